"""Shards → batches: the pyarrow/DataLoader path and the Ray Data pipelines on a real
local Ray, checked against the source images pixel for pixel."""

from __future__ import annotations

import io
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from wsss.datasets.augment import AugmentConfig
from wsss.datasets.base import DatasetInfo, Sample
from wsss.datasets.loader import ShardIterable, train_loader
from wsss.datasets.reading import eval_rows, iter_shard_batches
from wsss.datasets.shards import read_manifest, write_shards
from wsss.io import DataError

CLASSES = ("background", "cat", "dog", "boat")
K = len(CLASSES) - 1
ROWS = 22


class TinyReader:
    """Images of varying size, JPEG and PNG, masks with void pixels; `pseudo` makes the
    pseudo-label shards (id + mask only) that mirror the image shards row for row."""

    info = DatasetInfo("tiny", CLASSES, ((0, 0, 0), (128, 0, 0), (0, 128, 0), (0, 0, 128)))

    def __init__(self, pseudo: bool = False, rename: dict | None = None):
        self.pseudo, self.rename = pseudo, rename or {}

    def splits(self):
        return ["train", "val"]

    def samples(self, split):
        for index in range(ROWS if split == "train" else 7):
            sample = make_sample(split, index)
            if self.pseudo:
                sample = Sample(self.rename.get(sample.id, sample.id), b"", pseudo_label(sample.mask),
                                (), sample.height, sample.width)
            yield sample


