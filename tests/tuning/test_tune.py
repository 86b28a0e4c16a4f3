"""`wsss tune` (`wsss/tuning/tune.py`): settings checked before Ray starts, and real sweeps on a
local Ray (Tune + Optuna + Train V2): their trials, study, W&B runs, a killed driver, a diverged trial."""

from __future__ import annotations

import json
import re

import optuna
import pytest

from tests.helpers.runs import tiny_sweep_config, write_run
from wsss.platform.config import ConfigError, TrainConfig
from wsss.tuning.spaces import SpaceError, build_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("change, message", [
    (dict(trials=0), "--trials 0: must be >= 1"),
    (dict(scheduler="hyperband"), "--scheduler 'hyperband': must be asha or none"),
    (dict(concurrency=0), "--concurrency 0: must be >= 1"),
    (dict(config=dict(val_split="")), "set val_split"),
    (dict(config=dict(eval_every=2)), "keep eval_every=1"),
    (dict(config=dict(val_split="test")), "test"),
    (dict(space_specs={"fsae.dilation_kernel": {"choices": [2]}}), "'fsae.dilation_kernel'"),
    (dict(resume=True), "no sweep 'bad'"),
])
def test_bad_sweep_settings_fail_before_ray_starts(shards, tmp_path, change, message):
    import ray

    from wsss.io import DataError
    from wsss.tuning.tune import run_sweep

    config = tiny_sweep_config(shards, tmp_path, **change.pop("config", {}))
    was_running = ray.is_initialized()
    with pytest.raises((SpaceError, ConfigError, DataError), match=re.escape(message)):
        run_sweep(config, **{"trials": 2, "name": "bad", **change})
    assert ray.is_initialized() == was_running


def test_existing_sweep_name_needs_resume(shards, tmp_path):
    from wsss.io import write_json
    from wsss.tuning.tune import run_sweep

    write_json(str(tmp_path / "taken" / "sweep.json"), {"name": "taken"})
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        run_sweep(tiny_sweep_config(shards, tmp_path), trials=2, name="taken")


def test_resume_needs_tune_state(shards, tmp_path):
    from wsss.io import write_json
    from wsss.tuning.tune import run_sweep

    write_json(str(tmp_path / "early" / "sweep.json"), {"name": "early"})  # killed before Tune started
    with pytest.raises(ConfigError, match="no Tune experiment state"):
        run_sweep(tiny_sweep_config(shards, tmp_path), trials=2, name="early", resume=True)


def test_cli_requires_method_data_trials_unless_resuming(shards, tmp_path):
    from wsss.cli import main

    assert main(["tune", "--data", shards, "--trials", "2"]) == 2  # no --method
    assert main(["tune", "--resume"]) == 2  # no --name
    assert main(["tune", "--resume", "--name", "nothing", f"storage_path={tmp_path}"]) == 2


@pytest.mark.slow
def test_concurrency_follows_what_a_trial_needs(ray_local):
    from wsss.tuning.tune import max_concurrent_trials, trial_resources

    cpus = int(ray_local.cluster_resources()["CPU"])
    assert max_concurrent_trials(TrainConfig(num_workers=1, device="cpu"), None) == cpus // 2
    assert max_concurrent_trials(TrainConfig(num_workers=4, device="cpu"), None) == 1  # never 0
    assert max_concurrent_trials(TrainConfig(), 3) == 3  # --concurrency wins
    assert trial_resources()["CPU"] == 0  # the trial driver leaves every CPU to its workers


@pytest.mark.slow
def test_tiny_sweep_runs_its_trials_and_evaluates_the_best(tiny_sweep):
    summary, sweep_dir = tiny_sweep
    assert summary["trials"] == 2 and summary["finished"] == 2 and summary["errored"] == 0
    assert json.loads((sweep_dir / "best.json").read_text()) == json.loads(json.dumps(summary, default=str))
    trials = sorted(sweep_dir.glob("trial_*/result.json"))
    assert len(trials) == 2
    finals = {}
    for path in trials:
        last = json.loads(path.read_text().splitlines()[-1])
        assert {"miou", "epoch", "threshold", "loss", "checkpoint_path"} <= set(last)
        finals[last["trial_id"]] = last["miou"]
    assert summary["miou"] == max(finals.values()) and finals[summary["trial_id"]] == summary["miou"]
    assert set(summary["params"]) == set(build_space("cam+fsae").names)
    evaluation = summary["evaluation"]  # the full protocol: four scales and flips
    assert evaluation["scales"] == [1.0, 0.5, 1.5, 2.0] and evaluation["flip"] is True
    assert 0.0 <= evaluation["miou"] <= 1.0
    assert (sweep_dir / "train" / summary["trial_id"]).is_dir()  # each trial's own Train run


@pytest.mark.slow
def test_sweep_keeps_its_optuna_study_in_sqlite(tiny_sweep):
    summary, sweep_dir = tiny_sweep
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert study.best_value == pytest.approx(summary["miou"])
    assert study.best_params == summary["params"]


