"""A small synthetic WSSS benchmark, written in the VOC directory layout.

The generator writes JPEGImages/*.jpg (quality 90), SegmentationClass/*.png (VOC palette
PNGs), SegmentationRegion/*.png (which kind of region each pixel is: REGION_*),
Annotations/*.xml, ImageSets/Segmentation/{train,dev,val}.txt, classes.txt and
synthetic.json (the generation parameters); the `voc` reader is what reads it. The same
seed gives byte-identical files: every image draws from its own generator seeded by
(seed, split, index).

Each image shows 1-3 objects of 5 classes on a smooth, noisy background. An object is a
striped ellipse (the body) with a small head on its rim. The problems WSSS methods exist
to fix are built in on purpose:

(a) Discriminative part. Bodies look alike for every class (same stripe texture, same
    colour distribution); only the head (~5-15% of the object) tells the class, by its
    colour and shape. A classifier needs nothing but the head, so its CAM covers the
    head only, while the mask labels head and body.
(b) Context leak. "boat" stands on a wavy blue "water" region in 90% of its images;
    water appears in only 15% of the other images and is labelled background. CAMs of
    boat leak onto the water.
(c) Co-occurring classes. "horse" and "rider" appear together in ~80% of the images of
    either (the rider sits on the horse), so a classifier can credit one for the other.

Masks are exact (rendered from the same shapes as the image) except a 1 px void band
(255): every object pixel with a 4-neighbour of another label. Position, size, aspect,
orientation, head placement, background colour and noise vary, so the task is learnable
by a small ResNet from scratch in a few epochs but not trivial.

The region map makes the problems measurable (`wsss.platform.metrics.region_rates`):
a method that expands a CAM from the head to the whole object raises its body recall.
The `dev` split is drawn like train but never trained on: thresholds and other choices
are made on it, so that val is scored once.

Presets: "test" (40 train / 20 val, 64 px, for unit tests), "demo" (2000 train / 300
val, 96 px: generate + prepare + a few ResNet-18 epochs on 2 CPUs in minutes) and
"claims" (1500 train / 300 dev / 300 val, 96 px: `benchmarks/claims.py`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.datasets.base import IGNORE_INDEX, REGION_BODY, REGION_CONTEXT, REGION_PART, register_reader
from wsss.datasets.voc import REGION_FOLDER, VOCReader, voc_colormap
from wsss.io import DataError

CLASSES = ("background", "boat", "horse", "rider", "dog", "bird")
BOAT, HORSE, RIDER, DOG, BIRD = 1, 2, 3, 4, 5
HEAD_COLOURS = {BOAT: (230, 40, 40), HORSE: (40, 200, 70), RIDER: (245, 215, 30), DOG: (215, 60, 215),
                BIRD: (250, 250, 250)}
HEAD_NORMS = {BOAT: 2, HORSE: np.inf, RIDER: 1, DOG: 2, BIRD: np.inf}  # disc, square, diamond
PRESETS = {"test": {"num_train": 40, "num_dev": 0, "num_val": 20, "size": 64},
           "demo": {"num_train": 2000, "num_dev": 0, "num_val": 300, "size": 96},
           "claims": {"num_train": 1500, "num_dev": 300, "num_val": 300, "size": 96}}
SPLIT_CODES = {"train": 0, "val": 1, "dev": 2}
PAIR_PROBABILITY = 0.8  # horse <-> rider
EXTRA_PROBABILITY = 0.3  # another object besides a boat, dog or bird
WATER_WITH_BOAT, WATER_WITHOUT_BOAT = 0.9, 0.15
JPEG_QUALITY = 90
PARAMS_FILE = "synthetic.json"



@dataclass(frozen=True)
class SyntheticImage:
    image: np.ndarray  # uint8 [S, S, 3]
    mask: np.ndarray  # uint8 [S, S], class indices, 255 = void band
    exact: np.ndarray  # uint8 [S, S], class indices without the void band
    regions: np.ndarray  # uint8 [S, S], REGION_* of every pixel: the head is the discriminative part, water the context
    labels: tuple[int, ...]  # classes present in the mask


def render_image(seed: int, split: str, index: int, size: int) -> SyntheticImage:
    """Draw one image; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    classes = _choose_classes(rng)
    has_water = rng.random() < (WATER_WITH_BOAT if BOAT in classes else WATER_WITHOUT_BOAT)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    image = _background(rng, yy, xx)
    labelmap = np.zeros((size, size), np.uint8)
    regions = np.zeros((size, size), np.uint8)
    horizon = size * rng.uniform(0.4, 0.6)
    if has_water:
        water = yy > horizon + 1.5 * np.sin(xx * rng.uniform(0.2, 0.4) + rng.uniform(0, 2 * np.pi))
        image[water] = _water_texture(rng, yy[water], xx[water])
        regions[water] = REGION_CONTEXT

    placed: list[tuple[np.ndarray, float]] = []  # (centre (y, x), semi-major axis) of each object
    heads = []
    for cls in classes:
        semi_major = size * rng.uniform(0.16, 0.28)
        semi_minor = semi_major * rng.uniform(0.55, 0.85)
        centre = _place(rng, cls, placed, size, semi_major, horizon if cls == BOAT and has_water else None)
        placed.append((centre, semi_major))
        body, head = _object_shape(rng, cls, centre, semi_major, semi_minor, yy, xx, size)
        image[body] = _body_texture(rng, yy[body], xx[body])
        labelmap[body] = cls
        regions[body] = REGION_BODY
        heads.append((cls, head))
    for cls, head in heads:  # after every body: a rider never hides the horse's head
        image[head] = _head_colour(rng, cls, head.sum())
        labelmap[head] = cls
        regions[head] = REGION_PART

    image = _soften(image)
    mask = labelmap.copy()
    mask[_inner_boundary(labelmap)] = IGNORE_INDEX
    present = np.unique(mask)
    labels = tuple(int(c) for c in present if 0 < c < len(CLASSES))
    return SyntheticImage(np.clip(image, 0, 255).round().astype(np.uint8), mask, labelmap, regions, labels)


