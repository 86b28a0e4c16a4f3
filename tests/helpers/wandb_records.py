"""What an offline W&B run wrote: the records of its `run-<id>.wandb` file.

Offline, W&B keeps the summary, history and artifacts only in that file (no
wandb-summary.json). It is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks
of chunks, each with a 7-byte header (crc32, length, type: full, first, middle, last)
holding serialized `wandb_internal_pb2.Record`s.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def records(run_folder: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    out, pending, position = [], b"", HEADER
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if left < HEADER or (kind == 0 and length == 0):  # a block's zero padding
            position += left
            continue
        pending += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def summary(run_folder: Path) -> dict:
    """The run's summary as its updates left it: {"a/b": value}."""
    values = {}
    for record in records(run_folder):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return values


def artifacts(run_folder: Path) -> list:
    return [r.artifact for r in records(run_folder) if r.WhichOneof("record_type") == "artifact"]
