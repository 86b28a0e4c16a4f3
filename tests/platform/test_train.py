"""End to end on a real local Ray: train, evaluate, resume, survive a killed worker, stop on NaN."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.runs import tiny_run_config
from wsss.platform.config import ConfigError, load_config

pytestmark = pytest.mark.slow


def test_train_evaluate_resume_and_stop_on_divergence(ray_local, shards, tmp_path):
    from wsss.platform.evaluate import evaluate_checkpoint
    from wsss.platform.loop import NonFiniteLossError
    from wsss.platform.train import fit

    result = fit(tiny_run_config(shards, tmp_path))
    assert result.metrics["epoch"] == 2 and result.metrics["resumed_from_epoch"] == 0
    written = load_config(str(tmp_path / "runs" / "run" / "config.toml"))  # the resolved config, beside checkpoints
    assert written.to_dict() == tiny_run_config(shards, tmp_path).to_dict()
    assert 0 <= result.metrics["miou"] <= 1 and result.metrics["images_per_s"] > 0
    assert 0 < result.metrics["input_wait_s"] < result.metrics["epoch_time_s"]
    info = json.loads((Path(result.checkpoint.path) / "checkpoint.json").read_text())
    assert info["epoch"] == 2

    results = evaluate_checkpoint(result.checkpoint.path, shards, scales=(1.0, 0.5), max_images=6,
                                  out=str(tmp_path / "eval"))
    assert 0 <= results["miou"] <= 1 and results["threshold"] in [float(t) for t in results["miou_by_threshold"]]
    assert (tmp_path / "eval" / "results.md").read_text().startswith("# cam on val")
    # The synthetic shards carry region maps and a co-occurring pair: both are scored.
    assert results["cooccurring_pairs"] == [["horse", "rider"]]
    for key in ("part_recall", "body_recall", "context_fpr", "cooccurrence_confusion"):
        assert 0 <= results[key] <= 1 and 0 <= result.metrics[key] <= 1, key
    fixed = evaluate_checkpoint(result.checkpoint.path, shards, scales=(1.0,), max_images=6, threshold=0.3)
    assert fixed["threshold"] == 0.3 and fixed["threshold_chosen_on"] == "given"
    assert fixed["miou"] == pytest.approx(fixed["miou_by_threshold"]["0.3"])
    with pytest.raises(ValueError, match="threshold=0.33: must be one of the swept thresholds"):
        evaluate_checkpoint(result.checkpoint.path, shards, threshold=0.33)

    resumed = fit(tiny_run_config(shards, tmp_path, epochs=3))  # same name + storage_path: continues
    assert resumed.metrics["epoch"] == 3 and resumed.metrics["resumed_from_epoch"] == 2
    with pytest.raises(ConfigError, match="output_stride=8: run .* was trained with output_stride=16"):
        fit(tiny_run_config(shards, tmp_path, epochs=4, output_stride=8))  # another model: refused, not loaded

    offline_runs = list((tmp_path / "runs" / "run").rglob("offline-run-*"))
    assert offline_runs, "a W&B offline run is written beside the checkpoints"

    # Diverging after resuming (lr 1e30) stops the run and names the last good checkpoint.
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 4.*last good checkpoint: .*checkpoint_"):
        fit(tiny_run_config(shards, tmp_path, epochs=5, lr=1e30))


def test_a_resume_checkpoint_damaged_after_upload_falls_back_to_the_newest_that_loads(ray_local, shards, tmp_path):
    """Ray Train hands back the checkpoint it registered last, whatever its file holds now."""
    from wsss.platform.train import fit

    fit(tiny_run_config(shards, tmp_path, epochs=2))
    run = tmp_path / "runs" / "run"
    newest = max(run.glob("checkpoint_*/state.pt"), key=lambda p: json.loads((p.parent / "checkpoint.json").read_text())["epoch"])
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = fit(tiny_run_config(shards, tmp_path, epochs=3))
    assert resumed.metrics["resumed_from_epoch"] == 1 and resumed.metrics["epoch"] == 3


def test_a_run_keeps_its_newest_and_best_checkpoints(ray_local, shards, tmp_path):
    """keep_checkpoints=1 over 3 epochs, the first not evaluated: Ray deletes that one (its
    score is -inf), keeps the newest and the best by miou; a resumed run continues from the
    newest and `wsss evaluate` of the run directory scores the best."""
    from wsss.platform.checkpoints import best_checkpoint
    from wsss.platform.evaluate import evaluate_checkpoint
    from wsss.platform.train import fit

    local_copies = set(Path(tempfile.gettempdir()).glob("wsss-checkpoint-*"))  # earlier tests' killed workers leave theirs
    result = fit(tiny_run_config(shards, tmp_path, epochs=3, eval_every=2, keep_checkpoints=1))
    run = tmp_path / "runs" / "run"
    kept = {json.loads(p.read_text())["epoch"]: json.loads(p.read_text())["metrics"]
            for p in run.glob("checkpoint_*/checkpoint.json")}
    assert 3 in kept and 1 not in kept and set(kept) <= {2, 3}, kept
    assert all((p.parent / "state.pt").is_file() for p in run.glob("checkpoint_*/checkpoint.json"))
    best_epoch = max(kept, key=lambda epoch: (kept[epoch]["miou"], epoch))
    best = best_checkpoint(str(run))
    assert json.loads((Path(best) / "checkpoint.json").read_text())["epoch"] == best_epoch
    assert result.checkpoint.path.endswith(max(p.parent.name for p in run.glob("checkpoint_*/state.pt")))
    assert set(Path(tempfile.gettempdir()).glob("wsss-checkpoint-*")) <= local_copies, \
        "Ray deletes the local copy after upload"

    results = evaluate_checkpoint(str(run), shards, scales=(1.0,), flip=False, max_images=2)
    assert results["checkpoint"] == best and results["epoch"] == best_epoch

    resumed = fit(tiny_run_config(shards, tmp_path, epochs=4, eval_every=2, keep_checkpoints=1))
    assert resumed.metrics["resumed_from_epoch"] == 3 and resumed.metrics["epoch"] == 4

    # the run read every training shard, checked by its read tasks: later runs skip the check
    from wsss.datasets.shards import read_manifest
    from wsss.datasets.verification import is_verified

    assert is_verified(read_manifest(shards), "train")


def test_the_ray_worker_and_the_plain_loop_validate_on_the_same_epochs(ray_local, shards, tmp_path):
    """Both feeders validate every eval_every epochs and after the last one."""
    from wsss.platform.plain import train_plain
    from wsss.platform.train import fit

    config = tiny_run_config(shards, tmp_path, name="schedule", epochs=3, eval_every=2, keep_checkpoints=0,
                             wandb="disabled")
    fit(config)
    infos = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "schedule").glob("checkpoint_*/checkpoint.json")]
    assert sorted(info["epoch"] for info in infos) == [1, 2, 3]
    on_ray = sorted(info["epoch"] for info in infos if "miou" in info["metrics"])
    _, history = train_plain(config, device="cpu")
    plain = [metrics["epoch"] for metrics in history if "miou" in metrics]
    assert on_ray == plain == [2, 3]


def test_the_same_seed_repeats_a_run(ray_local, tmp_path):
    """Same seed, same batches, same losses: the reads of many small shard files finish
    in any order, but Train hands their blocks over in order."""
    from wsss.datasets.base import build_reader
    from wsss.datasets.shards import write_shards
    from wsss.platform.train import fit

    data = str(tmp_path / "shards")
    write_shards(build_reader("synthetic", str(tmp_path / "tree"), preset="test"), data,
                 rows_per_file=4, rows_per_group=4)  # 10 train files: 10 read tasks
    losses = [fit(tiny_run_config(data, tmp_path, name=name, epochs=1, eval_every=0, wandb="disabled")).metrics["loss"]
              for name in ("first", "second")]
    assert losses[0] == losses[1]


def test_killed_worker_is_survived_from_the_last_checkpoint(ray_local, shards, tmp_path):
    from ray.util.state import list_actors

    from wsss.platform.train import fit

    # keep_checkpoints=0: the wait below counts checkpoints on disk; sync upload: a checkpoint on
    # disk is then one the controller has registered (async uploads register later)
    config = tiny_run_config(shards, tmp_path, epochs=6, max_failures=1, eval_every=0, batch_size=2,
                             keep_checkpoints=0, checkpoint_upload="sync")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=fit(config)), daemon=True)
    thread.start()
    run_dir = tmp_path / "runs" / "run"
    deadline = time.time() + 300
    # The second checkpoint on disk means the first is registered with the controller.
    while len(list(run_dir.glob("checkpoint_*/state.pt"))) < 2:
        assert time.time() < deadline and thread.is_alive(), "no checkpoint appeared"
        time.sleep(0.5)
    alive = list_actors(filters=[("state", "=", "ALIVE")])
    assert not [a for a in alive if a.class_name == "PreemptionWatcher"], "a local Ray needs no preemption watcher"
    workers = [a for a in alive if "RayTrainWorker" in a.class_name]
    assert workers, "found no Ray Train worker to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    assert thread.is_alive(), "training ended before the worker was killed: make it longer"
    thread.join(timeout=600)
    result = outcome["result"]
    assert result.metrics["epoch"] == 6
    assert result.metrics["resumed_from_epoch"] >= 1, "the restarted worker resumed from a checkpoint"


def test_csrm_starts_from_a_cam_run_and_resumes_after_that_run_is_gone(ray_local, shards, tmp_path):
    """The Ray Train worker loads `init_from` for a fresh run and only then: the
    resumed run is neither refused for its missing start nor reads it."""
    import shutil

    import torch

    from wsss.datasets.shards import read_manifest
    from wsss.methods.base import BackboneConfig, build_method
    from wsss.platform.checkpoints import load_state
    from wsss.platform.train import fit

    torch.manual_seed(5)
    cam = build_method("cam", read_manifest(shards).num_classes, backbone=BackboneConfig("resnet18", 16, "none"))
    cam_run = tmp_path / "cam-run"
    (cam_run / "checkpoint_000001").mkdir(parents=True)
    torch.save({"method": cam.state_dict()}, cam_run / "checkpoint_000001" / "state.pt")
    (cam_run / "checkpoint_000001" / "checkpoint.json").write_text("{}")  # written last: complete
    config = tiny_run_config(shards, tmp_path, method="csrm", name="csrm", epochs=1, batch_size=4, lr=1e-9,
                             eval_every=0, wandb="disabled", init_from=str(cam_run)).with_overrides(
        {"csrm.crf_workers": 0})
    state = load_state(fit(config).checkpoint.path)["method"]
    for name, start in cam.network.named_parameters():  # lr 1e-9: still the start after an epoch
        for copy in ("network", "teacher"):
            assert torch.allclose(state[f"{copy}.{name}"], start, atol=1e-6), f"{copy}.{name}"

    shutil.rmtree(cam_run)
    resumed = fit(config.with_overrides({"epochs": 2}))
    assert resumed.metrics["epoch"] == 2 and resumed.metrics["resumed_from_epoch"] == 1
