"""A reader's split read in worker processes, in the split's order.

Reading is most of `wsss prepare`'s work (every image is decoded in full to check it, masks
are decoded and encoded again), and each item is read on its own, so an `ItemReader`'s items
are spread over processes. Results come back in the items' order, so the shards are byte for
byte those that one process writes. At most two windows of items are in flight: memory stays
bounded however far the writer falls behind.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

from wsss.datasets.base import DatasetReader, ItemReader
from wsss.io import DataError

ITEMS_PER_TASK = 8

_worker_state: tuple[ItemReader, str, Callable] | None = None  # one per worker process


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_split(reader: DatasetReader, split: str, convert: Callable, workers: int = 1) -> Iterator:
    """`convert(sample)` of each of the split's samples, in order. A DataError from reading
    an item is raised, or skipped and logged in `reader.skipped` under `skip_invalid`, as
    `reader.samples` does; one from `convert` is always raised. `workers` > 1 reads an
    `ItemReader` in that many processes (`convert` must then be picklable)."""
    if workers <= 1 or not isinstance(reader, ItemReader):
        for sample in reader.samples(split):
            yield convert(sample)
        return
    items = reader.items(split)
    window = workers * ITEMS_PER_TASK * 4
    # spawn: the parent may hold threads (pyarrow's), which a forked child would inherit locked
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(reader, split, convert))

    def submit(start: int) -> Iterator:
        return pool.map(_read_item, items[start:start + window], chunksize=ITEMS_PER_TASK)

    try:
        pending = submit(0)
        for start in range(window, len(items) + window, window):
            following = submit(start) if start < len(items) else iter(())
            for outcome in pending:
                if isinstance(outcome, DataError):
                    if not reader.skip_invalid:
                        raise outcome
                    reader.skipped.add(outcome)
                else:
                    yield outcome
            pending = following
    finally:  # an error, or a writer that stops early: the items not yet read are dropped
        pool.shutdown(cancel_futures=True)


def _start_worker(reader: ItemReader, split: str, convert: Callable) -> None:
    global _worker_state
    _worker_state = (reader, split, convert)


def _read_item(item) -> object:
    reader, split, convert = _worker_state
    try:
        sample = reader.read_item(split, item)
    except DataError as error:  # returned, not raised: the parent skips it and goes on
        return error
    return convert(sample)
