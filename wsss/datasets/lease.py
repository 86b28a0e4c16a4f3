"""One writer per folder: a lease file that a run, sweep or `prepare` holds while it writes.

`acquire` puts `owner.json` (host, pid, start time, heartbeat, a random token) in the
folder, or raises FolderInUseError naming the folder and its owner. A lease whose owner
is gone is taken over: on this host when its pid no longer runs, from another host when
its heartbeat is older than STALE_AFTER_S (a thread refreshes it every HEARTBEAT_S).
`release` deletes it if it is still ours; a run that dies outright leaves it behind, stale.

Locally the file is created with O_CREAT|O_EXCL, so of two starts exactly one wins.
Object stores (S3, GCS through pyarrow) have no exclusive create: the lease is written,
read back after SETTLE_S, and the start refused unless it is still ours. Two starts win
both only if one's check-and-write takes longer than SETTLE_S while the other's falls
inside it; taking over a stale lease has the same window locally.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from pyarrow import fs as pafs

from wsss.io import canonical, public_uri, resolve

logger = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a lease from another host is taken over after this long without a heartbeat
SETTLE_S = 1.0  # object stores: how long a written lease must stay ours
UNREADABLE_STALE_S = 10.0


class FolderInUseError(ValueError):
    """Another live process holds the folder's lease."""


class Lease:
    def __init__(self, folder: str, record: dict):
        self.folder, self.record = folder, record
        self.fs, path = resolve(folder)
        self.path = f"{path}/{OWNER_FILE}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {OWNER_FILE}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still ours."""
        self._stop.set()
        self._thread.join()
        try:
            if _is_ours(_read(self.fs, self.path), self.record):
                self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:  # storage gone: the error that ended the run matters more
            logger.warning("%s: the lease could not be released (%s); the next start takes it over once "
                           "it is stale", public_uri(self.folder), public_uri(" ".join(str(error).split())))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = _read(self.fs, self.path)
                if current is not None and "unreadable_for_s" in current:
                    continue  # another process is writing it this instant: look again at the next beat
                if not _is_ours(current, self.record):
                    logger.warning("%s: the lease was taken over by %s; this process no longer holds it",
                                   public_uri(self.folder), _describe(current))
                    return
                self.record["heartbeat"] = time.time()
                _write(self.fs, self.path, self.record)
            except OSError as error:  # a storage hiccup: the next beat tries again
                logger.warning("%s: lease heartbeat failed: %s", public_uri(self.folder), error)


def acquire(folder: str, what: str) -> Lease:
    """The lease of `folder` (created if missing) for `what` (e.g. "wsss train"), or
    FolderInUseError if a live process holds it."""
    folder = canonical(folder)
    fs, path = resolve(folder)
    fs.create_dir(path, recursive=True)
    file = f"{path}/{OWNER_FILE}"
    record = {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.now(UTC).isoformat(timespec="seconds"),
              "heartbeat": time.time(), "token": uuid.uuid4().hex}
    local = isinstance(fs, pafs.LocalFileSystem)
    for _ in range(2):  # the second try follows taking over a stale lease
        current = _read(fs, file)
        if current is not None:
            if not _is_stale(current):
                raise FolderInUseError(
                    f"{public_uri(folder)} is in use by {_describe(current)}: wait for it to finish, or use "
                    f"another name. If that process is gone, delete {public_uri(folder)}/{OWNER_FILE}")
            logger.warning("%s: taking over the stale lease of %s", public_uri(folder), _describe(current))
            try:
                fs.delete_file(file)
            except FileNotFoundError:
                pass
        if local:
            try:
                descriptor = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue  # another start won the race: look at its lease
            with os.fdopen(descriptor, "w") as stream:
                json.dump(record, stream)
        else:
            _write(fs, file, record)
            time.sleep(SETTLE_S)
            if not _is_ours(_read(fs, file), record):
                continue
        return Lease(folder, record)
    raise FolderInUseError(f"{public_uri(folder)} is in use by {_describe(_read(fs, file))}: another process "
                           "started in it at the same time")


def _is_stale(record: dict) -> bool:
    if "unreadable_for_s" in record:
        return record["unreadable_for_s"] > UNREADABLE_STALE_S
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return not _pid_runs(record["pid"])
    heartbeat = record.get("heartbeat")
    return not isinstance(heartbeat, (int, float)) or time.time() - heartbeat > STALE_AFTER_S


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_ours(current: dict | None, record: dict) -> bool:
    return current is not None and current.get("token") == record["token"]


def _describe(record: dict | None) -> str:
    if not record:
        return "another process"
    return (f"{record.get('what', '?')} (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"started {record.get('started', '?')})")


def _read(fs: pafs.FileSystem, path: str) -> dict | None:
    """The lease at `path`, None if there is none. One that does not parse is being written
    this instant or was cut short: stale only once UNREADABLE_STALE_S old."""
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as stream:
            record = json.loads(stream.read())
    except FileNotFoundError:
        return None
    except ValueError:
        record = None
    if isinstance(record, dict):
        return record
    return {"unreadable_for_s": time.time() - info.mtime.timestamp() if info.mtime else 0.0}


def _write(fs: pafs.FileSystem, path: str, record: dict) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps(record).encode())
