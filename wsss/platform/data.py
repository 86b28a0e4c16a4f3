"""Ray Data pipelines from Parquet shards: streaming training batches and evaluation rows.

Training: `read_parquet` of only the needed columns (file order reshuffled every epoch)
→ decode + augment in `map_batches` on CPU (`wsss.datasets.augment`, numpy) → the
platform calls `ray.train.get_dataset_shard("train").iter_torch_batches(...)` on each
worker. Evaluation: the same read → decode at original size; images differ in size, so
`image` and `mask` are variable-shaped tensor columns (iterate rows, or batches in numpy
format). Progress shows as Ray Data's progress bars (RAY_DATA_DISABLE_PROGRESS_BARS=1 hides them).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import ray
import ray.data
from ray.data import DataContext, FileShuffleConfig, RandomSeedConfig

from wsss.datasets.augment import AugmentConfig, EvalTransform, TrainTransform
from wsss.datasets.base import DataError
from wsss.datasets.loader import pseudo_label_files, read_shard, to_numpy
from wsss.datasets.shards import Manifest, read_manifest, verify_checksums

# Rows per decode/augment call: small enough that a block of float32 crops stays a few
# tens of MB, large enough that per-call overhead is negligible next to JPEG decoding.
MAP_BATCH_SIZE = 16


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


def _open(data_uri: str, split: str, verify: bool) -> Manifest:
    manifest = read_manifest(data_uri)
    manifest.rows(split)  # DataError naming the split if it does not exist
    if verify:
        verify_checksums(manifest.location, manifest, split)
    return manifest


def train_dataset(data_uri: str, split: str, augment: AugmentConfig, *, num_classes: int,
                  label_uri: str | None = None, verify: bool = True,
                  map_batch_size: int = MAP_BATCH_SIZE) -> ray.data.Dataset:
    """Augmented training batches (keys of `wsss.methods.base`) streamed from shards.

    `label_uri`: pseudo-label shards mirroring the image shards file for file and row
    for row (columns id, mask); their masks become `target`. `verify`: check every
    shard's sha256 against its manifest first (reads all bytes once)."""
    manifest = _open(data_uri, split, verify)
    if num_classes != manifest.num_classes:
        raise DataError(manifest.location, f"num_classes={num_classes}, but the manifest lists "
                                           f"{manifest.num_classes} foreground classes")
    config = augment.for_labels(label_uri is not None)
    transform = _EpochTransform(TrainTransform(config, num_classes))
    if label_uri is None:
        rows = ray.data.read_parquet(
            manifest.files(split),
            shuffle=FileShuffleConfig(seed=config.seed, reseed_after_execution=True)).select_columns(config.columns())
    else:
        rows = _joined_rows(manifest, _open(label_uri, split, verify), split, config)
    return rows.map_batches(transform, batch_format="numpy", batch_size=map_batch_size)


def _joined_rows(manifest: Manifest, labels: Manifest, split: str, config: AugmentConfig) -> ray.data.Dataset:
    """Image rows with their pseudo-label as column `target`, read pair of files by pair
    of files. (Dataset.zip would align rows by arrival order and materialise both sides.)"""
    pairs = [{"image": image, "label": label}
             for image, label in zip(manifest.files(split), pseudo_label_files(manifest, labels, split))]
    columns = config.columns()

    def read_pairs(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for image, label in zip(batch["image"], batch["label"]):
            table = read_shard(str(image), columns, str(label))
            for group in table.to_batches(max_chunksize=MAP_BATCH_SIZE * 4):
                yield to_numpy(group)

    return (ray.data.from_items(pairs, override_num_blocks=len(pairs))
            .randomize_block_order(seed=RandomSeedConfig(seed=config.seed, reseed_after_execution=True))
            .map_batches(read_pairs, batch_format="numpy", batch_size=1))


def eval_dataset(data_uri: str, split: str, *, with_mask: bool = True, verify: bool = True) -> ray.data.Dataset:
    """Original-size rows: id, image uint8 [H,W,3], mask uint8 [H,W] (255 = void; only
    with `with_mask`, every row must then have one), labels float32 [K] multi-hot."""
    manifest = _open(data_uri, split, verify)
    transform = EvalTransform(manifest.num_classes, with_mask=with_mask)
    rows = ray.data.read_parquet(manifest.files(split)).select_columns(transform.columns())
    return rows.map_batches(transform, batch_format="numpy", batch_size=MAP_BATCH_SIZE)