def make_sample(split: str, index: int) -> Sample:
    rng = np.random.default_rng([index, len(split)])
    height, width = 24 + 3 * index, 50 - index
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([(yy * 7 + index) % 256, (xx * 5) % 256, (yy + xx) % 256], -1).astype(np.uint8)
    image = (image + rng.integers(0, 30, size=image.shape)).astype(np.uint8)
    mask = np.where(xx < width // 2, 1 + index % K, 0).astype(np.uint8)
    mask[yy > height - 4] = 1 + (index + 1) % K
    mask[0, :] = 255
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG" if index % 2 else "PNG")
    labels = tuple(sorted(int(c) for c in np.unique(mask) if 0 < c < 255))
    return Sample(f"{split}_{index:03d}", buffer.getvalue(), mask, labels, height, width)


def pseudo_label(mask: np.ndarray) -> np.ndarray:
    return np.where(mask == 255, 255, (mask + 1) % (K + 1)).astype(np.uint8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_shards(TinyReader(), str(root / "images"), rows_per_file=5, rows_per_group=2)
    write_shards(TinyReader(pseudo=True), str(root / "pseudo"), rows_per_file=5, rows_per_group=2)
    return root


def source_by_id(split: str) -> dict[str, Sample]:
    return {sample.id: sample for sample in TinyReader().samples(split)}


# ---- pyarrow + torch DataLoader path --------------------------------------------------

def ids_of(batch) -> list[int]:
    return [int(str(i).split("_")[1]) for i in batch["id"]]


def test_ray_data_workers_never_import_torch():
    """A new Ray Data worker imports the pipeline's module to read and decode; torch would
    cost it seconds (docs/benchmarks.md, start-up of a Ray Train run)."""
    code = "import sys, wsss.platform.data; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_shard_batches_have_exact_size_and_cover_every_row(shards):
    files = read_manifest(str(shards / "images")).files("train")
    batches = list(iter_shard_batches(files, ["id", "labels"], 4))
    assert [len(b["id"]) for b in batches] == [4] * 5 + [2]
    assert sorted(i for b in batches for i in ids_of(b)) == list(range(ROWS))
    assert [len(b["id"]) for b in iter_shard_batches(files, ["id"], 4, drop_last=True)] == [4] * 5
    epochs = [[i for b in iter_shard_batches(files, ["id"], 4, shuffle=True, epoch=e) for i in ids_of(b)]
              for e in (0, 1, 0)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(ROWS))
    assert epochs[0] != epochs[1] and epochs[0] == epochs[2]


def test_dataloader_workers_and_ranks_read_disjoint_files(shards):
    files = read_manifest(str(shards / "images")).files("train")

    def index_only(batch, epoch):
        return {"index": np.asarray(ids_of(batch))}

    seen = []
    for rank in range(2):
        dataset = ShardIterable(files, index_only, ["id"], 3, rank=rank, world_size=2)
        dataset.set_epoch(1)
        loader = DataLoader(dataset, batch_size=None, num_workers=2)
        seen += [int(i) for batch in loader for i in batch["index"]]
    assert sorted(seen) == list(range(ROWS))


def test_train_loader_joins_pseudo_labels(shards):
    augment = AugmentConfig(crop_size=32, views={"mask"})
    loader = train_loader(str(shards / "images"), "train", augment, batch_size=4,
                          label_uri=str(shards / "pseudo"))
    batches = list(loader)
    assert len(batches) == ROWS // 4  # drop_last
    for batch in batches:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 32, 32)
        assert batch["target"].dtype == torch.uint8
        assert torch.equal(batch["target"], torch.from_numpy(pseudo_label(batch["mask"].numpy())))


def test_eval_rows_match_the_source(shards):
    source = source_by_id("val")
    rows = list(eval_rows(str(shards / "images"), "val"))
    assert sorted(row["id"] for row in rows) == sorted(source)
    for row in rows:
        sample = source[row["id"]]
        np.testing.assert_array_equal(row["image"], np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB")))
        np.testing.assert_array_equal(row["mask"], sample.mask)


def test_pseudo_labels_that_do_not_mirror_are_rejected(shards, tmp_path):
    fewer = tmp_path / "fewer"
    write_shards(TinyReader(pseudo=True), str(fewer), rows_per_file=4)
    with pytest.raises(DataError, match="do not mirror"):
        train_loader(str(shards / "images"), "train", AugmentConfig(crop_size=32), batch_size=2,
                     label_uri=str(fewer))
    renamed = tmp_path / "renamed"
    write_shards(TinyReader(pseudo=True, rename={"train_007": "train_999"}), str(renamed), rows_per_file=5)
    loader = train_loader(str(shards / "images"), "train", AugmentConfig(crop_size=32), batch_size=2,
                          label_uri=str(renamed))
    with pytest.raises(DataError, match="row 2 is 'train_999', the image shard has 'train_007'"):
        list(loader)


# ---- Ray Data ---------------------------------------------------------------------------

def test_ray_eval_dataset_is_pixel_exact(ray_local, shards):
    from wsss.platform.data import eval_dataset

    source = source_by_id("val")
    dataset = eval_dataset(str(shards / "images"), "val")
    rows = list(dataset.iter_rows())
    assert sorted(row["id"] for row in rows) == sorted(source)
    for row in rows:
        sample = source[row["id"]]
        expected = np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"))
        assert row["image"].dtype == np.uint8 and row["image"].shape == (sample.height, sample.width, 3)
        np.testing.assert_array_equal(row["image"], expected)
        np.testing.assert_array_equal(row["mask"], sample.mask)
        np.testing.assert_array_equal(np.flatnonzero(row["labels"]) + 1, sample.labels)
    batch = dataset.take_batch(5, batch_format="numpy")  # ragged sizes survive batching too
    assert len({image.shape for image in batch["image"]}) == 5


def test_ray_reads_are_capped_at_the_files_without_a_warning(ray_local, shards):
    """Read tasks are capped (one per CPU, at least 4), but never above the number of
    shard files, where Ray Data would warn on every epoch about a cap it cannot reach."""
    import warnings

    from wsss.platform.data import eval_dataset

    assert len(read_manifest(str(shards / "images")).files("val")) < 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = list(eval_dataset(str(shards / "images"), "val").iter_rows())
    assert len(rows) == 7
    assert not [w for w in caught if "concurrent tasks" in str(w.message)]


def epoch_totals(iterators, epochs: int, batch_size: int = 4) -> list[list[float]]:
    """Iterate like Ray Train workers (one thread per worker, every epoch in step);
    per worker and epoch, the sum of all image pixels (order-independent)."""
    totals = [[0.0] * epochs for _ in iterators]
    counts = [[0] * epochs for _ in iterators]

    def work(worker, iterator):
        for epoch in range(epochs):
            for batch in iterator.iter_torch_batches(batch_size=batch_size, drop_last=True):
                assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (batch_size, 3, 32, 32)
                assert batch["valid"].dtype == torch.bool and batch["mask"].dtype == torch.uint8
                assert batch["strong"].shape == batch["image"].shape and batch["labels"].shape == (batch_size, K)
                totals[worker][epoch] += float(batch["image"].double().sum())
                counts[worker][epoch] += batch_size

    threads = [threading.Thread(target=work, args=(w, it)) for w, it in enumerate(iterators)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert all(count == ROWS // len(iterators) // batch_size * batch_size for c in counts for count in c)
    return totals


def test_ray_train_dataset_streams_to_workers(ray_local, shards):
    from wsss.platform.data import train_dataset

    augment = AugmentConfig(crop_size=32, views={"strong", "mask"}, seed=3)
    dataset = train_dataset(str(shards / "images"), "train", augment, num_classes=K)
    totals = epoch_totals(dataset.streaming_split(2, equal=True), epochs=2)
    assert all(worker[0] != worker[1] for worker in totals)  # every epoch is augmented anew


def test_ray_train_dataset_is_reproducible(ray_local, shards):
    from wsss.platform.data import train_dataset

    augment = AugmentConfig(crop_size=32, seed=5)

    def totals():
        dataset = train_dataset(str(shards / "images"), "train", augment, num_classes=K, verify=False)
        return [sum(float(b["image"].double().sum()) for b in dataset.iter_torch_batches(batch_size=ROWS))
                for _ in range(2)]

    first, second = totals(), totals()
    assert first == second and first[0] != first[1]


def test_ray_train_dataset_joins_pseudo_labels(ray_local, shards):
    from wsss.platform.data import train_dataset

    augment = AugmentConfig(crop_size=32, views={"mask"})
    dataset = train_dataset(str(shards / "images"), "train", augment, num_classes=K,
                            label_uri=str(shards / "pseudo"))
    rows = 0
    for batch in dataset.iter_torch_batches(batch_size=5):
        expected = pseudo_label(batch["mask"].numpy().astype(np.uint8))
        assert torch.equal(batch["target"], torch.from_numpy(expected).long())
        rows += len(batch["target"])
    assert rows == ROWS


def test_ray_shard_order_is_reshuffled_each_epoch(ray_local, shards):
    import ray.data

    from wsss.platform.data import ShardDatasource

    manifest = read_manifest(str(shards / "images"))
    dataset = ray.data.read_datasource(ShardDatasource(manifest, "train", ["id"], seed=0))
    epochs = [[row["id"] for row in dataset.iter_rows()] for _ in range(3)]
    assert all(sorted(ids) == sorted(source_by_id("train")) for ids in epochs)
    assert len({tuple(ids) for ids in epochs}) > 1


def test_ray_bad_dataset_arguments_are_caught_before_building(ray_local, shards):
    """(A damaged shard is caught by the read that opens it: tests/test_verification.py.)"""
    from wsss.platform.data import train_dataset

    with pytest.raises(DataError, match="num_classes=5"):
        train_dataset(str(shards / "images"), "train", AugmentConfig(), num_classes=5)
    with pytest.raises(DataError, match="unknown split: 'test'"):
        train_dataset(str(shards / "images"), "test", AugmentConfig(), num_classes=K)


@pytest.mark.slow
def test_ray_train_worker_gets_new_augmentation_each_epoch(ray_local, shards):
    """Through a real TorchTrainer: the worker's shard differs between epochs (the
    worker asserts it; a failing worker makes `fit` raise)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from wsss.platform.data import train_dataset

    def worker(config):
        shard = ray.train.get_dataset_shard("train")
        totals = [sum(float(b["image"].double().sum()) for b in shard.iter_torch_batches(batch_size=4))
                  for _ in range(2)]
        assert totals[0] > 0 and totals[0] != totals[1], totals

    dataset = train_dataset(str(shards / "images"), "train", AugmentConfig(crop_size=32),
                            num_classes=K)
    trainer = TorchTrainer(worker, scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(storage_path=str(shards / "runs")),
                           datasets={"train": dataset})
    assert trainer.fit().error is None
