"""Decode and augment shard rows into training batches (numpy + PIL; no Ray, no torch).

A transform takes a numpy batch of shard columns (`id`, `image` bytes, `mask` bytes or
None, `labels`, `height`, `width`, and `target` bytes when pseudo-labels are joined) and
returns the batch keys of `wsss.methods.base`, in the compact types that cross process
boundaries (`wsss.platform.loop.model_inputs` makes the float and int64 tensors the
methods take, on the training device):

  image  uint8   [B,3,S,S]  weak view, 0 on padding
  labels float32 [B,K]      multi-hot over foreground classes 1..K
  valid  bool    [B,S,S]    True where the crop holds image, False on padding
  strong uint8   [B,3,S,S]  weak view + colour-only RandAugment + blur  (view "strong")
  mask   uint8   [B,S,S]    ground truth, 255 on void and padding       (view "mask")
  target uint8   [B,S,S]    pseudo-label, 255 on ignore and padding     (view "target")

Geometry (random rescale of the whole image by a factor in `scale_range`, horizontal
flip, random crop of S×S placed at a random offset when the image is smaller) is drawn
once per sample and shared by every view; masks only ever see nearest-neighbour
resampling. Randomness comes from a per-sample generator seeded by (seed, id, epoch),
so a run is reproducible however rows are split across processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from wsss.datasets.base import IGNORE_INDEX
from wsss.datasets.photometric import color_jitter, strong_photometric
from wsss.datasets.shards import decode_mask
from wsss.datasets.voc import ALPHA_MODES, RGB_EXACT_MODES
from wsss.io import DataError

OPTIONAL_VIEWS = frozenset({"strong", "mask", "target"})


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: int = 320  # S: side of the square training crop
    scale_range: tuple[float, float] = (0.7, 1.3)  # rescale factor of the original image
    flip_prob: float = 0.5
    color_jitter: float = 0.3  # brightness/contrast/saturation factors in [1-x, 1+x]
    hue_jitter: float = 0.1  # hue rotation in [-x, x] turns
    strong_ops: int = 3  # RandAugment operations of the strong view (FSAE: 3 of 9)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian blur of the strong view, pixels
    views: frozenset[str] = frozenset()  # optional outputs among OPTIONAL_VIEWS
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "views", frozenset(self.views))
        object.__setattr__(self, "scale_range", tuple(float(x) for x in self.scale_range))
        object.__setattr__(self, "blur_sigma", tuple(float(x) for x in self.blur_sigma))
        unknown = self.views - OPTIONAL_VIEWS
        if unknown:
            raise ValueError(f"AugmentConfig.views: unknown view(s) {sorted(unknown)}; "
                             f"known: {sorted(OPTIONAL_VIEWS)}")
        if self.crop_size < 1:
            raise ValueError(f"AugmentConfig.crop_size={self.crop_size}: must be >= 1")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"AugmentConfig.scale_range={self.scale_range}: need 0 < low <= high")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"AugmentConfig.flip_prob={self.flip_prob}: must be in [0, 1]")
        if self.color_jitter < 0 or not 0 <= self.hue_jitter <= 0.5:
            raise ValueError(f"AugmentConfig color_jitter={self.color_jitter}, hue_jitter="
                             f"{self.hue_jitter}: need color_jitter >= 0 and hue_jitter in [0, 0.5]")
        if self.strong_ops < 0 or not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"AugmentConfig strong_ops={self.strong_ops}, blur_sigma={self.blur_sigma}: "
                             "need strong_ops >= 0 and 0 <= low <= high")

    def for_labels(self, joined: bool) -> AugmentConfig:
        """This config with the `target` view exactly when pseudo-label shards are joined."""
        if "target" in self.views and not joined:
            raise ValueError("AugmentConfig.views has 'target' but no pseudo-label shards (label_uri) were given")
        return dataclasses.replace(self, views=self.views | {"target"}) if joined else self

    def columns(self) -> list[str]:
        """Shard columns the training transform reads (`target` comes from a join)."""
        return ["id", "image", "labels", "height", "width"] + (["mask"] if "mask" in self.views else [])


def sample_rng(seed: int, sample_id: str, epoch: int) -> np.random.Generator:
    """A generator that depends only on (seed, id, epoch), stable across processes."""
    digest = int.from_bytes(hashlib.blake2b(str(sample_id).encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([digest, int(epoch), int(seed)])


def decode_image(data: bytes, sample_id: str, height: int | None = None, width: int | None = None) -> Image.Image:
    """Original image bytes -> RGB PIL image, checked against the shard's height/width."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises many types for corrupt bytes
        raise DataError(sample_id, f"image bytes cannot be decoded ({type(error).__name__}: {error})") from None
    if image.mode not in RGB_EXACT_MODES + ALPHA_MODES:  # shards `wsss prepare` did not check
        raise DataError(sample_id, f"unsupported image: mode {image.mode}, which 8-bit RGB would clip")
    try:
        image = image if image.mode == "RGB" else image.convert("RGB")
        image.load()
    except Exception as error:
        raise DataError(sample_id, f"image bytes cannot be decoded ({type(error).__name__}: {error})") from None
    if height is not None and (image.height, image.width) != (int(height), int(width)):
        raise DataError(sample_id, f"decoded image is {image.height}x{image.width} but the shard "
                                   f"says {int(height)}x{int(width)}")
    return image


