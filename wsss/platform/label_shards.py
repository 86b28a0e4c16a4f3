"""Pseudo-label shards: the mirror of a split of image shards, written atomically.

A pseudo-label shard holds, for every row of its image shard and in the same order, the
`id` and a `mask` (mode-L PNG, 255 = ignore); it sits at the image shard's relative path
under its own folder, listed by a manifest in the shard format (`wsss.datasets.shards`).
`wsss.datasets.reading.pseudo_label_files` and `read_shard` are the reading side.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from wsss.datasets.base import IGNORE_INDEX
from wsss.datasets.shards import DatasetPublisher, Manifest
from wsss.io import DataError, canonical, join

LABEL_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("mask", pa.binary(), nullable=False)])


class LabelShardWriter:
    """Pseudo-label shards mirroring one split of image shards, published atomically.

    `write(index, ids, masks)` stages the mirror of the split's index-th image shard in a
    hidden folder; `publish(source)` moves the files into place and writes the manifest
    last. Leaving the `with` block unpublished, by an exception (Ctrl-C included) or
    otherwise, deletes everything staged or placed: a failed job leaves nothing readable
    and nothing to clean up (`DatasetPublisher` says how, and what a killed job leaves).
    """

    def __init__(self, out: str, images: Manifest, split: str, overwrite: bool = False):
        self.location = canonical(out)
        if self.location.rstrip("/") == images.location.rstrip("/"):
            raise DataError(out, "pseudo-labels would overwrite the image shards: choose another --out")
        images.rows(split)  # DataError naming a missing split
        self.publisher = DatasetPublisher(self.location, overwrite)
        self.images, self.split = images, split
        self.expected = images.splits[split]["files"]
        self.staged: dict[int, dict] = {}

    def __enter__(self) -> LabelShardWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
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
        fs, path = self.publisher.fs, f"{self.publisher.staging}/{entry['path']}"
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as stream:
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
            created=datetime.now(UTC).isoformat(timespec="seconds"))
        self.publisher.publish(manifest)
        return manifest

    def abort(self) -> None:
        """Delete everything staged or placed, unless published."""
        self.publisher.abort()


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
