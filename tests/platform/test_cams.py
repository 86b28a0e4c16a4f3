"""CAM post-processing and the one-pass threshold sweep against the plain metric functions."""

import numpy as np
import torch

from wsss.methods.base import BackboneConfig, build_method
from wsss.platform.cams import THRESHOLDS, best_threshold, normalized_cams, threshold_confusions, writable_tensor
from wsss.platform.metrics import confusion_matrix, miou


def test_threshold_sweep_equals_per_threshold_confusion_matrices():
    generator = torch.Generator().manual_seed(0)
    cams = torch.rand(3, 20, 24, generator=generator)
    gt = torch.randint(0, 4, (20, 24), generator=generator)
    gt[:3] = 255
    sweep = threshold_confusions(cams, gt, 4).numpy()
    for index, t in enumerate(THRESHOLDS):
        best, cls = cams.max(0)
        pred = torch.where(best >= t, cls + 1, 0)
        np.testing.assert_array_equal(sweep[index], confusion_matrix(pred.numpy(), gt.numpy(), 4))


def test_best_threshold_picks_the_best_miou():
    cams = torch.zeros(1, 8, 8)
    cams[0, :4] = 0.6  # object rows, all other pixels 0
    gt = torch.zeros(8, 8, dtype=torch.long)
    gt[:4] = 1
    best = best_threshold(threshold_confusions(cams, gt, 2).numpy())
    assert best["miou"] == 1.0 and best["threshold"] <= 0.6
    assert best["miou_by_threshold"]["0.65"] == miou(np.array([[32, 0], [32, 0]]))[1]


def test_normalized_cams_are_in_unit_range_and_zero_for_absent_classes():
    method = build_method("cam", 3, backbone=BackboneConfig("resnet18", 16, "none")).eval()
    image = torch.randn(1, 3, 40, 56)
    cams = normalized_cams(method, image, torch.tensor([1.0, 0.0, 1.0]), scales=(1.0, 0.5), flip=True)
    assert cams.shape == (3, 40, 56)
    assert cams[1].abs().max() == 0
    assert 0 <= cams.min() and cams.max() <= 1 + 1e-6


def test_writable_tensor_copies_a_read_only_array_and_shares_a_writable_one():
    read_only = np.arange(6, dtype=np.uint8)
    read_only.setflags(write=False)  # as Ray hands rows over
    copied = writable_tensor(read_only)
    copied[0] = 9
    assert read_only[0] == 0 and copied.dtype == torch.uint8
    assert writable_tensor(read_only, np.int64).tolist() == list(range(6))
    assert writable_tensor(read_only, np.int64).dtype == torch.int64
    writable = np.arange(6, dtype=np.int64)
    shared = writable_tensor(writable, np.int64)
    shared[0] = 9
    assert writable[0] == 9, "a writable array of the dtype asked for is not copied"