def decode_label_map(data: bytes | None, sample_id: str, what: str, size: tuple[int, int]) -> np.ndarray:
    """PNG class-index map -> uint8 [H,W], required to match the image size (H, W)."""
    if data is None:
        raise DataError(sample_id, f"no {what} for this image, but the pipeline needs one")
    try:
        array = decode_mask(data)
    except Exception as error:  # PIL's many error types, and decode_mask's ValueError
        raise DataError(sample_id, f"{what} bytes cannot be decoded ({type(error).__name__}: {error})") from None
    if array.shape != size:
        raise DataError(sample_id, f"{what} is {array.shape[0]}x{array.shape[1]} but the image is "
                                   f"{size[0]}x{size[1]}")
    return array


def multi_hot(labels: Iterable, num_classes: int, sample_id: str) -> np.ndarray:
    """Foreground labels 1..K -> float32 [K]."""
    indices = np.asarray(labels, dtype=np.int64).reshape(-1)
    bad = indices[(indices < 1) | (indices > num_classes)]
    if bad.size:
        raise DataError(sample_id, f"label {int(bad[0])} outside the foreground classes 1..{num_classes}")
    vector = np.zeros(num_classes, dtype=np.float32)
    vector[indices - 1] = 1.0
    return vector


@dataclass(frozen=True)
class Geometry:
    """One sample's geometric transform: scale to `size`, optional flip, then the box
    `crop` = (left, top, right, bottom) of the scaled image lands at `offset` (x, y)
    of the S×S canvas; the rest of the canvas is padding."""

    size: tuple[int, int]  # scaled (width, height)
    flip: bool
    crop: tuple[int, int, int, int]
    offset: tuple[int, int]

    @staticmethod
    def sample(width: int, height: int, config: AugmentConfig, rng: np.random.Generator) -> Geometry:
        scale = rng.uniform(*config.scale_range)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        flip = bool(rng.uniform() < config.flip_prob)
        crop_size = config.crop_size
        starts, offsets = [], []
        for extent in size:  # x, then y
            slack = extent - crop_size
            start = int(rng.integers(0, slack + 1)) if slack > 0 else 0
            offset = int(rng.integers(0, -slack + 1)) if slack < 0 else 0
            starts.append(start)
            offsets.append(offset)
        crop = (starts[0], starts[1], min(size[0], starts[0] + crop_size), min(size[1], starts[1] + crop_size))
        return Geometry(size, flip, crop, (offsets[0], offsets[1]))

    def apply(self, image: Image.Image, resample: int) -> Image.Image:
        """Scale, flip and crop; the result is the canvas content without padding.
        Only the source region that lands in the crop is resampled (PIL's `box`)."""
        left, top, right, bottom = self.crop
        if self.flip:  # the crop of the mirrored image is the mirror of the mirrored crop
            left, right = self.size[0] - right, self.size[0] - left
        scale_x, scale_y = image.width / self.size[0], image.height / self.size[1]
        box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
        content = image.resize((right - left, bottom - top), resample, box=box)
        return content.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else content

    def window(self, content: np.ndarray) -> tuple[slice, slice]:
        """Where `content` lands on the canvas: (rows, columns)."""
        x, y = self.offset
        return slice(y, y + content.shape[0]), slice(x, x + content.shape[1])

    def place(self, content: np.ndarray, canvas: np.ndarray) -> None:
        """uint8 [h,w,3] content -> its window of the uint8 canvas [3,S,S]."""
        canvas[(slice(None), *self.window(content))] = content.transpose(2, 0, 1)


