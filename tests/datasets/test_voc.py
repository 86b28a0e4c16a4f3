"""The VOC reader on tiny real VOC2012 + SBD trees: contents pixel for pixel, the train_aug
set algebra, and every kind of bad input (raised, or skipped and logged)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import scipy.io

from tests.helpers.voc_tree import (
    DETECTION_ONLY,
    NO_XML,
    TRAIN_AUG,
    VOC_TRAIN,
    VOC_VAL,
    make_sbd_tree,
    make_voc_tree,
    voc_xml,
    write_palette_png,
    write_sbd_mat,
)
from wsss.datasets.base import build_reader
from wsss.datasets.voc import VOC_CLASSES, VOCReader
from wsss.io import DataError


@pytest.fixture
def voc(tmp_path):
    return make_voc_tree(tmp_path)


@pytest.fixture
def sbd(tmp_path, voc):
    return make_sbd_tree(tmp_path, voc)


def by_id(reader, split):
    return {sample.id: sample for sample in reader.samples(split)}


def test_info_is_the_20_voc_classes_with_the_voc_palette(voc):
    info = VOCReader(voc.root).info
    assert info.name == "voc" and info.classes == VOC_CLASSES and info.num_classes == 20
    assert info.ignore_index == 255 and len(info.palette) == 21
    assert info.palette[:3] == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    assert info.palette[15] == (192, 128, 128)  # person


@pytest.mark.parametrize("split", ["train", "val", "trainval"])
def test_segmentation_splits_match_the_tree_pixel_for_pixel(voc, split):
    samples = list(VOCReader(voc.root).samples(split))
    assert [s.id for s in samples] == voc.splits[split]  # the split file's order
    for sample in samples:
        assert sample.image == voc.images[sample.id]  # original bytes, not re-encoded
        assert sample.mask.dtype == np.uint8 and sample.mask.shape == voc.sizes[sample.id]
        np.testing.assert_array_equal(sample.mask, voc.masks[sample.id])
        assert (sample.height, sample.width) == voc.sizes[sample.id]
        assert sample.labels == voc.labels(sample.id)
    assert any(255 in s.mask for s in samples)  # the void borders came through


@pytest.mark.parametrize("where", ["voc2012", "devkit", "devkit_parent"])
def test_root_may_be_voc2012_or_a_folder_holding_it(voc, where):
    root = {"voc2012": voc.root, "devkit": voc.devkit, "devkit_parent": voc.devkit.parent}[where]
    reader = build_reader("voc", str(root))
    assert reader.splits() == ["train", "trainval", "val"]
    assert [s.id for s in reader.samples("val")] == VOC_VAL


def test_person_parts_are_not_labels(voc):
    image_id = VOC_TRAIN[0]
    xml = (voc.root / "Annotations" / f"{image_id}.xml").read_text()
    assert "<name>head</name>" in xml and "<name>hand</name>" in xml
    assert VOCReader(voc.root).sample(image_id).labels == (1, 15)  # aeroplane, person


def test_train_aug_is_voc_train_and_sbd_minus_voc_val(voc, sbd):
    reader = VOCReader(voc.root, sbd=sbd.root)
    assert reader.splits()[-1] == "train_aug"
    samples = by_id(reader, "train_aug")
    assert list(samples) == TRAIN_AUG
    assert set(TRAIN_AUG) == (set(VOC_TRAIN) | set(sbd.train) | set(sbd.val)) - set(VOC_VAL)
    for image_id, sample in samples.items():
        np.testing.assert_array_equal(sample.mask, sbd.expected_mask(voc, image_id))
        assert sample.image == voc.images[image_id]
    # An id in both VOC train and SBD: VOC's PNG wins over the (different) SBD mask.
    both = min(set(VOC_TRAIN) & set(sbd.train))
    assert not np.array_equal(voc.masks[both], sbd.masks[both])
    np.testing.assert_array_equal(samples[both].mask, voc.masks[both])


def test_labels_fall_back_to_the_mask_without_xml(voc, sbd):
    assert not (voc.root / "Annotations" / f"{NO_XML}.xml").exists()
    sample = VOCReader(voc.root, sbd=sbd.root).sample(NO_XML, sbd_masks=True)
    expected = tuple(int(c) for c in np.unique(sbd.masks[NO_XML]) if 0 < c < 255)
    assert sample.labels == expected and sample.labels == voc.labels(NO_XML)


@pytest.mark.parametrize("where", ["parent", "release", "dataset"])
def test_sbd_path_may_be_release_or_its_dataset_folder(voc, sbd, where):
    path = {"parent": sbd.root.parent, "release": sbd.root, "dataset": sbd.root / "dataset"}[where]
    assert [s.id for s in VOCReader(voc.root, sbd=path).samples("train_aug")] == TRAIN_AUG


def test_train_aug_needs_sbd(voc):
    reader = VOCReader(voc.root)
    assert "train_aug" not in reader.splits()
    with pytest.raises(DataError, match="unknown split: 'train_aug'"):
        list(reader.samples("train_aug"))


def test_classes_txt_replaces_the_voc_classes(voc):
    classes = ["background"] + list(reversed(VOC_CLASSES[1:]))
    (voc.root / "classes.txt").write_text("\n".join(classes) + "\n")
    reader = VOCReader(voc.root)
    assert reader.info.classes == tuple(classes) and len(reader.info.palette) == 21
    assert reader.sample(VOC_TRAIN[0]).labels == (classes.index("person"), classes.index("aeroplane"))


def test_classes_txt_must_start_with_background(voc):
    (voc.root / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match="classes.txt: bad class list"):
        VOCReader(voc.root)


# Each case breaks one file of a fresh tree and returns (split, broken file, words of the problem).
def corrupt_image(voc, sbd):
    path = voc.root / "JPEGImages" / f"{VOC_TRAIN[1]}.jpg"
    path.write_bytes(b"this is not a jpeg" * 20)
    return "train", path, "corrupt or truncated image"


def truncated_image(voc, sbd):
    path = voc.root / "JPEGImages" / f"{VOC_TRAIN[1]}.jpg"
    path.write_bytes(voc.images[VOC_TRAIN[1]][:-40])
    return "train", path, "corrupt or truncated image: image file is truncated"


def missing_image(voc, sbd):
    path = voc.root / "JPEGImages" / f"{VOC_VAL[0]}.jpg"
    path.unlink()
    return "val", path, "image missing"


def missing_mask(voc, sbd):
    path = voc.root / "SegmentationClass" / f"{VOC_VAL[1]}.png"
    path.unlink()
    assert VOC_VAL[1] in sbd.val  # SBD has a mask for it, but val masks must be VOC's
    return "val", path, "mask missing: no such file"


def missing_mask_in_train_aug(voc, sbd):
    (sbd.root / "dataset" / "cls" / f"{DETECTION_ONLY[0]}.mat").unlink()
    return "train_aug", voc.root / "SegmentationClass" / f"{DETECTION_ONLY[0]}.png", "mask missing"


def mask_size_differs(voc, sbd):
    path = voc.root / "SegmentationClass" / f"{VOC_TRAIN[2]}.png"
    height, width = voc.sizes[VOC_TRAIN[2]]
    write_palette_png(path, np.zeros((height, width - 1), np.uint8) + 3)
    return "train", path, f"mask size differs from image size: mask {width - 1}x{height}, image {width}x{height}"


def mask_values_out_of_range(voc, sbd):
    path = voc.root / "SegmentationClass" / f"{VOC_TRAIN[2]}.png"
    mask = voc.masks[VOC_TRAIN[2]].copy()
    mask[0, :3] = [21, 254, 255]  # 21 and 254 are no class; 255 is void
    write_palette_png(path, mask)
    return "train", path, "mask values out of range: [21, 254]"


def sbd_mask_values_out_of_range(voc, sbd):
    path = sbd.root / "dataset" / "cls" / f"{DETECTION_ONLY[1]}.mat"
    mask = sbd.masks[DETECTION_ONLY[1]].copy()
    mask[0, 0] = 40
    write_sbd_mat(path, mask)
    return "train_aug", path, "mask values out of range: [40]"


def rgb_mask(voc, sbd):
    from PIL import Image

    path = voc.root / "SegmentationClass" / f"{VOC_TRAIN[0]}.png"
    Image.open(path).convert("RGB").save(path)
    return "train", path, "bad mask: mode RGB"


def sixteen_bit_image(voc, sbd):
    from PIL import Image

    path = voc.root / "JPEGImages" / f"{VOC_TRAIN[1]}.jpg"
    height, width = voc.sizes[VOC_TRAIN[1]]
    levels = (np.arange(height * width).reshape(height, width) % 80 * 800).astype(np.uint16)  # 80 values
    Image.fromarray(levels).save(path, format="PNG")  # what 8-bit RGB would clip to 2 values
    return "train", path, "unsupported image: mode I;16"


def transparent_image(voc, sbd):
    from PIL import Image

    path = voc.root / "JPEGImages" / f"{VOC_VAL[0]}.jpg"
    image = Image.open(path).convert("RGBA")
    image.putpixel((0, 0), (10, 20, 30, 0))
    image.save(path, format="PNG")
    return "val", path, "unsupported image: mode RGBA with transparent pixels"


def sixteen_bit_mask(voc, sbd):
    from PIL import Image

    path = voc.root / "SegmentationClass" / f"{VOC_TRAIN[0]}.png"
    Image.fromarray(voc.masks[VOC_TRAIN[0]].astype(np.uint16) * 300).save(path)
    return "train", path, "bad mask: mode I;16"


def corrupt_sbd_mat(voc, sbd):
    path = sbd.root / "dataset" / "cls" / f"{DETECTION_ONLY[2]}.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(10))
    return "train_aug", path, "corrupt or truncated mask"


def sbd_mat_without_gtcls(voc, sbd):
    path = sbd.root / "dataset" / "cls" / f"{DETECTION_ONLY[2]}.mat"
    scipy.io.savemat(path, {"GTinst": {"Segmentation": sbd.masks[DETECTION_ONLY[2]]}})
    return "train_aug", path, "bad mask: no GTcls.Segmentation"


def unknown_class_in_xml(voc, sbd):
    path = voc.root / "Annotations" / f"{VOC_VAL[1]}.xml"
    height, width = voc.sizes[VOC_VAL[1]]
    path.write_text(voc_xml(VOC_VAL[1], height, width, ["dog", "unicorn"]))
    return "val", path, "unknown class: 'unicorn'"


def malformed_xml(voc, sbd):
    path = voc.root / "Annotations" / f"{VOC_VAL[1]}.xml"
    path.write_text("<annotation><object><name>dog</name></annotation>")
    return "val", path, "malformed XML"


def xml_without_objects(voc, sbd):
    path = voc.root / "Annotations" / f"{VOC_TRAIN[3]}.xml"
    height, width = voc.sizes[VOC_TRAIN[3]]
    path.write_text(voc_xml(VOC_TRAIN[3], height, width, []))
    return "train", path, "no labels"


def mask_without_foreground(voc, sbd):
    path = sbd.root / "dataset" / "cls" / f"{NO_XML}.mat"
    write_sbd_mat(path, np.zeros(voc.sizes[NO_XML], np.uint8))
    return "train_aug", path, "no labels"


BAD_INPUTS = [corrupt_image, truncated_image, missing_image, missing_mask, missing_mask_in_train_aug,
              mask_size_differs, mask_values_out_of_range, sbd_mask_values_out_of_range, rgb_mask,
              sixteen_bit_image, transparent_image, sixteen_bit_mask, corrupt_sbd_mat, sbd_mat_without_gtcls, unknown_class_in_xml, malformed_xml,
              xml_without_objects, mask_without_foreground]


@pytest.mark.parametrize("break_tree", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_is_an_error_naming_the_file_and_problem(voc, sbd, break_tree):
    split, path, problem = break_tree(voc, sbd)
    with pytest.raises(DataError) as caught:
        list(VOCReader(voc.root, sbd=sbd.root).samples(split))
    assert caught.value.path == str(path)
    assert caught.value.problem.startswith(problem), caught.value.problem


@pytest.mark.parametrize("break_tree", BAD_INPUTS, ids=lambda f: f.__name__)
def test_skip_invalid_skips_and_logs_the_bad_sample(voc, sbd, break_tree):
    split, path, problem = break_tree(voc, sbd)
    reader = VOCReader(voc.root, sbd=sbd.root, skip_invalid=True)
    kept = [s.id for s in reader.samples(split)]
    all_ids = TRAIN_AUG if split == "train_aug" else voc.splits[split]
    assert len(kept) == len(all_ids) - 1 and set(kept) < set(all_ids)
    assert len(reader.skipped.entries) == 1
    skipped_path, skipped_problem = reader.skipped.entries[0]
    assert skipped_path == str(path) and skipped_problem.startswith(problem)


def test_skip_invalid_logs_every_bad_sample_of_a_split(voc, sbd):
    broken = [corrupt_image(voc, sbd), mask_size_differs(voc, sbd), xml_without_objects(voc, sbd)]
    reader = VOCReader(voc.root, skip_invalid=True)
    assert [s.id for s in reader.samples("train")] == [VOC_TRAIN[0]]
    assert [path for path, _ in reader.skipped.entries] == [str(path) for _, path, _ in broken]
    assert [problem.split(":")[0] for _, problem in reader.skipped.entries] == [
        "corrupt or truncated image", "mask size differs from image size", "no labels"]


def test_xml_labels_ignore_nested_part_names_only(voc):
    """A <part> named like a class must not count; an object named like a part must fail."""
    path = voc.root / "Annotations" / f"{VOC_TRAIN[0]}.xml"
    tree = ET.parse(path)
    for part_name in tree.getroot().iter("part"):
        part_name.find("name").text = "dog"
    tree.write(path)
    assert VOCReader(voc.root).sample(VOC_TRAIN[0]).labels == (1, 15)
    height, width = voc.sizes[VOC_TRAIN[0]]
    path.write_text(voc_xml(VOC_TRAIN[0], height, width, ["person", "head"]))
    with pytest.raises(DataError, match="unknown class: 'head'"):
        VOCReader(voc.root).sample(VOC_TRAIN[0])


def test_unknown_split_is_an_error(voc):
    with pytest.raises(DataError, match="unknown split: 'test'; known: train, trainval, val"):
        list(VOCReader(voc.root).samples("test"))


@pytest.mark.parametrize("case", ["missing", "file", "no_jpegimages", "no_imagesets"])
def test_unreadable_root_is_an_error_naming_it(tmp_path, voc, case):
    import shutil

    if case == "missing":
        root = tmp_path / "nowhere"
    elif case == "file":
        root = tmp_path / "a_file"
        root.write_text("x")
    elif case == "no_jpegimages":
        root = tmp_path / "empty"
        root.mkdir()
    else:
        shutil.rmtree(voc.root / "ImageSets")
        root = voc.root
    with pytest.raises(DataError, match="unreadable root") as caught:
        VOCReader(root)
    assert caught.value.path == str(root)


@pytest.mark.parametrize("case", ["missing", "no_cls", "no_val_txt"])
def test_unreadable_sbd_root_is_an_error_naming_it(tmp_path, voc, sbd, case):
    dataset = sbd.root / "dataset"
    if case == "missing":
        path, named = tmp_path / "nowhere", tmp_path / "nowhere"
    elif case == "no_cls":
        (dataset / "cls").rename(dataset / "gone")
        path, named = sbd.root, sbd.root
    else:
        (dataset / "val.txt").unlink()
        path, named = sbd.root, dataset / "val.txt"
    with pytest.raises(DataError, match="unreadable root") as caught:
        VOCReader(voc.root, sbd=path)
    assert caught.value.path == str(named)


def test_voc_tree_masks_have_void_borders_and_sbd_masks_none(voc, sbd):
    """The test trees themselves look like the real data."""
    assert all((m == 255).any() for m in voc.masks.values())
    assert not any((m == 255).any() for m in sbd.masks.values())
    mat = scipy.io.loadmat(sbd.root / "dataset" / "cls" / f"{NO_XML}.mat")
    assert mat["GTcls"].dtype.names == ("Boundaries", "Segmentation", "CategoriesPresent")


def test_images_that_read_as_rgb_exactly_are_kept_byte_for_byte(voc):
    """Grayscale, palette and all-opaque RGBA images convert to RGB without loss, as
    training decodes them: their shards keep the original bytes."""
    from PIL import Image

    from wsss.datasets.augment import decode_image

    originals = {}
    for image_id, mode in zip(VOC_TRAIN[:3], ("L", "P", "RGBA"), strict=True):
        path = voc.root / "JPEGImages" / f"{image_id}.jpg"
        rgb = Image.open(path).convert("RGB")
        rgb = rgb.convert("L").convert("RGB") if mode == "L" else rgb
        rgb.convert(mode).save(path, format="PNG")
        originals[image_id] = (path.read_bytes(), np.asarray(rgb.convert(mode).convert("RGB")))
    samples = {s.id: s for s in VOCReader(voc.root).samples("train")}
    for image_id, (data, pixels) in originals.items():
        assert samples[image_id].image == data
        np.testing.assert_array_equal(np.asarray(decode_image(data, image_id)), pixels)
