"""`csrm` trained with the ground truth as its L_s labels, beside the same run with its CRF labels.

Is it `csrm`'s code or its labels that keep its segmentation branch at the all-background
floor on the synthetic benchmark? `--labels ground-truth` trains L_s (Eq. 7) on the batch's
augmented ground-truth mask (255 on void and padding) in place of the teacher's CRF-refined
CAM labels (Eq. 6); every other term, the teacher and the schedules are unchanged. That is not
weakly supervised: it is the upper bound of the method when Eq. 6's labels are right.
`--labels crf` is the method as it is, in the same loop. `--ground-truth-epochs N` switches
from the ground truth to the CRF labels after N epochs: does the method hold on to what it
learnt when its own labels take over?

The plain loop (no Ray) with the demo's `csrm` settings at the results protocol: ResNet-18
from scratch, output stride 8, 96-px crops, batch 16, lr 0.05 (decoders 0.01), 4 epochs,
validation on the first 100 val images after each epoch. At the end, single-scale mIoU of
the segmentation branch and of the CAMs (best threshold) over the whole val split.

    python benchmarks/csrm_oracle.py --data results/demo/shards --labels ground-truth --seed 0
    python benchmarks/csrm_oracle.py --data results/demo/shards --labels crf --seed 0
    python benchmarks/csrm_oracle.py --data results/demo/shards --labels ground-truth --ground-truth-epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import wsss.platform.plain as plain
from wsss.datasets.reading import eval_rows
from wsss.datasets.shards import read_manifest
from wsss.methods.csrm import CSRM, CRFPseudoLabeler
from wsss.platform.cams import best_threshold
from wsss.platform.config import TrainConfig
from wsss.platform.loop import evaluate_rows
from wsss.platform.metrics import miou


class GroundTruthLabels:
    """Stands in for `PendingPseudoLabels`: the batch's augmented mask."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def result(self, device) -> torch.Tensor:
        return self.mask.to(device).long()


def train_on_ground_truth(epochs: int | None) -> None:
    """Patches the plain loop's pipeline to carry the mask, and `csrm` to train L_s on it for
    its first `epochs` epochs (all of them when None), then on its CRF labels."""
    augment_config = plain.augment_config

    def with_mask(config):
        augment = augment_config(config)
        return dataclasses.replace(augment, views=augment.views | {"mask"})

    plain.augment_config = with_mask
    submit, before_forward = CRFPseudoLabeler.submit, CSRM.before_forward
    phase = {"ground_truth": True}
    # No CRF work to throw away while the ground truth is used.
    CRFPseudoLabeler.submit = lambda self, *args: submit(self, *args) if not phase["ground_truth"] else None

    def before_forward_with_ground_truth(self, batch, progress):
        phase["ground_truth"] = epochs is None or progress.step < epochs * progress.steps_per_epoch
        added = before_forward(self, batch, progress)
        if phase["ground_truth"]:
            added["csrm_step"].pseudo_labels = GroundTruthLabels(batch["mask"])
        return added

    CSRM.before_forward = before_forward_with_ground_truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="shards of the synthetic benchmark")
    parser.add_argument("--labels", choices=("crf", "ground-truth"), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ground-truth-epochs", type=int, default=None,
                        help="with --labels ground-truth: only for these first epochs, then the CRF labels")
    args = parser.parse_args()
    if args.ground_truth_epochs is not None and args.labels != "ground-truth":
        parser.error("--ground-truth-epochs needs --labels ground-truth")
    if args.labels == "ground-truth":
        train_on_ground_truth(args.ground_truth_epochs)
    # The plain loop writes no checkpoints and logs nothing to W&B.
    config = TrainConfig(method="csrm", data=args.data, name="csrm-oracle", seed=args.seed, backbone="resnet18",
                         backbone_weights="none", output_stride=8, epochs=args.epochs, batch_size=16, crop_size=96,
                         lr=0.05, eval_every=1, eval_max_images=100).with_overrides({"csrm.decoder_lr_mult": 0.2})
    start = time.perf_counter()

    def report(metrics: dict) -> None:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
                 if k in ("epoch", "epoch_time_s", "miou", "threshold", "seg_miou", "csrm/crf_labelled_fg")
                 or k.startswith("loss/")}
        print(f"[{time.perf_counter() - start:.0f} s] {json.dumps(shown)}", flush=True)

    method, _ = plain.train_plain(config, on_epoch=report)
    classes = read_manifest(args.data).num_classes
    validation = evaluate_rows(method, eval_rows(args.data, "val"), num_classes=classes, device=torch.device("cpu"))
    seg_iou, seg_mean = miou(validation.segmentation)
    cams = best_threshold(validation.cams)
    labels = args.labels + (f" for {args.ground_truth_epochs} epoch(s)" if args.ground_truth_epochs is not None else "")
    print(f"labels {labels}, seed {args.seed}, all val, single scale: segmentation mIoU {100 * seg_mean:.2f} "
          f"(per class {[round(100 * float(x), 1) for x in seg_iou]}), CAM mIoU {100 * cams['miou']:.2f} "
          f"at threshold {cams['threshold']} (per class {[None if x is None else round(100 * x, 1) for x in cams['per_class_iou']]})")


if __name__ == "__main__":
    main()
