"""Parquet shards plus a manifest: the one on-disk form every dataset is trained from.

OUT/manifest.json lists every shard with its row count, byte size and sha256; readers open
only the files it lists, never a glob. `write_shards` (and the pseudo-label writer) publish
through `DatasetPublisher`: every shard is written under a hidden staging folder, moved into
place, and the manifest is written last (temp name, then move). Any failure or interrupt
deletes what was staged or moved and leaves no manifest, so a half-written dataset is never
readable. An existing manifest is only replaced with `overwrite=True`; the old dataset stays
intact until the new one is fully staged.

One row per image: `id` string, `image` binary (the original encoded bytes), `mask` binary
or null (PNG, mode L, pixel = class index, 255 = void), `labels` list<int16> (sorted
foreground classes 1..K), `height` and `width` int32; optionally `region` binary (PNG,
mode L: the kind of region of each pixel, for evaluation only), where the reader gives one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pyarrow import fs as pafs

from wsss.datasets.base import IGNORE_INDEX, DatasetInfo, DatasetReader, Sample
from wsss.datasets.lease import acquire
from wsss.datasets.parallel import read_split
from wsss.io import DataError, canonical, check_bucket, join, resolve

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("mask", pa.binary()),
    pa.field("labels", pa.list_(pa.int16()), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
])
REGION_SCHEMA = SCHEMA.append(pa.field("region", pa.binary(), nullable=False))


def encode_mask(mask: np.ndarray) -> bytes:
    """A class-index mask as PNG bytes (mode L, lossless)."""
    mask = np.asarray(mask)
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"a mask must be uint8 [H, W], got {mask.dtype} {list(mask.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "L":
            raise ValueError(f"a shard mask must be a mode L PNG, got mode {image.mode}")
        return np.array(image, dtype=np.uint8)


@dataclass(frozen=True)
class Manifest:
    location: str  # the dataset folder, URI or absolute path; not stored in the JSON
    dataset: str
    classes: list[str]
    palette: list[list[int]]
    ignore_index: int
    splits: dict[str, dict]  # split -> {"rows": n, "files": [{"path", "rows", "sha256", "bytes"}]}
    skipped: dict  # {"count": n, "by_problem": {problem: n}, "items": [[file, problem], ...]}
    source: dict
    created: str
    format_version: int = FORMAT_VERSION

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(name=self.dataset, classes=tuple(self.classes),
                           palette=tuple(tuple(rgb) for rgb in self.palette), ignore_index=self.ignore_index)

    @property
    def num_classes(self) -> int:
        return len(self.classes) - 1

    def files(self, split: str) -> list[str]:
        """The split's shards as full URIs or paths, in manifest order."""
        return [self.shard(entry["path"]) for entry in self._split(split)["files"]]

    def shard(self, relative: str) -> str:
        """The full URI or path of the shard the manifest lists as `relative`: the one place
        a manifest entry becomes a location, for reading, checksums and deletion alike."""
        return shard_location(self.location, relative)

    def rows(self, split: str) -> int:
        return self._split(split)["rows"]

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        del data["location"]
        return {"format_version": data.pop("format_version"), **data}

    def _split(self, split: str) -> dict:
        if split not in self.splits:
            raise DataError(join(self.location, MANIFEST_NAME),
                            f"unknown split: {split!r}; the manifest has {', '.join(self.splits) or 'none'}")
        return self.splits[split]


def shard_location(location: str, relative: str) -> str:
    """`relative` (a manifest entry) inside the dataset folder `location`; DataError naming
    the manifest and the entry if it could point outside the folder."""
    problem = _outside_problem(relative)
    if problem:
        raise DataError(join(location, MANIFEST_NAME), f"invalid manifest: shard path {relative!r} {problem}")
    return join(location, relative)


def _outside_problem(relative: object) -> str | None:
    """Why a manifest's shard path could name a file outside its dataset folder, or None."""
    if not isinstance(relative, str) or not relative:
        return "is not a relative path"
    if ":" in relative:
        return "is a URI or a drive path; shard paths are relative to the manifest's folder"
    if relative.startswith(("/", "\\")):
        return "is absolute; shard paths are relative to the manifest's folder"
    if any(part in ("", ".", "..") for part in relative.replace("\\", "/").split("/")):
        return "has an empty, '.' or '..' segment; shard paths stay inside the manifest's folder"
    return None


