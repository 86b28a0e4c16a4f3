"""cluster.yaml: valid for Ray's own cluster-launcher validation, and laid out as docs/cluster.md says."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from wsss.platform.runtime import free_port
from wsss.tuning.tune import HEAD_DRIVER_RESOURCE

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def filled(config: dict) -> dict:
    """What `ray up` validates: the config merged with Ray's AWS defaults."""
    return prepare_config(copy.deepcopy(config))


def test_ray_validates_the_config(cluster):
    validate_config(filled(cluster))


def test_validation_catches_a_broken_copy(cluster):
    """The check above is real: Ray rejects what the launcher would reject."""
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu"]["resources"] = {"GPU": 0.5}  # must be integers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(filled(broken))
    broken = copy.deepcopy(cluster)
    broken["head_node_type"] = "nonexistent"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(filled(broken))


def test_head_is_on_demand_cpu_and_hosts_the_drivers(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # on-demand
    assert head["resources"]["CPU"] == 0  # no training or data work on the head
    assert head["resources"][HEAD_DRIVER_RESOURCE] >= 1  # what `wsss tune` trials and jobs ask for
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_gpu_workers_are_spot_and_scale_from_zero(cluster):
    gpu = cluster["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))


def test_cpu_workers_for_decoding_and_crf(cluster):
    cpu = cluster["available_node_types"]["cpu"]
    assert cpu["min_workers"] == 0 < cpu["max_workers"]
    assert cpu["node_config"]["InstanceType"].startswith(("c", "m"))
    workers = sum(t.get("max_workers", 0) for name, t in cluster["available_node_types"].items()
                  if name != cluster["head_node_type"])
    assert cluster["max_workers"] >= workers


def test_every_node_installs_this_project(cluster):
    assert cluster["file_mounts"]["~/wsss"] == "."
    assert any("pip install" in c and "~/wsss" in c for c in cluster["setup_commands"])
    assert ".venv" in cluster["rsync_exclude"]


def test_dashboard_is_reached_only_through_an_ssh_tunnel(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start


# ---- `ray job submit` against a head started by the test -------------------------------

@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with the head's driver resource, stopped by killing
    its own process group (never `ray stop`, which would stop every Ray on the machine).
    Its own temp dir keeps it out of /tmp/ray/ray_current_cluster, which every later
    `ray.init()` on the machine would otherwise try to join."""
    import contextlib
    import os
    import secrets
    import shutil
    import signal
    import tempfile
    import urllib.error
    import urllib.request

    port, dashboard, agent, client = (free_port() for _ in range(4))  # defaults may be taken
    # token authentication on, as on a real cluster; a token of the test's own, so neither a
    # fresh machine's missing ~/.ray/auth_token nor a user's token is involved
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    log_path = tmp_path_factory.mktemp("head") / "head.log"
    log = open(log_path, "w")
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray puts sockets in it
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--num-cpus=2", f"--resources={{\"{HEAD_DRIVER_RESOURCE}\": 10}}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # up, and asking for Ray's auth token
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise TimeoutError("the Ray head's dashboard did not come up:\n"
                                       + log_path.read_text()[-2000:]) from None
                time.sleep(2)
        yield {"address": address, "env": env, "ray": ray_cli}
    finally:
        with contextlib.suppress(ProcessLookupError):  # a head that failed to start is gone
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(head: dict, entrypoint: str) -> None:
    """`ray job submit` of `entrypoint` from this project's directory, its driver pinned to the
    head by the head's driver resource as on a real cluster; waits for the job to end."""
    for _ in range(12):  # the head's job agent registers a little after its dashboard is up
        submitted = subprocess.run(
            [head["ray"], "job", "submit", "--address", head["address"],
             "--working-dir", str(CLUSTER_YAML.parent), "--entrypoint-resources",
             json.dumps({HEAD_DRIVER_RESOURCE: 1}), "--", *entrypoint.split()],
            env=head["env"], capture_output=True, text=True, timeout=800)
        if "No available agent" not in submitted.stderr:
            break
        time.sleep(5)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout


TINY_RUN = ("epochs=1 batch_size=8 crop_size=64 backbone=resnet18 backbone_weights=none "
            "eval_max_images=4 wandb=offline")


@pytest.mark.slow
def test_ray_job_submit_runs_a_tiny_sweep(local_head, shards, tmp_path):
    storage = tmp_path / "sweeps"
    submit_job(local_head, f"{sys.executable} -m wsss tune --method cam --data {shards} "
                           f"--trials 1 storage_path={storage} --name job --no-eval {TINY_RUN}")
    best = json.loads((storage / "job" / "best.json").read_text())
    assert best["finished"] == 1 and 0.0 <= best["miou"] <= 1.0


@pytest.mark.slow
def test_ray_job_submit_runs_a_tiny_train(local_head, shards, tmp_path):
    from wsss.platform.checkpoints import INFO_FILE, latest_checkpoint

    storage = tmp_path / "runs"
    submit_job(local_head, f"{sys.executable} -m wsss train --method cam --data {shards} "
                           f"storage_path={storage} name=job {TINY_RUN}")
    info = json.loads((Path(latest_checkpoint(str(storage / "job"))) / INFO_FILE).read_text())
    assert info["epoch"] == 1 and info["method"] == "cam"
