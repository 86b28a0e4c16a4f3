"""In-training validation (`loop.evaluate_rows`, `epoch_metrics`): stage-1 methods are
scored by their CAMs, stage 2 by its segmentation argmax, and a method with both (csrm)
reports both. No Ray: the same code runs on Ray Train workers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT
from wsss.methods.base import BackboneConfig, build_method
from wsss.platform.cams import image_tensor
from wsss.platform.loop import EpochStats, epoch_metrics, evaluate_rows, overlay_predictions

NUM_CLASSES = 3
BACKBONE = BackboneConfig(arch="resnet18", output_stride=16, weights="none")


def rows(count=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        height, width = 40 + 8 * index, 48
        mask = rng.integers(0, NUM_CLASSES + 1, (height, width)).astype(np.uint8)
        mask[:3] = 255  # void is not counted
        out.append({"id": f"r{index}", "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                    "mask": mask, "labels": np.array([1, 0, 1], np.float32)})
    return out


def method(spec):
    torch.manual_seed(0)
    return build_method(spec, NUM_CLASSES, backbone=BACKBONE).eval()


def reference_segmentation_confusion(model, samples):
    """Pixel by pixel: argmax over K+1 of the logits upsampled to the image, against the mask."""
    classes = NUM_CLASSES + 1
    model.eval()  # evaluate_rows left it in training mode
    confusion = np.zeros((classes, classes), np.int64)
    for row in samples:
        with torch.no_grad():
            logits = model.segmentation_logits(image_tensor(row["image"], torch.device("cpu")))
            logits = F.interpolate(logits, size=row["mask"].shape, mode="bilinear", align_corners=False)[0]
        for y in range(row["mask"].shape[0]):
            for x in range(row["mask"].shape[1]):
                truth = int(row["mask"][y, x])
                if truth != 255:
                    confusion[truth, int(logits[:, y, x].argmax())] += 1
    return confusion


def reference_miou(confusion):
    ious = []
    for c in range(len(confusion)):
        union = confusion[c].sum() + confusion[:, c].sum() - confusion[c, c]
        if union:
            ious.append(confusion[c, c] / union)
    return float(np.mean(ious))


def test_stage_2_is_validated_by_its_segmentation_argmax_not_by_cams():
    model, samples = method("deeplab"), rows()
    validation = evaluate_rows(model, samples, num_classes=NUM_CLASSES, device=torch.device("cpu"), keep_overlays=2)
    assert validation.cams is None and model.training  # handed back in training mode
    np.testing.assert_array_equal(validation.segmentation, reference_segmentation_confusion(model, samples))
    metrics = epoch_metrics(EpochStats(), validation, epoch=0)
    assert "threshold" not in metrics  # no CAM sweep for a segmentation network
    assert metrics["miou"] == metrics["seg_miou"] == pytest.approx(reference_miou(validation.segmentation))
    pictures = overlay_predictions(validation.overlays, metrics.get("threshold"))
    assert [p["id"] for p in pictures] == ["r0", "r1"]
    assert pictures[0]["prediction"].shape == samples[0]["mask"].shape


def test_stage_1_is_validated_by_its_cams_and_has_no_segmentation_score():
    validation = evaluate_rows(method("cam"), rows(), num_classes=NUM_CLASSES, device=torch.device("cpu"))
    assert validation.segmentation is None and validation.cams.shape[1:] == (NUM_CLASSES + 1, NUM_CLASSES + 1)
    metrics = epoch_metrics(EpochStats(), validation, epoch=0)
    assert "threshold" in metrics and "seg_miou" not in metrics


def test_csrm_reports_its_cams_as_the_objective_and_its_segmentation_branch_beside_them():
    model, samples = method("csrm"), rows(2)
    validation = evaluate_rows(model, samples, num_classes=NUM_CLASSES, device=torch.device("cpu"), keep_overlays=1)
    np.testing.assert_array_equal(validation.segmentation, reference_segmentation_confusion(model, samples))
    metrics = epoch_metrics(EpochStats(), validation, epoch=0)
    assert metrics["seg_miou"] == pytest.approx(reference_miou(validation.segmentation))
    assert "threshold" in metrics and metrics["miou"] != metrics["seg_miou"]
    assert "cams" in validation.overlays[0]  # W&B shows its CAMs at the chosen threshold


def test_read_only_rows_and_labels_are_read_without_a_torch_warning():
    """Ray hands rows (and the labels a worker gets) over read-only; torch warns once per
    process when a tensor would share such memory, so this runs in a process of its own."""
    script = """
import warnings

import numpy as np
import torch

from wsss.methods.base import BackboneConfig, build_method
from wsss.platform.config import TrainConfig
from wsss.platform.loop import evaluate_rows, set_up


def read_only(array):
    array.setflags(write=False)
    return array


warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    config = TrainConfig(method="cam", data="unused", backbone="resnet18", backbone_weights="none")
    set_up(config, num_classes=3, image_labels=read_only(np.ones((4, 4), bool)), device=torch.device("cpu"))
    row = {"id": "r", "image": read_only(np.zeros((32, 32, 3), np.uint8)),
           "mask": read_only(np.zeros((32, 32), np.uint8)), "region": read_only(np.zeros((32, 32), np.uint8)),
           "labels": read_only(np.array([1, 0, 1], np.float32))}
    torch.manual_seed(0)
    evaluate_rows(build_method("cam", 3, backbone=BackboneConfig("resnet18", 16, "none")), [row], num_classes=3,
                  device=torch.device("cpu"))
print([str(w.message) for w in caught if "not writable" in str(w.message)])
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout

