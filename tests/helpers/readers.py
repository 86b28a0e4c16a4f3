"""A dataset reader over a few fixed samples, one that fails on cue, and one that blocks
mid-write (a writer process to kill); what the shard writer and its lease are tested with."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import ROOT
from wsss.datasets.base import DatasetInfo, Sample


def png_bytes(seed: int, size=(12, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_sample(i: int, with_mask: bool = True) -> Sample:
    mask = np.random.default_rng(i).choice(np.array([0, 1, 2, 255], dtype=np.uint8), size=(12, 16))
    return Sample(id=f"img{i:03d}", image=png_bytes(i), mask=mask if with_mask else None,
                  labels=(1, 2), height=12, width=16)


class ListReader:
    """A DatasetReader over fixed samples that can fail after `fail_after` samples of a split."""

    def __init__(self, samples: dict[str, list[Sample]], fail_split: str | None = None, fail_after: int = 0,
                 error: BaseException | None = None):
        self.info = DatasetInfo("tiny", ("background", "a", "b"), ((0, 0, 0), (255, 0, 0), (0, 255, 0)))
        self.by_split, self.fail_split, self.fail_after, self.error = samples, fail_split, fail_after, error

    def splits(self):
        return list(self.by_split)

    def samples(self, split):
        for i, sample in enumerate(self.by_split[split]):
            if split == self.fail_split and i == self.fail_after:
                raise self.error
            yield sample


def tiny_reader(**failure) -> ListReader:
    return ListReader({"train": [tiny_sample(i) for i in range(5)],
                       "val": [tiny_sample(10 + i, with_mask=i != 1) for i in range(3)]}, **failure)


class BlockingReader(ListReader):
    """`tiny_reader`'s samples, except that after `block_after` of a split it touches the
    file `ready` and blocks: a writer to kill mid-write."""

    def __init__(self, ready: str, block_after: int):
        super().__init__(tiny_reader().by_split)
        self.ready, self.block_after = Path(ready), block_after

    def samples(self, split):
        for i, sample in enumerate(super().samples(split)):
            if i == self.block_after:
                self.ready.touch()
                time.sleep(600)
            yield sample


def blocked_writer(out: Path, ready: Path) -> subprocess.Popen:
    """A process writing `BlockingReader`'s shards to `out` (2 rows a file), blocked after the
    third sample of train, when it touches `ready`; its stderr is a pipe."""
    script = ("import sys; from tests.helpers.readers import BlockingReader; "
              "from wsss.datasets.shards import write_shards; "
              "write_shards(BlockingReader(sys.argv[2], block_after=3), sys.argv[1], rows_per_file=2, rows_per_group=1)")
    return subprocess.Popen([sys.executable, "-c", script, str(out), str(ready)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)


def files_under(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(folder, name), path)
                  for folder, _, names in os.walk(path) for name in names)
