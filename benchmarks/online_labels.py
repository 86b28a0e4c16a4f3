"""How good are the pixel labels that `lnl`, `fsae` and `csrm` train on? Measured on a trained checkpoint.

These methods supervise pixels with labels they derive online from the network itself:
`lnl`'s FSCM seeds (Eqs. 1-3, with the softmax or the cosine similarity of Eq. 1),
`fsae`'s confident online pseudo-labels (Eqs. 6-8), and `csrm`'s CRF pseudo-labels of its
L_s (Eq. 6, from the teacher's CAMs; from the network's own for other methods' checkpoints).
This script runs a checkpoint over training images without augmentation and scores those
labels against the ground-truth masks: at feature resolution for `lnl` and `fsae` (each
cell takes the ground truth at its centre), at image size for `csrm`'s. Coverage is the
share of pixels (cells) that get a label, precision the share of labelled ones whose label
is right, split into background and foreground labels. For `csrm` checkpoints the teacher's
segmentation branch is scored too (it labels every pixel).

    python benchmarks/online_labels.py --checkpoint RUN_DIR --data SHARDS [--images 200]
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch
import torch.nn.functional as F

from wsss.datasets.base import IGNORE_INDEX
from wsss.datasets.reading import eval_rows
from wsss.methods.csrm import CSRMConfig
from wsss.methods.csrm_pseudo import cam_pseudo_label
from wsss.methods.fsae import FSAEConfig, class_scores, online_pseudo_labels
from wsss.methods.lnl import LNLConfig, class_maps_with_background, consistency_scores, feature_similarity, seed_labels
from wsss.platform.cams import image_tensor
from wsss.platform.checkpoints import load_method
from wsss.platform.config import TrainConfig, stored_config

from lnl_seeds import cell_truth  # benchmarks/, beside this script


def cell_labels(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Ground truth [h,w] at the centres of an h×w grid over the mask."""
    return torch.from_numpy(cell_truth(mask, size).astype(np.int64))


class Tally:
    """Counts of labelled cells and correct ones, for background and foreground labels, and
    of foreground labels on ground-truth background (context a CAM leaked onto)."""

    def __init__(self):
        self.cells = self.bg = self.bg_right = self.fg = self.fg_right = self.fg_on_bg = 0

    def add(self, labels: torch.Tensor, truth: torch.Tensor) -> None:
        known = truth != IGNORE_INDEX
        labelled = (labels != IGNORE_INDEX) & known
        right = labelled & (labels == truth)
        self.cells += int(known.sum())
        self.bg += int((labelled & (labels == 0)).sum())
        self.bg_right += int((right & (labels == 0)).sum())
        self.fg += int((labelled & (labels > 0)).sum())
        self.fg_right += int((right & (labels > 0)).sum())
        self.fg_on_bg += int((labelled & (labels > 0) & (truth == 0)).sum())

    def summary(self) -> dict:
        def share(part: int, whole: int) -> float:
            return part / whole if whole else float("nan")

        return {"coverage": share(self.bg + self.fg, self.cells),
                "precision": share(self.bg_right + self.fg_right, self.bg + self.fg),
                "bg_coverage": share(self.bg, self.cells), "bg_precision": share(self.bg_right, self.bg),
                "fg_coverage": share(self.fg, self.cells), "fg_precision": share(self.fg_right, self.fg),
                "fg_on_background": share(self.fg_on_bg, self.fg)}


