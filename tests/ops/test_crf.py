"""Dense CRF over real pydensecrf: it cleans a noisy map, and uses the presets' numbers."""

from __future__ import annotations

import numpy as np
import pytest
from pydensecrf import densecrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from wsss.ops.crf import PRESETS, dense_crf, dense_crf_labels

SIZE = 48


def two_region_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark left part, bright right part (slight pixel noise) and its true labels."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((SIZE, SIZE), np.int64)
    truth[:, SIZE // 2 + 5:] = 1
    image = np.where(truth[..., None] == 1, 200, 40) + rng.integers(-8, 9, (SIZE, SIZE, 3))
    return image.clip(0, 255).astype(np.uint8), truth


def noisy_probs(truth: np.ndarray, seed: int = 1) -> np.ndarray:
    """Truth blurred to 0.3/0.7 plus strong noise: about a fifth of the pixels wrong."""
    rng = np.random.default_rng(seed)
    foreground = (0.3 + 0.4 * truth + rng.normal(0, 0.25, truth.shape)).clip(0.01, 0.99)
    return np.stack([1 - foreground, foreground]).astype(np.float32)


def foreground_iou(labels: np.ndarray, truth: np.ndarray) -> float:
    return ((labels == 1) & (truth == 1)).sum() / ((labels == 1) | (truth == 1)).sum()


@pytest.mark.parametrize("preset", ["psa", "irn"])
def test_dense_crf_improves_noisy_probabilities(preset):
    image, truth = two_region_image()
    probs = noisy_probs(truth)
    before = foreground_iou(probs.argmax(0), truth)
    refined = dense_crf(image, probs, preset=preset)
    after = foreground_iou(refined.argmax(0), truth)
    assert before < 0.85
    assert after > before + 0.1 and after > 0.95
    assert refined.dtype == np.float32 and refined.shape == probs.shape
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)


def test_dense_crf_labels_cleans_salt_and_pepper_labels():
    image, truth = two_region_image()
    rng = np.random.default_rng(2)
    noisy = np.where(rng.random(truth.shape) < 0.2, 1 - truth, truth)
    refined = dense_crf_labels(image, noisy, num_labels=2)
    assert refined.dtype == np.float32 and refined.shape == (2, SIZE, SIZE)
    assert foreground_iou(refined.argmax(0), truth) > foreground_iou(noisy, truth) + 0.1


def reference_crf(image, unary, num_labels, gaussian, bilateral):
    """pydensecrf called by hand with the published numbers."""
    crf = densecrf.DenseCRF2D(image.shape[1], image.shape[0], num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
    crf.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=np.ascontiguousarray(image),
                             compat=bilateral[2])
    return np.array(crf.inference(10)).reshape(num_labels, *image.shape[:2])


def test_psa_preset_is_psa_parameters_on_softmax_unary():
    image, truth = two_region_image()
    probs = noisy_probs(truth)
    expected = reference_crf(image, unary_from_softmax(probs), 2, gaussian=(3, 3), bilateral=(80, 13, 10))
    np.testing.assert_allclose(dense_crf(image, probs, preset="psa"), expected, atol=1e-6)
    assert not np.allclose(dense_crf(image, probs, preset="irn"), expected, atol=1e-3)


def test_irn_preset_is_irn_parameters_on_label_unary():
    image, truth = two_region_image()
    labels = noisy_probs(truth).argmax(0)
    unary = unary_from_labels(labels, 2, gt_prob=0.7, zero_unsure=False)
    expected = reference_crf(image, unary, 2, gaussian=(3, 3), bilateral=(50, 5, 10))
    np.testing.assert_allclose(dense_crf_labels(image, labels, 2), expected, atol=1e-6)
    assert PRESETS["irn"].bilateral_sxy == 50 and PRESETS["psa"].bilateral_sxy == 80


def test_stacked_label_maps_refine_as_separate_crfs():
    image, truth = two_region_image()
    rng = np.random.default_rng(3)
    maps = np.stack([np.where(rng.random(truth.shape) < share, 1 - truth, truth) for share in (0.1, 0.3, 0.45)])
    refined = dense_crf_labels(image, maps, num_labels=2)
    assert refined.dtype == np.float32 and refined.shape == (3, 2, SIZE, SIZE)
    for label_map, result in zip(maps, refined, strict=True):
        np.testing.assert_array_equal(result, dense_crf_labels(image, label_map, num_labels=2))
    assert not np.array_equal(refined[0], refined[2])


def test_non_contiguous_image_is_accepted():
    image, truth = two_region_image()
    probs = noisy_probs(truth)
    flipped = image[:, ::-1]
    refined = dense_crf(flipped, probs[:, :, ::-1].copy())
    np.testing.assert_allclose(refined, dense_crf(flipped.copy(), probs[:, :, ::-1].copy()), atol=1e-6)


@pytest.mark.parametrize("make_args, message", [
    (lambda img, p: (img.astype(np.float32), p), "uint8"),
    (lambda img, p: (img[..., :2].copy(), p), r"\[H,W,3\]"),
    (lambda img, p: (img, p[:, :-1]), "matching the image"),
    (lambda img, p: (img, -p), "non-negative"),
    (lambda img, p: (img, list(p)), "numpy array"),
])
def test_dense_crf_rejects_bad_input(make_args, message):
    image, truth = two_region_image()
    with pytest.raises(ValueError, match=message):
        dense_crf(*make_args(image, noisy_probs(truth)))


def test_dense_crf_rejects_unknown_preset_and_bad_labels():
    image, truth = two_region_image()
    with pytest.raises(ValueError, match="unknown preset 'crf'"):
        dense_crf(image, noisy_probs(truth), preset="crf")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        dense_crf_labels(image, truth + 1, num_labels=2)
    with pytest.raises(ValueError, match="integer"):
        dense_crf_labels(image, truth.astype(np.float32), num_labels=2)
    with pytest.raises(ValueError, match="matching the image"):
        dense_crf_labels(image, truth[None, None], num_labels=2)
