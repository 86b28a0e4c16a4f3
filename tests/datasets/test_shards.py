"""Shards and manifest: written and read back equal to the source, atomic on failure (a
killed writer's leftovers swept by the next), checksums, skip counting, storage URIs, and
`prepare` as the single entry point."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers.cityscapes_tree import write_cityscapes_tree
from tests.helpers.coco_tree import write_coco_tree
from tests.helpers.readers import ListReader, blocked_writer, files_under, png_bytes, tiny_reader, tiny_sample
from tests.helpers.voc_tree import make_voc_tree
from wsss.datasets import parallel
from wsss.datasets.base import DatasetInfo, Sample, build_reader
from wsss.datasets.prepare import prepare
from wsss.datasets.shards import (
    decode_mask,
    encode_mask,
    read_manifest,
    verify_checksums,
    write_shards,
)
from wsss.io import DataError, join, resolve


def read_back(manifest, split) -> list[dict]:
    rows = []
    for uri in manifest.files(split):
        fs, path = resolve(uri)
        rows += pq.read_table(path, filesystem=fs).to_pylist()
    return rows


def assert_rows_equal_samples(rows: list[dict], samples: list[Sample]):
    assert [row["id"] for row in rows] == [sample.id for sample in samples]
    for row, sample in zip(rows, samples, strict=True):
        assert row["image"] == sample.image  # byte for byte, never re-encoded
        if sample.mask is None:
            assert row["mask"] is None
        else:
            np.testing.assert_array_equal(decode_mask(row["mask"]), sample.mask)
        assert tuple(row["labels"]) == sample.labels
        assert (row["height"], row["width"]) == (sample.height, sample.width)


def test_coco_tree_round_trips_with_manifest_and_skips(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    out = tmp_path / "out"
    manifest = write_shards(build_reader("coco", str(root), skip_invalid=True), str(out),
                            rows_per_file=2, rows_per_group=1)
    source = build_reader("coco", str(root), skip_invalid=True)
    for split, files_expected in (("train", [1, 1]), ("val", [2, 2, 1])):
        samples = list(source.samples(split))
        assert_rows_equal_samples(read_back(manifest, split), samples)
        entries = manifest.splits[split]["files"]
        assert [entry["rows"] for entry in entries] == files_expected
        assert manifest.rows(split) == len(samples) == sum(files_expected)
        for entry, uri in zip(entries, manifest.files(split), strict=True):
            with open(uri, "rb") as file:
                data = file.read()
            assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
            assert pq.ParquetFile(uri).num_row_groups == entry["rows"]  # one row per group
    no_labels = str(root / "val2014" / "COCO_val2014_000000000005.jpg")
    assert manifest.skipped == {"count": 1, "by_problem": {"no labels": 1}, "items": [
        [no_labels, "no labels: instances_val2014.json has no annotation for this image"]]}
    assert read_manifest(str(out)) == manifest
    written = json.loads((out / "manifest.json").read_text())
    assert list(written) == ["format_version", "dataset", "classes", "palette", "ignore_index", "splits",
                             "skipped", "source", "created"]
    assert written["format_version"] == 1 and written["dataset"] == "coco" and written["ignore_index"] == 255
    assert len(written["classes"]) == len(written["palette"]) == 81
    assert files_under(out) == ["manifest.json", "train/part-00000.parquet", "train/part-00001.parquet",
                                "val/part-00000.parquet",
                                "val/part-00001.parquet", "val/part-00002.parquet"]


def test_schema_and_null_masks(tmp_path):
    manifest = write_shards(tiny_reader(), str(tmp_path))
    table = pq.read_table(manifest.files("val")[0])
    assert table.schema.field("labels").type == pa.list_(pa.int16())
    assert table.schema.field("height").type == pa.int32() and table.schema.field("image").type == pa.binary()
    assert_rows_equal_samples(read_back(manifest, "val"), tiny_reader().by_split["val"])
    assert read_back(manifest, "val")[1]["mask"] is None


@pytest.mark.parametrize("rows, rows_per_file, expected", [
    (1, 256, [1]), (2, 256, [1, 1]), (5, 256, [3, 2]), (5, 2, [2, 2, 1]), (4, 4, [2, 2]), (9, 4, [4, 4, 1]),
])
def test_rows_per_file_and_at_least_two_files(tmp_path, rows, rows_per_file, expected):
    samples = [tiny_sample(i) for i in range(rows)]
    manifest = write_shards(ListReader({"train": samples}), str(tmp_path), rows_per_file=rows_per_file)
    assert [entry["rows"] for entry in manifest.splits["train"]["files"]] == expected
    assert_rows_equal_samples(read_back(manifest, "train"), samples)


def test_row_groups_are_small(tmp_path):
    samples = [tiny_sample(i) for i in range(7)]
    manifest = write_shards(ListReader({"train": samples}), str(tmp_path), rows_per_group=2)
    groups = [pq.ParquetFile(uri).metadata.row_group(i).num_rows
              for uri in manifest.files("train") for i in range(pq.ParquetFile(uri).num_row_groups)]
    assert groups == [2, 2, 2, 1]


def test_checksum_mismatch_and_missing_shard_name_the_shard(tmp_path):
    manifest = write_shards(tiny_reader(), str(tmp_path))
    verify_checksums(manifest, "train")
    shard = manifest.files("train")[1]
    with open(shard, "r+b") as file:  # flip one byte in the middle
        file.seek(os.path.getsize(shard) // 2)
        byte = file.read(1)[0]
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte ^ 0xFF]))
    with pytest.raises(DataError, match="checksum mismatch") as error:
        verify_checksums(manifest, "train")
    assert error.value.path == shard
    os.remove(manifest.files("val")[0])
    with pytest.raises(DataError, match="shard missing") as error:
        verify_checksums(manifest, "val")
    assert error.value.path == manifest.files("val")[0]


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt(),
                                   DataError("x.jpg", "corrupt or truncated image: boom")])
@pytest.mark.parametrize("fail_split, fail_after", [("train", 3), ("val", 2)])
def test_failure_mid_write_leaves_no_manifest_and_no_files(tmp_path, error, fail_split, fail_after):
    out = tmp_path / "new" / "out"
    with pytest.raises(type(error)):
        write_shards(tiny_reader(fail_split=fail_split, fail_after=fail_after, error=error), str(out), rows_per_file=2)
    assert os.listdir(tmp_path) == []  # the run created `new/out`, so both go too
    with pytest.raises(DataError, match="manifest missing"):
        read_manifest(str(out))


def test_failed_prepare_into_an_existing_folder_leaves_its_files_alone(tmp_path):
    root = write_coco_tree(tmp_path / "coco")  # has an image without labels: fails without skip_invalid
    out, empty = tmp_path / "out", tmp_path / "empty"
    (out / "keep").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "keep" / "part-00000.parquet").write_bytes(b"not ours")
    (out / ".staging-backup").mkdir()  # look like our hidden names, but are not of their exact form
    (out / ".staging-backup" / "a.txt").write_text("mine")
    (out / ".manifest.json.tmp").write_text("mine")
    before = {name: (out / name).read_bytes() for name in files_under(out)}
    empty.mkdir()
    for folder in (out, empty):
        with pytest.raises(DataError, match="no labels"):
            prepare("coco", root, folder)
    assert {name: (out / name).read_bytes() for name in files_under(out)} == before
    assert empty.is_dir() and files_under(empty) == []


def test_a_killed_writer_leaves_staging_that_the_next_write_sweeps(tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    writer = blocked_writer(out, ready)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert writer.poll() is None, f"the writer exited early:\n{writer.stderr.read()}"
            assert time.monotonic() < deadline, "the writer never reached its third sample"
            time.sleep(0.05)
    finally:
        writer.kill()  # SIGKILL: no rollback runs
        writer.wait()
        writer.stderr.close()
    assert writer.returncode == -signal.SIGKILL
    staging = [name for name in os.listdir(out) if name.startswith(".staging-")]
    assert len(staging) == 1 and "train/part-00000.parquet" in files_under(out / staging[0])
    # A kill between writing the temp manifest and moving it leaves this one too.
    (out / f".manifest.json.{'0' * 32}.tmp").write_text("{")

    manifest = write_shards(tiny_reader(), str(out))
    assert [name for name in os.listdir(out) if name.startswith(".")] == []
    assert files_under(out) == sorted(["manifest.json", *(entry["path"] for split in manifest.splits.values()
                                                          for entry in split["files"])])
    for split in manifest.splits:
        verify_checksums(manifest, split)


def test_existing_manifest_needs_overwrite_and_stale_shards_go(tmp_path):
    write_shards(tiny_reader(), str(tmp_path), rows_per_file=2)
    before = files_under(tmp_path)
    with pytest.raises(DataError, match="manifest exists") as error:
        write_shards(tiny_reader(), str(tmp_path))
    assert error.value.path == str(tmp_path / "manifest.json") and files_under(tmp_path) == before
    small = ListReader({"train": [tiny_sample(i) for i in range(2)]})
    manifest = write_shards(small, str(tmp_path), overwrite=True)
    assert files_under(tmp_path) == ["manifest.json", "train/part-00000.parquet", "train/part-00001.parquet"]
    assert_rows_equal_samples(read_back(read_manifest(str(tmp_path)), "train"), small.by_split["train"])
    assert list(manifest.splits) == ["train"]


def test_failed_overwrite_keeps_the_old_dataset(tmp_path):
    old = write_shards(tiny_reader(), str(tmp_path))
    with pytest.raises(RuntimeError):
        write_shards(tiny_reader(fail_split="val", fail_after=1, error=RuntimeError("late")), str(tmp_path),
                     overwrite=True)
    assert read_manifest(str(tmp_path)) == old
    for split in old.splits:
        verify_checksums(old, split)
    assert len(files_under(tmp_path)) == 1 + sum(len(old.files(split)) for split in old.splits)


def test_empty_split_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="no samples") as error:
        write_shards(ListReader({"train": [tiny_sample(0)], "val": []}), str(tmp_path))
    assert error.value.path == "tiny split 'val'" and files_under(tmp_path) == []


def test_unknown_split_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'test'"):
        write_shards(tiny_reader(), str(tmp_path / "out"), splits=["train", "test"])
    assert not (tmp_path / "out").exists()


def test_file_uri_and_relative_paths(tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/by-uri"
    manifest = write_shards(tiny_reader(), uri)
    assert manifest.files("train")[0] == f"{uri}/train/part-00000.parquet"
    assert pq.read_table(manifest.files("train")[0]).num_rows == manifest.splits["train"]["files"][0]["rows"]
    assert read_manifest(uri) == manifest
    verify_checksums(manifest, "train")
    assert_rows_equal_samples(read_back(manifest, "val"), tiny_reader().by_split["val"])

    monkeypatch.chdir(tmp_path)
    manifest = write_shards(tiny_reader(), "relative/out")
    assert manifest.location == str(tmp_path / "relative" / "out")
    assert read_manifest("relative/out") == manifest
    assert manifest.files("val")[0] == str(tmp_path / "relative" / "out" / "val" / "part-00000.parquet")


def test_storage_resolve_and_join(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve("a/b")
    assert fs.type_name == "local" and path == str(tmp_path / "a" / "b")
    fs, path = resolve(f"file://{tmp_path}/c")
    assert fs.type_name == "local" and path == f"{tmp_path}/c"
    assert join("s3://bucket/data/", "train", "part-00000.parquet") == "s3://bucket/data/train/part-00000.parquet"
    assert join("a", "manifest.json") == str(tmp_path / "a" / "manifest.json")
    with pytest.raises(DataError, match="unusable storage URI") as error:
        resolve("nosuchscheme://bucket/x")
    assert error.value.path == "nosuchscheme://bucket/x"


def test_read_manifest_errors_name_the_manifest(tmp_path):
    manifest_path = str(tmp_path / "manifest.json")
    with pytest.raises(DataError, match="manifest missing") as error:
        read_manifest(str(tmp_path))
    assert error.value.path == manifest_path
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").unlink()
    write_shards(tiny_reader(), str(tmp_path))
    good = json.loads((tmp_path / "manifest.json").read_text())
    for edit, problem in [(lambda m: m.update(format_version=2), "format_version 2"),
                          (lambda m: m.pop("classes"), "missing classes"),
                          (lambda m: m["splits"]["train"].update(rows=99), "says 99 rows, its files 5"),
                          (lambda m: m["splits"]["val"]["files"][0].pop("sha256"), "needs files with")]:
        broken = json.loads(json.dumps(good))
        edit(broken)
        (tmp_path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(DataError, match=problem) as error:
            read_manifest(str(tmp_path))
        assert error.value.path == manifest_path


def test_manifest_accessors(tmp_path):
    manifest = write_shards(tiny_reader(), str(tmp_path))
    assert manifest.info == DatasetInfo("tiny", ("background", "a", "b"), ((0, 0, 0), (255, 0, 0), (0, 255, 0)))
    assert manifest.num_classes == 2 and manifest.rows("train") == 5 and manifest.rows("val") == 3
    with pytest.raises(DataError, match="unknown split: 'test'; the manifest has train, val"):
        manifest.files("test")


def test_mask_png_round_trip():
    mask = np.random.default_rng(0).integers(0, 256, (9, 13), dtype=np.uint8)
    data = encode_mask(mask)
    assert data.startswith(b"\x89PNG") and Image.open(io.BytesIO(data)).mode == "L"
    np.testing.assert_array_equal(decode_mask(data), mask)
    with pytest.raises(ValueError, match="uint8"):
        encode_mask(mask.astype(np.int64))
    with pytest.raises(ValueError, match="mode RGB"):
        decode_mask(png_bytes(0))


def test_prepare_cityscapes_end_to_end(tmp_path):
    label_ids = write_cityscapes_tree(tmp_path / "cityscapes")
    manifest = prepare("cityscapes", tmp_path / "cityscapes", tmp_path / "out")
    source = build_reader("cityscapes", str(tmp_path / "cityscapes"))
    for split in ("train", "val"):
        assert_rows_equal_samples(read_back(manifest, split), list(source.samples(split)))
        assert len(manifest.files(split)) == 2
    assert manifest.rows("train") + manifest.rows("val") == len(label_ids)
    assert manifest.source == {"root": str(tmp_path / "cityscapes"), "sbd": None, "options": {}}
    assert manifest.skipped["count"] == 0 and read_manifest(str(tmp_path / "out")) == manifest


def test_prepare_coco_counts_skipped_and_passes_options(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    manifest = prepare("coco", root, tmp_path / "out", skip_invalid=True, year=2014)
    assert manifest.skipped["by_problem"] == {"no labels": 1}
    assert manifest.source["options"] == {"skip_invalid": True, "year": 2014}
    with pytest.raises(DataError, match="no labels"):
        prepare("coco", root, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("dataset", ["voc", "coco", "cityscapes"])
def test_prepare_in_worker_processes_writes_the_bytes_one_process_writes(tmp_path, monkeypatch, dataset):
    """Every reader, read in 3 processes over several windows of items, skipping a bad one
    (coco's): the same shard bytes, the same manifest but its time, the same skip log."""
    monkeypatch.setattr(parallel, "ITEMS_PER_TASK", 1)  # windows of 4 items per worker: several per split
    root = tmp_path / dataset
    if dataset == "voc":
        root = make_voc_tree(root).devkit
    elif dataset == "coco":
        root = write_coco_tree(root)
    else:
        write_cityscapes_tree(root)
    serial = prepare(dataset, root, tmp_path / "serial", skip_invalid=True, workers=1)
    spread = prepare(dataset, root, tmp_path / "spread", skip_invalid=True, workers=3)
    files = files_under(tmp_path / "serial")
    assert files == files_under(tmp_path / "spread") and len(files) > 3
    for name in files:
        if name != "manifest.json":
            assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "spread" / name).read_bytes(), name
    assert serial.splits == spread.splits and serial.skipped == spread.skipped
    assert serial.skipped["count"] == (dataset == "coco")


