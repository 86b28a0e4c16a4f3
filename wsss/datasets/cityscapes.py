"""Cityscapes reader: fine annotations mapped to the 19 evaluation (train id) classes.

Layout read: root/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and
root/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png (the test split has no public
labels and is not read). A split exists when its leftImg8bit folder does. Sample ids are
<name>, e.g. "aachen_000000_000019".

Class indices: the platform's K+1 convention keeps index 0 for background, which
Cityscapes does not have. So class index = train id + 1 (road = 1, ..., bicycle = 19),
and index 0 "background" is declared but never appears in a mask or in the labels.
Label ids outside the 19 (ego vehicle, parking, caravan, ...) and 255 become 255 (void);
any other value is an error. Image labels are the class indices present in the mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsss.datasets.base import (
    IGNORE_INDEX,
    DatasetInfo,
    ItemReader,
    Sample,
    SkipLog,
    register_reader,
)
from wsss.datasets.voc import decode_image, read_png_mask
from wsss.io import DataError

# (label id, name, colour) of the 19 evaluated classes, in train id order (cityscapesScripts).
TRAIN_CLASSES = (
    (7, "road", (128, 64, 128)), (8, "sidewalk", (244, 35, 232)), (11, "building", (70, 70, 70)),
    (12, "wall", (102, 102, 156)), (13, "fence", (190, 153, 153)), (17, "pole", (153, 153, 153)),
    (19, "traffic light", (250, 170, 30)), (20, "traffic sign", (220, 220, 0)),
    (21, "vegetation", (107, 142, 35)), (22, "terrain", (152, 251, 152)), (23, "sky", (70, 130, 180)),
    (24, "person", (220, 20, 60)), (25, "rider", (255, 0, 0)), (26, "car", (0, 0, 142)),
    (27, "truck", (0, 0, 70)), (28, "bus", (0, 60, 100)), (31, "train", (0, 80, 100)),
    (32, "motorcycle", (0, 0, 230)), (33, "bicycle", (119, 11, 32)),
)
MAX_LABEL_ID = 33  # label ids 0..33 are Cityscapes classes; license plate (-1) is stored as 255
SPLITS = ("train", "val")


def class_lookup() -> np.ndarray:
    """uint8 [256]: label id -> class index (train id + 1), 255 for every other value."""
    lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, (label_id, _, _) in enumerate(TRAIN_CLASSES):
        lookup[label_id] = train_id + 1
    return lookup


@register_reader("cityscapes")
class CityscapesReader(ItemReader):
    """Reads a Cityscapes tree into `Sample`s; see the module docstring for the mapping."""

    def __init__(self, root: str | Path, skip_invalid: bool = False):
        self.root = Path(root)
        for folder in (self.root, self.root / "leftImg8bit", self.root / "gtFine"):
            if not folder.is_dir():
                raise DataError(folder, "unreadable root: not an existing directory "
                                        "(expected a Cityscapes root with leftImg8bit/ and gtFine/)")
        self.skip_invalid = skip_invalid
        self.skipped = SkipLog()
        self.lookup = class_lookup()
        self.info = DatasetInfo(
            name="cityscapes", classes=("background", *(name for _, name, _ in TRAIN_CLASSES)),
            palette=((0, 0, 0), *(colour for _, _, colour in TRAIN_CLASSES)))

    def splits(self) -> list[str]:
        return [split for split in SPLITS if (self.root / "leftImg8bit" / split).is_dir()]

    def items(self, split: str) -> list[Path]:
        if split not in self.splits():
            raise DataError(self.root / "leftImg8bit", f"unknown split {split!r}; known: {', '.join(self.splits())}")
        return sorted((self.root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))

    def read_item(self, split: str, image_path: Path) -> Sample:
        return self.sample(split, image_path)

    def sample(self, split: str, image_path: Path) -> Sample:
        name = image_path.name.removesuffix("_leftImg8bit.png")
        mask_path = self.root / "gtFine" / split / image_path.parent.name / f"{name}_gtFine_labelIds.png"
        image, height, width = decode_image(image_path)
        if not mask_path.exists():
            raise DataError(mask_path, "mask missing: no such file")
        label_ids = read_png_mask(mask_path)
        if label_ids.shape != (height, width):
            raise DataError(mask_path, f"mask size differs from image size: mask {label_ids.shape[1]}x"
                                       f"{label_ids.shape[0]}, image {width}x{height}")
        bad = np.unique(label_ids[(label_ids > MAX_LABEL_ID) & (label_ids != IGNORE_INDEX)])
        if bad.size:
            raise DataError(mask_path, f"mask values out of range: {bad[:8].tolist()} are not Cityscapes "
                                       f"label ids 0..{MAX_LABEL_ID} or {IGNORE_INDEX}")
        mask = self.lookup[label_ids]
        labels = tuple(int(c) for c in np.unique(mask) if c != IGNORE_INDEX)
        if not labels:
            raise DataError(mask_path, "no labels: no pixel belongs to one of the 19 classes")
        return Sample(id=name, image=image, mask=mask, labels=labels, height=height, width=width)
