"""Metrics against hand-computed confusion matrices and counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss.datasets.base import REGION_BACKGROUND, REGION_BODY, REGION_CONTEXT, REGION_PART
from wsss.platform.cams import region_counts
from wsss.platform.metrics import (
    confusion_matrix,
    cooccurrence_confusion,
    cooccurring_pairs,
    foreground_error_rates,
    miou,
    out_of_candidate_counts,
    out_of_candidate_rate,
    region_rates,
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


def test_region_rates_of_a_hand_built_case():
    """One object of class 1: a 2-pixel head (one hit), a 4-pixel body (one hit, one pixel
    void), and 3 pixels of context labelled background (one predicted as an object)."""
    P, B, C, G = REGION_PART, REGION_BODY, REGION_CONTEXT, REGION_BACKGROUND
    region = torch.tensor([[P, P, B, B], [B, B, C, C], [C, G, G, G]])
    gt = torch.tensor([[1, 1, 1, 255], [1, 1, 0, 0], [0, 0, 0, 0]])
    pred = torch.tensor([[1, 0, 1, 1], [0, 2, 0, 1], [0, 1, 1, 0]])
    counts = region_counts(pred[None], gt, region)
    np.testing.assert_array_equal(counts, [[1, 2, 1, 3, 1, 3]])
    rates = region_rates(counts[0].numpy())
    assert rates == pytest.approx({"part_recall": 1 / 2, "body_recall": 1 / 3, "context_fpr": 1 / 3})
    assert all(math.isnan(v) for v in region_rates(np.zeros(6)).values())


def test_region_counts_match_a_pixel_loop_at_every_threshold():
    generator = torch.Generator().manual_seed(0)
    region = torch.randint(0, 4, (9, 11), generator=generator)
    gt = torch.randint(0, 4, (9, 11), generator=generator)
    gt[0, :5] = 255
    predictions = torch.randint(0, 4, (5, 9, 11), generator=generator)
    expected = np.zeros((5, 6), np.int64)
    for t in range(5):
        for y in range(9):
            for x in range(11):
                label, kind, guess = int(gt[y, x]), int(region[y, x]), int(predictions[t, y, x])
                if label == 255:
                    continue
                for column, wanted in ((0, REGION_PART), (2, REGION_BODY)):
                    if kind == wanted and label > 0:
                        expected[t, column] += guess == label
                        expected[t, column + 1] += 1
                if kind == REGION_CONTEXT:
                    expected[t, 4] += guess > 0
                    expected[t, 5] += 1
    np.testing.assert_array_equal(region_counts(predictions, gt, region).numpy(), expected)


def test_cooccurring_pairs_need_each_class_in_half_the_images_of_the_other():
    # columns: background, horse, rider, dog. Rider is in all 3 horse images, horse in 3 of
    # the 4 rider images; dog is in 1 of the 3 horse images, horse in 1 of the 2 dog images.
    labels = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 1, 0]], dtype=bool)
    assert cooccurring_pairs(labels) == [(1, 2)]
    assert cooccurring_pairs(labels, min_share=0.25) == [(1, 2), (1, 3), (2, 3)]


def test_cooccurrence_confusion_counts_each_pair_both_ways():
    conf = np.array([[50, 1, 2, 0],
                     [3, 10, 4, 1],   # horse: 4 predicted as rider
                     [0, 6, 20, 0],   # rider: 6 predicted as horse
                     [0, 0, 0, 5]])
    assert cooccurrence_confusion(conf, [(1, 2)]) == pytest.approx((4 + 6) / (18 + 26))
    assert math.isnan(cooccurrence_confusion(conf, []))
