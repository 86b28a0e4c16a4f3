"""Shared fixtures: a real local Ray for the whole session, W&B offline in a temp dir."""

from __future__ import annotations

import os

import pytest

# Set before Ray or W&B import: progress bars only clutter test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session", autouse=True)
def _wandb_dir(tmp_path_factory):
    os.environ["WANDB_DIR"] = str(tmp_path_factory.mktemp("wandb"))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray (2 CPUs) shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        # Ray's state API (used by Train's placement-group cleaner in every worker) must find
        # this instance's dashboard even while other Ray instances run on the machine.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=2, include_dashboard=True, dashboard_port=port, configure_logging=False,
                 log_to_driver=False, runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    yield ray
    ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
