"""Pseudo-label shards: the mirror of a split of image shards, written atomically.

A pseudo-label shard holds, for every row of its image shard and in the same order, the
`id` and a `mask` (mode-L PNG, 255 = ignore); it sits at the image shard's relative path
under its own folder, listed by a manifest in the shard format (`wsss.datasets.shards`).
`wsss.datasets.loader.pseudo_label_files` and `read_shard` are the reading side.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from wsss.datasets.base import IGNORE_INDEX, DataError
from wsss.datasets.shards import MANIFEST_NAME, Manifest, check_writable, read_manifest
from wsss.datasets.storage import canonical, join, resolve

LABEL_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("mask", pa.binary(), nullable=False)])


class LabelShardWriter:
    """Pseudo-label shards mirroring one split of image shards, published atomically.

    `write(index, ids, masks)` stages the mirror of the split's index-th image shard in a
    hidden folder; `publish(source)` moves the files into place and writes the manifest
    last (temp name, then move). Leaving the `with` block unpublished, by an exception
    (Ctrl-C included) or otherwise, deletes everything staged or placed: a failed job
    leaves nothing readable and nothing to clean up.
    """

    def __init__(self, out: str, images: Manifest, split: str, overwrite: bool = False):
        self.location = canonical(out)
        if self.location.rstrip("/") == images.location.rstrip("/"):
            raise DataError(out, "pseudo-labels would overwrite the image shards: choose another --out")
        images.rows(split)  # DataError naming a missing split
        check_writable(self.location, overwrite)
        self.images, self.split, self.overwrite = images, split, overwrite
        self.expected = images.splits[split]["files"]
        self.fs, self.root = resolve(self.location)
        run = uuid.uuid4().hex
        self.staging, self.temp_manifest = f"{self.root}/.staging-{run}", f"{self.root}/.{MANIFEST_NAME}.{run}.tmp"
        self.staged: dict[int, dict] = {}
        self.placed: list[str] = []
        self.replacing = False
        self.published = False

    def __enter__(self) -> "LabelShardWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if not self.published:
            self.abort()

    def write(self, index: int, ids: list[str], masks: list[bytes]) -> None:
        entry = self.expected[index]
        if len(ids) != entry["rows"] or len(masks) != entry["rows"]:
            raise DataError(join(self.images.location, entry["path"]),
                            f"{len(ids)} pseudo-labels for a shard of {entry['rows']} rows")
        table = pa.Table.from_pydict({"id": ids, "mask": masks}, schema=LABEL_SCHEMA)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, row_group_size=32, compression="none", use_dictionary=False)
        data = buffer.getvalue().to_pybytes()
        path = f"{self.staging}/{entry['path']}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)
        self.staged[index] = {"path": entry["path"], "rows": len(ids),
                              "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def publish(self, source: dict) -> Manifest:
        missing = [entry["path"] for index, entry in enumerate(self.expected) if index not in self.staged]
        if missing:
            raise DataError(self.location, f"pseudo-labels missing for image shard(s) {', '.join(missing)}")
        files = [self.staged[index] for index in range(len(self.expected))]
        images = self.images
        manifest = Manifest(
            location=self.location, dataset=images.dataset, classes=list(images.classes),
            palette=[list(c) for c in images.palette], ignore_index=IGNORE_INDEX,
            splits={self.split: {"rows": sum(f["rows"] for f in files), "files": files}},
            skipped={"count": 0, "by_problem": {}, "items": []}, source=source,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        previous = self._previous_files()
        self.replacing = True
        self._delete(f"{self.root}/{MANIFEST_NAME}")  # from here on an old output is gone
        for file in files:
            target = f"{self.root}/{file['path']}"
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            self.fs.move(f"{self.staging}/{file['path']}", target)
            self.placed.append(target)
        with self.fs.open_output_stream(self.temp_manifest) as stream:
            stream.write(json.dumps(manifest.to_json(), indent=1).encode())
        self.fs.move(self.temp_manifest, f"{self.root}/{MANIFEST_NAME}")
        self.published = True
        self._delete_staging()
        for path in set(previous) - set(self.placed):
            self._delete(path)
        return manifest

    def abort(self) -> None:
        for path in [*([f"{self.root}/{MANIFEST_NAME}"] if self.replacing else []), *self.placed,
                     self.temp_manifest]:
            self._delete(path)
        self._delete_staging()

    def _previous_files(self) -> list[str]:
        if not self.overwrite:
            return []
        try:
            old = read_manifest(self.location)
        except DataError:
            return []
        return [f"{self.root}/{f['path']}" for entry in old.splits.values() for f in entry["files"]]

    def _delete(self, path: str) -> None:
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)

    def _delete_staging(self) -> None:
        if self.fs.get_file_info(self.staging).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.staging)


class RowAssembler:
    """Rows keyed by (file, row) arrive in any order; each file's values come back in row
    order as soon as the file is complete."""

    def __init__(self, rows_per_file: list[int]):
        self.rows_per_file = rows_per_file
        self.pending: dict[int, dict[int, object]] = {}

    def add(self, file: int, row: int, value) -> list | None:
        """The file's values in row order when this row completes it, else None."""
        if not 0 <= row < self.rows_per_file[file]:
            raise ValueError(f"row {row} of image shard {file}, which has {self.rows_per_file[file]} rows")
        rows = self.pending.setdefault(file, {})
        if row in rows:
            raise ValueError(f"row {row} of image shard {file} arrived twice")
        rows[row] = value
        if len(rows) < self.rows_per_file[file]:
            return None
        del self.pending[file]
        return [rows[index] for index in range(len(rows))]
