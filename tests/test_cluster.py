"""cluster.yaml: valid for Ray's own cluster-launcher validation, and laid out as docs/cluster.md says."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.helpers import ROOT
from wsss.platform.runtime import free_port, free_ports
from wsss.tuning.tune import HEAD_DRIVER_RESOURCE

CLUSTER_YAML = ROOT / "cluster.yaml"
DEPLOY = CLUSTER_YAML.parent / "deploy" / "aws"


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


def test_every_node_type_has_its_instance_profile(cluster):
    """Ray's AWS provider gives its default profile to the head only: without a profile of
    their own, workers could neither upload checkpoints nor read shards."""
    created = (DEPLOY / "create-iam.sh").read_text()
    for name, node_type in cluster["available_node_types"].items():
        profile = node_type["node_config"]["IamInstanceProfile"]["Name"]
        assert profile == ("wsss-head" if name == cluster["head_node_type"] else "wsss-node"), name
        assert profile in created


def test_bootstrap_keeps_each_node_types_profile(cluster):
    """What `ray up` does to the profiles, run offline: a head with its own profile is not
    given Ray's default one (which would need IAM calls)."""
    from ray.autoscaler._private.aws.config import _configure_iam_role

    config = filled(cluster)
    config["head_node"] = {}
    configured = _configure_iam_role(config)
    assert configured["head_node"] == {}
    for name, node_type in configured["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], name


def test_images_carry_the_pinned_ray_and_python(cluster):
    import ray
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())
    ray_pin = next(Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("ray["))
    upper = [s.version for s in ray_pin.specifier if s.operator == "<"]
    major, minor = (int(x) for x in ray.__version__.split(".")[:2])
    assert upper == [f"{major}.{minor + 1}"], "Ray is pinned to one minor version"
    assert ray.__version__ in ray_pin.specifier
    docker = cluster["docker"]
    images = [docker["image"], docker["head_image"]] + [
        t["docker"]["worker_image"] for t in cluster["available_node_types"].values() if "docker" in t]
    for image in images:
        repository, tag = image.split(":")
        version, python, platform = tag.split("-")
        assert repository == "rayproject/ray" and version in ray_pin.specifier, image
        assert python == "py311" and platform in ("cpu", "gpu"), image
    assert docker["image"].endswith("-gpu") and docker["head_image"].endswith("-cpu")


def test_every_node_type_has_an_image_newer_than_rays_default(cluster):
    """Without an ImageId, Ray falls back to a Deep Learning AMI on Ubuntu 18.04, whose
    driver is too old for torch's CUDA 12 wheels."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    for name, node_type in cluster["available_node_types"].items():
        image = node_type["node_config"]["ImageId"]
        assert image not in DEFAULT_AMI.values() and "ubuntu-22.04" in image, name


def test_gpu_nodes_install_the_cuda_build_of_torch(cluster):
    gpu = " ".join(cluster["available_node_types"]["gpu"]["worker_setup_commands"])
    assert "torch.version.cuda" in gpu and "whl/cpu" not in gpu  # setup fails on a CPU build
    assert any("pip install -e ~/wsss" in c for c in cluster["available_node_types"]["gpu"]["worker_setup_commands"])
    assert any("whl/cpu" in c for c in cluster["setup_commands"])  # head and cpu nodes
    assert "worker_setup_commands" not in cluster["available_node_types"]["cpu"]


def test_ssh_goes_through_a_group_the_user_restricts(cluster):
    """Ray's own security group opens SSH to 0.0.0.0/0; a group of the configured name that
    has rules already is used unchanged (docs/cluster.md shows how to create it)."""
    name = cluster["provider"]["security_group"]["GroupName"]
    docs = (CLUSTER_YAML.parent / "docs" / "cluster.md").read_text()
    assert f"--group-name {name}" in docs and "--cidr" in docs


def test_the_documented_keys_exist():
    """cluster.yaml once told users to pass a `--storage-path` flag `wsss train` has not got."""
    from wsss.platform.config import TrainConfig

    text = CLUSTER_YAML.read_text()
    assert "storage_path=s3://" in text and "storage_path" in TrainConfig.__dataclass_fields__
    for line in text.splitlines():
        assert "--storage-path" not in line or "wsss tune" in line, line


def test_policies_are_least_privilege():
    node = json.loads((DEPLOY / "node-policy.json").read_text())
    head = json.loads((DEPLOY / "head-policy.json").read_text())
    node_actions = {a for s in node["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert all(a.startswith("s3:") and "*" not in a for a in node_actions)
    assert all(s["Resource"] != "*" for s in node["Statement"])
    data_rights = [s for s in node["Statement"] if s["Resource"] == "arn:aws:s3:::BUCKET/PREFIX/data/*"]
    assert [s["Action"] for s in data_rights] == ["s3:GetObject"]  # the data is read-only
    head_actions = {a for s in head["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert "iam:PassRole" in head_actions and not any(a.endswith("*") for a in head_actions)


@pytest.mark.skipif(shutil.which("aws") is None, reason="needs the aws CLI")
def test_create_iam_makes_the_profiles_cluster_yaml_names(cluster, tmp_path):
    """deploy/aws/create-iam.sh, run with the aws CLI against moto's IAM."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "HOME": str(tmp_path)}
    try:
        done = subprocess.run([str(DEPLOY / "create-iam.sh"), "my-bucket"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        iam = boto3.client("iam", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        for node_type in cluster["available_node_types"].values():
            name = node_type["node_config"]["IamInstanceProfile"]["Name"]
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
            assert [role["RoleName"] for role in profile["Roles"]] == [name]
        s3 = iam.get_role_policy(RoleName="wsss-node", PolicyName="wsss-s3")["PolicyDocument"]
        assert "arn:aws:s3:::my-bucket/wsss/data/*" in json.dumps(s3) and "BUCKET" not in json.dumps(s3)
        assert iam.list_role_policies(RoleName="wsss-node")["PolicyNames"] == ["wsss-s3"]
        assert sorted(iam.list_role_policies(RoleName="wsss-head")["PolicyNames"]) == ["wsss-autoscaler", "wsss-s3"]
        autoscaler = iam.get_role_policy(RoleName="wsss-head", PolicyName="wsss-autoscaler")["PolicyDocument"]
        assert '"ec2:ResourceTag/ray-cluster-name": "wsss"' in json.dumps(autoscaler)
    finally:
        server.stop()


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

    port, dashboard, agent, client = free_ports(4)  # defaults may be taken
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
