"""cluster.yaml's autoscaling on one machine: a worker node is added for a job and removed after.

The head is `ray start --head` with an autoscaling config made from cluster.yaml's node types
for Ray's fake multi-node provider, whose worker nodes are Ray nodes (raylet and agents) that
the autoscaler starts and stops as processes on this machine. A `wsss train` job goes in with
`ray job submit`, its driver on the head as on the real cluster; the head has no CPUs, so the
run needs a worker node. This pytest process never joins the cluster: it reads the nodes over
the dashboard's HTTP API, as `ray list nodes` does.

Not `ray.cluster_utils.AutoscalingCluster`: it runs `ray stop --force`, which stops every Ray
on the machine, and reads a config the wheel does not ship. The cluster here is stopped by
killing its own processes, found by a marker in their environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT
from wsss.platform.runtime import free_ports
from wsss.tuning.tune import HEAD_DRIVER_RESOURCE

CLUSTER_YAML = ROOT / "cluster.yaml"
MARKER = "WSSS_TEST_AUTOSCALING_CLUSTER"  # env var every process of the test's cluster inherits
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's name for its head (FAKE_HEAD_NODE_TYPE)
IDLE_TIMEOUT_S = 6


def fake_cluster_config(cluster: dict, gcs_address: str) -> dict:
    """The autoscaler's config: cluster.yaml's node types (names, labels, min/max workers) on
    the fake provider, at most one worker node at a time (the machine has few cores), removed
    after IDLE_TIMEOUT_S idle. What the fake provider cannot honour is replaced:

    - worker resources: a type with `{}` gets its CPUs and GPUs from its instance type on AWS;
      a fake node has none, so they are given, small (2 CPUs: the Train worker and a data
      task), with a GPU where the instance type has one (a resource only: no CUDA here);
    - the head type: the provider tags its head `ray.head.default` whatever the config says,
      so the head's resources (no CPUs, the drivers' `head_driver`) go under that name;
    - node_config, docker, file mounts and setup commands: a fake node is processes of this
      machine's Ray and Python, not an instance booted from an image; left empty, as the
      autoscaler reads the file as it is (`ray up` would fill in the defaults).
    """
    types = {}
    for name, node_type in cluster["available_node_types"].items():
        fake = {"node_config": {}, "labels": dict(node_type.get("labels", {}))}
        if name == cluster["head_node_type"]:
            types[FAKE_HEAD_TYPE] = fake | {"resources": dict(node_type["resources"]), "max_workers": 0}
            continue
        has_gpu = node_type["node_config"]["InstanceType"].startswith(("g", "p"))
        fake["resources"] = {**node_type["resources"], "CPU": 2, **({"GPU": 1} if has_gpu else {})}
        fake["min_workers"] = node_type.get("min_workers", 0)
        fake["max_workers"] = min(node_type["max_workers"], 1)
        types[name] = fake
    return {
        "cluster_name": cluster["cluster_name"],
        "max_workers": 1,
        "upscaling_speed": cluster["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address,
                     # several nodes share one IP; nodes are processes, never updated or relaunched
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def test_the_fake_config_keeps_cluster_yamls_node_types():
    """Ray's schema accepts it (the autoscaler itself only logs a failed check), and every
    node type of cluster.yaml is there with its labels; the head as the fake provider names it."""
    from ray.autoscaler._private.util import validate_config

    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    config = fake_cluster_config(cluster, "127.0.0.1:1")
    validate_config(config)
    types = config["available_node_types"]
    for name, node_type in cluster["available_node_types"].items():
        fake = types[FAKE_HEAD_TYPE if name == cluster["head_node_type"] else name]
        assert fake["labels"] == node_type["labels"], name
        assert fake["max_workers"] <= node_type.get("max_workers", 0), name
    assert len(types) == len(cluster["available_node_types"])
    assert types[FAKE_HEAD_TYPE]["resources"] == cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    assert "GPU" in types["gpu"]["resources"] and "GPU" not in types["cpu"]["resources"]


def cluster_processes(marker: str) -> list[int]:
    """Live processes (zombies aside) whose environment carries `MARKER=marker`."""
    wanted = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:  # gone meanwhile, or not ours
            continue
        found.append(int(entry.name))
    return found


def kill_cluster(marker: str, timeout: float = 30) -> list[int]:
    """SIGKILL to every process of the cluster, as `ray stop --force` sends it, until none is
    left (a dying raylet may have started a worker meanwhile); returns those still alive after
    `timeout` (none, normally)."""
    deadline = time.monotonic() + timeout
    while (alive := cluster_processes(marker)) and time.monotonic() < deadline:
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    return alive


def get(head: dict, path: str, **query) -> dict:
    """GET of the head's dashboard API (what `ray list ...` and `ray job ...` read), with the
    token; a request the dashboard drops (it does on a busy machine) is sent again."""
    request = urllib.request.Request(f"{head['dashboard']}{path}?{urllib.parse.urlencode(query, doseq=True)}",
                                     headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"})
    for attempt in range(5):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except OSError as error:  # an HTTP error is an answer
            if isinstance(error, urllib.error.HTTPError) or attempt == 4:
                raise
            time.sleep(1)


def listed(head: dict, kind: str, **equal) -> list[dict]:
    """`ray list KIND --filter KEY=VALUE ... --detail` through the state API."""
    filters = {"filter_keys": list(equal), "filter_predicates": ["="] * len(equal),
               "filter_values": list(equal.values())}
    return get(head, f"/api/v0/{kind}", limit=1000, detail=1, **filters)["data"]["result"]["result"]


def alive_nodes(head: dict) -> list[dict]:
    return listed(head, "nodes", state="ALIVE")


@pytest.fixture
def autoscaling_head(tmp_path):
    """A head started with the fake autoscaling config; every port its own, none of Ray's
    defaults (other Ray instances run on this machine). Its temp dir is its own and short (Ray
    puts Unix sockets in it). Stopped by killing its processes, which the test checks."""
    import ray

    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    temp_dir = tempfile.mkdtemp(prefix="rayas", dir="/tmp")
    port, dashboard_port, agent, client = free_ports(4)
    gcs_address = f"{ray.util.get_node_ip_address()}:{port}"  # what `ray start` advertises
    config = fake_cluster_config(cluster, gcs_address)
    config_path = tmp_path / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head = config["available_node_types"][FAKE_HEAD_TYPE]
    resources = dict(head["resources"])
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {MARKER: temp_dir, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            # Train's placement-group cleaner asks this dashboard (see wsss/platform/runtime.py)
            "RAY_API_SERVER_ADDRESS": dashboard,
            # token authentication on, as on a real cluster, with a token of the test's own
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    reach = {"dashboard": dashboard, "env": env}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    log = open(tmp_path / "head.log", "w")
    started = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--port={port}",
         f"--autoscaling-config={config_path}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", f"--num-cpus={resources.pop('CPU')}",
         f"--resources={json.dumps(resources)}",
         "--labels=" + ",".join(f"{k}={v}" for k, v in head["labels"].items())],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # up: its raylet registered (`ray start` gives up after 30 s, an overloaded machine's GCS
        # may take that long) and its dashboard answering
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError, KeyError, ValueError):
                if alive_nodes(reach) and started.poll() is None:
                    break
            if started.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError("the head did not come up:\n" + (tmp_path / "head.log").read_text()[-3000:])
            time.sleep(1)
        yield reach | {"ray": ray_cli, "config": config, "temp_dir": temp_dir}
    finally:
        left = kill_cluster(temp_dir)
        started.wait(timeout=10)
        log.close()
        with contextlib.suppress(OSError):  # kept with the test's files, for a failure's post-mortem
            shutil.copytree(Path(temp_dir) / "session_latest" / "logs", tmp_path / "ray-logs")
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's cluster still running: {left}"


def node_type_of(node: dict, types: dict) -> str:
    """The config's node type whose labels the node carries."""
    return next((name for name, spec in types.items()
                 if spec["labels"] and spec["labels"].items() <= node["labels"].items()), None)