def _choose_classes(rng: np.random.Generator) -> list[int]:
    """Draw order: a horse before its rider so that the rider sits on top (problem c)."""
    primary = int(rng.integers(1, len(CLASSES)))
    if primary in (HORSE, RIDER):
        return [HORSE, RIDER] if rng.random() < PAIR_PROBABILITY else [primary]
    if rng.random() < EXTRA_PROBABILITY:
        others = [c for c in (BOAT, DOG, BIRD) if c != primary]
        return [primary, int(rng.choice(others))]
    return [primary]


def _place(rng, cls, placed, size, semi_major, horizon) -> np.ndarray:
    """A rider sits on the horse; a boat on the water; others away from earlier objects."""
    margin = 0.7 * semi_major
    if cls == RIDER and placed:
        horse_centre, horse_semi_major = placed[-1]
        offset = np.array([-(0.8 * horse_semi_major + 0.5 * semi_major), rng.uniform(-0.1, 0.1) * size])
        return np.clip(horse_centre + offset, margin, size - margin)
    low_y = max(horizon + 0.1 * size, margin) if horizon is not None else margin
    candidates = np.stack([rng.uniform(min(low_y, size - margin), size - margin, 12),
                           rng.uniform(margin, size - margin, 12)], axis=1)  # (y, x)
    if not placed:
        return candidates[0]
    centres = np.array([centre for centre, _ in placed])
    distance = np.linalg.norm(candidates[:, None] - centres[None], axis=2).min(axis=1)
    return candidates[int(distance.argmax())]


