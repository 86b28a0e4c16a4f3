"""Pictures of what a model sees: label maps in the dataset's palette over the image, CAM
heatmaps, and one captioned row of them per image, as PNG files or arrays for W&B.

No Ray and no torch here: inputs are numpy arrays (image uint8 [H,W,3], label maps [H,W]
of class ids with 255 = ignore, CAMs float [H,W] in [0,1]).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOUR = (255, 255, 255)
ALPHA = 0.55  # share of the label colour over the image: both stay readable
TILE_HEIGHT = (192, 384)  # tiles are scaled into this range: 64 px synthetic images get legible captions
CAPTION, LEGEND = 22, 20  # heights of the caption band above the tiles and of each legend line
TEXT, BACKGROUND = (30, 30, 30), (255, 255, 255)


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def colorize(labels: np.ndarray, palette) -> np.ndarray:
    """Class ids [H,W] -> RGB uint8 [H,W,3] in the dataset's palette; ignored pixels white."""
    lookup = np.zeros((256, 3), np.uint8)
    lookup[:] = IGNORE_COLOUR
    colours = np.asarray(palette, np.uint8).reshape(-1, 3)[:255]
    lookup[:len(colours)] = colours
    return lookup[np.asarray(labels, np.uint8)]


def blend(image: np.ndarray, colours: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """`colours` over `image`, both uint8 [H,W,3]."""
    mixed = (1 - alpha) * np.asarray(image, np.float32) + alpha * np.asarray(colours, np.float32)
    return mixed.round().astype(np.uint8)


def label_overlay(image: np.ndarray, labels: np.ndarray, palette) -> np.ndarray:
    """A label map over its image, in the dataset's palette (background stays the palette's,
    black in VOC's: it darkens, so the coloured objects stand out)."""
    return blend(image, colorize(labels, palette))


def jet(values: np.ndarray) -> np.ndarray:
    """[0,1] float [H,W] -> RGB uint8 [H,W,3], blue (0) through green to red (1)."""
    x = np.clip(np.asarray(values, np.float32), 0, 1)[..., None]
    centres = np.array([0.75, 0.5, 0.25], np.float32)  # where red, green and blue peak
    return (np.clip(1.5 - np.abs(4 * (x - centres)), 0, 1) * 255).round().astype(np.uint8)


def cam_overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """One class's normalised CAM [H,W] as a heatmap over the image."""
    return blend(image, jet(cam), alpha=0.5)


def panel(tiles: list[tuple[str, np.ndarray]], *, title: str = "",
          legend: list[tuple[str, tuple[int, int, int]]] = ()) -> Image.Image:
    """Tiles (caption, RGB uint8 [H,W,3] of one size) side by side under their captions,
    with an optional title line above and a legend of class colours below."""
    height, width = tiles[0][1].shape[:2]
    scale = min(max(1.0, TILE_HEIGHT[0] / height), TILE_HEIGHT[1] / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    gap, top = 4, CAPTION + (CAPTION if title else 0)
    total_width = len(tiles) * size[0] + (len(tiles) - 1) * gap
    font = _font()
    legend_rows = _legend_rows(legend, total_width, font)
    canvas = Image.new("RGB", (total_width, top + size[1] + LEGEND * len(legend_rows) + (4 if legend_rows else 0)),
                       BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 4), title, fill=TEXT, font=font)
    for index, (caption, tile) in enumerate(tiles):
        left = index * (size[0] + gap)
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
        canvas.paste(Image.fromarray(np.asarray(tile, np.uint8)).resize(size, resample), (left, top))
        draw.text((left + 3, top - CAPTION + 4), _fit(draw, caption, size[0] - 6, font), fill=TEXT, font=font)
    y = top + size[1] + 4
    for row in legend_rows:
        x = 4
        for name, colour in row:
            draw.rectangle([x, y + 3, x + 12, y + 15], fill=tuple(colour), outline=TEXT)
            draw.text((x + 16, y + 2), name, fill=TEXT, font=font)
            x += 16 + draw.textlength(name, font=font) + 12
        y += LEGEND
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def _legend_rows(legend, width: int, font) -> list[list]:
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows, x = [], width
    for name, colour in legend:
        item = 16 + measure.textlength(name, font=font) + 12
        if x + item > width and (not rows or rows[-1]):
            rows.append([])
            x = 4
        rows[-1].append((name, colour))
        x += item
    return rows


def legend_of(label_maps: list[np.ndarray], classes: list[str], palette) -> list[tuple[str, tuple]]:
    """(class name, colour) of every class present in any of `label_maps`, and `ignored`
    where a map has ignored pixels."""
    present = sorted(set().union(*(np.unique(np.asarray(m)).tolist() for m in label_maps)))
    legend = [(classes[c], tuple(int(v) for v in palette[c])) for c in present if c < len(classes)]
    return legend + ([("ignored", IGNORE_COLOUR)] if 255 in present else [])


def cam_panel(image: np.ndarray, cams: np.ndarray, labels: np.ndarray, prediction: np.ndarray,
              ground_truth: np.ndarray | None, classes: list[str], palette, *, title: str = "",
              prediction_caption: str = "prediction") -> Image.Image:
    """image | ground truth | CAM heatmap of each class in `labels` [K] | prediction.
    cams float [K,H,W] (foreground classes, without background); classes and palette
    include background (K+1)."""
    tiles = [("image", image)]
    if ground_truth is not None:
        tiles.append(("ground truth", label_overlay(image, ground_truth, palette)))
    for k in np.flatnonzero(np.asarray(labels) > 0.5):
        tiles.append((f"CAM: {classes[k + 1]}", cam_overlay(image, cams[k])))
    tiles.append((prediction_caption, label_overlay(image, prediction, palette)))
    maps = [prediction] + ([ground_truth] if ground_truth is not None else [])
    return panel(tiles, title=title, legend=legend_of(maps, classes, palette))


def prediction_panel(image: np.ndarray, prediction: np.ndarray, ground_truth: np.ndarray | None,
                     classes: list[str], palette, *, title: str = "",
                     prediction_caption: str = "prediction") -> Image.Image:
    """image | ground truth (where there is one) | a label map such as a prediction or a pseudo-label."""
    tiles = [("image", image)]
    if ground_truth is not None:
        tiles.append(("ground truth", label_overlay(image, ground_truth, palette)))
    tiles.append((prediction_caption, label_overlay(image, prediction, palette)))
    maps = [prediction] + ([ground_truth] if ground_truth is not None else [])
    return panel(tiles, title=title, legend=legend_of(maps, classes, palette))


def picture_name(sample_id: str) -> str:
    """A file name naming the image: ids may hold '/' (COCO, Cityscapes folders)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(sample_id)).strip("._") or "image"


def save_png(picture: Image.Image, path: str | Path) -> Path:
    """Writes the PNG whole or not at all: a temp file beside it, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        picture.save(temp, format="PNG", optimize=True)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
