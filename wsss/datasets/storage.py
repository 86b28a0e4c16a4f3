"""Where shards live: local paths (relative too) and any URI pyarrow understands.

Everything that writes or reads shards goes through `resolve`, so `s3://`, `gs://`,
`file://` and plain paths behave the same way everywhere.
"""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
from pyarrow import fs as pafs

from wsss.datasets.base import DataError


def is_uri(location: str) -> bool:
    return "://" in location


def canonical(location: str | os.PathLike) -> str:
    """URIs unchanged; local paths absolute, so they stay valid in other processes."""
    location = os.fspath(location)
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `location` and the path inside it."""
    location = canonical(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, ValueError, OSError) as error:
        raise DataError(location, f"unusable storage URI: {error}") from None


def check_bucket(location: str | os.PathLike) -> None:
    """DataError naming `location` when it is in an S3/GCS bucket that does not exist.

    Asked before expensive work: pyarrow only notices a missing bucket at the first
    write, and a read reports it as a missing file."""
    fs, path = resolve(location)
    if fs.type_name not in ("s3", "gcs"):
        return
    bucket = path.split("/", 1)[0]
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise DataError(canonical(location), f"bucket {bucket!r} does not exist (or these credentials "
                                             "cannot see it)")


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` with `parts` appended, keeping its scheme if it has one."""
    location = canonical(location)
    if is_uri(location):
        return "/".join([location.rstrip("/"), *(part.strip("/") for part in parts)])
    return os.path.join(location, *parts)


def write_text(location: str, text: str) -> None:
    """Write `text` to `location` whole or not at all: a reader sees the old file or the new
    one, never half of it. Locally: a temp file beside it, renamed over it. On object stores
    (S3, GCS) one PUT at close already replaces an object whole, and a failed one leaves
    the old object."""
    data = text.encode()
    fs, path = resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if fs.type_name != "local":
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the bytes on disk before the name points at them
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def is_file(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str) -> str | None:
    """The file's text, or None when it does not exist."""
    data = read_bytes(location)
    return None if data is None else data.decode()


def delete_file(location: str) -> None:
    """Delete the file if it exists."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
