"""`csrm`'s CRF pseudo-labels (`wsss/methods/csrm_pseudo.py`, Eqs. 2 and 6), in this process
and from worker processes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from wsss.methods.csrm_pseudo import CRFPseudoLabeler, cam_pseudo_label, default_workers
from wsss.ops.crf import dense_crf_labels

K = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def square_scene(size: int = 32):
    """A bright square (CAM 1), a mid-grey ring around it (CAM 0.2), dark elsewhere (CAM 0)."""
    rng = np.random.default_rng(0)
    region = np.zeros((size, size), np.int64)
    region[4:28, 4:28] = 1
    region[10:22, 10:22] = 2
    colours = np.array([30, 120, 230])
    image = (colours[region][..., None] + rng.integers(-5, 6, (size, size, 3))).clip(0, 255).astype(np.uint8)
    cam = np.array([0.0, 0.2, 1.0], np.float32)[region] * 3.0  # logits; ψ divides by the max
    return image, cam[None], region


def test_pseudo_label_is_class_where_confident_background_where_cold_and_uncertain_between():
    image, cams, region = square_scene()
    valid = np.ones(region.shape, bool)
    valid[:, -2:] = False
    labels = cam_pseudo_label(image, cams, np.array([3]), valid, 0.35, 0.05)
    inside = np.zeros_like(valid)
    inside[2:-2, 2:-4] = True  # away from region borders and padding
    for value, expected in ((2, 3), (1, 255), (0, 0)):
        core = (region == value) & inside
        assert (labels[core] == expected).mean() > 0.95, (value, np.unique(labels[core], return_counts=True))
    assert (labels[:, -2:] == 255).all(), "padding is never labelled"
    none = cam_pseudo_label(image, cams[:0], np.array([], np.int64), valid, 0.35, 0.05)
    assert (none[valid] == 0).all()


def reference_pseudo_label(image, cams, class_ids, fg_threshold, bg_threshold):
    """Eq. 6 pixel by pixel from two CRFs of their own: ψ = the CAMs' ReLU over each map's max."""
    psi = np.maximum(cams, 0) / np.maximum(np.maximum(cams, 0).max(axis=(1, 2), keepdims=True), 1e-5)
    refined = {}
    for name, threshold in (("fg", fg_threshold), ("bg", bg_threshold)):
        scores = np.concatenate([np.full((1, *psi.shape[1:]), threshold, np.float32), psi])
        refined[name] = dense_crf_labels(image, scores.argmax(axis=0), len(scores)).argmax(axis=0)
    labels = np.empty(image.shape[:2], np.uint8)
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            if refined["fg"][y, x] > 0:
                labels[y, x] = class_ids[refined["fg"][y, x] - 1]
            else:
                labels[y, x] = 0 if refined["bg"][y, x] == 0 else 255
    return labels


def test_pseudo_label_equals_a_crf_per_threshold():
    image, cams, _ = square_scene()
    rng = np.random.default_rng(1)
    two_classes = np.concatenate([cams, rng.random((1, 32, 32), dtype=np.float32) * 2.0])
    valid = np.ones((32, 32), bool)
    for thresholds in ((0.35, 0.05), (0.6, 0.2)):
        expected = reference_pseudo_label(image, two_classes, np.array([1, 3]), *thresholds)
        np.testing.assert_array_equal(cam_pseudo_label(image, two_classes, np.array([1, 3]), valid, *thresholds),
                                      expected)


@pytest.mark.parametrize("overlap", [None, True])
def test_pseudo_labels_from_worker_processes_equal_the_in_process_ones(overlap):
    image, cams, _ = square_scene()
    raw = torch.from_numpy(np.stack([image, image[::-1].copy()]))
    cam_logits = torch.zeros(2, K, 32, 32)
    cam_logits[0, 1] = torch.from_numpy(cams[0])
    cam_logits[1, 2] = torch.from_numpy(cams[0]).flip(0)
    labels = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    in_process = CRFPseudoLabeler(0, 0.35, 0.05).submit(raw, cam_logits, labels, valid).result("cpu")
    pooled_labeler = CRFPseudoLabeler(1, 0.35, 0.05, overlap=overlap)  # None on CPU CAMs: sent at result
    pooled = pooled_labeler.submit(raw, cam_logits, labels, valid).result("cpu")
    assert torch.equal(pooled, in_process)
    assert set(in_process[0].unique().tolist()) == {0, 2, 255} and 3 in in_process[1].unique().tolist()
    assert pooled_labeler.wait_seconds > 0


def test_automatic_workers_leave_a_core_to_the_step_only_when_the_crf_overlaps_it():
    cores = len(os.sched_getaffinity(0))
    assert default_workers(overlap=False) == cores
    assert default_workers(overlap=True) == max(1, cores - 1)
    labeler = CRFPseudoLabeler(-1, 0.35, 0.05)
    assert labeler.workers is None
    image, cams, _ = square_scene()
    labeler.submit(torch.from_numpy(image)[None], torch.from_numpy(cams)[None], torch.ones(1, 1),
                   torch.ones(1, 32, 32, dtype=torch.bool))  # CPU CAMs: not sent before result, nothing runs
    assert labeler.workers == cores