def image_labels(manifest: Manifest, split: str) -> np.ndarray:
    """bool [L, K+1] image-level labels of a split (column 0, background, always set),
    read from the `labels` column alone."""
    fs, _ = resolve(manifest.files(split)[0])
    paths = [resolve(uri)[1] for uri in manifest.files(split)]
    labels = pq.read_table(paths, columns=["labels"], filesystem=fs).column("labels").to_pylist()
    matrix = np.zeros((len(labels), manifest.num_classes + 1), dtype=bool)
    matrix[:, 0] = True
    for row, present in enumerate(labels):
        matrix[row, present] = True
    return matrix


def read_manifest(uri: str) -> Manifest:
    """The manifest of the prepared dataset at `uri` (the folder `wsss prepare --out` wrote)."""
    location = canonical(uri)
    fs, root = resolve(location)
    name = join(location, MANIFEST_NAME)
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST_NAME}") as stream:
            data = json.loads(stream.read())
    except FileNotFoundError:
        check_bucket(location)  # a missing bucket reads as a missing file: say which it is
        raise DataError(name, "manifest missing: no prepared dataset here (run `wsss prepare`)") from None
    except (OSError, ValueError) as error:  # ValueError covers bad JSON
        raise DataError(name, f"invalid manifest: {error}") from None
    _check_manifest(name, data)
    keys = [field.name for field in dataclasses.fields(Manifest) if field.name != "location"]
    return Manifest(location=location, **{key: data[key] for key in keys})


def _check_manifest(name: str, data: object) -> None:
    if not isinstance(data, dict):
        raise DataError(name, "invalid manifest: not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise DataError(name, f"invalid manifest: format_version {data.get('format_version')!r}, "
                              f"this version of wsss reads {FORMAT_VERSION}")
    keys = [field.name for field in dataclasses.fields(Manifest) if field.name != "location"]
    missing = [key for key in keys if key not in data]
    if missing:
        raise DataError(name, f"invalid manifest: missing {', '.join(missing)}")
    if len(data["palette"]) != len(data["classes"]):
        raise DataError(name, "invalid manifest: palette and classes differ in length")
    for split, entry in data["splits"].items():
        try:
            files = entry["files"]
            rows = sum(int(file["rows"]) for file in files)
            complete = all(isinstance(file["path"], str) and isinstance(file["sha256"], str) for file in files)
        except (KeyError, TypeError, ValueError):
            complete = False
        if not complete:
            raise DataError(name, f"invalid manifest: split {split!r} needs files with path, rows and sha256")
        for file in files:
            problem = _outside_problem(file["path"])
            if problem:
                raise DataError(name, f"invalid manifest: split {split!r} shard path {file['path']!r} {problem}")
        if rows != entry.get("rows"):
            raise DataError(name, f"invalid manifest: split {split!r} says {entry.get('rows')} rows, its files {rows}")


def verify_checksums(manifest: Manifest, split: str) -> None:
    """DataError naming the first shard of `split` whose bytes differ from the manifest."""
    for entry in manifest._split(split)["files"]:
        name = manifest.shard(entry["path"])
        fs, path = resolve(name)
        try:
            digest, _ = _sha256(fs, path)
        except OSError as error:
            raise DataError(name, f"shard missing: listed in the manifest but unreadable ({error})") from None
        if digest != entry["sha256"]:
            raise DataError(name, f"checksum mismatch: sha256 {digest}, the manifest says {entry['sha256']}")


def check_writable(uri: str, overwrite: bool = False) -> None:
    """Prepared data is never replaced silently: DataError if `uri` holds a manifest
    (or is in a bucket that does not exist)."""
    check_bucket(uri)
    fs, root = resolve(uri)
    if not overwrite and fs.get_file_info(f"{root}/{MANIFEST_NAME}").type != pafs.FileType.NotFound:
        raise DataError(join(uri, MANIFEST_NAME), "manifest exists: the output already holds a prepared "
                                                  "dataset; pass overwrite=True (--overwrite) to replace it")


