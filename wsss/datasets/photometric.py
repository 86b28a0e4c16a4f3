"""Colour-only image operations for the training views (PIL, one image at a time).

Nothing here moves a pixel: every operation maps colours (pointwise, or through a global
statistic such as the image mean or histogram) or filters with a symmetric kernel
(sharpness, Gaussian blur). That is what lets the strong view share the weak view's
geometry, so a pseudo-label made on one view supervises the other pixel for pixel.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5])."""
    hue, saturation, value = image.convert("HSV").split()
    rotated = np.asarray(hue).astype(np.int16) + int(round(shift * 256))
    hue = Image.fromarray((rotated % 256).astype(np.uint8), "L")
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def color_jitter(image: Image.Image, rng: np.random.Generator, strength: float, hue: float) -> Image.Image:
    """Brightness, contrast and saturation by factors in [1-strength, 1+strength] and a hue
    rotation in [-hue, hue], in random order (the usual WSSS weak-view jitter)."""
    if strength <= 0 and hue <= 0:
        return image
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    factors = rng.uniform(low, high, size=3)
    shift = rng.uniform(-hue, hue)
    for index in rng.permutation(4):
        if index < 3:
            if strength > 0:
                image = enhancers[index](image).enhance(factors[index])
        elif hue > 0:
            image = adjust_hue(image, shift)
    return image


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
