"""PASCAL VOC 2012 reader, with the SBD `train_aug` split.

Layout read (root = the VOC2012 folder, or a VOCdevkit folder holding it):
  JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNG: pixel = class index,
  255 = void), ImageSets/Segmentation/<split>.txt, Annotations/<id>.xml.
Image-level labels come from the XML object names (nested `<part>` names of person such
as "head" are not objects); an image without XML falls back to the classes in its mask.

`train_aug` (with `sbd=`, the SBD `benchmark_RELEASE` tree) is the standard augmented
training set: VOC train ∪ SBD train ∪ SBD val − VOC val (10,582 ids with the real data).
Its masks come from VOC's PNG when there is one, else from SBD `cls/<id>.mat`.

A `classes.txt` at the root (one name per line, "background" first) replaces the 20 VOC
classes; the synthetic benchmark declares its classes this way, and adds a region map per
image (SegmentationRegion/<id>.png, mode L, REGION_* values), read when that folder exists.

Every bad input is a DataError naming the file and "<problem>: <detail>"; the part
before the colon is a fixed category, so skipped inputs can be counted per problem.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.datasets.base import (
    IGNORE_INDEX,
    REGION_CONTEXT,
    DatasetInfo,
    ItemReader,
    Sample,
    SkipLog,
    register_reader,
)
from wsss.io import DataError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
TRAIN_AUG = "train_aug"
REGION_FOLDER = "SegmentationRegion"
# What PIL raises on bad bytes: truncation and unknown formats are OSErrors, broken chunks
# SyntaxError or ValueError, absurd sizes DecompressionBombError.
PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Image modes that convert("RGB"), how training decodes every image, maps without loss of
# what the image shows. 16-bit and float modes (I;16, I, F) would be clipped to 0/255.
RGB_EXACT_MODES = ("RGB", "L", "P", "1", "CMYK", "YCbCr")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The standard VOC palette: the bits of the class index spread over R, G and B."""
    index = np.arange(n)
    rgb = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):  # 8 bit planes, not a per-pixel loop
        for channel in range(3):
            bit = (index >> (3 * shift + channel)) & 1
            rgb[:, channel] |= bit << (7 - shift)
    return [tuple(int(v) for v in row) for row in rgb]


def find_voc_root(root: str | Path) -> Path:
    """The folder holding JPEGImages: root itself, root/VOC2012 or root/VOCdevkit/VOC2012."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "unreadable root: not an existing directory")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            if not (candidate / "ImageSets" / "Segmentation").is_dir():
                raise DataError(candidate, "unreadable root: no ImageSets/Segmentation folder")
            return candidate
    raise DataError(root, "unreadable root: no JPEGImages folder (expected a VOC2012 or VOCdevkit folder)")


def find_sbd_root(sbd: str | Path) -> Path:
    """The SBD `dataset` folder (train.txt, val.txt, cls/): sbd, sbd/dataset or
    sbd/benchmark_RELEASE/dataset."""
    sbd = Path(sbd)
    if not sbd.is_dir():
        raise DataError(sbd, "unreadable root: SBD path is not an existing directory")
    for candidate in (sbd, sbd / "dataset", sbd / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            for name in ("train.txt", "val.txt"):
                if not (candidate / name).is_file():
                    raise DataError(candidate / name, "unreadable root: SBD split file missing")
            return candidate
    raise DataError(sbd, "unreadable root: no SBD cls/ folder (expected benchmark_RELEASE or its dataset/)")


def read_classes(root: Path) -> tuple[str, ...]:
    path = root / "classes.txt"
    if not path.exists():
        return VOC_CLASSES
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names or names[0] != "background":
        raise DataError(path, "bad class list: first line must be 'background'")
    if len(set(names)) != len(names) or len(names) > IGNORE_INDEX:
        raise DataError(path, f"bad class list: duplicate names or more than {IGNORE_INDEX} classes")
    return names


def read_ids(path: Path) -> list[str]:
    """Ids of a split file, first token per line, in file order without repeats."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise DataError(path, f"unreadable split file: {error}") from None
    return list(dict.fromkeys(line.split()[0] for line in lines if line.strip()))