@pytest.mark.slow
def test_a_job_gets_a_worker_node_that_is_removed_after(autoscaling_head, shards, tmp_path):
    from wsss.platform.checkpoints import INFO_FILE, latest_checkpoint

    head = autoscaling_head
    types = head["config"]["available_node_types"]
    storage = tmp_path / "runs"
    job_id = f"autoscaled-{secrets.token_hex(4)}"
    command = [head["ray"], "job", "submit", "--no-wait", "--address", head["dashboard"], "--submission-id", job_id,
               "--working-dir", str(CLUSTER_YAML.parent),
               "--entrypoint-resources", json.dumps({HEAD_DRIVER_RESOURCE: 1}), "--",
               sys.executable, "-m", "wsss", "train", "--method", "cam", "--data", shards,
               f"storage_path={storage}", "name=autoscaled", "epochs=1", "batch_size=8", "crop_size=64",
               "backbone=resnet18", "backbone_weights=none", "eval_max_images=4", "wandb=disabled", "device=cpu"]
    start = time.monotonic()
    seen: dict[str, dict] = {}  # worker node id -> its type, when it was first and last seen alive

    def watch() -> int:
        """Records the worker nodes alive now; returns how many nodes are alive."""
        nodes = alive_nodes(head)
        now = time.monotonic() - start
        for node in nodes:
            if not node["is_head_node"]:
                seen.setdefault(node["node_id"], {"type": node_type_of(node, types), "added": now})["last"] = now
        return len(nodes)

    def job() -> dict | None:
        """The job's details (None: not submitted)."""
        try:
            return get(head, f"/api/jobs/{job_id}")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    # --no-wait: the job's end is read from the job API below, which asks again where a busy
    # machine's dashboard drops a connection; a submission that did not arrive is sent again (the
    # head's job agent registers a little after its dashboard is up)
    for _ in range(12):
        submitted = subprocess.run(command, env=head["env"], capture_output=True, text=True, timeout=300)
        if job() is not None:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"the job was not submitted: {submitted.stdout[-2000:]}{submitted.stderr[-2000:]}")
    while (details := job())["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        watch()
        assert time.monotonic() - start < 400, f"the job did not end: {details}"
        time.sleep(1)
    job_done = time.monotonic() - start
    assert details["status"] == "SUCCEEDED", get(head, f"/api/jobs/{job_id}/logs")["logs"][-4000:]
    while watch() != 1:
        assert time.monotonic() - start < job_done + 120, f"worker nodes still up 2 min after the job: {seen}"
        time.sleep(1)
    removed = time.monotonic() - start

    print(f"job submitted at t=0, ended at t={job_done:.0f} s; node count back to the head at t={removed:.0f} s; "
          "worker nodes: " + ", ".join(f"{v['type']} added at t={v['added']:.0f} s, last seen at t={v['last']:.0f} s"
                                       for v in seen.values()))
    # one node, of the type for CPU work (no GPU node for a CPU run), added while the job ran
    assert [node["type"] for node in seen.values()] == ["cpu"], seen
    (node_id, node), = seen.items()
    assert node["added"] < job_done
    # the run trained there, its driver on the head
    workers = listed(head, "actors", class_name="RayTrainWorker")
    assert [worker["node_id"] for worker in workers] == [node_id]
    head_node = next(n for n in listed(head, "nodes") if n["is_head_node"])
    assert node_type_of(head_node, types) == FAKE_HEAD_TYPE and details["driver_node_id"] == head_node["node_id"]
    info = json.loads((Path(latest_checkpoint(str(storage / "autoscaled"))) / INFO_FILE).read_text())
    assert info["epoch"] == 1
    # the autoscaler started it, and stopped it for being idle (lines it logs before acting)
    monitor = (Path(head["temp_dir"]) / "session_latest" / "logs" / "monitor.log").read_text()
    assert "Launching 1 nodes, type cpu." in monitor
    assert re.search(f"Terminating the node with id {node_id} .*\\(idle\\)", monitor)