@pytest.mark.slow
def test_each_trial_is_one_offline_wandb_run_with_cam_overlays(tiny_sweep):
    summary, sweep_dir = tiny_sweep
    trial_ids = {json.loads(p.read_text().splitlines()[-1])["trial_id"]
                 for p in sweep_dir.glob("trial_*/result.json")}
    for trial_id in trial_ids:
        # beside the trial's checkpoints; the best trial's full evaluation resumed it in a second folder
        run = sorted((sweep_dir / "train" / trial_id).glob("wandb/offline-run-*"))[0]
        log = (run / "logs" / "debug.log").read_text()
        assert "'method': 'cam+fsae'" in log and "'wandb_group': 'tiny'" in log
        config_line = next(line for line in log.splitlines() if line.startswith("config:"))
        assert not re.search(r"'[^']*(key|token|secret|password)[^']*':", config_line, re.IGNORECASE)
        assert list((run / "files" / "media" / "images").glob("cam_overlays_*.png"))


def test_trials_a_killed_driver_sampled_but_never_saved_are_marked_failed(tmp_path):
    from wsss.tuning.tune import fail_abandoned_trials

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    done = study.ask()
    study.tell(done, 0.5)
    study.ask()  # sampled, then the driver died before Tune saved the trial
    assert fail_abandoned_trials(storage, "s") == [1]
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert fail_abandoned_trials(storage, "s") == []


@pytest.mark.slow
def test_killed_driver_resumes_and_finishes_the_requested_trials(ray_local, shards, tmp_path):
    """The driver dies (SIGKILL) after the first trial; --resume restores Tune's experiment
    and the searcher, reruns the trial in flight and stops at the requested count."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from wsss.cli import main

    storage, trials = tmp_path / "sweeps", 2
    command = [sys.executable, "-m", "wsss", "tune", "--method", "cam", "--data", shards, "--trials",
               str(trials), f"storage_path={storage}", "--name", "killed", "--seed", "5", "--no-eval",
               "epochs=1", "batch_size=8", "crop_size=64", "backbone=resnet18", "backbone_weights=none",
               "eval_max_images=4", "wandb=offline"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sweep_dir = storage / "killed"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        states = "".join(p.read_text() for p in sweep_dir.glob("experiment_state-*.json"))
        if "TERMINATED" in states:
            break
        time.sleep(2)
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    first = [json.loads(p.read_text().splitlines()[-1]) for p in sweep_dir.glob("trial_*/result.json")
             if p.read_text().strip()]
    assert len(first) >= 1

    assert main(["tune", "--resume", "--name", "killed", f"storage_path={storage}", "--no-eval"]) == 0
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trials"] == trials and best["finished"] == trials
    finals = [json.loads(p.read_text().splitlines()[-1]) for p in sweep_dir.glob("trial_*/result.json")]
    assert len(finals) == trials
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    # A trial sampled by the killed driver before Tune saved it is FAIL, never left RUNNING.
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == trials
    assert set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}
    for done in first:  # finished before the kill: kept, not trained again
        again = next(f for f in finals if f["trial_id"] == done["trial_id"])
        assert again["miou"] == done["miou"]
        assert len(list((sweep_dir / "train" / done["trial_id"]).glob("checkpoint_*/"))) == 1


def test_a_trial_restarted_after_its_last_epoch_reports_its_checkpoint(tmp_path):
    from wsss.tuning.tune import finished_run_metrics

    run = write_run(tmp_path, "trial", [0.2, 0.3])
    metrics = finished_run_metrics(str(run), epochs=2)
    assert metrics["miou"] == 0.3 and metrics["epoch"] == 2
    assert metrics["checkpoint_path"] == str(sorted(run.glob("checkpoint_*"))[-1])
    assert finished_run_metrics(str(run), epochs=3) is None  # still has an epoch to train
    assert finished_run_metrics(str(tmp_path / "never-started"), epochs=1) is None


@pytest.mark.slow
def test_a_diverged_trial_is_marked_diverged_scores_0_and_is_never_the_best(ray_local, shards, tmp_path):
    from wsss.tuning.report import make_report
    from wsss.tuning.tune import run_sweep

    # TPE's seeded start samples lr 1e30 (NaN loss in its first epoch), then 0.02
    space = {"lr": {"type": "categorical", "choices": [0.02, 1e30]}}
    summary = run_sweep(tiny_sweep_config(shards, tmp_path, method="cam"), trials=2, space_specs=space, seed=0,
                        name="nan", concurrency=1, evaluate_best=False)
    assert summary["finished"] == 1 and summary["errored"] == 0 and len(summary["diverged"]) == 1
    (diverged_id, note), = summary["diverged"].items()
    assert "non-finite loss at epoch 1" in note
    assert summary["trial_id"] != diverged_id and summary["params"] == {"lr": 0.02}
    assert json.loads((tmp_path / "nan" / "best.json").read_text())["diverged"] == summary["diverged"]
    last = {}
    for path in (tmp_path / "nan").glob("trial_*/result.json"):
        result = json.loads(path.read_text().splitlines()[-1])
        last[result["trial_id"]] = result
    assert last[diverged_id]["diverged"] is True and last[diverged_id]["miou"] == 0.0
    study = optuna.load_study(study_name="nan", storage=f"sqlite:///{tmp_path / 'nan' / 'optuna.db'}")
    assert sorted(t.value for t in study.trials) == [0.0, last[summary["trial_id"]]["miou"]]

    report = make_report([str(tmp_path / "nan")], str(tmp_path / "report"))
    assert report["rows"] == 1
    table = (tmp_path / "report" / "table.md").read_text()
    assert f"Diverged (loss NaN or infinite; not ranked): nan/{diverged_id}" in table and "lr=0.02" in table
    records = (tmp_path / "report" / "records.csv").read_text().splitlines()
    assert [line.rsplit(",", 1)[-1] for line in records[1:]].count("True") == 1