# What a run names `staging` and its temp manifest (a uuid4 hex each): the only names swept.
_STAGING_NAME = re.compile(r"\.staging-[0-9a-f]{32}")
_TEMP_MANIFEST_NAME = re.compile(rf"\.{re.escape(MANIFEST_NAME)}\.[0-9a-f]{{32}}\.tmp")


class DatasetPublisher:
    """Publishes one dataset folder (shards plus manifest) atomically.

    Callers write files under `staging`, a hidden folder in the output, then call
    `publish(manifest)`: it moves the files the manifest lists into place, writes the
    manifest last (temp name, then move) and, with `overwrite`, deletes the previous
    dataset's files that the new one does not reuse. Leaving the `with` block unpublished,
    by an exception (Ctrl-C included) or otherwise, deletes everything staged or placed,
    and the output folder too (with any parent folder) if this publisher created it and it
    holds no file.

    A run killed outright (SIGKILL, OOM, power loss) cannot roll back; the next publisher
    into the same output deletes that run's staging folder and temp manifest (only names
    of exactly the form used here) when it starts. A second job writing the same output
    at once is refused (FolderInUseError): the publisher holds the output's lease
    (`wsss.datasets.lease`) from before it looks for leftovers until it is done.
    """

    def __init__(self, location: str, overwrite: bool = False):
        self.location, self.overwrite = canonical(location), overwrite
        check_writable(self.location, overwrite)
        self.fs, self.root = resolve(self.location)
        self._created = _outermost_missing(self.fs, self.root)  # what `abort` may remove
        self._lease = acquire(self.location, "a job writing shards")
        if self.fs.get_file_info(self.root).type == pafs.FileType.Directory:
            self._delete_leftovers()
        run = uuid.uuid4().hex
        self.staging, self._temp_manifest = f"{self.root}/.staging-{run}", f"{self.root}/.{MANIFEST_NAME}.{run}.tmp"
        self._placed: list[str] = []
        self._replacing = False  # set once the old manifest is deleted: any manifest after that is ours
        self.published = False

    def __enter__(self) -> DatasetPublisher:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.abort()

    def publish(self, manifest: Manifest) -> None:
        """Move the staged files `manifest` lists into place, then write the manifest."""
        previous = _listed_files(self.location) if self.overwrite else []
        self._replacing = True
        _delete_file(self.fs, f"{self.root}/{MANIFEST_NAME}")  # from here on the old dataset is gone
        for entry in manifest.splits.values():
            for file in entry["files"]:
                target = resolve(shard_location(self.location, file["path"]))[1]
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                self.fs.move(f"{self.staging}/{file['path']}", target)
                self._placed.append(target)
        with self.fs.open_output_stream(self._temp_manifest) as stream:
            stream.write(json.dumps(manifest.to_json(), indent=1).encode())
        self.fs.move(self._temp_manifest, f"{self.root}/{MANIFEST_NAME}")
        self.published = True
        _delete_dir(self.fs, self.staging)
        for path in set(previous) - set(self._placed):
            _delete_file(self.fs, path)

    def abort(self) -> None:
        """Release the output's lease; delete everything this run staged or placed, nothing
        once published."""
        self._lease.release()  # first: the output folder goes only when it holds no file
        if self.published:
            return
        for path in [*([f"{self.root}/{MANIFEST_NAME}"] if self._replacing else []), *self._placed,
                     self._temp_manifest]:
            _delete_file(self.fs, path)
        _delete_dir(self.fs, self.staging)
        if self._created is None:
            return
        # Empty folders under one we created (a split folder; on object stores the markers
        # pyarrow leaves) are ours.
        everything = self.fs.get_file_info(pafs.FileSelector(self._created, recursive=True, allow_not_found=True))
        if not any(info.type == pafs.FileType.File for info in everything):
            _delete_dir(self.fs, self._created)

    def _delete_leftovers(self) -> None:
        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
            if info.type == pafs.FileType.Directory and _STAGING_NAME.fullmatch(info.base_name):
                self.fs.delete_dir(info.path)
            elif info.type == pafs.FileType.File and _TEMP_MANIFEST_NAME.fullmatch(info.base_name):
                self.fs.delete_file(info.path)


