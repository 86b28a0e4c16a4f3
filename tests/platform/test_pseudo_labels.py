"""Pseudo-labels: the per-image CRF step, the atomic label-shard writer, and the Ray Data
job end to end from a real (tiny) stage-1 checkpoint on a real local Ray."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers.ray_state import alive_actors, all_cpus_free
from wsss.cli import build_parser
from wsss.datasets.reading import pseudo_label_files, read_shard
from wsss.datasets.shards import decode_mask, read_manifest, verify_checksums
from wsss.io import DataError
from wsss.platform.label_shards import LabelShardWriter, RowAssembler
from wsss.platform.pseudo_labels import (
    DEFAULT_THRESHOLD,
    PseudoLabelSettings,
    checkpoint_threshold,
    generate_pseudo_labels,
    ground_truth_labels,
    main,
    pseudo_label,
)


def flat_image(height=48, width=48, value=128):
    return np.full((height, width, 3), value, np.uint8)


# ---- the per-image step ------------------------------------------------------------------

def test_crf_mode_labels_only_background_and_the_image_classes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    cams = rng.random((2, 40, 52)).astype(np.float32)
    cams[0, :20] = 1.0  # a confident class-2 region on top
    cams[1, :20] = 0.0
    label = pseudo_label(image, cams, np.array([2, 4]), PseudoLabelSettings("crf", threshold=0.25))
    assert label.dtype == np.uint8 and label.shape == (40, 52)
    assert set(np.unique(label)) <= {0, 2, 4}
    assert (label[:15] == 2).mean() > 0.9


def test_crf_mode_threshold_is_the_background_score():
    image = flat_image(32, 32, 50)
    image[8:24, 8:24] = 200  # an object the CRF can see
    cams = np.zeros((1, 32, 32), np.float32)
    cams[0, 8:24, 8:24] = 0.6
    low = pseudo_label(image, cams, np.array([1]), PseudoLabelSettings("crf", threshold=0.3))
    high = pseudo_label(image, cams, np.array([1]), PseudoLabelSettings("crf", threshold=0.9))
    assert low[16, 16] == 1 and high[16, 16] == 0 and low[0, 0] == 0


def test_irn_mode_ignores_pixels_between_the_two_thresholds():
    image = flat_image(value=30)
    image[8:40, 8:40] = 120
    image[16:32, 16:32] = 230
    cams = np.zeros((1, 48, 48), np.float32)
    cams[0, 8:40, 8:40] = 0.15  # above δ_bg, below δ_fg: uncertain
    cams[0, 16:32, 16:32] = 1.0  # above δ_fg: the class
    label = pseudo_label(image, cams, np.array([3]), PseudoLabelSettings("irn", fg_threshold=0.3,
                                                                                bg_threshold=0.05))
    assert set(np.unique(label)) <= {0, 3, 255}
    assert label[24, 24] == 3 and label[10, 10] == 255 and label[2, 2] == 0


def test_segmentation_mode_is_the_argmax_over_background_and_the_image_classes():
    probs = np.random.default_rng(0).random((3, 6, 7)).astype(np.float32)  # background, class 2, class 4
    label = pseudo_label(flat_image(6, 7), probs, np.array([2, 4]), PseudoLabelSettings("segmentation"))
    for y in range(6):
        for x in range(7):
            best = max(range(3), key=lambda channel: probs[channel, y, x])
            assert label[y, x] == [0, 2, 4][best]


def test_segmentation_crf_mode_cleans_the_argmax_along_the_image(tmp_path):
    """CSRM's "CSRM + dCRF" (Table 2): a speckle of the argmax inside a uniform region, and a
    boundary off the image's edge by a few pixels, follow the image after the dense CRF."""
    image = flat_image(48, 48, 40)
    image[:, 24:] = 220  # the object: the right half
    probs = np.zeros((2, 48, 48), np.float32)  # background, class 3
    probs[0], probs[1] = 0.8, 0.2
    probs[0, :, 21:], probs[1, :, 21:] = 0.3, 0.7  # the branch's boundary 3 pixels left of the edge
    probs[0, 10:13, 35:38], probs[1, 10:13, 35:38] = 0.6, 0.4  # a background speckle in the object
    plain = pseudo_label(image, probs, np.array([3]), PseudoLabelSettings("segmentation"))
    refined = pseudo_label(image, probs, np.array([3]), PseudoLabelSettings("segmentation-crf"))
    assert (plain[11, 36], plain[24, 22]) == (0, 3)
    assert set(np.unique(refined)) <= {0, 3}
    assert (refined[:, 24:] == 3).mean() > 0.99 and (refined[:, :21] == 0).mean() > 0.99
    assert refined[11, 36] == 3 and (refined[:, 21:24] == 0).mean() > 0.9


