"""Tiny but real PASCAL VOC2012 and SBD trees for tests of any module.

`make_voc_tree(base)` writes base/VOCdevkit/VOC2012 with JPEGs of varying sizes, palette
PNG masks whose objects have a VOC-style void (255) border, and XML annotations in which
a person carries nested <part>s (head, hand) that are not objects. `make_sbd_tree(base,
voc)` writes base/benchmark_RELEASE/dataset with train.txt, val.txt, img/ and cls/<id>.mat
(GTcls struct: Boundaries, Segmentation, CategoriesPresent), chosen so that train_aug
exercises every term of VOC train ∪ SBD train ∪ SBD val − VOC val. Both return what they
wrote, so tests can compare pixel for pixel.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from wsss.datasets.voc import VOC_CLASSES, voc_colormap

VOC_TRAIN = ["2007_000010", "2007_000020", "2007_000030", "2007_000040"]
VOC_VAL = ["2007_000050", "2007_000060", "2007_000070"]
DETECTION_ONLY = ["2008_000010", "2008_000020", "2008_000030", "2008_000040", "2008_000050"]  # no PNG mask
NO_XML = "2008_000040"  # labels must come from its (SBD) mask
SBD_TRAIN = ["2007_000020", "2007_000050", "2008_000010", "2008_000020", "2008_000030"]
SBD_VAL = ["2008_000040", "2007_000060"]
# VOC train ∪ SBD train ∪ SBD val − VOC val; 2008_000050 is in neither SBD list.
TRAIN_AUG = sorted(set(VOC_TRAIN) | {"2008_000010", "2008_000020", "2008_000030", "2008_000040"})

PERSON = VOC_CLASSES.index("person")


@dataclass
class VocTree:
    devkit: Path  # the VOCdevkit folder
    root: Path  # devkit / "VOC2012"
    splits: dict[str, list[str]]  # ImageSets/Segmentation/<split>.txt
    images: dict[str, bytes] = field(default_factory=dict)  # JPEG bytes written, by id
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (height, width)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # SegmentationClass PNGs written
    objects: dict[str, list[int]] = field(default_factory=dict)  # classes drawn in each image

    def labels(self, image_id: str) -> tuple[int, ...]:
        return tuple(sorted(set(self.objects[image_id])))


@dataclass
class SbdTree:
    root: Path  # the benchmark_RELEASE folder
    train: list[str]
    val: list[str]
    masks: dict[str, np.ndarray]  # cls/<id>.mat Segmentation written
    train_aug: list[str]  # the ids the reader must give for train_aug, sorted

    def expected_mask(self, voc: VocTree, image_id: str) -> np.ndarray:
        """VOC's PNG wins over SBD's .mat."""
        return voc.masks[image_id] if image_id in voc.masks else self.masks[image_id]


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    """A VOC-style mask: mode P, pixel = class index, the standard VOC palette."""
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask, np.uint8).tobytes())
    image.putpalette([v for rgb in voc_colormap(256) for v in rgb])
    image.save(path)


def write_sbd_mat(path: Path, mask: np.ndarray) -> None:
    """SBD's cls/<id>.mat layout: a GTcls struct with per-class boundary cells."""
    present = np.unique(mask[(mask > 0) & (mask < 255)]).astype(np.uint8)
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = scipy.sparse.csc_matrix(mask.shape, dtype=bool)
    scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": mask.astype(np.uint8),
                                      "CategoriesPresent": present}})