def _object_shape(rng, cls, centre, semi_major, semi_minor, yy, xx, size):
    """Boolean body (rotated ellipse) and head (class-shaped blob on the body's rim)."""
    angle = rng.uniform(0, np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = yy - centre[0], xx - centre[1]
    along, across = dx * cos + dy * sin, -dx * sin + dy * cos
    body = (along / semi_major) ** 2 + (across / semi_minor) ** 2 <= 1.0

    radius = max(2.5, size * rng.uniform(0.045, 0.06))
    rims = rng.uniform(0, 2 * np.pi, 8)  # candidate directions; the first whose head is inside wins
    rim_along, rim_across = 0.85 * semi_major * np.cos(rims), 0.85 * semi_minor * np.sin(rims)
    head_xs = centre[1] + rim_along * cos - rim_across * sin
    head_ys = centre[0] + rim_along * sin + rim_across * cos
    room = np.minimum(np.minimum(head_xs, size - 1 - head_xs), np.minimum(head_ys, size - 1 - head_ys))
    best = int(np.argmax(room >= radius)) if (room >= radius).any() else int(np.argmax(room))
    head_y, head_x = head_ys[best], head_xs[best]
    offsets = np.stack([np.abs(yy - head_y), np.abs(xx - head_x)])
    head = np.linalg.norm(offsets, ord=HEAD_NORMS[cls], axis=0) <= radius * (1.25 if HEAD_NORMS[cls] == 1 else 1.0)
    return body, head


def _background(rng, yy, xx) -> np.ndarray:
    """Muted colour (grey with a slight tint, never as saturated as a head), a random
    linear brightness gradient and pixel noise."""
    size = yy.shape[0]
    base = rng.uniform(80, 170) + rng.uniform(-15, 15, 3)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = ((xx * np.cos(direction) + yy * np.sin(direction)) / size - 0.5)[..., None]
    return base + ramp * (rng.uniform(-40, 40) + rng.uniform(-10, 10, 3)) + _noise(rng, 6, (size, size, 3))


def _noise(rng, sigma, shape) -> np.ndarray:
    return sigma * rng.standard_normal(shape, dtype=np.float32)


def _water_texture(rng, yy, xx) -> np.ndarray:
    """Colours of water pixels at coordinates (yy, xx): blue horizontal waves."""
    waves = np.sin(2 * np.pi * yy / rng.uniform(3, 6) + 0.6 * np.sin(xx * rng.uniform(0.15, 0.35)))
    colour = np.array([35, 85, 150]) * rng.uniform(0.85, 1.15)
    return colour + 22 * waves[..., None] + _noise(rng, 5, yy.shape + (3,))


def _body_texture(rng, yy, xx) -> np.ndarray:
    """Colours of body pixels at (yy, xx). The same distribution for every class: the body
    tells nothing about the class (problem a)."""
    direction, period = rng.uniform(0, np.pi), rng.uniform(4, 7)
    stripes = np.sin(2 * np.pi * (xx * np.cos(direction) + yy * np.sin(direction)) / period + rng.uniform(0, 6.3))
    colour = np.array([150, 120, 95]) * rng.uniform(0.85, 1.15)
    return colour + 28 * stripes[..., None] + _noise(rng, 6, yy.shape + (3,))


def _head_colour(rng, cls, count) -> np.ndarray:
    colour = np.array(HEAD_COLOURS[cls]) * rng.uniform(0.9, 1.02)
    return colour + _noise(rng, 5, (count, 3))


def _soften(image: np.ndarray) -> np.ndarray:
    """Half-strength 3x3 box blur: edges blend as in photos, which is why they are void."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    size = image.shape[0]
    box = sum(padded[i:i + size, j:j + size] for i in range(3) for j in range(3)) / 9
    return 0.5 * image + 0.5 * box


def _inner_boundary(labelmap: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour of a different label (the image edge is no boundary)."""
    padded = np.pad(labelmap, 1, mode="edge")
    neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    differs = np.any([n != labelmap for n in neighbours], axis=0)
    return differs & (labelmap > 0)


def _annotation_xml(image_id: str, size: int, labelmap: np.ndarray, labels: tuple[int, ...]) -> str:
    objects = []
    for cls in labels:
        ys, xs = np.nonzero(labelmap == cls)
        objects.append(
            f"  <object>\n    <name>{CLASSES[cls]}</name>\n    <difficult>0</difficult>\n"
            f"    <bndbox><xmin>{xs.min() + 1}</xmin><ymin>{ys.min() + 1}</ymin>"
            f"<xmax>{xs.max() + 1}</xmax><ymax>{ys.max() + 1}</ymax></bndbox>\n  </object>\n")
    return (f"<annotation>\n  <folder>synthetic</folder>\n  <filename>{image_id}.jpg</filename>\n"
            f"  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>\n"
            f"  <segmented>1</segmented>\n{''.join(objects)}</annotation>\n")


def resolve_params(preset: str = "test", **overrides) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; known: {', '.join(PRESETS)}")
    params = dict(PRESETS[preset], seed=0)
    unknown = set(overrides) - set(params)
    if unknown:
        raise ValueError(f"unknown synthetic option(s) {sorted(unknown)}; known: {sorted(params)}")
    params.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < (16 if key == "size" else 0):
            raise ValueError(f"synthetic option {key}={value!r} must be an int >= {16 if key == 'size' else 0}")
    return params


def generate_synthetic(root: str | Path, num_train: int = PRESETS["test"]["num_train"],
                       num_val: int = PRESETS["test"]["num_val"], size: int = PRESETS["test"]["size"],
                       seed: int = 0, num_dev: int = 0) -> Path:
    """Write the benchmark into `root` (absent or empty) and return it. It is built in a
    sibling temporary folder and renamed into place, so a failure leaves nothing behind."""
    params = resolve_params(num_train=num_train, num_dev=num_dev, num_val=num_val, size=size, seed=seed)
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(root, "cannot generate: the folder exists and is not empty")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_tree(staging, **params)
        if root.exists():
            root.rmdir()  # empty, checked above; os.replace cannot replace a directory
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_tree(out: Path, num_train: int, num_dev: int, num_val: int, size: int, seed: int) -> None:
    for folder in ("JPEGImages", "SegmentationClass", REGION_FOLDER, "Annotations", "ImageSets/Segmentation"):
        (out / folder).mkdir(parents=True)
    palette = [v for rgb in voc_colormap(256) for v in rgb]
    for split, count in (("train", num_train), ("dev", num_dev), ("val", num_val)):
        if not count and split == "dev":
            continue
        ids = [f"{split}_{index:05d}" for index in range(count)]
        for index, image_id in enumerate(ids):
            drawn = render_image(seed, split, index, size)
            buffer = io.BytesIO()
            Image.fromarray(drawn.image).save(buffer, "JPEG", quality=JPEG_QUALITY)
            (out / "JPEGImages" / f"{image_id}.jpg").write_bytes(buffer.getvalue())
            png = Image.frombytes("P", (size, size), drawn.mask.tobytes())  # pixel = class index
            png.putpalette(palette)
            png.save(out / "SegmentationClass" / f"{image_id}.png")
            Image.fromarray(drawn.regions).save(out / REGION_FOLDER / f"{image_id}.png")
            xml = _annotation_xml(image_id, size, drawn.exact, drawn.labels)
            (out / "Annotations" / f"{image_id}.xml").write_text(xml)
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    params = {"num_train": num_train, "num_dev": num_dev, "num_val": num_val, "size": size, "seed": seed}
    (out / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True) + "\n")


@register_reader("synthetic")
def synthetic_reader(root: str | Path, preset: str | None = None, skip_invalid: bool = False, sbd=None,
                     **overrides) -> VOCReader:
    """Generate the benchmark into `root` unless it is already there, then read it with the
    VOC reader. Without a preset or overrides an existing tree is read as it is, and a new
    one gets the "test" preset; with them, an existing tree must match."""
    if sbd is not None:
        raise ValueError("the synthetic dataset has no SBD part; drop the sbd option")
    requested = resolve_params(preset or "test", **overrides)
    params_file = Path(root) / PARAMS_FILE
    if not params_file.exists():
        generate_synthetic(root, **requested)
    elif preset is not None or overrides:
        try:
            on_disk = json.loads(params_file.read_text())
        except (OSError, ValueError) as error:
            raise DataError(params_file, f"unreadable generation parameters: {error}") from None
        if on_disk != requested:
            raise DataError(params_file, f"parameters differ: generated with {on_disk}, requested {requested}; "
                                         "use another root or delete this one")
    return VOCReader(root, skip_invalid=skip_invalid, name="synthetic")