def decode_image(path: Path) -> tuple[bytes, int, int]:
    """The file's bytes and (height, width), after decoding it fully: PIL only notices a
    truncated JPEG when it decodes the last rows."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "image missing: no such file") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            problem = rgb_problem(image)
    except PIL_DECODE_ERRORS as error:
        raise DataError(path, f"corrupt or truncated image: {error}") from None
    if problem:
        raise DataError(path, problem)
    return data, height, width


def rgb_problem(image: Image.Image) -> str | None:
    """Why reading `image` as 8-bit RGB would change it, or None. Shards keep the original
    bytes, so an image with an alpha channel that is opaque everywhere passes as it is."""
    if image.mode in ALPHA_MODES or image.has_transparency_data:
        if image.convert("RGBA").getchannel("A").getextrema()[0] < 255:
            return (f"unsupported image: mode {image.mode} with transparent pixels; training reads RGB and "
                    "would drop the alpha channel (flatten the image onto a background first)")
        return None
    if image.mode not in RGB_EXACT_MODES:
        return (f"unsupported image: mode {image.mode}; training reads 8-bit RGB, which would clip or "
                "distort it (convert the image to 8-bit RGB first)")
    return None


def read_png_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            mode, mask = image.mode, np.array(image)
    except FileNotFoundError:
        raise DataError(path, "mask missing: no such file") from None
    except PIL_DECODE_ERRORS as error:
        raise DataError(path, f"corrupt or truncated mask: {error}") from None
    if mode not in ("P", "L"):
        raise DataError(path, f"bad mask: mode {mode}, expected palette (P) or grayscale (L) class indices")
    return mask


def read_sbd_mask(path: Path) -> np.ndarray:
    """SBD stores the class mask as GTcls.Segmentation in a MATLAB file."""
    import scipy.io  # only train_aug needs scipy
    from scipy.io.matlab import MatReadError

    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except (MatReadError, OSError, ValueError, TypeError, EOFError, IndexError, KeyError) as error:
        raise DataError(path, f"corrupt or truncated mask: {error!r}") from None  # scipy's errors vary
    try:
        segmentation = np.asarray(mat["GTcls"].Segmentation)
    except (KeyError, AttributeError):
        raise DataError(path, "bad mask: no GTcls.Segmentation in the .mat file") from None
    if segmentation.ndim != 2 or not np.issubdtype(segmentation.dtype, np.number):
        raise DataError(path, f"bad mask: GTcls.Segmentation has shape {segmentation.shape}, expected [H, W]")
    if segmentation.min() < 0 or segmentation.max() > IGNORE_INDEX:
        raise DataError(path, "mask values out of range: outside 0..255")
    return segmentation.astype(np.uint8)


@register_reader("voc")
class VOCReader(ItemReader):
    """Reads a VOC2012 tree (and optionally SBD) into `Sample`s; see the module docstring."""

    def __init__(self, root: str | Path, sbd: str | Path | None = None, skip_invalid: bool = False,
                 name: str = "voc"):
        self.root = find_voc_root(root)
        self.sbd = find_sbd_root(sbd) if sbd is not None else None
        self.skip_invalid = skip_invalid
        self.skipped = SkipLog()
        classes = read_classes(self.root)
        self.info = DatasetInfo(name=name, classes=classes, palette=tuple(voc_colormap(len(classes))))

    def splits(self) -> list[str]:
        names = sorted(path.stem for path in self._split_dir.glob("*.txt"))
        if self.sbd is not None and TRAIN_AUG not in names:
            names.append(TRAIN_AUG)
        return names

    def items(self, split: str) -> list[str]:
        return self.ids(split)

    def read_item(self, split: str, image_id: str) -> Sample:
        return self.sample(image_id, sbd_masks=split == TRAIN_AUG)

    def ids(self, split: str) -> list[str]:
        """The split's ids: the split file's order, or sorted for train_aug."""
        if split == TRAIN_AUG and self.sbd is not None:
            voc_train = read_ids(self._split_file("train"))
            voc_val = set(read_ids(self._split_file("val")))
            sbd_ids = read_ids(self.sbd / "train.txt") + read_ids(self.sbd / "val.txt")
            return sorted(set(voc_train).union(sbd_ids) - voc_val)
        return read_ids(self._split_file(split))

    def sample(self, image_id: str, sbd_masks: bool = False) -> Sample:
        """One validated sample. Every split's images need a mask; only train_aug's
        (`sbd_masks`) may come from SBD."""
        image, height, width = decode_image(self.root / "JPEGImages" / f"{image_id}.jpg")
        mask_path, mask = self._read_mask(image_id, sbd_masks and self.sbd is not None)
        if mask.shape != (height, width):
            raise DataError(mask_path, f"mask size differs from image size: mask {mask.shape[1]}x{mask.shape[0]}, "
                                       f"image {width}x{height}")
        num_classes = len(self.info.classes)
        bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise DataError(mask_path, f"mask values out of range: {bad[:8].tolist()} not in 0..{num_classes - 1} "
                                       f"or {IGNORE_INDEX}")
        labels = self._labels(image_id, mask, mask_path)
        return Sample(id=image_id, image=image, mask=mask, labels=labels, height=height, width=width,
                      region=self._read_region(image_id, mask.shape))

    def _read_region(self, image_id: str, shape: tuple[int, int]) -> np.ndarray | None:
        if not (self.root / REGION_FOLDER).is_dir():
            return None
        path = self.root / REGION_FOLDER / f"{image_id}.png"
        region = read_png_mask(path)
        if region.shape != shape:
            raise DataError(path, f"region map size differs from image size: {region.shape} vs {shape}")
        if region.max() > REGION_CONTEXT:
            raise DataError(path, f"region values out of range: {int(region.max())} not in 0..{REGION_CONTEXT}")
        return region

    def _labels(self, image_id: str, mask: np.ndarray, mask_path: Path) -> tuple[int, ...]:
        xml_path = self.root / "Annotations" / f"{image_id}.xml"
        if xml_path.exists():
            labels, source = xml_labels(xml_path, self.info.classes), xml_path
        else:
            present = np.unique(mask)
            labels = tuple(int(c) for c in present if 0 < c < len(self.info.classes))
            source = mask_path
        if not labels:
            raise DataError(source, "no labels: the image has no foreground class")
        return labels

    def _read_mask(self, image_id: str, sbd_masks: bool) -> tuple[Path, np.ndarray]:
        png = self.root / "SegmentationClass" / f"{image_id}.png"
        if png.exists():
            return png, read_png_mask(png)
        if sbd_masks:
            mat = self.sbd / "cls" / f"{image_id}.mat"
            if mat.exists():
                return mat, read_sbd_mask(mat)
            raise DataError(png, f"mask missing: neither this file nor {mat} exists")
        raise DataError(png, "mask missing: no such file")

    @property
    def _split_dir(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"

    def _split_file(self, split: str) -> Path:
        path = self._split_dir / f"{split}.txt"
        if not path.is_file():
            raise DataError(path, f"unknown split: {split!r}; known: {', '.join(self.splits())}")
        return path


def xml_labels(path: Path, classes: tuple[str, ...]) -> tuple[int, ...]:
    """Sorted foreground class indices named by the annotation's objects. Only the
    object's own <name> counts, never those of its nested <part>s."""
    try:
        annotation = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise DataError(path, f"malformed XML: {error}") from None
    index = {name: i for i, name in enumerate(classes) if i > 0}
    labels = set()
    for obj in annotation.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise DataError(path, f"unknown class: {name!r} is not one of the {len(index)} classes")
        labels.add(index[name])
    return tuple(sorted(labels))
