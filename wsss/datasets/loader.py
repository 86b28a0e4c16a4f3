"""Shards without Ray: a torch DataLoader over the numpy transforms.

The plain (non-Ray) training loop and the ingest benchmark read through here. Files are
the unit of parallelism: DataLoader workers (and data-parallel ranks) each take every
n-th file of the split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wsss.datasets.augment import AugmentConfig, TrainTransform
from wsss.datasets.reading import NumpyBatch, iter_shard_batches, pseudo_label_files
from wsss.datasets.shards import read_manifest


def to_torch(batch: NumpyBatch) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in batch.items()}


class ShardIterable(IterableDataset):
    """Transformed torch batches over a split's shards. Each (rank, DataLoader worker)
    reads every n-th file, so n readers never read the same row twice in an epoch.
    Call `set_epoch` before each epoch, like torch's DistributedSampler."""

    def __init__(self, files: Sequence[str], transform: Callable[[NumpyBatch, int], NumpyBatch],
                 columns: Sequence[str], batch_size: int, *, label_files: Sequence[str] | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.files, self.label_files = list(files), None if label_files is None else list(label_files)
        self.transform, self.columns, self.batch_size = transform, list(columns), batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        readers, reader = self.world_size * workers, self.rank * workers + worker_id
        # The same (seed, epoch) file order in every reader, then every n-th file of it.
        order = np.random.default_rng([self.epoch, self.seed]).permutation(len(self.files)) \
            if self.shuffle else np.arange(len(self.files))
        mine = order[reader::readers]
        batches = iter_shard_batches(
            [self.files[i] for i in mine], self.columns, self.batch_size,
            label_files=None if self.label_files is None else [self.label_files[i] for i in mine],
            shuffle=self.shuffle, seed=self.seed + reader, epoch=self.epoch, drop_last=self.drop_last)
        for batch in batches:
            yield to_torch(self.transform(batch, self.epoch))


def train_loader(data_uri: str, split: str, augment: AugmentConfig, *, batch_size: int,
                 label_uri: str | None = None, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> DataLoader:
    """A torch DataLoader of augmented training batches (the plain loop's input)."""
    manifest = read_manifest(data_uri)
    targets = pseudo_label_files(manifest, read_manifest(label_uri), split) if label_uri else None
    transform = TrainTransform(augment.for_labels(label_uri is not None), manifest.num_classes)
    dataset = ShardIterable(manifest.files(split), transform, transform.config.columns(), batch_size,
                            label_files=targets, seed=augment.seed, drop_last=drop_last,
                            rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())
