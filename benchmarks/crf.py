"""Dense-CRF throughput of the pseudo-label job's CRF stage with 1 vs 2 CPU actors, one run.

    python benchmarks/crf.py --images 48 --size 256 --rounds 2 --cpus 2 [--batches 1,4]

The same in-memory rows, in the form the CAM stage emits them (JPEG bytes of synthetic
benchmark images, blurred and noisy CAMs of their classes), go through
`wsss.platform.pseudo_labels.CRFStage` on Ray Data in a fixed pool of 1, then 2 actors
(one CPU each), at the job's rows per call or at each of --batches. Throughput is steady
state: rows after the first output / time from the first output to the last, so actor
start-up (importing torch) does not count. Rounds alternate the pool sizes so that load
from other processes hits both alike; the best round of each counts. Goal: 2 actors /
1 actor ≥ 1.8 on 2 cores.

The machine's own limit is measured beside it: the same `CRFStage` called in a loop by 1,
then 2 plain processes (no Ray), each on every other row. If 2 bare processes do not reach
1.8× either, the cores themselves do not scale that far (shared caches, memory bandwidth,
a hypervisor's CPU budget) and Ray's ratio is to be read against the bare one.

On a machine shared with other work the wall-clock ratio says as much about the neighbours
as about the job, so the CPU seconds each actor spends per image are reported too: equal
CPU per image with 1 and 2 actors means the stage itself adds no cost when it scales out.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import time

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from wsss.datasets.synthetic import CLASSES, render_image  # noqa: E402
from wsss.platform.pseudo_labels import CRF_BATCH_SIZE, CRFStage, PseudoLabelSettings  # noqa: E402

NUM_CLASSES = len(CLASSES) - 1


def make_rows(count: int, size: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        sample = render_image(0, "train", index, size)
        buffer = io.BytesIO()
        Image.fromarray(sample.image).save(buffer, format="JPEG", quality=90)
        labels = np.zeros(NUM_CLASSES, np.float32)
        labels[np.asarray(sample.labels) - 1] = 1
        cams = np.stack([gaussian_filter((sample.exact == c).astype(np.float32), size / 16) for c in sample.labels])
        cams = np.clip(cams + rng.normal(0, 0.05, cams.shape), 0, None).astype(np.float32)
        cams /= cams.reshape(len(cams), -1).max(axis=1).clip(min=1e-5)[:, None, None]
        rows.append({"file": 0, "row": index, "id": f"bench-{index}", "image": buffer.getvalue(),
                     "height": size, "width": size, "labels": labels, "mask": b"", "scores": cams.tobytes()})
    return rows


class TimedCRFStage(CRFStage):
    """The job's CRF stage, plus the CPU seconds of each call."""

    def __call__(self, batch: dict) -> dict:
        started = time.process_time()
        out = super().__call__(batch)
        return out | {"cpu_s": np.full(len(out["id"]), (time.process_time() - started) / len(out["id"]))}


def throughput(rows: list[dict], actors: int, settings: PseudoLabelSettings, batch_size: int) -> tuple[float, float]:
    """(images/s in the steady state, mean CPU seconds per image)."""
    labeled = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        TimedCRFStage, batch_size=batch_size, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=dict(settings=settings.__dict__, num_classes=NUM_CLASSES))
    arrivals, done, cpu = [], 0, []
    for batch in labeled.iter_batches(batch_size=None, batch_format="numpy"):
        done += len(batch["id"])
        cpu += batch["cpu_s"].tolist()
        arrivals.append((time.perf_counter(), done))
    (first_time, first_rows), (last_time, last_rows) = arrivals[0], arrivals[-1]
    return (last_rows - first_rows) / max(last_time - first_time, 1e-9), float(np.mean(cpu))


def _bare_worker(rows, settings, barrier, queue) -> None:
    stage = CRFStage(settings.__dict__, NUM_CLASSES)
    batches = [{key: np.asarray([value], dtype=object if isinstance(value, bytes) else None)
                for key, value in row.items()} for row in rows]
    barrier.wait()  # every process starts timing together, after its imports
    started = time.perf_counter()
    for batch in batches:
        stage(batch)
    queue.put((started, time.perf_counter()))


def bare_throughput(rows: list[dict], processes: int, settings: PseudoLabelSettings) -> float:
    """images/s of `processes` plain processes sharing the rows: the machine's limit."""
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_bare_worker, args=(rows[i::processes], settings, barrier, queue))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    spans = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return len(rows) / (max(end for _, end in spans) - min(start for start, _ in spans))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=256, help="side of the square images, pixels")
    parser.add_argument("--mode", default="crf", choices=("crf", "irn"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batches", default=str(CRF_BATCH_SIZE),
                        help=f"rows per CRF call, comma-separated (the job's: {CRF_BATCH_SIZE})")
    args = parser.parse_args()
    rows = make_rows(args.images, args.size)
    settings = PseudoLabelSettings(args.mode, threshold=0.25)
    batch_sizes = [int(b) for b in args.batches.split(",")]
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    best = {(a, b): 0.0 for a in (1, 2) for b in batch_sizes}
    cpu = {key: [] for key in best}
    for round_index in range(args.rounds):
        for actors in ((1, 2) if round_index % 2 == 0 else (2, 1)):
            for batch_size in batch_sizes:
                value, cpu_per_image = throughput(rows, actors, settings, batch_size)
                best[actors, batch_size] = max(best[actors, batch_size], value)
                cpu[actors, batch_size].append(cpu_per_image)
                print(f"round {round_index + 1}: {actors} actor(s), {batch_size} row(s) per call: {value:6.2f} "
                      f"images/s, {1000 * cpu_per_image:.0f} ms CPU per image "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    ray.shutdown()
    bare = {1: 0.0, 2: 0.0}
    for round_index in range(args.rounds):
        for processes in ((1, 2) if round_index % 2 == 0 else (2, 1)):
            value = bare_throughput(rows, processes, settings)
            bare[processes] = max(bare[processes], value)
            print(f"round {round_index + 1}: {processes} bare process(es) {value:6.2f} images/s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"{args.mode} CRF, {args.images} images of {args.size}x{args.size}, {os.cpu_count()} CPUs; "
          f"bare 1 process {bare[1]:.2f} images/s, 2 processes {bare[2]:.2f}, 2 / 1 = {bare[2] / bare[1]:.2f} "
          "(the machine's limit)")
    for b in batch_sizes:
        ratio = best[2, b] / best[1, b]
        print(f"{b} row(s) per call: 1 actor {best[1, b]:.2f} images/s, 2 actors {best[2, b]:.2f}; "
              f"Ray 2 / 1 = {ratio:.2f} (goal >= 1.8): {'met' if ratio >= 1.8 else 'NOT met'}; "
              f"2 actors / 2 bare processes = {best[2, b] / bare[2]:.2f}; CPU per image 1 actor "
              f"{1000 * min(cpu[1, b]):.0f} ms, 2 actors {1000 * min(cpu[2, b]):.0f} ms (best rounds)")


if __name__ == "__main__":
    main()
