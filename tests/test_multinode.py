"""A multi-node local Ray cluster loses the node that trains; the run finishes from its checkpoint.

The cluster is `ray.cluster_utils.Cluster`: a head with no CPUs (so the Train worker and the
data tasks can only run on the worker node, as on the cluster.yaml cluster) and one worker
node with 2 CPUs. `wsss train` is a separate driver process joined to it by RAY_ADDRESS, as
`ray job submit` starts it. This pytest process never connects to the cluster.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from wsss.platform.runtime import free_port

EPOCHS = 3


def registered_epoch(run_dir: Path) -> int:
    """Epoch of the latest checkpoint Ray Train has registered for the run (0 if none): what a
    restarted worker gets from `ray.train.get_checkpoint()`. A checkpoint directory on disk is
    not enough; the worker writes it before the controller records it."""
    import ray.train

    try:
        return ray.train.Result.from_path(str(run_dir)).metrics["epoch"]
    except (RuntimeError, ValueError, TypeError):  # no snapshot yet, or one being rewritten
        return 0


def wait_for_epoch(run_dir: Path, epoch: int, driver: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while registered_epoch(run_dir) < epoch:
        if driver.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.returncode}) before epoch {epoch} was checkpointed")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no epoch-{epoch} checkpoint registered in {run_dir} after {timeout:.0f} s")
        time.sleep(0.2)


@pytest.fixture
def cluster_env(monkeypatch):
    """Environment the cluster's processes inherit. RAY_TMPDIR: `Cluster` writes its address
    into <RAY_TMPDIR>/ray/ray_current_cluster, which every plain `ray.init()` on this machine
    would then join (other tests, other users), so it gets a temp dir of its own (short: Ray
    puts Unix sockets under it). RAY_API_SERVER_ADDRESS: Train V2's placement-group cleaner
    runs in a cluster process and asks the dashboard about the run (see wsss/platform/runtime.py)."""
    import shutil

    directory = tempfile.mkdtemp(prefix="raymn", dir="/tmp")
    dashboard = free_port()
    monkeypatch.setenv("RAY_TMPDIR", directory)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dashboard}")
    yield {"dashboard_port": dashboard}
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def cluster_beside_this_process(head_node_args: dict):
    """A started `Cluster` that leaves this process's own Ray usable afterwards: starting a
    head node points this process's internal-KV client at the new cluster and `shutdown()`
    clears it, although it belongs to the session's Ray (`ray_local`) if a test started one."""
    from ray.cluster_utils import Cluster
    from ray.experimental import internal_kv

    kv_client = internal_kv.internal_kv_get_gcs_client()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head_node_args)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        if kv_client is not None:
            internal_kv._initialize_internal_kv(kv_client)


@pytest.mark.slow
def test_run_survives_losing_its_worker_node(tmp_path, cluster_env):
    import ray.train

    from wsss.datasets.prepare import prepare

    # 80 training images: 10 steps an epoch, so the node is lost mid-run, not after it
    prepare("synthetic", tmp_path / "tree", tmp_path / "shards", preset="test", num_train=80)
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": cluster_env["dashboard_port"],
            # declare a lost node dead after ~3 s rather than the default ~15 s
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}}
    run_dir = tmp_path / "runs" / "lost-node"
    with cluster_beside_this_process(head) as cluster, open(tmp_path / "driver.log", "w+") as log:
        worker = cluster.add_node(num_cpus=2)
        driver = subprocess.Popen(
            [sys.executable, "-m", "wsss", "train", "--method", "cam", "--data", str(tmp_path / "shards"),
             f"storage_path={run_dir.parent}", f"name={run_dir.name}", f"epochs={EPOCHS}", "max_failures=2",
             "batch_size=8", "crop_size=64", "backbone=resnet18", "backbone_weights=none",
             "eval_max_images=4", "wandb=disabled", "keep_checkpoints=0"],  # every checkpoint: counted below
            env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_epoch(run_dir, 1, driver, timeout=150)
            cluster.remove_node(worker, allow_graceful=False)  # as a spot instance goes: no warning
            lost_at = registered_epoch(run_dir)
            cluster.add_node(num_cpus=2)
            driver.wait(timeout=150)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        log.seek(0)
        assert driver.returncode == 0, log.read()[-4000:]

    assert lost_at < EPOCHS, "the node was lost only after the run had finished"
    result = ray.train.Result.from_path(str(run_dir))
    assert result.metrics["epoch"] == EPOCHS
    # the new worker started from the checkpoint of the epoch done when the node was lost
    # (or a later one the controller recorded just then), not from scratch: every epoch was
    # checkpointed exactly once
    assert lost_at <= result.metrics["resumed_from_epoch"] < EPOCHS
    # (Ray lists them by their score, val miou: sorted here by epoch)
    assert sorted(metrics["epoch"] for _, metrics in result.best_checkpoints) == list(range(1, EPOCHS + 1))
