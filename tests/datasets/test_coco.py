"""The COCO reader on a tiny real tree: class mapping, masks pixel for pixel, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.coco_tree import (
    ANNOTATIONS,
    HEIGHT,
    WIDTH,
    file_name,
    rle_counts,
    rle_string,
    write_coco_tree,
)
from wsss.datasets.base import build_reader
from wsss.datasets.coco import decode_rle_string, rle_to_bitmap
from wsss.io import DataError

# Class indices by hand: COCO ids sorted, numbered from 1 (ids 12, 26, 29, 30, 45, ... unused).
PERSON, BICYCLE, CAR, AIRPLANE, BIRD, CAT, DOG, CHAIR, TOOTHBRUSH = 1, 2, 3, 5, 15, 16, 17, 57, 80
VOID = 255


def expected_masks() -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
    """Sample id -> (mask, labels): tests/coco_tree.py's annotations under the documented rule."""
    expected = {}

    def new(split, number, labels):
        mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        expected[file_name(split, number).removesuffix(".jpg")] = (mask, labels)
        return mask

    m = new("val", 1, (PERSON, DOG))
    m[4:41, 4:41] = PERSON
    m[20:31, 20:31] = DOG  # smaller, so on top although listed first
    m = new("val", 2, (PERSON, CAR))  # a crowd-only class is still an image label
    m[20:48, :] = VOID  # crowd of people
    m[10:31, 10:51] = CAR  # a non-crowd instance wins over the crowd
    m = new("val", 3, (BICYCLE, TOOTHBRUSH))
    m[5:41, 5:21] = TOOTHBRUSH
    m[0:21, 30:61] = VOID
    m[30:41, 40:51] = TOOTHBRUSH
    m[30:41, 55:61] = TOOTHBRUSH
    m = new("val", 4, (CAR, AIRPLANE))
    m[:] = VOID
    m[2:11, 2:11] = CAR
    m = new("val", 6, (BIRD, CAT))
    m[5:15, 5:15] = CAT  # annotation 60
    m[0:10, 0:10] = BIRD  # annotation 61: equal area, higher id, painted last
    m = new("train", 7, (PERSON,))
    m[8:41, 8:31] = PERSON
    m = new("train", 8, (CAR, CHAIR))
    m[0:11, :] = CAR
    m[20:48, 30:41] = CHAIR
    return expected


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco_tree(tmp_path_factory.mktemp("coco"))


def test_categories_map_to_contiguous_indices_by_sorted_id(coco_root):
    reader = build_reader("coco", str(coco_root))
    categories = json.loads((coco_root / "annotations" / "instances_val2014.json").read_text())["categories"]
    assert len(reader.info.classes) == 81 and reader.info.classes[0] == "background"
    for index, category in enumerate(sorted(categories, key=lambda c: c["id"]), start=1):
        assert reader.info.classes[index] == category["name"]
    assert [reader.info.classes[i] for i in (PERSON, DOG, CHAIR, TOOTHBRUSH)] == ["person", "dog", "chair", "toothbrush"]
    assert len(set(reader.info.palette)) == 81


def test_masks_and_labels_match_the_documented_rendering(coco_root):
    reader = build_reader("coco", str(coco_root), skip_invalid=True)
    assert reader.splits() == ["train", "val"]
    expected = expected_masks()
    seen = set()
    for split in reader.splits():
        for sample in reader.samples(split):
            mask, labels = expected[sample.id]
            np.testing.assert_array_equal(sample.mask, mask, err_msg=sample.id)
            assert sample.labels == labels, sample.id
            assert sample.image == (coco_root / f"{split}2014" / f"{sample.id}.jpg").read_bytes()
            assert (sample.height, sample.width) == (HEIGHT, WIDTH)
            seen.add(sample.id)
    assert seen == set(expected)


def test_image_without_annotations_is_an_error_or_skipped(coco_root):
    with pytest.raises(DataError, match="no labels") as error:
        list(build_reader("coco", str(coco_root)).samples("val"))
    assert error.value.path.endswith(file_name("val", 5))
    reader = build_reader("coco", str(coco_root), skip_invalid=True)
    assert len(list(reader.samples("val"))) == len(ANNOTATIONS["val"]) - 1
    assert reader.skipped.entries == [(str(coco_root / "val2014" / file_name("val", 5)),
                                       "no labels: instances_val2014.json has no annotation for this image")]


