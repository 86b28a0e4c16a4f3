"""Shard checksums: checked by the read that opens a shard, remembered once a split has
been read in full, checked again when the manifest or a shard changes, skippable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from wsss.datasets.reading import read_shard
from wsss.datasets.shards import read_manifest
from wsss.datasets.verification import RECORDS_FOLDER, is_verified, remember_verified, verification_key
from wsss.io import DataError


@pytest.fixture
def data(shards, tmp_path, monkeypatch) -> Path:
    """A copy of the session's shards (records written here stay here) and an empty cache."""
    monkeypatch.setenv("WSSS_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "data"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns(RECORDS_FOLDER))
    return copy


def corrupt(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_a_read_checks_the_shard_it_opens(data):
    manifest = read_manifest(str(data))
    entry = manifest.splits["val"]["files"][1]
    uri = str(data / entry["path"])
    checked = read_shard(uri, ["id", "image"], sha256=entry["sha256"])
    assert checked.equals(pq.read_table(uri, columns=["id", "image"]))
    corrupt(data / entry["path"])
    with pytest.raises(DataError, match=f"{entry['path']}.*checksum mismatch"):
        read_shard(uri, ["id"], sha256=entry["sha256"])
    read_shard(uri, ["id"])  # unchecked: the damaged byte is not in the id column's way


def test_a_split_read_in_full_is_remembered_beside_the_manifest(data):
    manifest = read_manifest(str(data))
    assert not is_verified(manifest, "train")
    where = remember_verified(manifest, "train")
    assert Path(where).parent == data / RECORDS_FOLDER
    assert is_verified(manifest, "train") and not is_verified(manifest, "val")
    assert verification_key(manifest, "train") == verification_key(read_manifest(str(data)), "train")


def test_a_rewritten_shard_is_checked_again(data):
    manifest = read_manifest(str(data))
    remember_verified(manifest, "train")
    shard = data / manifest.splits["train"]["files"][0]["path"]
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place, same size
    assert not is_verified(manifest, "train")


def test_another_manifest_is_checked_again(data):
    manifest = read_manifest(str(data))
    remember_verified(manifest, "train")
    text = (data / "manifest.json").read_text()
    (data / "manifest.json").write_text(text.replace('"created": "', '"created": "1'))
    assert not is_verified(read_manifest(str(data)), "train")


def test_a_read_only_data_folder_is_remembered_in_the_local_cache(data, tmp_path):
    """Any OSError writing beside the manifest (on the cluster: the node role may only read
    the data prefix) sends the record to the cache; here `.verified` is a file, not a folder."""
    (data / RECORDS_FOLDER).write_text("not a folder")
    manifest = read_manifest(str(data))
    where = remember_verified(manifest, "train")
    assert Path(where).parent == tmp_path / "cache" / "verified"
    assert is_verified(manifest, "train")


@pytest.mark.usefixtures("ray_local")
def test_ray_reads_check_until_the_split_is_remembered(data):
    """A damaged shard fails the read task that opens it, naming it; once the split is
    recorded as verified (or with verify=False) nothing is hashed."""
    from wsss.platform.data import _open, eval_dataset

    manifest = read_manifest(str(data))
    shard = manifest.splits["val"]["files"][1]["path"]
    corrupt(data / shard)
    with pytest.raises(Exception, match=f"{shard}.*checksum mismatch"):
        list(eval_dataset(str(data), "val", with_mask=False).iter_rows())
    assert _open(str(data), "val", verify=False)[1] is None
    remember_verified(manifest, "val")  # as a run would after a clean pass
    assert _open(str(data), "val", verify=True)[1] is None
    assert _open(str(data), "train", verify=True)[1] == [f["sha256"] for f in manifest.splits["train"]["files"]]