def test_prepare_in_worker_processes_stops_at_the_first_bad_sample_writing_nothing(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    with pytest.raises(DataError) as serial:
        prepare("coco", root, tmp_path / "serial", workers=1)
    with pytest.raises(DataError) as spread:
        prepare("coco", root, tmp_path / "spread", workers=2)
    assert str(spread.value) == str(serial.value) and "no labels" in str(spread.value)
    assert not (tmp_path / "spread").exists()
    with pytest.raises(ValueError, match="workers must be a whole number >= 1, got 0"):
        prepare("coco", root, tmp_path / "none", workers=0)


def test_prepare_checks_arguments_before_any_work(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known: .*coco"):
        prepare("imagenet", root, out)
    with pytest.raises(ValueError, match="takes no option 'sbd'"):
        prepare("coco", root, out, sbd=tmp_path)
    with pytest.raises(ValueError, match="takes no option 'colour'"):
        prepare("cityscapes", root, out, colour=True)
    with pytest.raises(DataError, match="unreadable root") as error:
        prepare("cityscapes", tmp_path / "absent", out)
    assert error.value.path == str(tmp_path / "absent")
    assert not out.exists()
    prepare("coco", root, out, skip_invalid=True)
    with pytest.raises(DataError, match="manifest exists"):  # checked before the (absent) root is read
        prepare("coco", tmp_path / "absent", out)
    assert prepare("coco", root, out, skip_invalid=True, overwrite=True).rows("val") == 5


@pytest.mark.parametrize("entry, problem", [("../outside.parquet", "'..' segment"),
                                            ("train/../../outside.parquet", "'..' segment"),
                                            ("/etc/passwd", "is absolute"),
                                            ("s3://other-bucket/part.parquet", "is a URI"),
                                            ("train//part.parquet", "empty")])
def test_a_manifest_entry_outside_its_folder_is_refused_when_read(tmp_path, entry, problem):
    out = tmp_path / "data"
    write_shards(tiny_reader(), str(out))
    (tmp_path / "outside.parquet").write_bytes((out / "train" / "part-00000.parquet").read_bytes())
    crafted = json.loads((out / "manifest.json").read_text())
    shard = crafted["splits"]["train"]["files"][0]
    shard["path"] = entry
    shard["sha256"] = hashlib.sha256((tmp_path / "outside.parquet").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(crafted))
    with pytest.raises(DataError, match=f"shard path '{entry}' .*{problem}") as error:
        read_manifest(str(out))
    assert error.value.path == str(out / "manifest.json")


def test_prepare_overwrite_never_deletes_a_file_an_old_manifest_points_outside_to(tmp_path, caplog):
    from wsss.cli import main

    root, out = write_coco_tree(tmp_path / "coco"), tmp_path / "out"
    assert main(["prepare", "coco", "--root", str(root), "--out", str(out), "--skip-invalid"]) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    crafted = json.loads((out / "manifest.json").read_text())
    crafted["splits"]["train"]["files"].append({"path": "../victim.txt", "rows": 0, "bytes": 7,
                                                "sha256": hashlib.sha256(b"keep me").hexdigest()})
    (out / "manifest.json").write_text(json.dumps(crafted))
    with caplog.at_level(logging.WARNING, logger="wsss.datasets.shards"):  # whatever level earlier tests left
        assert main(["prepare", "coco", "--root", str(root), "--out", str(out), "--skip-invalid", "--overwrite"]) == 0
    assert victim.read_text() == "keep me"
    assert "'../victim.txt'" in caplog.text and "none of the files it lists is deleted" in caplog.text
    assert read_manifest(str(out)).rows("train") > 0


@pytest.mark.parametrize("change, problem", [
    (dict(mask=np.full((12, 16), 50, np.uint8)), "bad mask: value 50, expected classes 0..2 or 255"),
    (dict(labels=(-1,)), r"bad labels \[-1\]: expected sorted distinct classes 1..2"),
    (dict(labels=(0, 1)), r"bad labels \[0, 1\]"),
    (dict(labels=(2, 1)), r"bad labels \[2, 1\]"),
    (dict(labels=(3,)), r"bad labels \[3\]"),
    (dict(mask=np.zeros((12, 15), np.uint8)), r"bad mask: shape \[12, 15\], the image is 12x16"),
])
def test_write_shards_refuses_values_no_class_has_naming_the_sample(tmp_path, change, problem):
    import dataclasses

    bad = dataclasses.replace(tiny_sample(3), **change)
    reader = ListReader({"train": [tiny_sample(i) for i in range(3)] + [bad]})
    with pytest.raises(DataError, match=problem) as error:
        write_shards(reader, str(tmp_path / "out"))
    assert error.value.path == "img003" and not (tmp_path / "out").exists()