def test_an_image_without_classes_is_all_background():
    for mode, channels in (("crf", 0), ("irn", 0), ("segmentation", 1), ("segmentation-crf", 1)):
        label = pseudo_label(flat_image(), np.zeros((channels, 48, 48), np.float32), np.array([], int),
                             PseudoLabelSettings(mode))
        assert (label == 0).all()


@pytest.mark.parametrize("values, message", [
    (dict(mode="psa"), "mode='psa'"),
    (dict(threshold=1.5), "threshold=1.5"),
    (dict(fg_threshold=0.1, bg_threshold=0.2), "need 0 <= bg < fg"),
    (dict(scales=(1.0, 0.0)), "scales"),
])
def test_bad_settings_name_the_value(values, message):
    with pytest.raises(ValueError, match=message):
        PseudoLabelSettings(**values)


def test_checkpoint_threshold_comes_from_checkpoint_json(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    torch.save({}, checkpoint / "state.pt")
    assert checkpoint_threshold(str(tmp_path / "run")) is None  # no checkpoint.json: incomplete
    (checkpoint / "checkpoint.json").write_text(json.dumps({"metrics": {"miou": 0.4, "threshold": 0.35}}))
    assert checkpoint_threshold(str(tmp_path / "run")) == 0.35
    assert checkpoint_threshold(str(checkpoint)) == 0.35
    assert checkpoint_threshold(str(tmp_path / "nowhere")) is None


def test_rows_arriving_in_any_order_come_back_per_file_in_row_order():
    rows_per_file = [3, 1, 4]
    keyed = [(file, row) for file, count in enumerate(rows_per_file) for row in range(count)]
    order = np.random.default_rng(0).permutation(len(keyed))
    assembler, completed = RowAssembler(rows_per_file), {}
    for index in order:
        file, row = keyed[index]
        values = assembler.add(file, row, f"{file}:{row}")
        if values is not None:
            completed[file] = values
    assert completed == {file: [f"{file}:{row}" for row in range(count)] for file, count in enumerate(rows_per_file)}
    with pytest.raises(ValueError, match="row 3 of image shard 0, which has 3 rows"):
        assembler.add(0, 3, "x")
    assembler.add(2, 0, "x")
    with pytest.raises(ValueError, match="row 0 of image shard 2 arrived twice"):
        assembler.add(2, 0, "x")


# ---- the atomic writer -------------------------------------------------------------------

def ground_truth_rows(uri):
    table = read_shard(uri, ["id", "mask"])
    return table.column("id").to_pylist(), table.column("mask").to_pylist()


def test_writer_publishes_a_mirror_that_the_training_join_accepts(shards, tmp_path):
    images = read_manifest(shards)
    out = tmp_path / "labels"
    with LabelShardWriter(str(out), images, "train") as writer:
        for index, uri in enumerate(images.files("train")):
            writer.write(index, *ground_truth_rows(uri))
        assert not (out / "manifest.json").exists()  # nothing readable before publish
        writer.publish({"kind": "test"})
    labels = read_manifest(str(out))
    assert labels.rows("train") == images.rows("train") and labels.source == {"kind": "test"}
    for image_uri, label_uri in zip(images.files("train"), pseudo_label_files(images, labels, "train"), strict=True):
        joined = read_shard(image_uri, ["id", "mask"], label_uri)
        assert joined.column("target").equals(joined.column("mask"))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # staging removed


def test_writer_leaves_nothing_when_the_job_fails(shards, tmp_path):
    images = read_manifest(shards)
    out = tmp_path / "labels"
    with pytest.raises(RuntimeError, match="CRF worker died"):
        with LabelShardWriter(str(out), images, "train") as writer:
            writer.write(0, *ground_truth_rows(images.files("train")[0]))
            raise RuntimeError("CRF worker died")
    assert not out.exists()  # the job created it, so it goes too


def test_writer_refuses_bad_output(shards, tmp_path):
    images = read_manifest(shards)
    with pytest.raises(DataError, match="overwrite the image shards"):
        LabelShardWriter(shards, images, "train")
    with pytest.raises(DataError, match="unknown split"):
        LabelShardWriter(str(tmp_path / "a"), images, "test")
    out = str(tmp_path / "b")
    with LabelShardWriter(out, images, "train") as writer:
        ids, masks = ground_truth_rows(images.files("train")[0])
        with pytest.raises(DataError, match=f"{len(ids) - 1} pseudo-labels for a shard of {len(ids)} rows"):
            writer.write(0, ids[:-1], masks[:-1])
        writer.write(0, ids, masks)
        with pytest.raises(DataError, match="missing for image shard.*part-00001"):
            writer.publish({})
    assert not Path(out).exists()  # the failed publish left nothing


def test_a_new_writer_sweeps_what_a_killed_job_left(shards, tmp_path):
    images = read_manifest(shards)
    out = tmp_path / "labels"
    for overwrite in (False, True):
        if overwrite:  # what a job killed outright leaves: its staging folder and temp manifest
            run = uuid.uuid4().hex
            (out / f".staging-{run}" / "train").mkdir(parents=True)
            (out / f".staging-{run}" / "train" / "part-00000.parquet").write_bytes(b"half a shard")
            (out / f".manifest.json.{run}.tmp").write_text("{")
            (out / ".staging-mine").mkdir()  # not of the exact form a writer uses: kept
        with LabelShardWriter(str(out), images, "train", overwrite) as writer:
            for index, uri in enumerate(images.files("train")):
                writer.write(index, *ground_truth_rows(uri))
            writer.publish({})
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".staging-mine"]
    verify_checksums(read_manifest(str(out)), "train")


