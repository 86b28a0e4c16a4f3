"""How clean are `lnl`'s seeds E_s, by FSCM similarity and η? Measured on a trained checkpoint.

    python benchmarks/lnl_seeds.py --checkpoint RUN --data SHARDS [--split dev] [--json OUT]

For each similarity of Eq. 1 (`softmax` as written, the clipped `cosine`, the authors' code's
`sigmoid` of the cosine) and each η, E_s (Eqs. 1-3 with the checkpoint's erosion, or 3×3)
is scored against the ground truth at feature resolution (each cell takes the ground truth at
its centre): coverage (share of cells that get a seed) and precision (share of seeds that are
right), for background and foreground seeds and per class. Any checkpoint with features and
CAM logits works (`cam`, `lnl`, ...). `choose` picks the setting a run should use. A reference
row scores the CAMs themselves at the same cells (each cell labelled with the argmax of FSCM's
input M, background = 1 − max foreground): what seeds would be with no feature similarity.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from wsss.datasets.base import IGNORE_INDEX
from wsss.datasets.reading import eval_rows
from wsss.methods.lnl import (
    SIMILARITY_KINDS,
    LNLConfig,
    class_maps_with_background,
    consistency_scores,
    feature_similarity,
    seed_labels,
)
from wsss.platform.cams import image_tensor
from wsss.platform.checkpoints import load_method

ETAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_PRECISION = 0.9  # a seed setting is usable when both its bg and fg seeds are at least this precise


def cell_truth(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The ground truth at the centres of an h×w grid of feature cells."""
    rows = ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int)
    return mask[np.ix_(rows, cols)]


@torch.no_grad()
def seed_counts(checkpoint: str, data: str, split: str, kinds=SIMILARITY_KINDS, etas=ETAS,
                max_images: int = 0) -> dict:
    """{(kind, eta): int64 [C, 2] seeds and right seeds per class (0 = background)} and the
    number of cells with a ground truth per class, summed over the split's images."""
    method, state = load_method(checkpoint)
    erosion = method.config.erosion if isinstance(method.config, LNLConfig) else LNLConfig().erosion
    classes = len(state["dataset"]["classes"])
    counts = {(kind, eta): np.zeros((classes, 2), np.int64) for kind in kinds for eta in etas}
    reference = np.zeros((classes, 2), np.int64)
    cells = np.zeros(classes, np.int64)
    for index, row in enumerate(eval_rows(data, split)):
        if max_images and index >= max_images:
            break
        out = method.network(image_tensor(row["image"], torch.device("cpu")))
        labels = torch.from_numpy(np.asarray(row["labels"], np.float32))[None]
        maps = class_maps_with_background(out["cam_logits"], labels)
        truth = cell_truth(np.asarray(row["mask"]), tuple(maps.shape[2:]))
        cells += np.bincount(truth[truth != IGNORE_INDEX], minlength=classes)[:classes]
        add_seeds(reference, maps.argmax(dim=1)[0].numpy(), truth, classes)
        for kind in kinds:
            scores = consistency_scores(feature_similarity(out["features"], kind), maps)
            for eta in etas:
                add_seeds(counts[(kind, eta)], seed_labels(scores, eta, erosion)[0].numpy(), truth, classes)
    return {"checkpoint": checkpoint, "split": split, "erosion": erosion, "classes": state["dataset"]["classes"],
            "cells": cells, "counts": counts, "reference": reference}


def add_seeds(counts: np.ndarray, seeds: np.ndarray, truth: np.ndarray, classes: int) -> None:
    """Adds seeds and right seeds per class of one image's seed map to counts [C, 2]."""
    seeded = (seeds != IGNORE_INDEX) & (truth != IGNORE_INDEX)
    counts[:, 0] += np.bincount(seeds[seeded], minlength=classes)[:classes]
    right = seeded & (seeds == truth)
    counts[:, 1] += np.bincount(seeds[right], minlength=classes)[:classes]


def summarise(measured: dict) -> list[dict]:
    """One row per (kind, η): coverage and precision of bg and fg seeds, and per class."""
    return [score_seeds(counts, measured, kind, eta) for (kind, eta), counts in measured["counts"].items()]


def reference_row(measured: dict) -> dict:
    """The CAMs' own argmax at the same cells, scored like a seed setting (η None)."""
    return score_seeds(measured["reference"], measured, "CAM argmax", None)


def score_seeds(counts: np.ndarray, measured: dict, kind: str, eta: float | None) -> dict:
    """Coverage and precision of bg and fg seeds, and per class, from counts [C, 2]."""
    cells = measured["cells"]
    share = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    fg = counts[1:].sum(axis=0)
    return {"kind": kind, "eta": eta,
            "bg_coverage": share(counts[0, 0], cells.sum()), "bg_precision": share(counts[0, 1], counts[0, 0]),
            "fg_coverage": share(fg[0], cells.sum()), "fg_precision": share(fg[1], fg[0]),
            # the share of each class's own cells that are right seeds of it
            "class_recall": {name: share(counts[c, 1], cells[c]) for c, name in enumerate(measured["classes"])},
            "class_precision": {name: share(counts[c, 1], counts[c, 0]) for c, name in enumerate(measured["classes"])}}


def choose(rows: list[dict]) -> dict:
    """The setting with the most foreground seeds among those whose background and foreground
    seeds are both at least MIN_PRECISION precise; without one, the setting with the most
    right seeds per cell among those that give both background and foreground seeds (the
    contrast needs prototypes of both)."""
    usable = [r for r in rows if r["bg_precision"] >= MIN_PRECISION and r["fg_precision"] >= MIN_PRECISION]
    if usable:
        return max(usable, key=lambda r: r["fg_coverage"])
    both = [r for r in rows if r["bg_coverage"] > 0 and r["fg_coverage"] > 0] or rows
    return max(both, key=lambda r: np.nan_to_num(r["bg_coverage"] * r["bg_precision"])
               + np.nan_to_num(r["fg_coverage"] * r["fg_precision"]))


def table(rows: list[dict]) -> str:
    lines = ["| similarity | η | bg coverage | bg precision | fg coverage | fg precision |", "|---|---|---|---|---|---|"]
    for r in rows:
        eta = "—" if r["eta"] is None else f"{r['eta']:.1f}"
        lines.append(f"| {r['kind']} | {eta} | {r['bg_coverage']:.3f} | {r['bg_precision']:.3f} | "
                     f"{r['fg_coverage']:.3f} | {r['fg_precision']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--max-images", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    measured = seed_counts(args.checkpoint, args.data, args.split, max_images=args.max_images)
    rows = summarise(measured)
    print(table(rows + [reference_row(measured)]))
    print(f"foreground cells: {measured['cells'][1:].sum() / measured['cells'].sum():.3f} of all cells")
    best = choose(rows)
    print(f"chosen: similarity={best['kind']} eta={best['eta']} (fg coverage {best['fg_coverage']:.3f}, "
          f"fg precision {best['fg_precision']:.3f}, bg precision {best['bg_precision']:.3f})")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"rows": rows, "chosen": best, "reference": reference_row(measured)}, file, indent=1)


if __name__ == "__main__":
    main()
