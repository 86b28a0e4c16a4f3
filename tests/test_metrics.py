"""Metrics against hand-computed confusion matrices and counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss.platform.metrics import (
    confusion_matrix,
    foreground_error_rates,
    miou,
    out_of_candidate_counts,
    out_of_candidate_rate,
)


def test_confusion_matrix_matches_hand_count_and_skips_ignored_pixels():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    expected = np.array([[1, 1, 0],   # gt 0: one right, one predicted 1
                         [0, 1, 1],   # gt 1: one right, one predicted 2
                         [0, 0, 1]])  # gt 2: right; the 255 pixel is not counted
    conf = confusion_matrix(pred, gt, num_classes=3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, expected)


def test_confusion_matrix_accepts_torch_and_returns_numpy():
    gt = torch.tensor([[0, 1], [1, 1]])
    pred = torch.tensor([[0, 0], [1, 1]], dtype=torch.uint8)
    conf = confusion_matrix(pred, gt, num_classes=2)
    assert isinstance(conf, np.ndarray)
    np.testing.assert_array_equal(conf, [[1, 0], [1, 2]])


def test_confusion_matrix_custom_ignore_index():
    conf = confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 9]), num_classes=2, ignore_index=9)
    np.testing.assert_array_equal(conf, [[1, 0], [0, 1]])


@pytest.mark.parametrize("pred, gt, message", [
    (np.zeros((2, 3), int), np.zeros((3, 2), int), "shape"),
    (np.zeros(3, float), np.zeros(3, int), "integer"),
    (np.array([0, 3]), np.array([0, 1]), "pred holds label 3"),
    (np.array([0, 1]), np.array([0, 7]), "gt holds label 7"),
])
def test_confusion_matrix_rejects_bad_input(pred, gt, message):
    with pytest.raises((ValueError, TypeError), match=message):
        confusion_matrix(pred, gt, num_classes=3)


def test_confusion_matrix_ignores_any_prediction_on_ignored_pixels():
    conf = confusion_matrix(np.array([0, 255]), np.array([0, 255]), num_classes=2)
    np.testing.assert_array_equal(conf, [[1, 0], [0, 0]])


def test_miou_hand_computed_and_absent_class_excluded():
    conf = np.array([[3, 1, 0],
                     [1, 2, 0],
                     [0, 0, 0]])  # class 2 neither in gt nor predicted
    iou, mean = miou(conf)
    assert iou[0] == pytest.approx(3 / 5) and iou[1] == pytest.approx(2 / 4)
    assert math.isnan(iou[2])
    assert mean == pytest.approx((0.6 + 0.5) / 2)


def test_miou_counts_a_class_that_is_only_predicted():
    iou, mean = miou(np.array([[2, 1], [0, 0]]))
    assert iou.tolist() == pytest.approx([2 / 3, 0.0])
    assert mean == pytest.approx(1 / 3)


def test_miou_empty_matrix_is_nan():
    iou, mean = miou(np.zeros((3, 3), np.int64))
    assert np.isnan(iou).all() and math.isnan(mean)


def test_foreground_error_rates_hand_computed():
    conf = np.array([[6, 2, 2],   # background: 4 of 10 predicted as objects
                     [1, 4, 1],   # object 1: 1 predicted background (1 confused with 2: neither)
                     [3, 0, 5]])  # object 2: 3 predicted background
    fpr, fnr = foreground_error_rates(conf)
    assert fpr == pytest.approx(4 / 10)
    assert fnr == pytest.approx(4 / 14)


def test_foreground_error_rates_nan_without_background_or_objects():
    fpr, fnr = foreground_error_rates(np.array([[5, 1], [0, 0]]))
    assert fpr == pytest.approx(1 / 6) and math.isnan(fnr)


def test_out_of_candidate_rate_hand_computed():
    pred = np.array([[[0, 1], [2, 2]],    # image 0 labels {1}: the two 2s are OC
                     [[0, 0], [3, 0]]])   # image 1 labels {3}: nothing OC
    labels = np.array([[False, True, False, False],   # background allowed even when False
                       [True, False, False, True]])
    assert out_of_candidate_rate(pred, labels) == (pytest.approx(1 / 2), pytest.approx(2 / 8))
    assert out_of_candidate_counts(pred, labels) == {"images": 2, "oc_images": 1, "pixels": 8, "oc_pixels": 2}


def test_out_of_candidate_rate_counts_only_valid_pixels_and_accepts_torch():
    pred = torch.tensor([[[2, 1], [1, 1]]])
    labels = torch.tensor([[True, True, False]])
    valid = torch.tensor([[[False, True], [True, True]]])
    assert out_of_candidate_rate(pred, labels, valid) == (0.0, 0.0)
    assert out_of_candidate_rate(pred, labels) == (1.0, 0.25)


@pytest.mark.parametrize("pred, labels, message", [
    (np.zeros((2, 2), int), np.ones((1, 3), bool), r"\[B,H,W\]"),
    (np.zeros((1, 2, 2), int), np.ones((2, 3), bool), "bool"),
    (np.zeros((1, 2, 2), int), np.ones((1, 3), int), "bool"),
    (np.full((1, 2, 2), 3), np.ones((1, 3), bool), "outside"),
])
def test_out_of_candidate_rejects_bad_input(pred, labels, message):
    with pytest.raises(ValueError, match=message):
        out_of_candidate_rate(pred, labels)
