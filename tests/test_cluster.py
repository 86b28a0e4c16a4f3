"""cluster.yaml: valid for Ray's own cluster-launcher validation, and laid out as docs/cluster.md says."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

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
