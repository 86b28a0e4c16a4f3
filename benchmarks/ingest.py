"""Training-input throughput: Ray Data vs a torch DataLoader vs a bare loop, one run.

    python benchmarks/ingest.py --images 1000 --cpus 2

Writes its own shards (smooth random JPEGs at a VOC-like size plus PNG masks, in the
documented shard schema), then measures images/s of the same decode + augment
(`wsss.datasets.augment.TrainTransform`) through

  ray        `wsss.platform.data.train_dataset` → `iter_torch_batches`, Ray with --cpus CPUs
  loader     torch DataLoader over `wsss.datasets.loader.ShardIterable`, --cpus workers
  bare       one process, pyarrow read + the transform in a plain loop (the work itself)
  decode     one process, pyarrow read + PIL decode only (the machine's decode limit)

Each pipeline runs --rounds times, interleaved, so that load from other processes hits
all of them alike; each round is one warm epoch (a first, untimed epoch starts the
workers). The best round of each counts. Ratios: ray/loader (goal ≥ 1.0) and ray per
CPU / bare and / decode on one CPU (goal ≥ 0.7).

Per CPU is measured two ways: wall-clock images/s divided by --cpus (meaningful on an
otherwise idle machine), and images per CPU-second actually consumed by this process and
all its descendants — Ray's raylet and workers, the DataLoader's workers — read from
/proc (Linux), which stays meaningful when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from wsss.datasets.augment import AugmentConfig, TrainTransform  # noqa: E402
from wsss.datasets.base import DatasetInfo, Sample  # noqa: E402
from wsss.datasets.loader import ShardIterable, iter_shard_batches  # noqa: E402
from wsss.datasets.shards import read_manifest, write_shards  # noqa: E402

CLASSES = ("background", "a", "b", "c", "d")


class RandomJpegs:
    """A reader of smooth random images (JPEG-compressible like photos) with masks."""

    info = DatasetInfo("ingest-bench", CLASSES, tuple((40 * i, 255 - 40 * i, 80) for i in range(len(CLASSES))))

    def __init__(self, count: int, height: int, width: int):
        self.count, self.height, self.width = count, height, width

    def splits(self):
        return ["train"]

    def samples(self, split):
        rng = np.random.default_rng(0)
        for index in range(self.count):
            coarse = rng.integers(0, 256, size=(self.height // 16 + 1, self.width // 16 + 1, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((self.width, self.height), Image.Resampling.BICUBIC)
            noisy = np.asarray(image).astype(np.int16) + rng.integers(-8, 9, size=(self.height, self.width, 3))
            buffer = io.BytesIO()
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            mask = np.zeros((self.height, self.width), dtype=np.uint8)
            cls = 1 + index % (len(CLASSES) - 1)
            mask[self.height // 4: 3 * self.height // 4, self.width // 4: 3 * self.width // 4] = cls
            yield Sample(f"bench_{index:06d}", buffer.getvalue(), mask, (cls,), self.height, self.width)


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by `root` and every descendant, live or reaped (/proc)."""
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            # after the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14)
            processes[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += processes.get(pid, (0, 0))[1]
        stack.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def time_epoch(batches) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (this process tree) and images of one epoch."""
    start, cpu_start, count = time.perf_counter(), tree_cpu_seconds(os.getpid()), 0
    for batch in batches:
        count += len(batch["labels"])
    return time.perf_counter() - start, tree_cpu_seconds(os.getpid()) - cpu_start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--views", default="", help="optional views, comma-separated (e.g. strong,raw)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--map-batch", type=int, default=16, help="rows per Ray Data map_batches call")
    parser.add_argument("--data", default="", help="reuse shards here (written if absent)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = args.data or os.path.join(tempfile.mkdtemp(prefix="wsss-ingest-"), "shards")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        started = time.perf_counter()
        write_shards(RandomJpegs(args.images, args.height, args.width), data)
        print(f"wrote {args.images} images {args.width}x{args.height} to {data} "
              f"in {time.perf_counter() - started:.1f} s")
    manifest = read_manifest(data)
    files, num_classes = manifest.files("train"), manifest.num_classes
    views = frozenset(v for v in args.views.split(",") if v)
    augment = AugmentConfig(crop_size=args.crop, views=views)
    transform = TrainTransform(augment, num_classes)
    columns = augment.columns()

    import ray

    from wsss.platform.data import train_dataset

    ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_data = train_dataset(data, "train", augment, num_classes=num_classes, map_batch_size=args.map_batch)
    loader_data = ShardIterable(files, transform, columns, args.batch, seed=augment.seed)

    def bare(epoch):
        for batch in iter_shard_batches(files, columns, args.batch):
            yield transform(batch, epoch)

    def decode(epoch):
        for batch in iter_shard_batches(files, ["image"], args.batch):
            for data_bytes in batch["image"]:
                np.asarray(Image.open(io.BytesIO(data_bytes)).convert("RGB"))
            yield {"labels": batch["image"]}

    def loader(epoch):
        loader_data.set_epoch(epoch)
        return torch.utils.data.DataLoader(loader_data, batch_size=None, num_workers=args.cpus)

    def ray_epoch(epoch):
        return ray_data.iter_torch_batches(batch_size=args.batch)

    pipelines = {"ray": ray_epoch, "loader": loader, "bare": bare, "decode": decode}
    time_epoch(ray_epoch(0))  # start Ray's workers and import everything once
    wall = {name: 0.0 for name in pipelines}  # best images/s
    cpu = {name: 0.0 for name in pipelines}  # best images per CPU-second
    for round_index in range(args.rounds):
        for name, make in pipelines.items():
            seconds, cpu_seconds, count = time_epoch(make(round_index + 1))
            assert count == args.images, (name, count)
            wall[name] = max(wall[name], count / seconds)
            cpu[name] = max(cpu[name], count / cpu_seconds)
            print(f"round {round_index + 1} {name:>6}: {count / seconds:7.1f} images/s, "
                  f"{count / cpu_seconds:7.1f} images per CPU-second")
    ray.shutdown()

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; --cpus {args.cpus}")
    print(f"workload: {args.images} JPEGs {args.width}x{args.height} → crop {args.crop}, "
          f"views {sorted(views) or 'none'}, batch {args.batch}, map_batches {args.map_batch}")
    print(f"best of {args.rounds} rounds, images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in wall.items()))
    print("               images per CPU-second: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    per_cpu = wall["ray"] / args.cpus
    print(f"ray / loader (wall)                  = {wall['ray'] / wall['loader']:.2f}x  (goal >= 1.0)")
    print(f"ray per CPU / bare (wall, 1 CPU)     = {per_cpu / wall['bare']:.2f}x  (goal >= 0.7)")
    print(f"ray / bare, per CPU-second           = {cpu['ray'] / cpu['bare']:.2f}x  (goal >= 0.7)")
    print(f"loader / bare, per CPU-second        = {cpu['loader'] / cpu['bare']:.2f}x")
    print(f"ray per CPU / decode only (wall)     = {per_cpu / wall['decode']:.2f}x")
    print(f"ray / decode only, per CPU-second    = {cpu['ray'] / cpu['decode']:.2f}x")

if __name__ == "__main__":
    main()