def write_shards(reader: DatasetReader, out_uri: str, splits: Iterable[str] | None = None,
                 rows_per_file: int = 256, rows_per_group: int = 32, overwrite: bool = False,
                 source: dict | None = None, workers: int = 1,
                 progress: Callable[[str, int], None] | None = None) -> Manifest:
    """Write the reader's splits to `out_uri` as shards plus manifest (see module docstring).

    At least two files per split with two or more rows, so reads parallelise. `workers`
    processes read the samples (the shards are the same for any number); `progress(split,
    rows)` is called after each row is written."""
    if rows_per_file < 1 or rows_per_group < 1:
        raise ValueError(f"rows_per_file and rows_per_group must be >= 1, got {rows_per_file}, {rows_per_group}")
    known = reader.splits()
    splits = list(known if splits is None else splits)
    unknown = [split for split in splits if split not in known]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r} for dataset {reader.info.name!r}; known: {', '.join(known)}")
    with DatasetPublisher(out_uri, overwrite) as publisher:
        entries = {}
        for split in splits:
            rows = read_split(reader, split, functools.partial(_row, num_classes=len(reader.info.classes) - 1),
                              workers)
            if progress is not None:
                rows = _reported(rows, functools.partial(progress, split))
            entries[split] = _stage_split(publisher.fs, publisher.staging, split, rows, rows_per_file, rows_per_group)
            if not entries[split]["rows"]:
                raise DataError(f"{reader.info.name} split {split!r}", "no samples: nothing valid to write")
        info = reader.info
        manifest = Manifest(
            location=publisher.location, dataset=info.name, classes=list(info.classes),
            palette=[list(rgb) for rgb in info.palette], ignore_index=info.ignore_index, splits=entries,
            skipped=_skip_summary(reader), source=dict(source or {}),
            created=datetime.now(UTC).isoformat(timespec="seconds"))
        publisher.publish(manifest)
    return manifest


def _reported(rows: Iterator[dict], progress: Callable[[int], None]) -> Iterator[dict]:
    for count, row in enumerate(rows, 1):
        yield row
        progress(count)


def _stage_split(fs: pafs.FileSystem, staging: str, split: str, rows: Iterator[dict],
                 rows_per_file: int, rows_per_group: int) -> dict:
    fs.create_dir(f"{staging}/{split}", recursive=True)
    rows = iter(rows)
    names, written = [], []
    schema = None  # the first sample decides whether the split has a region column
    while (first := next(rows, None)) is not None:
        schema = schema or (SCHEMA if "region" not in first else REGION_SCHEMA)
        names.append(f"{split}/part-{len(names):05d}.parquet")
        part = (_same_columns(row, schema)
                for row in itertools.chain([first], itertools.islice(rows, rows_per_file - 1)))
        written.append(_write_parquet(fs, f"{staging}/{names[-1]}", part, rows_per_group, schema))
    if len(names) == 1 and written[0]["rows"] >= 2:
        table = pq.read_table(f"{staging}/{names[0]}", filesystem=fs, schema=schema)
        half = (len(table) + 1) // 2
        names.append(f"{split}/part-00001.parquet")
        written = [_write_parquet(fs, f"{staging}/{name}", part.to_pylist(), rows_per_group, schema)
                   for name, part in zip(names, (table.slice(0, half), table.slice(half)), strict=True)]
    files = [{"path": name} | file for name, file in zip(names, written, strict=True)]
    return {"rows": sum(file["rows"] for file in files), "files": files}


def _row(sample: Sample, num_classes: int) -> dict:
    _check_sample(sample, num_classes)
    row = {"id": sample.id, "image": sample.image,
           "mask": None if sample.mask is None else encode_mask(sample.mask),
           "labels": list(sample.labels), "height": sample.height, "width": sample.width}
    if sample.region is not None:
        row["region"] = encode_mask(sample.region)
    return row


