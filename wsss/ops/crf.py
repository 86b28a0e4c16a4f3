"""Fully connected CRF (Krähenbühl & Koltun) over pydensecrf with the two WSSS presets.

- "psa" (AffinityNet/PSA): gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10,
  unary = -log of the given probabilities (`dense_crf`).
- "irn" (IRN): gaussian sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10, and a unary from
  hard labels that trusts each label with probability 0.7 (`dense_crf_labels`).
Both run 10 mean-field iterations and return refined probabilities float32 [K,H,W];
take `argmax(0)` for labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydensecrf import densecrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax


@dataclass(frozen=True)
class CRFPreset:
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float


PRESETS = {
    "psa": CRFPreset(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10),
    "irn": CRFPreset(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=50, bilateral_srgb=5, bilateral_compat=10),
}
LABEL_GT_PROB = 0.7  # IRN's confidence in a hard label


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        kind = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"dense CRF: image must be a uint8 numpy array [H,W,3], got {kind}")
    # pydensecrf takes the raw buffer through a writable memoryview: copy read-only arrays
    # (np.asarray of a PIL image, Ray Data rows) and non-contiguous ones.
    return np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def _preset(name: str) -> CRFPreset:
    if name not in PRESETS:
        raise ValueError(f"dense CRF: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def _infer(image: np.ndarray, unaries: list[np.ndarray], num_labels: int, preset: CRFPreset,
           iterations: int) -> list[np.ndarray]:
    """Each unary's refined probabilities [num_labels,H,W]. The pairwise terms, whose lattices
    cost about as much to build as 10 iterations, are built once for all of them: inference
    reads them and the unary only, so every result is the one a CRF of its own gives."""
    if iterations < 1:
        raise ValueError(f"dense CRF: iterations must be >= 1, got {iterations}")
    height, width = image.shape[:2]
    crf = densecrf.DenseCRF2D(width, height, num_labels)
    crf.addPairwiseGaussian(sxy=preset.gaussian_sxy, compat=preset.gaussian_compat)
    crf.addPairwiseBilateral(sxy=preset.bilateral_sxy, srgb=preset.bilateral_srgb, rgbim=image,
                             compat=preset.bilateral_compat)
    refined = []
    for unary in unaries:
        crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        refined.append(np.asarray(crf.inference(iterations), dtype=np.float32).reshape(num_labels, height, width))
    return refined


def dense_crf(image: np.ndarray, probs: np.ndarray, preset: str = "psa", iterations: int = 10) -> np.ndarray:
    """Refines class probabilities with a dense CRF.

    image uint8 [H,W,3] (RGB, un-normalised); probs float [K,H,W], non-negative (e.g. CAMs
    with a background channel, or softmax output), clipped at 1e-5 before the log.
    Returns float32 [K,H,W] refined probabilities (each pixel sums to 1).
    """
    image = _check_image(image)
    config = _preset(preset)
    if not isinstance(probs, np.ndarray) or probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        shape = probs.shape if isinstance(probs, np.ndarray) else type(probs).__name__
        raise ValueError(f"dense CRF: probs must be a numpy array [K,{image.shape[0]},{image.shape[1]}] "
                         f"matching the image, got {shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("dense CRF: probs must be finite and non-negative")
    return _infer(image, [unary_from_softmax(probs)], probs.shape[0], config, iterations)[0]


def dense_crf_labels(image: np.ndarray, labels: np.ndarray, num_labels: int, preset: str = "irn",
                     iterations: int = 10, gt_prob: float = LABEL_GT_PROB) -> np.ndarray:
    """Refines a hard label map with a dense CRF (IRN's label unary).

    labels int [H,W] in [0, num_labels), or [N,H,W]: N maps of the same image, refined
    separately (the pairwise terms built once). Each pixel's label gets probability
    `gt_prob`, the others share the rest (label 0 is an ordinary label, not "unsure").
    Returns float32 [num_labels,H,W] refined probabilities, or [N,num_labels,H,W].
    """
    image = _check_image(image)
    config = _preset(preset)
    if not isinstance(labels, np.ndarray) or labels.ndim not in (2, 3) or labels.shape[-2:] != image.shape[:2] \
            or not np.issubdtype(labels.dtype, np.integer):
        kind = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(f"dense CRF: labels must be an integer array {image.shape[:2]} (or [N,"
                         f"{image.shape[0]},{image.shape[1]}]) matching the image, got {kind}")
    if num_labels < 2:
        raise ValueError(f"dense CRF: num_labels must be >= 2, got {num_labels}")
    if labels.min() < 0 or labels.max() >= num_labels:
        raise ValueError(f"dense CRF: labels must lie in [0, {num_labels}), got [{labels.min()}, {labels.max()}]")
    if not 0 < gt_prob < 1:
        raise ValueError(f"dense CRF: gt_prob must be in (0, 1), got {gt_prob}")
    maps = labels if labels.ndim == 3 else labels[None]
    unaries = [unary_from_labels(label_map, num_labels, gt_prob=gt_prob, zero_unsure=False) for label_map in maps]
    refined = _infer(image, unaries, num_labels, config, iterations)
    return np.stack(refined) if labels.ndim == 3 else refined[0]
