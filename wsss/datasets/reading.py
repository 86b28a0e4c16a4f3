"""Shards as numpy, without Ray or torch: pyarrow reads of one shard (joined with its
pseudo-label mirror), batches over many, and original-size evaluation rows.

Ray Data's read tasks run these in its worker processes; keeping torch out of this
module keeps each new worker from spending seconds importing it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wsss.datasets.augment import EvalTransform
from wsss.datasets.shards import Manifest, has_regions, read_manifest
from wsss.io import DataError, resolve

NumpyBatch = dict[str, np.ndarray]


def pseudo_label_files(manifest: Manifest, labels: Manifest, split: str) -> list[str]:
    """The pseudo-label shards mirroring `split` of the image shards, file for file and
    row for row; DataError naming the pseudo-label manifest when they do not."""
    manifest.rows(split), labels.rows(split)  # DataErrors naming a missing split
    counts = [[file["rows"] for file in m.splits[split]["files"]] for m in (manifest, labels)]
    if counts[0] != counts[1]:
        raise DataError(labels.location, f"pseudo-label shards of split {split!r} do not mirror the image "
                                         f"shards: rows per file {counts[1]}, images {counts[0]}")
    return labels.files(split)


def read_shard(uri: str, columns: Sequence[str], label_uri: str | None = None, *,
               sha256: str | None = None, label_sha256: str | None = None) -> pa.Table:
    """One shard's `columns`; with `label_uri`, its pseudo-label mirror's mask joined as
    `target` after checking that the ids match row for row. With `sha256` (`label_sha256`),
    the file's bytes are read once, checked against it and parsed from memory."""
    try:
        source, fs = _checked_source(uri, sha256)
        table = pq.read_table(source, columns=list(columns), filesystem=fs)
    except (OSError, pa.ArrowException) as error:
        raise DataError(uri, f"shard unreadable: {error}") from None
    if label_uri is None:
        return table
    try:
        source, fs = _checked_source(label_uri, label_sha256)
        labels = pq.read_table(source, columns=["id", "mask"], filesystem=fs)
    except (OSError, pa.ArrowException) as error:
        raise DataError(label_uri, f"pseudo-label shard unreadable: {error}") from None
    if len(labels) != len(table) or not labels.column("id").equals(table.column("id")):
        ids, label_ids = table.column("id").to_pylist(), labels.column("id").to_pylist()
        # the lengths may differ: that is one of the mismatches reported
        where = next((i for i, (a, b) in enumerate(zip(ids, label_ids, strict=False)) if a != b),
                     min(len(ids), len(label_ids)))
        found = label_ids[where] if where < len(label_ids) else "end of file"
        expected = ids[where] if where < len(ids) else "end of file"
        raise DataError(label_uri, f"pseudo-labels do not match the image shard {uri} row for row: "
                                   f"row {where} is {found!r}, the image shard has {expected!r}")
    return table.append_column("target", labels.column("mask"))


def _checked_source(uri: str, sha256: str | None) -> tuple:
    """(source, filesystem) pyarrow reads the shard from: its path (only the columns' bytes
    are fetched), or with `sha256` all its bytes, once they hash to it (DataError naming
    the shard otherwise)."""
    fs, path = resolve(uri)
    if sha256 is None:
        return path, fs
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise DataError(uri, f"checksum mismatch: sha256 {digest}, the manifest says {sha256}")
    return pa.BufferReader(data), None


def to_numpy(table: pa.Table) -> NumpyBatch:
    """Arrow columns as numpy, in the form Ray Data's numpy batches take: strings and
    bytes as object arrays, list columns as object arrays of arrays."""
    return {name: column.to_numpy(zero_copy_only=False)
            for name, column in zip(table.column_names, table.columns, strict=True)}


def iter_shard_batches(files: Sequence[str], columns: Sequence[str], batch_size: int, *,
                       label_files: Sequence[str] | None = None, shuffle: bool = False, seed: int = 0,
                       epoch: int = 0, drop_last: bool = False) -> Iterator[NumpyBatch]:
    """Numpy batches of exactly `batch_size` rows (the last may be short unless
    `drop_last`) over `files` in order, or in a (seed, epoch)-shuffled order of files and
    of rows within each file."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if label_files is not None and len(label_files) != len(files):
        raise ValueError(f"{len(label_files)} pseudo-label shards for {len(files)} image shards")
    rng = np.random.default_rng([int(epoch), int(seed)])
    order = rng.permutation(len(files)) if shuffle else range(len(files))
    pending: list[pa.Table] = []
    pending_rows = 0
    for index in order:
        table = read_shard(files[index], columns, label_files[index] if label_files is not None else None)
        if shuffle:
            table = table.take(rng.permutation(len(table)))
        pending.append(table)
        pending_rows += len(table)
        if pending_rows < batch_size:
            continue
        merged = pa.concat_tables(pending)
        full = pending_rows // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield to_numpy(merged.slice(start, batch_size))
        pending, pending_rows = [merged.slice(full)], pending_rows - full
    if pending_rows and not drop_last:
        yield to_numpy(pa.concat_tables(pending))


def eval_rows(data_uri: str, split: str, *, with_mask: bool = True, batch_size: int = 16) -> Iterator[dict]:
    """Original-size rows {id, image uint8 HWC, mask uint8 HW, labels float32 [K]}, and
    region uint8 HW where the shards have that column."""
    manifest = read_manifest(data_uri)
    transform = EvalTransform(manifest.num_classes, with_mask=with_mask, with_region=has_regions(manifest, split))
    for batch in iter_shard_batches(manifest.files(split), transform.columns(), batch_size):
        out = transform(batch)
        for row in range(len(out["id"])):
            yield {key: value[row] for key, value in out.items()}