def _same_columns(row: dict, schema: pa.Schema) -> dict:
    if ("region" in row) != (schema is REGION_SCHEMA):
        raise DataError(row["id"], "region map: every sample of a split needs one, or none does")
    return row


def _check_sample(sample: Sample, num_classes: int) -> None:
    """DataError naming the sample if its labels or mask hold values no class has: a reader
    bug that would otherwise surface as a wrong loss, or an index error mid-training."""
    labels = list(sample.labels)
    if any(not isinstance(label, (int, np.integer)) or not 1 <= label <= num_classes for label in labels) \
            or labels != sorted(set(labels)):
        raise DataError(sample.id, f"bad labels {labels}: expected sorted distinct classes 1..{num_classes}")
    if sample.mask is None:
        return
    mask = np.asarray(sample.mask)
    if mask.shape != (sample.height, sample.width):
        raise DataError(sample.id, f"bad mask: shape {list(mask.shape)}, the image is "
                                   f"{sample.height}x{sample.width}")
    bad = mask[(mask > num_classes) & (mask != IGNORE_INDEX)]
    if bad.size:
        raise DataError(sample.id, f"bad mask: value {int(bad[0])}, expected classes 0..{num_classes} "
                                   f"or {IGNORE_INDEX} (ignore)")


def has_regions(manifest: Manifest, split: str) -> bool:
    """Whether the split's shards carry the `region` column (read from the first file's footer)."""
    fs, path = resolve(manifest.files(split)[0])
    return "region" in pq.read_schema(path, filesystem=fs).names


def _write_parquet(fs: pafs.FileSystem, path: str, rows: Iterable[dict], rows_per_group: int,
                   schema: pa.Schema = SCHEMA) -> dict:
    """Stream rows into one file, one row group at a time, hashing the bytes as they are
    written (no second read; in parallel prepares, while the workers read on); returns the
    file's rows, sha256 and bytes."""
    rows, count = iter(rows), 0
    # Images and PNG masks are compressed already; dictionaries of unique blobs only cost.
    with fs.open_output_stream(path) as stream:
        hashing = _HashingStream(stream)
        with pq.ParquetWriter(hashing, schema, compression="none", use_dictionary=False) as writer:
            while group := list(itertools.islice(rows, rows_per_group)):
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                count += len(group)
    return {"rows": count, "sha256": hashing.digest.hexdigest(), "bytes": hashing.size}


class _HashingStream:
    """A writable file that forwards to `stream`, keeping the sha256 and size of what passed."""

    def __init__(self, stream):
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.stream.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:  # the caller closes `stream`
        pass

    @property
    def closed(self) -> bool:
        return self.stream.closed


def _sha256(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _skip_summary(reader: DatasetReader) -> dict:
    """Problems are counted by category: the message up to its first colon."""
    entries = reader.skipped.entries if getattr(reader, "skipped", None) is not None else []
    by_problem = Counter(problem.split(":", 1)[0] for _, problem in entries)
    return {"count": len(entries), "by_problem": dict(by_problem), "items": [list(entry) for entry in entries]}


def _listed_files(location: str) -> list[str]:
    """Paths (inside the filesystem) of the shards an existing manifest lists, all inside
    `location`; none if the manifest is unreadable or names a file outside it."""
    try:
        manifest = read_manifest(location)
    except DataError as error:
        logger.warning("%s; none of the files it lists is deleted", error)
        return []
    return [resolve(manifest.shard(file["path"]))[1] for entry in manifest.splits.values() for file in entry["files"]]


def _delete_file(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def _outermost_missing(fs: pafs.FileSystem, path: str) -> str | None:
    """The outermost folder of `path`, itself included, that does not exist (on object
    stores: holds no object); None if `path` exists. Stops below the bucket or top folder."""
    missing = None
    while "/" in path.strip("/") and fs.get_file_info(path).type == pafs.FileType.NotFound:
        missing, path = path, path.rsplit("/", 1)[0]
    return missing


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
