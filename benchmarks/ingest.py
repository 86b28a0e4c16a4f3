"""Training-input throughput: Ray Data vs a torch DataLoader vs a bare loop, one run.

    python benchmarks/ingest.py --cpus 2

The default size is VOC's `train_aug` (10,582 images, about 10 minutes on 2 CPUs), what
users train on and where the goals are judged: every Ray Data epoch starts 0.5–0.9 s later
than a DataLoader's, which at epochs of a few seconds (`--images 600`, a quick look) is most
of the gap.

Writes its own shards (smooth random JPEGs at a VOC-like size plus PNG masks, in the
documented shard schema), then measures images/s of the same decode + augment
(`wsss.datasets.augment.TrainTransform`) through

  ray        `wsss.platform.data.train_dataset` → `iter_torch_batches`, Ray with --cpus CPUs
  ray-reserve  the same with Ray Data's per-operator CPU reservation (its default)
  rayX       the same with X CPUs per decode task (--map-cpus 0.5 adds ray0.5)
  ray-readX  the same with X CPUs per read task (--read-cpus 0.25 adds ray-read0.25)
  ray-mbN    the same with N rows per decode call (--map-batches 16 adds ray-mb16)
  loader     torch DataLoader over `wsss.datasets.loader.ShardIterable`, --cpus workers
  bare×n     --cpus plain processes, each reading + transforming every n-th shard in a loop:
             the machine's limit for this work on these CPUs (no framework, no batches moved)
  bare       the same plain loop in one process
  decode     one process, pyarrow read + PIL decode only (the JPEG decoder's limit)

Each pipeline runs --rounds times, interleaved, so that load from other processes hits
all of them alike; each round is one epoch, after a first untimed one that starts Ray's
workers and the process pool. The best round of each counts. Goals: ray/loader ≥ 1.0 and
ray ≥ 0.7 × the bare limit per CPU. Each round's wait for its first batch is printed too
(Ray Data and the DataLoader).

Per CPU is measured two ways: wall-clock (ray vs bare×n on the same CPUs; ray/--cpus vs
bare on one), meaningful on an otherwise idle machine, and images per CPU-second actually
consumed by this process and all its descendants — Ray's raylet and workers, the
DataLoader's workers — read from /proc (Linux), which stays meaningful when other jobs
share the machine.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
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
from wsss.datasets.loader import ShardIterable  # noqa: E402
from wsss.datasets.reading import iter_shard_batches  # noqa: E402
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


def tree_cpu_ticks(root: int) -> dict[int, int]:
    """CPU ticks used so far by `root` and each live descendant, by pid; a process's
    ticks include its reaped children's (/proc/PID/stat utime+stime+cutime+cstime)."""
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
    ticks, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in processes:
            ticks[pid] = processes[pid][1]
        stack.extend(children.get(pid, []))
    return ticks


def cpu_seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds spent between two snapshots: growth of processes alive in both, all
    of new ones. (Ray may retire a worker mid-epoch; what it used since `before` is lost
    unless its parent reaped it, so this can undercount slightly, never double count.)"""
    ticks = sum(max(0, value - before.get(pid, 0)) for pid, value in after.items())
    return ticks / os.sysconf("SC_CLK_TCK")


def count_rows(batches, first_batch_s: list[float] | None = None) -> int:
    """Rows of all batches; appends the seconds until the first one to `first_batch_s`."""
    started, count = time.perf_counter(), 0
    for batch in batches:
        if count == 0 and first_batch_s is not None:
            first_batch_s.append(time.perf_counter() - started)
        count += len(batch["labels"])
    return count


def ray_epoch(dataset, batch_size: int, first_batch_s: list[float], epoch: int) -> int:
    return count_rows(dataset.iter_torch_batches(batch_size=batch_size), first_batch_s)


def bare_augment(files, columns, batch_size, augment, num_classes, epoch) -> int:
    """Read + decode + augment in a plain loop; the work itself, no framework."""
    transform = TrainTransform(augment, num_classes)
    return count_rows(transform(batch, epoch) for batch in iter_shard_batches(files, columns, batch_size))


def bare_decode(files, batch_size) -> int:
    """Read + PIL decode only: what this machine's JPEG decoder allows."""
    count = 0
    for batch in iter_shard_batches(files, ["image"], batch_size):
        for data in batch["image"]:
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            count += 1
    return count