def test_compressed_rle_hand_vectors():
    assert decode_rle_string("52203") == [5, 2, 2, 2, 5]
    # 40 = 8 + 1*32 -> "X1"; 100 = 4 + 3*32 -> "T3"; 3 -> "3"; 10 is stored as 10 - 100 = -90
    # = 6 + 29*32 - 1024: groups 6|0x20 -> "V", then 29 (sign bit 0x10 set) -> "M".
    assert decode_rle_string("X1T33VM") == [40, 100, 3, 10]


def test_compressed_rle_round_trips_random_runs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 5000, size=rng.integers(1, 30)).tolist()
        assert decode_rle_string(rle_string(counts)) == counts


def test_rle_runs_fill_columns_first():
    np.testing.assert_array_equal(rle_to_bitmap([2, 3, 1], 2, 3), [[0, 1, 1], [0, 1, 0]])
    bitmap = np.random.default_rng(1).random((7, 5)) > 0.5
    np.testing.assert_array_equal(rle_to_bitmap(rle_counts(bitmap), 7, 5), bitmap)


def edit_json(root, split, edit):
    path = root / "annotations" / f"instances_{split}2014.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def first_error(root, split="train") -> DataError:
    with pytest.raises(DataError) as error:
        list(build_reader("coco", str(root)).samples(split))
    return error.value


def test_truncated_image_names_the_file(tmp_path):
    root = write_coco_tree(tmp_path)
    path = root / "train2014" / file_name("train", 7)
    path.write_bytes(path.read_bytes()[:300])
    error = first_error(root)
    assert error.path == str(path) and "corrupt or truncated image" in error.problem


def test_missing_image_names_the_file(tmp_path):
    root = write_coco_tree(tmp_path)
    path = root / "train2014" / file_name("train", 8)
    path.unlink()
    error = first_error(root)
    assert error.path == str(path) and "image missing" in error.problem


def test_image_size_differing_from_json(tmp_path):
    root = write_coco_tree(tmp_path)
    edit_json(root, "train", lambda data: data["images"][0].update(height=HEIGHT + 1))
    error = first_error(root)
    assert error.path.endswith(file_name("train", 7)) and "image size differs" in error.problem


def test_unknown_category_id_names_json_and_annotation(tmp_path):
    root = write_coco_tree(tmp_path)
    path = edit_json(root, "train", lambda data: data["annotations"][0].update(category_id=12))
    error = first_error(root)
    assert error.path == f"{path} (annotation 70)" and "unknown class: category_id 12" in error.problem


def test_categories_other_than_cocos_80(tmp_path):
    root = write_coco_tree(tmp_path)
    path = edit_json(root, "train", lambda data: data["categories"][0].update(name="human"))
    error = first_error(root)
    assert error.path == str(path) and "unknown class" in error.problem and "human" in error.problem


@pytest.mark.parametrize("segmentation, problem", [
    ({"size": [HEIGHT, WIDTH], "counts": [5, 5]}, "sum to"),
    ({"size": [HEIGHT, WIDTH + 1], "counts": [HEIGHT * (WIDTH + 1)]}, "RLE size"),
    ([[1, 2, 3, 4, 5, 6, 7]], "odd number"),
    ("nonsense", "neither a polygon"),
])
def test_bad_segmentation_names_the_annotation(tmp_path, segmentation, problem):
    root = write_coco_tree(tmp_path)
    path = edit_json(root, "train", lambda data: data["annotations"][0].update(segmentation=segmentation))
    error = first_error(root)
    assert error.path == f"{path} (annotation 70)" and "bad segmentation" in error.problem
    assert problem in error.problem


def test_malformed_json(tmp_path):
    root = write_coco_tree(tmp_path)
    path = root / "annotations" / "instances_train2014.json"
    path.write_text('{"images": [')
    error = first_error(root)
    assert error.path == str(path) and "malformed annotation file" in error.problem


def test_unreadable_root(tmp_path):
    with pytest.raises(DataError, match="unreadable root") as error:
        build_reader("coco", str(tmp_path / "absent"))
    assert error.value.path == str(tmp_path / "absent")
    with pytest.raises(DataError, match="no instances_train2014.json"):
        build_reader("coco", str(tmp_path))


def test_only_splits_with_a_json_exist(tmp_path):
    root = write_coco_tree(tmp_path, {"val": ANNOTATIONS["val"]})
    reader = build_reader("coco", str(root))
    assert reader.splits() == ["val"]
    with pytest.raises(DataError, match="unknown split 'train'"):
        list(reader.samples("train"))
