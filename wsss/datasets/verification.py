"""Checksums of prepared shards, checked once per dataset and remembered.

A split is checked in the Ray Data read tasks that open its shards (each hashes the bytes
it reads anyway, `reading.read_shard`), so the work is spread over the cluster and
overlaps training. After a pass that read every shard of a split without a mismatch, the
driver writes a verification record; later runs, trials and evaluations find it and hash
nothing. The record's key covers the manifest's content and every shard's size and
modification time (on S3 its LastModified), so a shard rewritten since is checked again.

Records go beside the manifest (`DATA/.verified/`), else, where the data folder is
read-only (the cluster's node role may only read it), into a local cache directory
(`$WSSS_CACHE_DIR`, default `~/.cache/wsss/verified`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pyarrow import fs as pafs

from wsss.datasets.shards import Manifest
from wsss.io import join, public_uri, resolve, write_text

RECORDS_FOLDER = ".verified"


def verification_key(manifest: Manifest, split: str) -> str:
    """sha256 of (location, split, manifest content, each shard's path, size and mtime);
    one listing of the data folder, not one request per shard."""
    fs, root = resolve(manifest.location)
    listed = {info.path: info for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
              if info.type == pafs.FileType.File}
    shards = []
    for entry in manifest.splits[split]["files"]:
        info = listed.get(f"{root}/{entry['path']}")
        # a missing shard gets a key no record has: the read task then names it
        shards.append([entry["path"], info.size if info else None, info.mtime_ns if info else None])
    content = json.dumps([public_uri(manifest.location), split, manifest.to_json(), shards], sort_keys=True,
                         default=str)
    return hashlib.sha256(content.encode()).hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("WSSS_CACHE_DIR") or Path.home() / ".cache" / "wsss") / "verified"


def _record_name(split: str, key: str) -> str:
    return f"{split}-{key}.json"


def is_verified(manifest: Manifest, split: str) -> bool:
    key = verification_key(manifest, split)
    if (cache_dir() / _record_name(split, key)).is_file():
        return True
    fs, root = resolve(manifest.location)
    return fs.get_file_info(f"{root}/{RECORDS_FOLDER}/{_record_name(split, key)}").type == pafs.FileType.File


def remember_verified(manifest: Manifest, split: str) -> str:
    """Write the record of `split` having been read in full without a checksum mismatch;
    returns where: beside the manifest, or the local cache when that folder is read-only."""
    key = verification_key(manifest, split)
    record = json.dumps({"location": public_uri(manifest.location), "split": split, "key": key})
    beside = join(manifest.location, RECORDS_FOLDER, _record_name(split, key))
    try:
        write_text(beside, record)
        return beside
    except OSError:  # read-only folder or bucket prefix (pyarrow raises OSError for AccessDenied)
        local = cache_dir() / _record_name(split, key)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(record)
        return str(local)