# ---- ground truth as label shards (the fully supervised upper bound) ------------------------

def run_command(argv: list[str]) -> int:
    return main(build_parser().parse_args(["pseudo-labels", *argv]))


def test_ground_truth_mode_writes_the_masks_as_label_shards(shards, tmp_path, capsys):
    out = tmp_path / "labels"
    assert run_command(["--mode", "ground-truth", "--data", shards, "--out", str(out)]) == 0
    images, labels = read_manifest(shards), read_manifest(str(out))
    assert f"wrote the {images.rows('train')} ground-truth masks" in capsys.readouterr().out
    assert labels.source["mode"] == "ground-truth" and labels.source["split"] == "train"
    for image_uri, label_uri in zip(images.files("train"), pseudo_label_files(images, labels, "train"), strict=True):
        joined = read_shard(image_uri, ["id", "mask"], label_uri)  # the join training does
        assert joined.column("target").equals(joined.column("mask"))


def test_ground_truth_mode_refuses_a_checkpoint_and_other_modes_need_one(shards, tmp_path):
    with pytest.raises(ValueError, match="takes no --checkpoint"):
        run_command(["--mode", "ground-truth", "--checkpoint", "x", "--data", shards, "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="--mode crf needs --checkpoint"):
        run_command(["--data", shards, "--out", str(tmp_path / "b")])
    assert not any(tmp_path.iterdir())


def edited_copy(shards: str, target: Path, column: str, value) -> tuple[str, str, str]:
    """The shards with `column` of one image in the second train file set to `value`, the
    manifest's checksums updated so the job starts; returns (copy, that file, the image's id)."""
    import hashlib

    shutil.copytree(shards, target)
    manifest = json.loads((target / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["files"][1]
    path = target / entry["path"]
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[2] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.binary()))
    pq.write_table(table, path)
    data = path.read_bytes()
    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (target / "manifest.json").write_text(json.dumps(manifest))
    return str(target), entry["path"], table.column("id")[2].as_py()


def test_ground_truth_mode_names_an_image_without_a_mask_and_leaves_nothing(shards, tmp_path):
    copy, shard, missing = edited_copy(shards, tmp_path / "images", "mask", None)
    out = tmp_path / "labels"
    with pytest.raises(DataError, match=f"{shard}.*image '{missing}' has no mask"):
        ground_truth_labels(copy, str(out))
    assert not out.exists()


# ---- the Ray Data job end to end -----------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(ray_local, shards, tmp_path_factory):
    """A tiny stage-1 `cam` checkpoint: 1 epoch of ResNet-18 at 64 px (shared by the tests here)."""
    from wsss.platform.config import TrainConfig
    from wsss.platform.train import fit

    runs = tmp_path_factory.mktemp("runs")
    config = TrainConfig(method="cam", data=shards, name="stage1", storage_path=str(runs), epochs=1, batch_size=8,
                         crop_size=64, backbone="resnet18", output_stride=16, backbone_weights="none", lr=0.02,
                         eval_max_images=4, wandb="disabled")
    return fit(config).checkpoint.path


def untrained_checkpoint(spec: str, shards: str, directory: Path) -> str:
    """An untrained checkpoint of `spec` (ResNet-18) for the shards' classes."""
    import torch

    from wsss.methods.base import build_method
    from wsss.platform.checkpoints import save_checkpoint
    from wsss.platform.config import TrainConfig

    manifest = read_manifest(shards)
    config = TrainConfig(method=spec, data=shards, backbone="resnet18", output_stride=16, backbone_weights="none")
    torch.manual_seed(0)
    method = build_method(spec, manifest.num_classes, config.sections, config.backbone_config)
    directory.mkdir()
    save_checkpoint(directory, method, torch.optim.SGD(method.parameters(), lr=0.1), epoch=1, step=1,
                    config=config.to_dict(), dataset={"classes": manifest.classes})
    return str(directory)


def test_segmentation_mode_needs_a_segmentation_branch_and_says_so_before_any_work(shards, tmp_path):
    cam = untrained_checkpoint("cam", shards, tmp_path / "cam")
    for mode in ("segmentation", "segmentation-crf"):
        with pytest.raises(ValueError, match=f"--mode {mode} needs a method with a segmentation branch.*'cam' has none"):
            generate_pseudo_labels(cam, shards, str(tmp_path / "labels"), mode=mode)
    assert not (tmp_path / "labels").exists()


@pytest.mark.slow
def test_segmentation_mode_labels_csrm_images_with_its_segmentation_branch(ray_local, shards, tmp_path):
    import torch

    from wsss.datasets.augment import decode_image
    from wsss.platform.cams import image_tensor
    from wsss.platform.checkpoints import load_method
    from wsss.platform.segmentation import segmentation_probs

    checkpoint = untrained_checkpoint("csrm", shards, tmp_path / "csrm")
    out = tmp_path / "labels"
    source = generate_pseudo_labels(checkpoint, shards, str(out), mode="segmentation", scales=(1.0, 0.5))
    assert source["mode"] == "segmentation" and source["ignored_fraction"] == 0
    method, _ = load_method(checkpoint)
    images = read_manifest(shards)
    image_table = read_shard(images.files("train")[0], ["id", "image", "height", "width", "labels"]).to_pylist()
    label_table = read_shard(pseudo_label_files(images, read_manifest(str(out)), "train")[0], ["id", "mask"])
    for row, mask in zip(image_table[:4], label_table.column("mask").to_pylist()[:4], strict=True):
        image = np.asarray(decode_image(row["image"], row["id"], row["height"], row["width"]))
        probs = segmentation_probs(method, image_tensor(image, torch.device("cpu")), (1.0, 0.5)).numpy()
        classes = [0, *row["labels"]]
        expected = np.asarray(classes)[probs[classes].argmax(axis=0)]
        assert np.array_equal(decode_mask(mask), expected), row["id"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crf", "irn"])
def test_job_writes_label_shards_mirroring_the_image_shards(ray_local, shards, checkpoint, tmp_path, mode):
    out = tmp_path / "labels"
    source = generate_pseudo_labels(checkpoint, shards, str(out), mode=mode, scales=(1.0, 0.5))
    images, labels = read_manifest(shards), read_manifest(str(out))
    assert [f["path"] for f in labels.splits["train"]["files"]] == [f["path"] for f in images.splits["train"]["files"]]
    assert len(images.files("train")) >= 2, "the test needs several files to check the mirror"
    for image_uri, label_uri in zip(images.files("train"), pseudo_label_files(images, labels, "train"), strict=True):
        image_table = read_shard(image_uri, ["id", "height", "width", "labels"])
        label_table = read_shard(label_uri, ["id", "mask"])
        assert label_table.column("id").to_pylist() == image_table.column("id").to_pylist()
        for mask, height, width, present in zip(label_table.column("mask").to_pylist(),
                                                image_table.column("height").to_pylist(),
                                                image_table.column("width").to_pylist(),
                                                image_table.column("labels").to_pylist(), strict=True):
            values = set(np.unique(decode_mask(mask)).tolist())
            assert decode_mask(mask).shape == (height, width)
            assert values <= {0, *present} | ({255} if mode == "irn" else set())
    assert labels.source == source and source["mode"] == mode
    assert source["threshold"] == (checkpoint_threshold(checkpoint) or DEFAULT_THRESHOLD)
    assert source["quality"]["images_with_mask"] == images.rows("train")
    assert 0 <= source["quality"]["miou"] <= 1
    assert (source["ignored_fraction"] == 0) == (mode == "crf")


@pytest.mark.slow
def test_failed_job_leaves_no_output_and_a_rerun_works(ray_local, shards, checkpoint, tmp_path, capsys):
    out = tmp_path / "labels"
    broken, _, _ = edited_copy(shards, tmp_path / "broken", "image", b"not an image")
    with pytest.raises(Exception, match="cannot be decoded") as kept:
        generate_pseudo_labels(checkpoint, broken, str(out), scales=(1.0,), flip=False)
    assert not out.exists() or not any(out.rglob("*")), "a failed job leaves nothing, not even staging"
    assert all_cpus_free(ray_local, 60), f"the failed job's actors hold CPUs: {alive_actors()}"
    assert kept.value is not None  # kept on purpose: holding the error must not hold the actors

    generate_pseudo_labels(checkpoint, shards, str(out), scales=(1.0,), flip=False)
    first = read_manifest(str(out))
    with pytest.raises(DataError, match="manifest exists"):
        generate_pseudo_labels(checkpoint, shards, str(out), scales=(1.0,), flip=False)
    main(build_parser().parse_args(["pseudo-labels", "--checkpoint", checkpoint, "--data", shards, "--out", str(out), "--mode", "irn",
                            "--scales", "1.0", "--no-flip", "--overwrite"]))
    assert f"wrote {first.rows('train')} pseudo-labels (irn)" in capsys.readouterr().out
    second = read_manifest(str(out))
    assert second.source["mode"] == "irn" and second.rows("train") == first.rows("train")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train"]
