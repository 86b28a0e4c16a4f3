"""COCO 2014 reader: instance annotations rendered into semantic masks.

Layout read: root/annotations/instances_{train,val}2014.json, root/{train,val}2014/*.jpg.
A split exists when its JSON does. The 80 categories, sorted by COCO category id, become
classes 1..80 (0 = background); each JSON's categories must be exactly these.
Sample ids are the image file's stem, e.g. "COCO_val2014_000000000042".

Mask rule (each annotation is first rasterised on its own: polygons with PIL's
ImageDraw.polygon, filled and outline included; RLE, uncompressed `counts` lists or
COCO's compressed strings, decoded exactly):
  1. non-crowd instances are painted in order of decreasing rasterised area (ties: lower
     annotation id first), so a smaller object lying on a larger one stays on top;
  2. crowd (`iscrowd=1`) regions become 255 (ignore) wherever no non-crowd instance covers
     them, since a crowd region mixes its class with unlabelled background;
  3. everything else is 0 (background).
Image labels are the categories of every annotation that covers at least one pixel, crowd
regions included: a crowd of people is people in the image even though its pixels are
ignored in the mask. An image whose annotations cover nothing is "no labels".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wsss.datasets.base import (
    IGNORE_INDEX,
    DatasetInfo,
    ItemReader,
    Sample,
    SkipLog,
    register_reader,
)
from wsss.datasets.voc import decode_image, voc_colormap
from wsss.io import DataError

COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}
CLASS_OF_CATEGORY = {category: index for index, category in enumerate(sorted(COCO_CATEGORIES), start=1)}
SPLITS = ("train", "val")


def decode_rle_string(counts: str) -> list[int]:
    """COCO's compressed RLE: run lengths as 5-bit groups in ASCII (offset 48), bit 0x20
    = more groups follow, the last group's 0x10 bit = negative; from the third run on,
    each value is stored relative to the run two before it."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                raise ValueError("compressed RLE ends inside a number")
            group = ord(counts[position]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_to_bitmap(counts: list[int], height: int, width: int) -> np.ndarray:
    """Alternating runs of 0 and 1, starting with 0, over the pixels in column-major order."""
    runs = np.asarray(counts, dtype=np.int64)
    if runs.ndim != 1 or (runs < 0).any() or runs.sum() != height * width:
        raise ValueError(f"RLE runs must be >= 0 and sum to {height}x{width} = {height * width} pixels")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(width, height).T


def polygons_to_bitmap(polygons: list, height: int, width: int) -> np.ndarray:
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) % 2:
            raise ValueError(f"a polygon has an odd number of coordinates ({len(polygon)})")
        if len(polygon) >= 6:  # fewer than 3 points enclose nothing
            draw.polygon([float(v) for v in polygon], fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def segmentation_bitmap(segmentation: object, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        return polygons_to_bitmap(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", [])) != [height, width]:
            raise ValueError(f"RLE size {segmentation.get('size')} is not the image's [{height}, {width}]")
        counts = segmentation["counts"]
        return rle_to_bitmap(decode_rle_string(counts) if isinstance(counts, str) else counts, height, width)
    raise ValueError("segmentation is neither a polygon list nor an RLE with counts")


def render_mask(annotations: list[dict], height: int, width: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The semantic mask and image labels of one image's annotations (module docstring rule).
    Each annotation carries "class" (1..80) and "bitmap" (bool [H, W])."""
    mask = np.zeros((height, width), dtype=np.uint8)
    instances = [a for a in annotations if not a["iscrowd"]]
    instances.sort(key=lambda a: (-int(a["bitmap"].sum()), a["id"]))
    covered = np.zeros((height, width), dtype=bool)
    for annotation in instances:
        mask[annotation["bitmap"]] = annotation["class"]
        covered |= annotation["bitmap"]
    for annotation in annotations:
        if annotation["iscrowd"]:
            mask[annotation["bitmap"] & ~covered] = IGNORE_INDEX
    labels = tuple(sorted({a["class"] for a in annotations if a["bitmap"].any()}))
    return mask, labels


@register_reader("coco")
class COCOReader(ItemReader):
    """Reads a COCO tree into `Sample`s; see the module docstring for the rules."""

    def __init__(self, root: str | Path, skip_invalid: bool = False, year: int = 2014):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "unreadable root: not an existing directory")
        self.year = year
        candidates = {split: self.root / "annotations" / f"instances_{split}{year}.json" for split in SPLITS}
        self.annotation_files = {split: path for split, path in candidates.items() if path.is_file()}
        if not self.annotation_files:
            raise DataError(self.root / "annotations",
                            f"unreadable root: no instances_train{year}.json or instances_val{year}.json")
        self.skip_invalid = skip_invalid
        self.skipped = SkipLog()
        classes = ("background", *(COCO_CATEGORIES[c] for c in sorted(COCO_CATEGORIES)))
        self.info = DatasetInfo(name="coco", classes=classes, palette=tuple(voc_colormap(len(classes))))

    def splits(self) -> list[str]:
        return list(self.annotation_files)

    def items(self, split: str) -> list[tuple[Path, dict, list[dict]]]:
        """(annotation file, image record, its annotations) by file name."""
        if split not in self.annotation_files:
            raise DataError(self.root / "annotations", f"unknown split {split!r}; known: {', '.join(self.splits())}")
        json_path = self.annotation_files[split]
        images, annotations = load_annotations(json_path)
        return [(json_path, image, annotations.get(image["id"], []))
                for image in sorted(images.values(), key=lambda record: record["file_name"])]

    def read_item(self, split: str, item: tuple[Path, dict, list[dict]]) -> Sample:
        return self.sample(split, *item)

    def sample(self, split: str, json_path: Path, image: dict, annotations: list[dict]) -> Sample:
        path = self.root / f"{split}{self.year}" / image["file_name"]
        if not annotations:
            raise DataError(path, f"no labels: {json_path.name} has no annotation for this image")
        data, height, width = decode_image(path)
        if (height, width) != (image["height"], image["width"]):
            raise DataError(path, f"image size differs from annotation: image {width}x{height}, "
                                  f"{json_path.name} says {image['width']}x{image['height']}")
        rendered = []
        for annotation in annotations:
            where = f"{json_path} (annotation {annotation.get('id')})"
            if annotation.get("category_id") not in CLASS_OF_CATEGORY:
                raise DataError(where, f"unknown class: category_id {annotation.get('category_id')!r}")
            try:
                bitmap = segmentation_bitmap(annotation.get("segmentation"), height, width)
            except (ValueError, TypeError) as error:
                raise DataError(where, f"bad segmentation: {error}") from None
            rendered.append({"id": annotation.get("id", 0), "class": CLASS_OF_CATEGORY[annotation["category_id"]],
                             "iscrowd": bool(annotation.get("iscrowd", 0)), "bitmap": bitmap})
        mask, labels = render_mask(rendered, height, width)
        if not labels:
            raise DataError(path, "no labels: its annotations cover no pixel")
        return Sample(id=Path(image["file_name"]).stem, image=data, mask=mask, labels=labels,
                      height=height, width=width)


def load_annotations(path: Path) -> tuple[dict[int, dict], dict[int, list[dict]]]:
    """Image records by id and annotations by image id, after checking the categories."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(path, f"malformed annotation file: {error}") from None
    try:
        images = {record["id"]: {key: record[key] for key in ("id", "file_name", "height", "width")}
                  for record in data["images"]}
        categories = {record["id"]: record["name"] for record in data["categories"]}
        annotations: dict[int, list[dict]] = {}
        for annotation in data["annotations"]:
            annotations.setdefault(annotation["image_id"], []).append(annotation)
    except (KeyError, TypeError) as error:
        raise DataError(path, f"malformed annotation file: missing or misplaced key {error}") from None
    if categories != COCO_CATEGORIES:
        differing = sorted(set(categories.items()) ^ set(COCO_CATEGORIES.items()))[:3]
        raise DataError(path, f"unknown class: categories are not COCO's 80 (e.g. {differing})")
    return images, annotations
