"""Files and URIs, for every layer: where a location lives, whole-file reads and writes,
and how a location is named in messages without the credentials it may carry.

Everything that reads or writes goes through `resolve`, so `s3://`, `gs://`, `file://` and
plain paths (relative too) behave the same way everywhere. A URI may carry credentials
(`s3://KEY:SECRET@bucket/x`, `postgresql://user:pw@host/db`, `...?secret_key=...`): runs
use it as given, and everything written for people to read (W&B config, checkpoints'
config, results.json, sweep.json, error messages) goes through `public_uri`.
"""

from __future__ import annotations

import json
import os
import re
import uuid

import pyarrow as pa
from pyarrow import fs as pafs

REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&;][^=&#\s]*(?:key|token|secret|password|passwd|pwd|credential)[^=&#\s]*=)"
                           r"(?P<value>[^&#\s]*)", re.IGNORECASE)


def public_uri(text: str) -> str:
    """`text` (a URI, or a message holding URIs) with user:password and secret query
    values replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{REDACTED}", text)


def is_redacted(text: str) -> bool:
    """Whether `text` is a URI that `public_uri` took credentials out of."""
    return f"://{REDACTED}@" in text or f"={REDACTED}" in text


class DataError(ValueError):
    """Bad input data. The message always names the file (or key) and the problem."""

    def __init__(self, path: object, problem: str):
        self.path = public_uri(str(path))  # messages are printed and logged
        self.problem = public_uri(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # rebuilt from its two parts when it crosses to another process
        return type(self), (self.path, self.problem)


class StorageUnavailableError(OSError):
    """Storage that does not answer (an object store stopped or out of reach). The message
    names the location, without credentials, and what failed."""

    def __init__(self, location: object, problem: str):
        self.location = public_uri(str(location))
        self.problem = public_uri(problem)
        super().__init__(f"{self.location}: {self.problem}")

    def __reduce__(self):
        return type(self), (self.location, self.problem)


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


def check_reachable(location: str | os.PathLike, then: str = "", cause: BaseException | None = None) -> None:
    """StorageUnavailableError naming `location` when it is in an object store that does
    not answer now (asked once, with pyarrow's own retries); `then` ends the message and
    `cause` is the error it explains. A local path always answers."""
    fs, path = resolve(location)
    if fs.type_name == "local":
        return
    try:
        fs.get_file_info(path)
    except OSError as error:
        problem = f"the storage does not answer ({' '.join(str(error).split())})"
        raise StorageUnavailableError(canonical(location), f"{problem}; {then}" if then else problem) \
            from cause or error


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


def read_json(location: str):
    """The file's parsed JSON, or None when it does not exist."""
    text = read_text(location)
    return None if text is None else json.loads(text)


def write_json(location: str, data) -> None:
    """`data` as indented JSON, written whole (`write_text`); values JSON does not know
    (paths, dates) as their str()."""
    write_text(location, json.dumps(data, indent=2, default=str))