class TrainTransform:
    """Numpy batch of shard columns -> training batch (see the module docstring)."""

    def __init__(self, config: AugmentConfig, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: need at least one foreground class")
        self.config = config
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray], epoch: int = 0) -> dict[str, np.ndarray]:
        views, size = self.config.views, self.config.crop_size
        for column in self.config.columns() + (["target"] if "target" in views else []):
            if column not in batch:
                raise DataError(column, f"column missing from the batch (have {sorted(batch)})")
        count = len(batch["id"])
        image_out = np.zeros((count, 3, size, size), dtype=np.uint8)
        valid = np.zeros((count, size, size), dtype=bool)
        strong = np.zeros_like(image_out) if "strong" in views else None
        maps = {name: np.full((count, size, size), IGNORE_INDEX, dtype=np.uint8)
                for name in ("mask", "target") if name in views}
        labels = np.zeros((count, self.num_classes), dtype=np.float32)
        for row in range(count):
            sample_id = str(batch["id"][row])
            image = decode_image(batch["image"][row], sample_id, batch["height"][row], batch["width"][row])
            labels[row] = multi_hot(batch["labels"][row], self.num_classes, sample_id)
            rng = sample_rng(self.config.seed, sample_id, epoch)
            geometry = Geometry.sample(image.width, image.height, self.config, rng)
            weak_image = color_jitter(geometry.apply(image, Image.Resampling.BILINEAR), rng,
                                      self.config.color_jitter, self.config.hue_jitter)
            weak = np.asarray(weak_image)
            window = geometry.window(weak)
            valid[row][window] = True
            geometry.place(weak, image_out[row])
            if strong is not None:
                extra = strong_photometric(weak_image, rng, self.config.strong_ops, self.config.blur_sigma)
                geometry.place(np.asarray(extra), strong[row])
            for name, canvas in maps.items():
                array = decode_label_map(batch[name][row], sample_id, name, (image.height, image.width))
                content = np.asarray(geometry.apply(Image.fromarray(array, "L"), Image.Resampling.NEAREST))
                canvas[row][geometry.window(content)] = content
        out = {"image": image_out, "labels": labels, "valid": valid, **maps}
        if strong is not None:
            out["strong"] = strong
        return out


class EvalTransform:
    """Numpy batch of shard columns -> original-size rows for evaluation:
    id (str), image uint8 [H,W,3], mask uint8 [H,W] (255 = void), labels float32 [K], and
    with `with_region` the region map uint8 [H,W] (`wsss.datasets.shards.has_regions`).
    Images differ in size, so `image`, `mask` and `region` are object arrays of arrays."""

    def __init__(self, num_classes: int, with_mask: bool = True, with_region: bool = False):
        self.num_classes = num_classes
        self.with_mask = with_mask
        self.with_region = with_region

    def columns(self) -> list[str]:
        return (["id", "image", "labels", "height", "width"] + (["mask"] if self.with_mask else [])
                + (["region"] if self.with_region else []))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["id"])
        images = np.empty(count, dtype=object)
        maps = {key: np.empty(count, dtype=object) for key in ("mask", "region") if key in self.columns()}
        labels = np.zeros((count, self.num_classes), dtype=np.float32)
        for row in range(count):
            sample_id = str(batch["id"][row])
            image = decode_image(batch["image"][row], sample_id, batch["height"][row], batch["width"][row])
            images[row] = np.asarray(image)
            labels[row] = multi_hot(batch["labels"][row], self.num_classes, sample_id)
            for key, column in maps.items():
                column[row] = decode_label_map(batch[key][row], sample_id, key, (image.height, image.width))
        ids = np.asarray([str(x) for x in batch["id"]], dtype=object)
        return {"id": ids, "image": images, "labels": labels, **maps}
