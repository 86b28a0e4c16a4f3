"""Ray Data pipelines from Parquet shards: streaming training batches and evaluation rows.

Training: read the shards (only the needed columns; file order reshuffled every epoch)
→ decode + augment in `map_batches` on CPU (`wsss.datasets.augment`, numpy) → the
platform calls `ray.train.get_dataset_shard("train").iter_torch_batches(...)` on each
worker. Evaluation: the same read → decode at original size; images differ in size, so
`image` and `mask` are variable-shaped tensor columns (iterate rows, or batches in numpy
format). Progress shows as Ray Data's progress bars (RAY_DATA_DISABLE_PROGRESS_BARS=1 hides them),
except in training (`quiet_console`), whose progress is one line per epoch.

Reads go through `ShardDatasource` rather than `ray.data.read_parquet`: in Ray 2.60 the
latter packs small shard files into one read task (so one CPU decoded everything in
benchmarks/ingest.py), lists the files again every epoch (seconds each time), and cannot
join pseudo-label shards row for row except through `Dataset.zip`, which materialises
both sides and aligns rows by arrival order.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import DataContext, ExecutionOptions
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data._internal.logging import SessionFileHandler
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from wsss.datasets.augment import AugmentConfig, EvalTransform, TrainTransform
from wsss.datasets.reading import pseudo_label_files, read_shard
from wsss.datasets.shards import Manifest, has_regions, read_manifest
from wsss.datasets.verification import is_verified
from wsss.io import DataError

# The values below were measured with benchmarks/ingest.py; the numbers and the settings
# they beat are in docs/benchmarks.md ("Settings that came from measurements").
# Rows per decode/augment call: enough that Ray Data's wait between calls is small beside
# the decoding, few enough that a batch of uint8 crops stays ~26 MB.
MAP_BATCH_SIZE = 64
EVAL_BATCH_SIZE = 16  # evaluation rows keep their original size (Cityscapes: 6 MB each)
# A streaming read keeps the CPU it reserved while it waits for its block to be taken, so
# reads ask for little, and at most one per CPU (at least MIN_READ_TASKS) runs: paused
# reads then never crowd out the decoders. A CPU share unlike the decoders' also keeps
# reads from fusing with them, so decoding spreads over every CPU however few files.
READ_CPUS = 0.05
MIN_READ_TASKS = 4
# Below 1 CPU, so that reads fit beside 2 decoders on 2 CPUs (and beside 1 on the CPU a
# Ray Train worker leaves).
MAP_CPUS = 0.75


def _read_file(uri: str, columns: Sequence[str], label_uri: str | None, sha256: str | None,
               label_sha256: str | None) -> Iterator[pa.Table]:
    yield read_shard(uri, columns, label_uri, sha256=sha256, label_sha256=label_sha256)


class ShardDatasource(Datasource):
    """One read task per shard file (joined with its pseudo-label mirror when given),
    in manifest order, or shuffled anew each execution (epoch) when `seed` is set. With
    `checksums` (`label_checksums`), each task checks its file's sha256 as it reads it.

    Each file is one block: Ray Data merges what a read task yields up to its target
    block size (128 MiB), so slicing a file into smaller blocks here changes nothing.
    Read tasks of 64 rows each (one map call) gave an epoch's first batch in
    benchmarks/ingest.py about 0.1 s sooner, but doubled Ray Train's wait for it
    (docs/benchmarks.md)."""

    def __init__(self, manifest: Manifest, split: str, columns: Sequence[str], *,
                 label_files: Sequence[str] | None = None, seed: int | None = None,
                 checksums: Sequence[str] | None = None, label_checksums: Sequence[str] | None = None):
        self.files, self.entries = manifest.files(split), manifest.splits[split]["files"]
        self.columns, self.label_files, self.seed = list(columns), label_files, seed
        self.checksums, self.label_checksums = checksums, label_checksums

    def get_name(self) -> str:
        return "Shards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(int(entry.get("bytes", 0)) for entry in self.entries)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: DataContext | None = None) -> list[ReadTask]:
        order = np.arange(len(self.files))
        if self.seed is not None:
            epoch = getattr(data_context, "_execution_idx", 0) if data_context is not None else 0
            order = np.random.default_rng([epoch, self.seed]).permutation(order)
        tasks = []
        for index in order:
            label = self.label_files[index] if self.label_files is not None else None
            metadata = BlockMetadata(num_rows=self.entries[index]["rows"], size_bytes=self.entries[index].get("bytes"),
                                     input_files=[self.files[index]], exec_stats=None)
            read = functools.partial(_read_file, self.files[index], self.columns, label,
                                     self.checksums[index] if self.checksums else None,
                                     self.label_checksums[index] if self.label_checksums else None)
            tasks.append(ReadTask(read, metadata))
        return tasks


class _EpochTransform:
    """Runs the numpy training transform with the epoch taken from Ray Data.

    Ray Data counts executions of a dataset (one per training epoch) in the DataContext
    it ships to every task; its own seeded shuffles use the same counter. Seeding the
    augmentation by (seed, id, execution) makes every epoch differ while a rerun repeats."""

    def __init__(self, transform: TrainTransform):
        self.transform = transform

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = getattr(DataContext.get_current(), "_execution_idx", 0)
        return self.transform(batch, epoch)


def _read(source: ShardDatasource, num_cpus: float = READ_CPUS) -> ray.data.Dataset:
    cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
    # No more than one task per file: Ray Data warns about a cap it cannot reach.
    tasks = max(1, min(len(source.files), max(MIN_READ_TASKS, cpus)))
    return ray.data.read_datasource(source, num_cpus=num_cpus, concurrency=tasks)


def _open(data_uri: str, split: str, verify: bool) -> tuple[Manifest, list[str] | None]:
    """The manifest, and the shards' sha256 for the read tasks to check: none when `verify`
    is off or the split was verified before (`wsss.datasets.verification`)."""
    manifest = read_manifest(data_uri)
    manifest.rows(split)  # DataError naming the split if it does not exist
    if not verify or is_verified(manifest, split):
        return manifest, None
    return manifest, [entry["sha256"] for entry in manifest.splits[split]["files"]]


def train_dataset(data_uri: str, split: str, augment: AugmentConfig, *, num_classes: int,
                  label_uri: str | None = None, verify: bool = True,
                  map_batch_size: int = MAP_BATCH_SIZE, map_cpus: float = MAP_CPUS,
                  read_cpus: float = READ_CPUS, reserve_cpus: bool = False) -> ray.data.Dataset:
    """Augmented training batches (keys of `wsss.methods.base`) streamed from shards.

    `label_uri`: pseudo-label shards mirroring the image shards file for file and row
    for row (columns id, mask); their masks become `target`. `verify`: each read task
    checks its shard's sha256, until the split has a verification record. `map_cpus`,
    `read_cpus` and `reserve_cpus` exist for benchmarks/ingest.py, which measured the defaults best."""
    manifest, checksums = _open(data_uri, split, verify)
    if num_classes != manifest.num_classes:
        raise DataError(manifest.location, f"num_classes={num_classes}, but the manifest lists "
                                           f"{manifest.num_classes} foreground classes")
    config = augment.for_labels(label_uri is not None)
    targets, label_checksums = None, None
    if label_uri:
        labels, label_checksums = _open(label_uri, split, verify)
        targets = pseudo_label_files(manifest, labels, split)
    source = ShardDatasource(manifest, split, config.columns(), label_files=targets, seed=config.seed,
                             checksums=checksums, label_checksums=label_checksums)
    rows = _read(source, read_cpus)
    transform = _EpochTransform(TrainTransform(config, num_classes))
    batches = rows.map_batches(transform, batch_format="numpy", batch_size=map_batch_size, num_cpus=map_cpus)
    # Ray Data reserves a share of the CPUs for each operator, which on a few CPUs leaves
    # decoding about one (benchmarks/ingest.py); the reads are light, so let decoding
    # take whatever they leave.
    batches.context.op_resource_reservation_enabled = reserve_cpus
    return batches


def eval_dataset(data_uri: str, split: str, *, with_mask: bool = True, verify: bool = True) -> ray.data.Dataset:
    """Original-size rows: id, image uint8 [H,W,3], mask uint8 [H,W] (255 = void; only
    with `with_mask`, every row must then have one), labels float32 [K] multi-hot."""
    manifest, checksums = _open(data_uri, split, verify)
    transform = EvalTransform(manifest.num_classes, with_mask=with_mask, with_region=has_regions(manifest, split))
    rows = _read(ShardDatasource(manifest, split, transform.columns(), checksums=checksums))
    return rows.map_batches(transform, batch_format="numpy", batch_size=EVAL_BATCH_SIZE)


def ingest_options(preserve_order: bool) -> ExecutionOptions:
    """Ray Train's default ingest options (the driver's DataContext), built without
    `exclude_resources`: Ray 2.60 deprecates it and warns whenever it is passed, as
    `DataConfig.default_ingest_options()` does for every dataset it is not given options for."""
    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=preserve_order,
                            verbose_progress=current.verbose_progress, label_selector=current.label_selector)


def quiet_console(context: DataContext) -> None:
    """No progress bars and only errors on the console from the executions of datasets with
    this context (a dataset's own, or the current one for datasets made after); Ray Data's
    full logs still go to `logs/ray-data` in Ray's log folder."""
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if _QuietConsole not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, _QuietConsole]


class _QuietConsole(ExecutionCallback):
    """Raises Ray Data's console handlers to ERROR in the process that executes the
    dataset (for a Ray Train dataset, its split coordinator actor, where no code of ours
    runs otherwise). Ray Data builds its callbacks before it starts an execution, so this
    also hides its "progress bars disabled" notice and its issue detectors' warnings."""

    def __init__(self):
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, SessionFileHandler):
                handler.setLevel(logging.ERROR)
