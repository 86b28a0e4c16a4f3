"""Colour-only image operations for the training views (PIL, one image at a time).

Nothing here moves a pixel: every operation maps colours (pointwise, or through a global
statistic such as the image mean or histogram) or filters with a symmetric kernel
(sharpness, Gaussian blur). That is what lets the strong view share the weak view's
geometry, so a pseudo-label made on one view supervises the other pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# ITU-R 601-2 luma, the weights PIL uses for greyscale.
LUMA = np.array([0.299, 0.587, 0.114])


def hue_rotation(turns: float) -> np.ndarray:
    """3x3 rotation of RGB about the grey axis by `turns` of a full circle: shifts hue,
    keeps grey pixels grey (Rodrigues' formula with axis (1,1,1)/sqrt(3))."""
    angle = 2 * np.pi * turns
    axis = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(axis, axis)


def jitter_affine(rng: np.random.Generator, strength: float, hue: float,
                  mean_colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brightness, contrast and saturation by factors in [1-strength, 1+strength] and a hue
    rotation in [-hue, hue] turns, in random order, composed into one map x -> A x + b.

    Each is affine in RGB: brightness scales; saturation blends with the pixel's grey;
    contrast blends with the image's mean grey (of the image as the earlier operations
    left it, hence `mean_colour`, the mean RGB of the input); hue rotates about grey."""
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    brightness, contrast, saturation = rng.uniform(low, high, size=3)
    turns = rng.uniform(-hue, hue)
    matrix, offset = np.eye(3), np.zeros(3)
    for index in rng.permutation(4):
        shift = np.zeros(3)
        if index == 0:
            step = brightness * np.eye(3)
        elif index == 1:
            step = contrast * np.eye(3)
            shift = (1 - contrast) * LUMA @ (matrix @ mean_colour + offset) * np.ones(3)
        elif index == 2:
            step = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), LUMA)
        else:
            step = hue_rotation(turns)
        matrix, offset = step @ matrix, step @ offset + shift
    return matrix, offset


def mean_colour(image: Image.Image) -> np.ndarray:
    """Mean RGB of an image, from its histogram (C speed)."""
    histogram = np.asarray(image.histogram(), dtype=np.float64).reshape(3, 256)
    return histogram @ np.arange(256) / histogram[0].sum()


def color_jitter(image: Image.Image, rng: np.random.Generator, strength: float, hue: float) -> Image.Image:
    """The weak view's colour jitter (`jitter_affine`), applied in one pass by PIL's
    matrix conversion (which rounds and clips to uint8)."""
    if strength <= 0 and hue <= 0:
        return image
    matrix, offset = jitter_affine(rng, strength, hue, mean_colour(image))
    return image.convert("RGB", matrix=tuple(np.concatenate([matrix, offset[:, None]], axis=1).ravel()))


def _enhance(kind) -> Callable[[Image.Image, float], Image.Image]:
    # FixMatch's RandAugment range: factor 0.1 .. 1.9 (1 = unchanged).
    return lambda image, magnitude: kind(image).enhance(0.1 + 1.8 * magnitude)


# The 9 colour-space operations of RandAugment (its geometric ones — rotate, shear,
# translate — are left out, as FSAE does for segmentation). magnitude is in [0, 1].
RANDAUGMENT_OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "identity": lambda image, magnitude: image,
    "autocontrast": lambda image, magnitude: ImageOps.autocontrast(image),
    "equalize": lambda image, magnitude: ImageOps.equalize(image),
    "solarize": lambda image, magnitude: ImageOps.solarize(image, 256 - int(round(magnitude * 256))),
    "posterize": lambda image, magnitude: ImageOps.posterize(image, 8 - int(magnitude * 4)),
    "brightness": _enhance(ImageEnhance.Brightness),
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "sharpness": _enhance(ImageEnhance.Sharpness),
}
_OP_NAMES = tuple(RANDAUGMENT_OPS)


def rand_augment(image: Image.Image, rng: np.random.Generator, num_ops: int) -> Image.Image:
    """RandAugment with a random magnitude per operation (as in FixMatch): `num_ops`
    operations drawn with replacement from the 9 colour-space ones."""
    for index in rng.integers(0, len(_OP_NAMES), size=num_ops):
        image = RANDAUGMENT_OPS[_OP_NAMES[index]](image, float(rng.uniform()))
    return image


def gaussian_blur(image: Image.Image, rng: np.random.Generator, sigma_range: tuple[float, float]) -> Image.Image:
    """Blur with a standard deviation drawn from `sigma_range` (pixels); (0, 0) disables it."""
    sigma = float(rng.uniform(*sigma_range))
    return image.filter(ImageFilter.GaussianBlur(sigma)) if sigma > 0 else image


def strong_photometric(image: Image.Image, rng: np.random.Generator, num_ops: int,
                       sigma_range: tuple[float, float]) -> Image.Image:
    """The strong view's extra perturbation on top of the weak view: RandAugment, then blur."""
    return gaussian_blur(rand_augment(image, rng, num_ops), rng, sigma_range)
