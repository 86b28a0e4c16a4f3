"""The Cityscapes reader on a tiny real tree, checked against the official label table."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers.cityscapes_tree import HEIGHT, WIDTH, write_cityscapes_tree
from wsss.datasets.base import build_reader
from wsss.io import DataError

# cityscapesScripts/helpers/labels.py: (name, label id, train id); 255 and -1 are not evaluated.
OFFICIAL_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9),
    ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14),
    ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16),
    ("motorcycle", 32, 17), ("bicycle", 33, 18), ("license plate", -1, -1),
]


def expected_class(label_id: int) -> int:
    """Class index = train id + 1; everything not evaluated (and 255, a license plate) is void."""
    for _, official_id, train_id in OFFICIAL_LABELS:
        if official_id == label_id and train_id not in (255, -1):
            return train_id + 1
    return 255


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    return root, write_cityscapes_tree(root)


def test_classes_are_background_then_the_19_train_classes(tree):
    info = build_reader("cityscapes", str(tree[0])).info
    train_names = [name for name, _, train_id in sorted(OFFICIAL_LABELS, key=lambda row: row[2])
                   if train_id not in (255, -1)]
    assert info.classes == ("background", *train_names)
    assert info.num_classes == 19 and len(info.palette) == 20
    assert info.palette[1] == (128, 64, 128) and info.palette[19] == (119, 11, 32)  # road, bicycle


def test_masks_follow_the_official_table_pixel_for_pixel(tree):
    root, label_ids = tree
    reader = build_reader("cityscapes", str(root))
    assert reader.splits() == ["train", "val"]
    seen = []
    for split in reader.splits():
        for sample in reader.samples(split):
            source = label_ids[sample.id]
            expected = np.zeros_like(source)
            for y in range(HEIGHT):
                for x in range(WIDTH):
                    expected[y, x] = expected_class(int(source[y, x]))
            np.testing.assert_array_equal(sample.mask, expected, err_msg=sample.id)
            assert sample.labels == tuple(sorted(set(expected.flatten().tolist()) - {255}))
            assert 0 not in sample.labels and 0 not in sample.mask  # no background in Cityscapes
            city = sample.id.split("_")[0]
            assert sample.image == (root / "leftImg8bit" / split / city / f"{sample.id}_leftImg8bit.png").read_bytes()
            assert (sample.height, sample.width) == (HEIGHT, WIDTH)
            seen.append(sample.id)
    assert sorted(seen) == sorted(label_ids)


def mask_path(root, name="aachen_000000_000019", split="train"):
    return root / "gtFine" / split / name.split("_")[0] / f"{name}_gtFine_labelIds.png"


def first_error(root) -> DataError:
    with pytest.raises(DataError) as error:
        list(build_reader("cityscapes", str(root)).samples("train"))
    return error.value


def test_missing_mask(tmp_path):
    write_cityscapes_tree(tmp_path)
    mask_path(tmp_path).unlink()
    error = first_error(tmp_path)
    assert error.path == str(mask_path(tmp_path)) and error.problem.startswith("mask missing")


def test_mask_size_differs_from_image(tmp_path):
    write_cityscapes_tree(tmp_path)
    Image.fromarray(np.full((HEIGHT, WIDTH - 8), 7, dtype=np.uint8)).save(mask_path(tmp_path))
    error = first_error(tmp_path)
    assert error.path == str(mask_path(tmp_path)) and "mask size differs from image size" in error.problem


def test_label_id_outside_the_table(tmp_path):
    write_cityscapes_tree(tmp_path)
    ids = np.full((HEIGHT, WIDTH), 7, dtype=np.uint8)
    ids[0, 0] = 40
    Image.fromarray(ids).save(mask_path(tmp_path))
    error = first_error(tmp_path)
    assert error.path == str(mask_path(tmp_path)) and "mask values out of range: [40]" in error.problem


def test_truncated_image(tmp_path):
    write_cityscapes_tree(tmp_path)
    image = tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    image.write_bytes(image.read_bytes()[:200])
    error = first_error(tmp_path)
    assert error.path == str(image) and "corrupt or truncated image" in error.problem


def test_all_void_mask_has_no_labels_and_can_be_skipped(tmp_path):
    label_ids = write_cityscapes_tree(tmp_path)
    Image.fromarray(np.full((HEIGHT, WIDTH), 1, dtype=np.uint8)).save(mask_path(tmp_path))  # ego vehicle
    error = first_error(tmp_path)
    assert error.path == str(mask_path(tmp_path)) and error.problem.startswith("no labels")
    reader = build_reader("cityscapes", str(tmp_path), skip_invalid=True)
    ids = [sample.id for sample in reader.samples("train")]
    assert "aachen_000000_000019" not in ids and len(ids) == sum(n.startswith(("aachen", "bremen")) for n in label_ids) - 1
    assert reader.skipped.entries == [(error.path, error.problem)]


def test_unreadable_root(tmp_path):
    with pytest.raises(DataError, match="unreadable root") as error:
        build_reader("cityscapes", str(tmp_path / "absent"))
    assert error.value.path == str(tmp_path / "absent")
    (tmp_path / "leftImg8bit").mkdir()
    with pytest.raises(DataError, match="unreadable root") as error:
        build_reader("cityscapes", str(tmp_path))
    assert error.value.path == str(tmp_path / "gtFine")