def measure(checkpoint: str, data: str, split: str, images: int, fg_thresholds: list[float]) -> dict:
    method, state = load_method(checkpoint)
    sections = TrainConfig.from_dict(stored_config(state["config"])).sections
    lnl, fsae = sections.get("lnl", LNLConfig()), sections.get("fsae", FSAEConfig())
    csrm = sections.get("csrm", CSRMConfig())
    teacher = getattr(method, "teacher", None)  # csrm's: its CAMs make the L_s labels
    fg_thresholds = fg_thresholds or [csrm.fg_threshold]
    tallies = {"fscm cosine": Tally(), "fscm softmax": Tally(), "fsae": Tally(),
               **{f"csrm crf δ_fg {fg:g}": Tally() for fg in fg_thresholds}}
    if teacher is not None:
        tallies["csrm segmentation"] = Tally()
    best_scores = {"cosine": [], "softmax": []}
    for row in itertools.islice(eval_rows(data, split), images):
        with torch.no_grad():
            image = image_tensor(row["image"], torch.device("cpu"))
            out = method.network(image)
            features, logits = out["features"], out["cam_logits"]
            labels = torch.from_numpy(np.asarray(row["labels"], np.float32))[None]
            truth = cell_labels(row["mask"], tuple(logits.shape[2:]))[None]
            class_maps = class_maps_with_background(logits, labels)
            for kind in ("cosine", "softmax"):  # FSCM as in training (a whole image: no padding)
                scores = consistency_scores(feature_similarity(features, kind), class_maps)
                tallies[f"fscm {kind}"].add(seed_labels(scores, lnl.seed_threshold, lnl.erosion), truth)
                best_scores[kind].append(scores.amax(dim=1).flatten().numpy())  # what η is compared with
            pseudo, confident = online_pseudo_labels(class_scores(logits, 0.0, labels), fsae.fae_threshold,
                                                     fsae.sae_threshold, fsae.dilation_kernel)
            tallies["fsae"].add(pseudo.masked_fill(~confident, IGNORE_INDEX), truth)
            cams = teacher.cam_logits(image) if teacher is not None else logits
            ids = np.flatnonzero(labels[0].numpy() > 0.5)
            full_truth = torch.from_numpy(np.asarray(row["mask"], np.int64))[None]
            for fg in fg_thresholds:
                crf = cam_pseudo_label(np.asarray(row["image"]), cams[0, ids].numpy(), ids + 1,
                                       np.ones(row["mask"].shape, bool), fg, csrm.bg_threshold, csrm.crf_preset)
                tallies[f"csrm crf δ_fg {fg:g}"].add(torch.from_numpy(crf.astype(np.int64))[None], full_truth)
            if teacher is not None:
                seg = F.interpolate(teacher.seg_logits(image), size=row["mask"].shape, mode="bilinear",
                                    align_corners=False)
                tallies["csrm segmentation"].add(seg.argmax(dim=1), full_truth)
    report = {name: tally.summary() for name, tally in tallies.items()}
    for kind, values in best_scores.items():
        report[f"fscm {kind}"]["median_best_score"] = float(np.median(np.concatenate(values)))
    return {"checkpoint": checkpoint, "method": state["config"]["method"], "images": images,
            "seed_threshold": lnl.seed_threshold, "erosion": lnl.erosion, "fae_threshold": fsae.fae_threshold,
            "sae_threshold": fsae.sae_threshold, "dilation_kernel": fsae.dilation_kernel,
            "labels": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, action="append", help="run or checkpoint dir (repeatable)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--fg-thresholds", default="", help="δ_fg values for csrm's CRF labels, comma-separated "
                                                            "(default: the checkpoint's csrm.fg_threshold, or 0.35)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fg_thresholds = [float(value) for value in args.fg_thresholds.split(",") if value]
    results = [measure(c, args.data, args.split, args.images, fg_thresholds) for c in args.checkpoint]
    print("| checkpoint | labels | median best Eq. 2 score | coverage | precision | bg cov. | bg prec. "
          "| fg cov. | fg prec. | fg on bg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for name, s in result["labels"].items():
            best = s.get("median_best_score")
            print(f"| {result['checkpoint'].rstrip('/').rsplit('/', 1)[-1]} | {name} | "
                  f"{'—' if best is None else f'{best:.3f}'} | {s['coverage']:.3f} | {s['precision']:.3f} | "
                  f"{s['bg_coverage']:.3f} | {s['bg_precision']:.3f} | {s['fg_coverage']:.3f} | "
                  f"{s['fg_precision']:.3f} | {s['fg_on_background']:.3f} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
