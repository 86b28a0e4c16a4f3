"""How good are the pixel labels that `lnl` and `fsae` train on? Measured on a trained checkpoint.

Both methods supervise pixels with labels they derive online from the network itself:
`lnl`'s FSCM seeds (Eqs. 1-3, with the softmax or the cosine similarity of Eq. 1) and
`fsae`'s confident online pseudo-labels (Eqs. 6-8). This script runs a checkpoint over
training images without augmentation and scores those labels against the ground-truth
masks, at feature resolution (each cell takes the ground truth at its centre):
coverage (share of image cells that get a label) and precision (share of labelled cells
whose label is right), split into background and foreground labels.

    python benchmarks/online_labels.py --checkpoint RUN_DIR --data SHARDS [--images 200]
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch

from wsss.datasets.reading import eval_rows
from wsss.methods.fsae import class_scores, online_pseudo_labels
from wsss.methods.lnl import Config as LNLConfig
from wsss.methods.lnl import class_maps_with_background, consistency_scores, feature_similarity, seed_labels
from wsss.platform.cams import image_tensor
from wsss.platform.checkpoints import load_method

IGNORE = 255


def cell_labels(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Ground truth [h,w] at the centres of an h×w grid over the mask."""
    rows = ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int)
    return torch.from_numpy(mask[np.ix_(rows, cols)].astype(np.int64))


class Tally:
    """Counts of labelled cells and correct ones, for background and foreground labels."""

    def __init__(self):
        self.cells = self.bg = self.bg_right = self.fg = self.fg_right = 0

    def add(self, labels: torch.Tensor, truth: torch.Tensor) -> None:
        known = truth != IGNORE
        labelled = (labels != IGNORE) & known
        right = labelled & (labels == truth)
        self.cells += int(known.sum())
        self.bg += int((labelled & (labels == 0)).sum())
        self.bg_right += int((right & (labels == 0)).sum())
        self.fg += int((labelled & (labels > 0)).sum())
        self.fg_right += int((right & (labels > 0)).sum())

    def summary(self) -> dict:
        def share(part: int, whole: int) -> float:
            return part / whole if whole else float("nan")

        return {"coverage": share(self.bg + self.fg, self.cells),
                "precision": share(self.bg_right + self.fg_right, self.bg + self.fg),
                "bg_coverage": share(self.bg, self.cells), "bg_precision": share(self.bg_right, self.bg),
                "fg_coverage": share(self.fg, self.cells), "fg_precision": share(self.fg_right, self.fg)}


def measure(checkpoint: str, data: str, split: str, images: int) -> dict:
    method, state = load_method(checkpoint)
    sections = state["config"].get("sections", {})
    lnl = LNLConfig(**sections["lnl"]) if "lnl" in sections else LNLConfig()
    fsae = sections.get("fsae", {})
    tau_fae, tau_sae, kernel = fsae.get("tau_fae", 0.95), fsae.get("tau_sae", 0.8), fsae.get("kernel", 3)
    tallies = {"fscm cosine": Tally(), "fscm softmax": Tally(), "fsae": Tally()}
    best_scores = {"cosine": [], "softmax": []}
    for row in itertools.islice(eval_rows(data, split), images):
        with torch.no_grad():
            out = method.network(image_tensor(row["image"], torch.device("cpu")))
            features, logits = out["features"], out["cam_logits"]
            labels = torch.from_numpy(np.asarray(row["labels"], np.float32))[None]
            truth = cell_labels(row["mask"], tuple(logits.shape[2:]))[None]
            class_maps = class_maps_with_background(logits, labels)
            for kind in ("cosine", "softmax"):  # FSCM as in training (a whole image: no padding)
                scores = consistency_scores(feature_similarity(features, kind), class_maps)
                tallies[f"fscm {kind}"].add(seed_labels(scores, lnl.eta, lnl.erosion), truth)
                best_scores[kind].append(scores.amax(dim=1).flatten().numpy())  # what η is compared with
            pseudo, confident = online_pseudo_labels(class_scores(logits, 0.0, labels), tau_fae, tau_sae, kernel)
            tallies["fsae"].add(pseudo.masked_fill(~confident, IGNORE), truth)
    report = {name: tally.summary() for name, tally in tallies.items()}
    for kind, values in best_scores.items():
        report[f"fscm {kind}"]["median_best_score"] = float(np.median(np.concatenate(values)))
    return {"checkpoint": checkpoint, "method": state["config"]["method"], "images": images,
            "eta": lnl.eta, "erosion": lnl.erosion, "tau_fae": tau_fae, "tau_sae": tau_sae, "kernel": kernel,
            "labels": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, action="append", help="run or checkpoint dir (repeatable)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [measure(c, args.data, args.split, args.images) for c in args.checkpoint]
    print("| checkpoint | labels | median best Eq. 2 score | coverage | precision | bg cov. | bg prec. "
          "| fg cov. | fg prec. |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for name, s in result["labels"].items():
            best = s.get("median_best_score")
            print(f"| {result['checkpoint'].rstrip('/').rsplit('/', 1)[-1]} | {name} | "
                  f"{'—' if best is None else f'{best:.3f}'} | {s['coverage']:.3f} | {s['precision']:.3f} | "
                  f"{s['bg_coverage']:.3f} | {s['bg_precision']:.3f} | {s['fg_coverage']:.3f} | "
                  f"{s['fg_precision']:.3f} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
