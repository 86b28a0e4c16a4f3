"""Starting or joining Ray, and running Ray Data jobs, the same way for every command."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback


def workers_soft_limit(cpus: int) -> int:
    """Idle worker processes a Ray node keeps. Ray's default, one per CPU, kills the extra
    workers of a streaming Ray Data job (read tasks beside decode tasks) after 1 s idle,
    and each restart re-imports torch (measured: docs/benchmarks.md). cluster.yaml's nodes
    use the same rule."""
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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now: each is held until all are chosen, since a port
    closed a moment ago may be handed out again."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
        return ports


def job_batches(dataset: ray.data.Dataset, **iter_batches_args) -> Iterator:
    """`dataset.iter_batches(...)` whose actors are killed when the job fails.

    Ray Data shuts a failed job down without killing its actor pools: it drops its own
    handles and leaves the actors to reference counting, but the error's traceback, a
    task still in flight in its metadata fetcher, or a notebook's last error can keep a
    handle, and the actor then holds its CPU or GPU until the driver exits. A rerun in
    the same driver (a notebook, a Tune driver, the tests' shared Ray) waits forever.
    Killing the actors is the only remedy that held (docs/reliability.md).
    """
    context = dataset.context
    if _KillActorsOnFailure not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes = [*context.custom_execution_callback_classes,
                                                     _KillActorsOnFailure]
    yield from dataset.iter_batches(**iter_batches_args)


class _KillActorsOnFailure(ExecutionCallback):
    """Remembers every actor of a job's pools while it runs; kills them if it fails.

    Reads the pools' private fields (Ray Data 2.60): Ray Data has no public hook that
    names a job's actors. tests/platform/test_runtime.py fails if a Ray upgrade breaks this.
    """

    def __init__(self):
        self._actors: dict = {}  # handles as keys: insertion-ordered set

    def on_execution_step(self, executor) -> None:
        for operator in executor._topology:
            pool = getattr(operator, "_actor_pool", None)
            if pool is not None:
                self._actors.update(dict.fromkeys(pool._running_actors))
                self._actors.update(dict.fromkeys(pool._pending_actors.values()))

    def after_execution_succeeds(self, executor) -> None:
        self._actors.clear()

    def after_execution_fails(self, executor, error: Exception) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors.clear()