def voc_xml(image_id: str, height: int, width: int, objects: list[str], person_parts: bool = True) -> str:
    """A VOC2012 annotation; a person gets nested head/hand <part>s, as in the real data."""
    parts = ("\t\t<part>\n\t\t\t<name>head</name>\n\t\t\t<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>6</xmax>"
             "<ymax>6</ymax></bndbox>\n\t\t</part>\n\t\t<part>\n\t\t\t<name>hand</name>\n\t\t\t<bndbox>"
             "<xmin>3</xmin><ymin>8</ymin><xmax>5</xmax><ymax>10</ymax></bndbox>\n\t\t</part>\n")
    body = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>{width}</xmax>"
        f"<ymax>{height}</ymax></bndbox>\n{parts if name == 'person' and person_parts else ''}\t</object>\n"
        for name in objects)
    return (f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            f"\t<source><database>The VOC2007 Database</database></source>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n"
            f"\t</size>\n\t<segmented>1</segmented>\n{body}</annotation>\n")


def draw_mask(rng: np.random.Generator, height: int, width: int, classes: list[int], void: bool = True) -> np.ndarray:
    """Non-overlapping rectangles, one per class, each with a 1-2 px void border."""
    mask = np.zeros((height, width), np.uint8)
    slot = width // len(classes)
    for i, cls in enumerate(classes):
        top, left = int(rng.integers(3, height // 3)), i * slot + 3
        bottom, right = int(rng.integers(2 * height // 3, height - 3)), (i + 1) * slot - 3
        if void:
            mask[top - 2:bottom + 2, left - 2:right + 2] = 255
        mask[top:bottom, left:right] = cls
    return mask


def _classes_for(index: int) -> list[int]:
    """1-2 classes per image; every third image holds a person (with parts in its XML)."""
    first = 1 + (7 * index) % 20
    if index % 3 == 0:
        return [PERSON] if first == PERSON else [first, PERSON]
    return [first]


def make_voc_tree(base: str | Path, seed: int = 0) -> VocTree:
    """Write base/VOCdevkit/VOC2012 and return what was written."""
    rng = np.random.default_rng(seed)
    devkit = Path(base) / "VOCdevkit"
    root = devkit / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    splits = {"train": VOC_TRAIN, "val": VOC_VAL, "trainval": VOC_TRAIN + VOC_VAL}
    for name, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    tree = VocTree(devkit=devkit, root=root, splits=splits)
    for index, image_id in enumerate(VOC_TRAIN + VOC_VAL + DETECTION_ONLY):
        height, width = (40, 48) if index % 2 else (48, 56)
        classes = _classes_for(index)
        tree.sizes[image_id] = (height, width)
        tree.objects[image_id] = classes
        tree.images[image_id] = encode_jpeg(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(tree.images[image_id])
        if image_id != NO_XML:
            names = [VOC_CLASSES[c] for c in classes]
            (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, height, width, names))
        if image_id not in DETECTION_ONLY:
            tree.masks[image_id] = draw_mask(rng, height, width, classes)
            write_palette_png(root / "SegmentationClass" / f"{image_id}.png", tree.masks[image_id])
    return tree


def make_sbd_tree(base: str | Path, voc: VocTree, seed: int = 1) -> SbdTree:
    """Write base/benchmark_RELEASE/dataset for the ids in SBD_TRAIN and SBD_VAL. Its masks
    have no void (as in SBD) and differ from VOC's PNG for ids that have one."""
    rng = np.random.default_rng(seed)
    release = Path(base) / "benchmark_RELEASE"
    dataset = release / "dataset"
    for folder in ("cls", "img", "inst"):
        (dataset / folder).mkdir(parents=True, exist_ok=True)
    (dataset / "train.txt").write_text("".join(f"{i}\n" for i in SBD_TRAIN))
    (dataset / "val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    masks = {}
    for image_id in SBD_TRAIN + SBD_VAL:
        height, width = voc.sizes[image_id]
        masks[image_id] = draw_mask(rng, height, width, voc.objects[image_id], void=False)
        write_sbd_mat(dataset / "cls" / f"{image_id}.mat", masks[image_id])
        (dataset / "img" / f"{image_id}.jpg").write_bytes(voc.images[image_id])
    return SbdTree(root=release, train=SBD_TRAIN, val=SBD_VAL, masks=masks, train_aug=TRAIN_AUG)
