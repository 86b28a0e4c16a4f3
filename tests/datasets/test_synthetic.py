"""The synthetic benchmark: deterministic, read by the VOC reader, exact masks with a 1 px
void band, and the WSSS problems (discriminative part, context, co-occurrence) really in it."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
from PIL import Image

from wsss.datasets.base import REGION_BODY, REGION_CONTEXT, REGION_PART, build_reader
from wsss.datasets.synthetic import (
    BIRD,
    BOAT,
    CLASSES,
    DOG,
    HEAD_COLOURS,
    HORSE,
    PRESETS,
    RIDER,
    generate_synthetic,
    render_image,
    resolve_params,
)
from wsss.io import DataError

SIZE = 64


@pytest.fixture(scope="module")
def drawn():
    """A few hundred images in memory: enough for the statistics, fast at 64 px."""
    return [render_image(0, "train", index, SIZE) for index in range(400)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", num_train=12, num_val=6, size=SIZE, seed=3)


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path, tree):
    again = generate_synthetic(tmp_path / "again", num_train=12, num_val=6, size=SIZE, seed=3)
    other = generate_synthetic(tmp_path / "other", num_train=12, num_val=6, size=SIZE, seed=4)
    assert files(again) == files(tree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no staging folder left
    different = files(other)
    assert different.keys() == files(tree).keys()
    assert different["JPEGImages/train_00000.jpg"] != files(tree)["JPEGImages/train_00000.jpg"]


def test_layout_is_voc_with_classes_txt(tree):
    assert (tree / "classes.txt").read_text().split() == list(CLASSES)
    assert (tree / "ImageSets/Segmentation/train.txt").read_text().split() == [f"train_{i:05d}" for i in range(12)]
    assert len(list((tree / "JPEGImages").glob("*.jpg"))) == 18
    png = Image.open(tree / "SegmentationClass/val_00000.png")
    assert png.mode == "P" and png.size == (SIZE, SIZE)
    assert json.loads((tree / "synthetic.json").read_text()) == {"num_train": 12, "num_dev": 0, "num_val": 6, "size": SIZE, "seed": 3}


def test_the_voc_reader_reads_exactly_what_was_drawn(tree):
    reader = build_reader("voc", str(tree))
    assert reader.info.classes == CLASSES and len(reader.info.palette) == len(CLASSES)
    assert reader.splits() == ["train", "val"]
    for split, count in (("train", 12), ("val", 6)):
        samples = list(reader.samples(split))
        assert [s.id for s in samples] == [f"{split}_{i:05d}" for i in range(count)]
        for index, sample in enumerate(samples):
            truth = render_image(3, split, index, SIZE)
            np.testing.assert_array_equal(sample.mask, truth.mask)
            np.testing.assert_array_equal(sample.region, truth.regions)
            assert sample.labels == truth.labels and len(sample.labels) >= 1
            assert (sample.height, sample.width) == (SIZE, SIZE)
            decoded = np.asarray(Image.open(tree / "JPEGImages" / f"{sample.id}.jpg"), dtype=np.int16)
            assert np.abs(decoded - truth.image).mean() < 6  # JPEG at quality 90 of the drawn image
    assert reader.skipped.entries == []


def test_synthetic_reader_generates_once_then_reads(tmp_path):
    root = tmp_path / "syn"
    reader = build_reader("synthetic", str(root), num_train=5, num_val=3, seed=1)
    assert reader.info.name == "synthetic" and reader.info.classes == CLASSES
    assert [len(list(reader.samples(s))) for s in ("train", "val")] == [5, 3]
    stamp = (root / "JPEGImages/train_00000.jpg").stat().st_mtime_ns
    again = build_reader("synthetic", str(root))  # no options: whatever is there
    assert (root / "JPEGImages/train_00000.jpg").stat().st_mtime_ns == stamp
    assert len(list(again.samples("train"))) == 5
    with pytest.raises(DataError, match="synthetic.json: parameters differ"):
        build_reader("synthetic", str(root), preset="demo")


def test_the_dev_split_is_drawn_apart_from_train_and_val(tmp_path):
    root = generate_synthetic(tmp_path / "syn", num_train=4, num_dev=3, num_val=2, size=SIZE)
    reader = build_reader("voc", str(root))
    assert reader.splits() == ["dev", "train", "val"]
    dev, train = list(reader.samples("dev")), list(reader.samples("train"))
    assert [s.id for s in dev] == ["dev_00000", "dev_00001", "dev_00002"]
    for index, sample in enumerate(dev):
        np.testing.assert_array_equal(sample.mask, render_image(0, "dev", index, SIZE).mask)
        assert not any(np.array_equal(sample.mask, other.mask) for other in train)


def test_region_maps_become_a_shard_column_read_back_for_evaluation(tmp_path):
    from wsss.datasets.prepare import prepare
    from wsss.datasets.reading import eval_rows
    from wsss.datasets.shards import has_regions, read_manifest

    root = generate_synthetic(tmp_path / "syn", num_train=4, num_val=3, size=SIZE, seed=2)
    prepare("voc", str(root), str(tmp_path / "shards"))
    manifest = read_manifest(str(tmp_path / "shards"))
    assert has_regions(manifest, "val")
    rows = list(eval_rows(str(tmp_path / "shards"), "val"))
    for index, row in enumerate(rows):
        np.testing.assert_array_equal(row["region"], render_image(2, "val", index, SIZE).regions)


def test_a_new_root_gets_the_test_preset(tmp_path):
    reader = build_reader("synthetic", str(tmp_path / "syn"))
    assert len(list(reader.samples("train"))) == PRESETS["test"]["num_train"]
    assert len(list(reader.samples("val"))) == PRESETS["test"]["num_val"]


def test_generation_refuses_a_non_empty_folder_and_bad_options_without_writing(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        generate_synthetic(tmp_path / "full", num_train=2, num_val=1)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]
    with pytest.raises(ValueError, match="size"):
        generate_synthetic(tmp_path / "bad", size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_presets_and_options_are_checked():
    assert resolve_params("demo") == {"num_train": 2000, "num_dev": 0, "num_val": 300, "size": 96, "seed": 0}
    assert resolve_params("test", seed=7)["seed"] == 7
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        resolve_params("huge")
    with pytest.raises(ValueError, match="unknown synthetic option"):
        resolve_params("test", colour="red")
    with pytest.raises(ValueError, match="num_train='3'"):
        resolve_params("test", num_train="3")


def boundary_reference(exact):
    """Object pixels with a 4-neighbour (inside the image) of another label, by a plain loop."""
    height, width = exact.shape
    void = np.zeros_like(exact, dtype=bool)
    for y in range(height):
        for x in range(width):
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ny, nx = y + dy, x + dx
                if exact[y, x] > 0 and 0 <= ny < height and 0 <= nx < width and exact[ny, nx] != exact[y, x]:
                    void[y, x] = True
    return void


def test_masks_are_exact_with_a_one_pixel_void_band(drawn):
    for image in drawn[:20]:
        void = boundary_reference(image.exact)
        np.testing.assert_array_equal(image.mask == 255, void)
        np.testing.assert_array_equal(image.mask[~void], image.exact[~void])
        assert void.any()
        assert set(np.unique(image.exact)) <= set(range(len(CLASSES)))
        assert image.labels == tuple(int(c) for c in np.unique(image.mask) if 0 < c < 255)


def presence(drawn):
    return np.array([[c in image.labels for c in range(1, len(CLASSES))] for image in drawn])


def test_every_class_appears_and_every_image_has_a_label(drawn):
    assert all(image.labels for image in drawn)
    frequency = presence(drawn).mean(axis=0)
    assert (frequency > 0.15).all(), frequency


def test_discriminative_part_is_small_and_the_body_looks_alike_across_classes(drawn):
    """Problem (a): heads tell the class apart, bodies do not."""
    head_share, body_colour, head_colour = [], {c: [] for c in HEAD_COLOURS}, {c: [] for c in HEAD_COLOURS}
    for image in drawn:
        for cls in image.labels:
            head = (image.exact == cls) & (image.regions == REGION_PART)
            body = (image.exact == cls) & (image.regions == REGION_BODY)
            assert head.any(), "every visible object shows its head"
            head_share.append(head.sum() / (head.sum() + body.sum()))
            if body.any():  # a horse may hide entirely behind its rider but for the head
                body_colour[cls].append(image.image[body].mean(axis=0))
            head_colour[cls].append(image.image[head].mean(axis=0))
    assert 0.05 < np.median(head_share) < 0.2
    body_means = np.array([np.mean(v, axis=0) for v in body_colour.values()])
    head_means = np.array([np.mean(v, axis=0) for v in head_colour.values()])
    assert np.abs(body_means - body_means.mean(axis=0)).max() < 8  # bodies: one colour for all
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(head_means, 2)) > 80  # heads: far apart


def test_water_is_background_context_of_boats(drawn):
    """Problem (b): water comes with boats, is labelled background, and is rarely elsewhere."""
    boat = presence(drawn)[:, BOAT - 1]
    water = np.array([(image.regions == REGION_CONTEXT).any() for image in drawn])
    assert water[boat].mean() > 0.8 and water[~boat].mean() < 0.25
    for image in drawn:
        on_water = image.mask[image.regions == REGION_CONTEXT]
        assert np.isin(on_water, [0, 255]).all()


def test_horse_and_rider_co_occur_and_other_pairs_do_not(drawn):
    """Problem (c)."""
    present = presence(drawn)

    def given(a, b):  # P(a | b)
        return (present[:, a - 1] & present[:, b - 1]).sum() / present[:, b - 1].sum()

    assert given(RIDER, HORSE) > 0.7 and given(HORSE, RIDER) > 0.7
    for a, b in [(BOAT, DOG), (DOG, BIRD), (BOAT, BIRD), (HORSE, DOG)]:
        assert given(a, b) < 0.4 and given(b, a) < 0.4


def test_generation_is_fast(tmp_path):
    start = time.process_time()  # CPU time: wall time means little on a shared test machine
    generate_synthetic(tmp_path / "speed", num_train=200, num_val=0, size=96)
    elapsed = time.process_time() - start
    assert elapsed < 10, f"200 images at 96 px took {elapsed:.1f} s of CPU"  # about 1 s
