"""Starting or joining Ray, the same way for every command."""

from __future__ import annotations

import os
import socket

import ray


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of RAY_ADDRESS (`ray job submit` sets it), else start a local Ray.

    A local Ray gets a dashboard on a port chosen here and RAY_API_SERVER_ADDRESS naming
    it, inherited by every Ray process: Train V2's placement-group cleaner asks the
    dashboard whether a finished run's controller is gone, and its own detection of the
    cluster fails on a machine running several Ray instances, leaking the run's CPUs.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], configure_logging=False)
        return
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_port=port, configure_logging=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
