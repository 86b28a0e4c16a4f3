"""Every shared fixture: a real local Ray for the whole session, W&B offline in a temp dir,
the synthetic shards, moto's S3 server. Shared code that is not a fixture is in tests/helpers/."""

from __future__ import annotations

import logging
import os

import pytest

pytest.register_assert_rewrite("tests.helpers")  # their asserts report values, as a test's do

# Set before Ray or W&B import: progress bars only clutter test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session", autouse=True)
def _wandb_dir(tmp_path_factory):
    os.environ["WANDB_DIR"] = str(tmp_path_factory.mktemp("wandb"))


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions on a shared 2-core machine: a second intra-op thread only spins
    against other processes (10× slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray (2 CPUs) shared by every test that needs it; started like the CLI
    starts it, so Train's placement-group cleaner finds it beside other Ray instances."""
    import ray

    from wsss.platform.runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)  # always a Ray of the tests' own, never a user's cluster
    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _ray_left_free(request):
    """Fails a test that leaves the shared Ray's CPUs held (a leaked actor), and gives
    the next tests a fresh Ray: on the old one each would wait for those CPUs forever."""
    yield
    if "ray_local" not in request.fixturenames:
        return
    import ray

    from tests.helpers.ray_state import alive_actors, all_cpus_free
    from wsss.platform.runtime import ensure_ray

    if all_cpus_free(ray, within_s=60):
        return
    actors = alive_actors()
    ray.shutdown()
    ensure_ray(num_cpus=2)
    pytest.fail(f"CPUs still held 60 s after the test (alive actors: {actors}); Ray restarted for the next tests")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """The synthetic benchmark's `test` preset (40 train / 20 val images, 64 px) as shards.
    Read-only: a test that needs to change them works on a copy."""
    from wsss.datasets.prepare import prepare

    root = tmp_path_factory.mktemp("synthetic")
    prepare("synthetic", str(root / "tree"), str(root / "shards"), preset="test")
    return str(root / "shards")


@pytest.fixture(scope="session")
def tiny_sweep(ray_local, shards, tmp_path_factory):
    """A real 2-trial sweep of `cam+fsae` on the session's Ray: (its summary, its folder).
    Read-only: tests/tuning/test_tune.py checks it, tests/tuning/test_report.py reports it."""
    from tests.helpers.runs import tiny_sweep_config
    from wsss.tuning.tune import run_sweep

    storage = tmp_path_factory.mktemp("sweeps")
    summary = run_sweep(tiny_sweep_config(shards, storage), trials=2, name="tiny", seed=3)
    return summary, storage / "tiny"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 with one empty bucket, for this module; yields the
    environment (endpoint, dummy credentials) a process needs to reach it."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    from tests.helpers.s3 import BUCKET
    from wsss.platform.runtime import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # else one log line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing",
                          region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
        yield env
    finally:
        server.stop()


@pytest.fixture
def s3(s3_env, monkeypatch):
    """The bucket's filesystem, seen through the same environment as the CLI's; in-process
    CLI calls in the test see it too."""
    from pyarrow import fs as pafs

    from tests.helpers.s3 import BUCKET

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
