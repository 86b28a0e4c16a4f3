"""Starting or joining Ray, and running Ray Data jobs, the same way for every command."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Iterator

import ray


def workers_soft_limit(cpus: int) -> int:
    """Idle worker processes a Ray node keeps. Ray's default, one per CPU, kills the extra
    workers of a streaming Ray Data job (read tasks beside decode tasks) after 1 s idle,
    and each restart re-imports torch: on 2 CPUs the training input ran at down to a third
    of its speed (benchmarks/ingest.py, docs/benchmarks.md). cluster.yaml's nodes use the same rule."""
    return 4 * cpus + 8


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of RAY_ADDRESS (`ray job submit` sets it), else start a local Ray.

    A local Ray gets a dashboard on a port chosen here and RAY_API_SERVER_ADDRESS naming
    it, inherited by every Ray process: Train V2's placement-group cleaner asks the
    dashboard whether a finished run's controller is gone, and its own detection of the
    cluster fails on a machine running several Ray instances, leaking the run's CPUs.
    A local Ray also keeps more idle workers than Ray's default (`workers_soft_limit`),
    and its Train runs start no preemption watcher, one actor process fewer per run: one
    machine has no spot nodes to drain.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], configure_logging=False)
        return
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    cpus = num_cpus or os.cpu_count() or 1
    os.environ.setdefault("RAY_num_workers_soft_limit", str(workers_soft_limit(cpus)))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_port=port, configure_logging=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def job_batches(dataset: ray.data.Dataset, **iter_batches_args) -> Iterator:
    """`dataset.iter_batches(...)` that gives a failed job's actors back at once.

    Ray Data shuts a failed job down without killing its actor pools: each actor keeps its
    CPU or GPU while anything holds the error, whose traceback frames reach the executor
    and the dataset (a caller keeping the exception, a notebook's last error, a log
    handler's records), so a rerun in the same process can wait forever for resources.
    Pass the dataset inline (`job_batches(ds.map_batches(...))`): a caller's variable
    would keep it alive.
    """
    try:
        yield from dataset.iter_batches(**iter_batches_args)
    except BaseException as error:
        del dataset
        _clear_frames(error)
        gc.collect()  # the executor is garbage in reference cycles now: free its actors
        raise


def _clear_frames(error: BaseException) -> None:
    """Drop the locals of every finished frame the error, its causes and contexts reach:
    their tracebacks' frames and those frames' callers (an error raised in Ray Data's
    scheduling thread reaches the thread's frames, which hold the executor, that way)."""
    errors, seen_errors, seen_frames = [error], set(), set()
    while errors:
        error = errors.pop()
        if error is None or id(error) in seen_errors:
            continue
        seen_errors.add(id(error))
        errors += [error.__cause__, error.__context__]
        tb = error.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            while frame is not None and id(frame) not in seen_frames:
                seen_frames.add(id(frame))
                try:
                    frame.clear()
                except RuntimeError:  # still executing: the caller's own frames
                    pass
                frame = frame.f_back
            tb = tb.tb_next
