"""A tiny real COCO 2014 tree for tests: noise JPEGs plus instances JSON whose objects are
rectangles written as polygons, uncompressed RLE and compressed RLE, with crowds, overlaps
and an image without annotations. Rectangles keep the expected masks easy to write by hand.

Rectangles are (x0, y0, x1, y1) with both ends inclusive.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.datasets.coco import COCO_CATEGORIES

HEIGHT, WIDTH = 48, 64


def rect_bitmap(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    bitmap = np.zeros((HEIGHT, WIDTH), dtype=bool)
    bitmap[y0:y1 + 1, x0:x1 + 1] = True
    return bitmap


def rle_counts(bitmap: np.ndarray) -> list[int]:
    """Runs of 0 then 1 then 0 ... over the pixels in column-major order (COCO's RLE)."""
    counts, value, run = [], False, 0
    for pixel in bitmap.flatten(order="F").tolist():
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return counts


def rle_string(counts: list[int]) -> str:
    """COCO's compressed form, written from its description: each value (from the fourth
    run on, minus the run two before) in 5-bit groups, low first, offset by 48; 0x20 marks
    a following group, 0x10 in the last group the sign."""
    chars = []
    for i, value in enumerate(counts):
        if i > 2:
            value -= counts[i - 2]
        while True:
            group, value = value & 0x1F, value >> 5
            last = value == (-1 if group & 0x10 else 0)
            chars.append(chr(48 + (group if last else group | 0x20)))
            if last:
                break
    return "".join(chars)


def segmentation(form: str, rects: list[tuple[int, int, int, int]]) -> object:
    if form == "polygon":
        return [[x0, y0, x1, y0, x1, y1, x0, y1] for x0, y0, x1, y1 in rects]
    bitmap = np.logical_or.reduce([rect_bitmap(*rect) for rect in rects])
    counts = rle_counts(bitmap)
    return {"size": [HEIGHT, WIDTH], "counts": counts if form == "rle" else rle_string(counts)}


# split -> image number -> [(annotation id, category id, form, iscrowd, rectangles)]
ANNOTATIONS = {
    "val": {
        1: [(11, 18, "polygon", 0, [(20, 20, 30, 30)]),  # dog lies on the person; listed first
            (10, 1, "polygon", 0, [(4, 4, 40, 40)])],
        2: [(20, 3, "rle", 0, [(10, 10, 50, 30)]),  # car partly in front of a crowd of people
            (21, 1, "rle", 1, [(0, 20, 63, 47)])],
        3: [(30, 90, "rle_string", 0, [(5, 5, 20, 40)]),
            (31, 2, "rle_string", 1, [(30, 0, 60, 20)]),
            (32, 90, "polygon", 0, [(40, 30, 50, 40), (55, 30, 60, 40)])],  # two-part polygon
        4: [(40, 5, "rle", 1, [(0, 0, 63, 47)]),  # crowd over everything, a car on top
            (41, 3, "polygon", 0, [(2, 2, 10, 10)])],
        5: [],  # no annotations: "no labels"
        6: [(61, 16, "polygon", 0, [(0, 0, 9, 9)]),  # same area: the higher id is painted last
            (60, 17, "polygon", 0, [(5, 5, 14, 14)])],
    },
    "train": {
        7: [(70, 1, "polygon", 0, [(8, 8, 30, 40)])],
        8: [(80, 3, "rle_string", 0, [(0, 0, 63, 10)]), (81, 62, "rle", 0, [(30, 20, 40, 47)])],
    },
}


def file_name(split: str, number: int, year: int = 2014) -> str:
    return f"COCO_{split}{year}_{number:012d}.jpg"


def noise_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_coco_tree(root: str | Path, annotations: dict = ANNOTATIONS, year: int = 2014) -> Path:
    """Write images and instances JSONs for `annotations` (default: the tree above)."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": cid, "name": name, "supercategory": "thing"} for cid, name in COCO_CATEGORIES.items()]
    for split, images in annotations.items():
        (root / f"{split}{year}").mkdir(exist_ok=True)
        records, objects = [], []
        for number, image_annotations in images.items():
            name = file_name(split, number, year)
            (root / f"{split}{year}" / name).write_bytes(noise_jpeg(number))
            records.append({"id": number, "file_name": name, "height": HEIGHT, "width": WIDTH})
            for ann_id, category, form, iscrowd, rects in image_annotations:
                objects.append({"id": ann_id, "image_id": number, "category_id": category, "iscrowd": iscrowd,
                                "segmentation": segmentation(form, rects), "area": 0.0, "bbox": [0, 0, 1, 1]})
        data = {"info": {}, "images": records, "annotations": objects, "categories": categories}
        (root / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(data))
    return root