def measure(run, epoch) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (this process tree) and images of one epoch."""
    start, cpu_start = time.perf_counter(), tree_cpu_ticks(os.getpid())
    count = run(epoch)
    return time.perf_counter() - start, cpu_seconds_between(cpu_start, tree_cpu_ticks(os.getpid())), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10582, help="default: VOC's train_aug")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--views", default="", help="optional views, comma-separated (e.g. strong,mask)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--map-batch", type=int, default=None,
                        help="rows per Ray Data map_batches call (default: the product's MAP_BATCH_SIZE)")
    parser.add_argument("--map-cpus", default="", help="also CPUs per Ray Data decode task, comma-separated")
    parser.add_argument("--read-cpus", default="", help="also CPUs per Ray Data read task, comma-separated")
    parser.add_argument("--map-batches", default="", help="also rows per map_batches call, comma-separated")
    parser.add_argument("--data", default="", help="reuse shards here (written if absent)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = args.data or os.path.join(tempfile.mkdtemp(prefix="wsss-ingest-"), "shards")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        started = time.perf_counter()
        write_shards(RandomJpegs(args.images, args.height, args.width), data)
        print(f"wrote {args.images} images {args.width}x{args.height} to {data} "
              f"in {time.perf_counter() - started:.1f} s")
    manifest = read_manifest(data)
    files, num_classes, images = manifest.files("train"), manifest.num_classes, manifest.rows("train")
    views = frozenset(v for v in args.views.split(",") if v)
    augment = AugmentConfig(crop_size=args.crop, views=views)
    columns = augment.columns()
    # The same work in --cpus plain processes, each on every n-th shard: the machine's
    # limit for these CPUs. Spawned (not forked) because Ray runs threads in this process.
    pool = multiprocessing.get_context("spawn").Pool(args.cpus)
    parts = [files[i::args.cpus] for i in range(args.cpus)]

    import ray

    from wsss.platform.data import MAP_BATCH_SIZE, train_dataset
    from wsss.platform.runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=args.cpus)  # as every wsss command starts a local Ray
    args.map_batch = args.map_batch or MAP_BATCH_SIZE
    variants = {"ray": {}, "ray-reserve": {"reserve_cpus": True}}  # the product; Ray Data's CPU reservation
    variants.update({f"ray{float(c):g}": {"map_cpus": float(c)} for c in args.map_cpus.split(",") if c})
    variants.update({f"ray-read{float(c):g}": {"read_cpus": float(c)} for c in args.read_cpus.split(",") if c})
    variants.update({f"ray-mb{b}": {"map_batch_size": int(b)} for b in args.map_batches.split(",") if b})
    ray_data = {name: train_dataset(data, "train", augment, num_classes=num_classes,
                                    **({"map_batch_size": args.map_batch} | options))
                for name, options in variants.items()}
    loader_data = ShardIterable(files, TrainTransform(augment, num_classes), columns, args.batch, seed=augment.seed)

    first_batch_s = {name: [] for name in (*variants, "loader")}  # per timed round

    def loader(epoch):
        loader_data.set_epoch(epoch)
        batches = torch.utils.data.DataLoader(loader_data, batch_size=None, num_workers=args.cpus)
        return count_rows(batches, first_batch_s["loader"])

    def parallel(epoch):
        jobs = [(part, columns, args.batch, augment, num_classes, epoch) for part in parts]
        return sum(pool.starmap(bare_augment, jobs))

    rays = {name: functools.partial(ray_epoch, dataset, args.batch, first_batch_s[name])
            for name, dataset in ray_data.items()}
    pipelines = {
        **rays,
        "loader": loader,
        "bare×n": parallel,
        "bare": lambda epoch: bare_augment(files, columns, args.batch, augment, num_classes, epoch),
        "decode": lambda epoch: bare_decode(files, args.batch),
    }
    for name in (*rays, "bare×n"):  # start Ray's workers and the pool, import everything once
        pipelines[name](0)
    for firsts in first_batch_s.values():
        firsts.clear()
    wall = {name: 0.0 for name in pipelines}  # best images/s
    cpu = {name: 0.0 for name in pipelines}  # best images per CPU-second
    for round_index in range(args.rounds):
        for name, run in pipelines.items():
            seconds, cpu_seconds, count = measure(run, round_index + 1)
            assert count == images, f"{name} produced {count} of {images} images"
            wall[name] = max(wall[name], count / seconds)
            cpu[name] = max(cpu[name], count / cpu_seconds)
            print(f"round {round_index + 1} {name:>6}: {count / seconds:7.1f} images/s, "
                  f"{count / cpu_seconds:7.1f} images per CPU-second")
    ray.shutdown()
    pool.close()

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; --cpus {args.cpus}")
    print(f"workload: {images} JPEGs (shards {data}) → crop {args.crop}, "
          f"views {sorted(views) or 'none'}, batch {args.batch}, map_batches {args.map_batch}")
    print(f"best of {args.rounds} rounds, images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in wall.items()))
    print("               images per CPU-second: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    print("first batch of an epoch, s (per round): " + "; ".join(
        f"{k} " + ", ".join(f"{s:.2f}" for s in v) for k, v in first_batch_s.items()))
    for name in rays:
        print(f"{name:<7} / loader (wall)                 = {wall[name] / wall['loader']:.2f}x  (goal >= 1.0)")
        print(f"{name:<7} / bare×n, same CPUs (wall)      = {wall[name] / wall['bare×n']:.2f}x  (goal >= 0.7)")
        print(f"{name:<7} per CPU / bare on 1 CPU (wall)  = {wall[name] / args.cpus / wall['bare']:.2f}x")
        print(f"{name:<7} per CPU / decode only (wall)    = {wall[name] / args.cpus / wall['decode']:.2f}x")
        print(f"{name:<7} / bare, images per CPU-second   = {cpu[name] / cpu['bare']:.2f}x")
    print(f"loader  / bare, images per CPU-second   = {cpu['loader'] / cpu['bare']:.2f}x")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"cpus": args.cpus, "images": images, "crop": args.crop, "batch": args.batch,
                       "images_per_s": wall, "images_per_cpu_s": cpu, "first_batch_s": first_batch_s}, file, indent=1)


if __name__ == "__main__":
    main()
