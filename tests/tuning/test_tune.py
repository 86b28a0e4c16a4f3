"""Search spaces, space files, and real sweeps on a local Ray (Tune + Optuna + Train V2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from tests.helpers.runs import tiny_sweep_config, write_run
from wsss.methods.base import ADDONS, METHODS, method_parts, required_inputs
from wsss.platform.config import ConfigError, TrainConfig
from wsss.tuning.spaces import SHARED, SpaceError, build_space, load_space_file, tunable_keys

optuna.logging.set_verbosity(optuna.logging.WARNING)


def compositions() -> list[str]:
    """Every base method alone and with each add-on its network can feed."""
    specs = list(METHODS)
    for base, cls in METHODS.items():
        for addon in ADDONS.values():
            if addon.needs_outputs <= cls.network_outputs:
                specs.append(f"{base}+{addon.name}")
    return specs


def sample(space, count: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space(study.ask()) for _ in range(count)]


@pytest.mark.parametrize("part", [*METHODS.values(), *ADDONS.values()], ids=lambda part: part.name)
def test_a_part_sweeps_its_own_keys_and_run_keys_only(part):
    """So that its space stays valid in every composition it is part of."""
    run_keys = {key for key in tunable_keys("cam") if "." not in key}
    for key in part.search_space:
        section, _, _ = key.rpartition(".")
        assert section == part.name or key in run_keys, f"{part.name} sweeps {key!r}"


@pytest.mark.parametrize("method", compositions())
def test_space_samples_valid_configs_of_every_method(method):
    space = build_space(method)
    # stage-2 methods train on pseudo-labels: any URI passes config validation
    base = TrainConfig(method=method, pseudo_labels="s3://pseudo" if "target" in required_inputs(method) else "")
    space.check_against(base)
    expected = {p.name for p in SHARED} | {key for part in method_parts(method) for key in part.search_space}
    assert sorted(space.names) == sorted(expected)  # a composed method sweeps the union, once each
    for overrides in sample(space, 25):
        assert set(overrides) == set(expected)
        config = base.with_overrides(overrides)  # raises on any invalid value
        for key, value in overrides.items():
            section, _, field = key.rpartition(".")
            actual = getattr(config.sections[section], field) if section else getattr(config, key)
            assert actual == value


def test_stage2_sweeps_its_own_lr_range():
    ranges = {method: next(p for p in build_space(method).params if p.name == "lr")
              for method in ("cam", "deeplab", "deeplab+ocr")}
    assert (ranges["cam"].low, ranges["cam"].high) == (1e-3, 1e-1)
    assert ranges["deeplab"] == ranges["deeplab+ocr"]
    assert (ranges["deeplab"].low, ranges["deeplab"].high) == (1e-4, 1e-2)


def test_composed_space_is_the_union_of_its_parts():
    lnl, fsae, both = build_space("lnl"), build_space("cam+fsae"), build_space("lnl+fsae")
    assert set(both.names) == set(lnl.names) | set(fsae.names)


def test_paper_parameters_are_swept():
    names = set(build_space("lnl+fsae").names)
    assert {"lr", "lnl.seed_threshold", "lnl.contrast_weight", "lnl.bank_momentum", "lnl.temperature",
            "lnl.num_prototypes", "lnl.erosion", "lnl.warmup_epochs", "fsae.dilation_kernel", "fsae.fae_threshold",
            "fsae.sae_threshold", "fsae.loss_weight"} <= names
    params = {p.name: p for p in build_space("lnl+fsae").params}
    assert params["lnl.temperature"].log and params["fsae.dilation_kernel"].choices == (1, 3, 5, 7)
    assert {"ocr.margin", "ocr.ic_threshold", "ocr.rectification_weight"} <= set(ADDONS["ocr"].search_space)
    assert {"csrm.temperature", "csrm.negatives_per_query", "csrm.queries_per_class", "csrm.fg_threshold",
            "csrm.bg_threshold", "csrm.rank_low", "csrm.rank_high",
            "csrm.decoder_lr_mult"} <= set(METHODS["csrm"].search_space)


def test_erosion_kernels_are_odd():
    assert {o["lnl.erosion"] for o in sample(build_space("lnl"), 60)} == {1, 3, 5, 7}


def test_conditional_parameter_is_sampled_above_its_partner():
    # the CSRM γ_h > γ_l rule, on a parameter pair every method has: epochs > warm-up
    specs = {"fsae.warmup_epochs": {"type": "int", "low": 0, "high": 4},
             "epochs": {"type": "int", "low": 1, "high": 6, "above": "fsae.warmup_epochs"}}
    space = build_space("cam+fsae", specs)
    assert space.names.index("epochs") > space.names.index("fsae.warmup_epochs")
    draws = sample(space, 80)
    assert all(d["epochs"] > d["fsae.warmup_epochs"] for d in draws)
    assert {d["fsae.warmup_epochs"] for d in draws} == set(range(5))  # the partner's whole range


def test_csrm_rank_high_exceeds_rank_low():
    assert all(d["csrm.rank_high"] > d["csrm.rank_low"] for d in sample(build_space("csrm"), 80))


def test_space_file_narrows_and_replaces(tmp_path):
    toml = tmp_path / "space.toml"
    toml.write_text('[lnl.seed_threshold]\nlow = 0.7\nhigh = 0.9\n\n'
                    '["fsae.dilation_kernel"]\nchoices = [3, 5]\n\n'
                    '[lr]\ntype = "categorical"\nchoices = [0.01, 0.02]\n\n'
                    '[weight_decay]\ntype = "float"\nlow = 1e-5\nhigh = 1e-3\nlog = true\n')
    specs = load_space_file(toml)
    assert set(specs) == {"lnl.seed_threshold", "fsae.dilation_kernel", "lr", "weight_decay"}
    space = build_space("lnl+fsae", specs)
    params = {p.name: p for p in space.params}
    assert params["lnl.seed_threshold"].type == "float" and not params["lnl.seed_threshold"].log  # narrowed, rest kept
    for draw in sample(space, 40):
        assert 0.7 <= draw["lnl.seed_threshold"] <= 0.9
        assert draw["fsae.dilation_kernel"] in (3, 5)
        assert draw["lr"] in (0.01, 0.02)
        assert 1e-5 <= draw["weight_decay"] <= 1e-3
        TrainConfig(method="lnl+fsae").with_overrides(draw)


def test_json_space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"fsae.loss_weight": {"low": 0.5, "high": 1.5}}))
    assert load_space_file(path) == {"fsae.loss_weight": {"low": 0.5, "high": 1.5}}


@pytest.mark.parametrize("name, spec, message", [
    ("fsae.loss_weight", {"low": 2.0, "high": 1.0}, "low (2.0) must be < high (1.0)"),
    ("fsae.loss_weight", {"low": 1.0, "high": 1.0}, "must be < high"),
    ("lr", {"low": 0.0, "high": 0.1}, "log scale needs low > 0"),
    ("fsae.sae_threshold", {"log": True, "low": -0.5}, "log scale needs low > 0"),
    ("fsae.dilation_kernel", {"choices": []}, "non-empty list of choices"),
    ("fsae.nonsense", {"type": "float", "low": 0, "high": 1}, "unknown parameter"),
    ("fsae.loss_weight", {"lo": 0.1}, "unknown field"),
    ("momentum", {"low": 0.5, "high": 0.9}, "needs a type"),
    ("momentum", {"type": "normal", "low": 0.5, "high": 0.9}, "must be one of float, int, categorical"),
    ("epochs", {"type": "int", "low": 1.5, "high": 4}, "must be an integer"),
    ("fsae.loss_weight", {"low": "a", "high": 1.0}, "must be a finite number"),
    ("fsae.loss_weight", {"step": 0.1}, "log scale and a step"),
    ("fsae.dilation_kernel", {"type": "categorical", "choices": [3], "low": 1}, "choices only"),
    ("data", {"type": "categorical", "choices": ["a"]}, "unknown parameter"),
    ("fsae.fae_threshold", {"above": "fsae.nowhere"}, "is not a parameter of this space"),
    ("fsae.tau_fae", {"low": 0.9, "high": 0.95}, "is now 'fsae.fae_threshold'"),
])
def test_invalid_space_is_an_error_naming_the_parameter(name, spec, message):
    with pytest.raises(SpaceError, match=re.escape(message)) as error:
        build_space("cam+fsae", {name: spec})
    assert repr(name) in str(error.value)


def test_conditional_range_that_can_be_empty_is_an_error():
    specs = {"fsae.warmup_epochs": {"type": "int", "low": 0, "high": 5},
             "epochs": {"type": "int", "low": 1, "high": 5, "above": "fsae.warmup_epochs"}}
    with pytest.raises(SpaceError, match="'epochs'.*leaves no value above"):
        build_space("cam+fsae", specs)


def test_cycle_of_conditionals_is_an_error():
    specs = {"fsae.loss_weight": {"above": "fsae.fae_threshold"}, "fsae.fae_threshold": {"above": "fsae.loss_weight"}}
    with pytest.raises(SpaceError, match="cycle"):
        build_space("cam+fsae", specs)


def test_values_the_method_rejects_fail_before_any_trial():
    space = build_space("cam+fsae", {"fsae.fae_threshold": {"low": 0.9, "high": 1.5}})  # a range is fine...
    with pytest.raises(SpaceError, match="'fsae.fae_threshold'.*not a valid config"):
        space.check_against(TrainConfig(method="cam+fsae"))  # ...but τ_FAE > 1 is not a config
    with pytest.raises(SpaceError, match="'fsae.dilation_kernel'"):
        build_space("cam+fsae", {"fsae.dilation_kernel": {"choices": [2, 3]}}).check_against(
            TrainConfig(method="cam+fsae"))


def test_unknown_method_is_an_error():
    with pytest.raises(SpaceError, match="unknown base method"):
        build_space("nosuch")


@pytest.mark.parametrize("name, text, message", [
    ("space.yaml", "a: 1", "expected a .toml or .json"),
    ("space.toml", "[lnl.seed_threshold\nlow = 1", "not valid TOML"),
    ("space.json", "{", "not valid JSON"),
    ("space.json", "[1, 2]", "expected a table"),
])
def test_bad_space_file_is_an_error_naming_it(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpaceError, match=message) as error:
        load_space_file(path)
    assert str(path) in str(error.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(SpaceError, match="no such file"):
        load_space_file(tmp_path / "absent.toml")


def test_space_is_picklable_for_tune_checkpoints():
    import pickle

    space = build_space("lnl+fsae")
    assert pickle.loads(pickle.dumps(space)) == space


# ---- sweeps on a real local Ray ------------------------------------------------------

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


@pytest.fixture(scope="module")
def tiny_sweep(ray_local, shards, tmp_path_factory):
    from wsss.tuning.tune import run_sweep

    storage = tmp_path_factory.mktemp("sweeps")
    summary = run_sweep(tiny_sweep_config(shards, storage), trials=2, name="tiny", seed=3)
    return summary, storage / "tiny"


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


@pytest.mark.slow
def test_report_of_a_real_sweep(tiny_sweep, tmp_path):
    from PIL import Image

    from wsss.tuning.report import make_report

    summary, sweep_dir = tiny_sweep
    result = make_report([str(sweep_dir)], str(tmp_path / "report"))
    table = (tmp_path / "report" / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| cam+fsae"))
    assert f"{100 * summary['miou']:.2f}" in row and f"{100 * summary['evaluation']['miou']:.2f}" in row
    assert "| 1 |" in row  # one seed
    trials = {json.loads(p.read_text().splitlines()[-1])["trial_id"] for p in sweep_dir.glob("trial_*/result.json")}
    expected = {"tiny-history.png"} | {f"tiny-{name}.png" for name in summary["params"]}
    curves = {f"tiny-{trial}.png" for trial in trials}
    assert {Path(p).name for p in result["plots"]} == expected | curves | {"cam-fsae-synthetic.png"}
    for plot in result["plots"]:
        if Path(plot).name in expected:
            assert Image.open(plot).size == (640, 420)
    curve = Image.open(tmp_path / "report" / "curves" / f"tiny-{summary['trial_id']}.png")
    epochs = [json.loads(line) for path in sweep_dir.glob("trial_*/result.json")
              for line in path.read_text().splitlines() if json.loads(line)["trial_id"] == summary["trial_id"]]
    noted = any(key.startswith("fsae/") for epoch in epochs for key in epoch)  # not while fsae warms up
    assert curve.height == 30 + (3 if noted else 2) * 260  # loss, mIoU and fsae's label shares
    html = (tmp_path / "report" / "table.html").read_text()
    assert "<td>cam+fsae</td>" in html
    records = (tmp_path / "report" / "records.csv").read_text().splitlines()
    assert len(records) == 3  # header + two trials


@pytest.mark.slow
def test_report_of_a_real_sweep_writes_its_optuna_plots_as_html(tiny_sweep, tmp_path):
    pytest.importorskip("plotly")
    from wsss.tuning.report import STUDY_PLOTS, make_report

    _, sweep_dir = tiny_sweep
    result = make_report([str(sweep_dir)], str(tmp_path / "report"))
    plots = tmp_path / "report" / "plots"
    written = {Path(p).name for p in result["html"]}
    assert {"tiny-history.html", "tiny-slices.html"} <= written, result["notes"]
    for kind in STUDY_PLOTS:  # each written, or left out with the reason named
        assert f"tiny-{kind}.html" in written or any(note.startswith(f"tiny-{kind}:") for note in result["notes"])
    for page in written:
        assert 'src="plotly.min.js"' in (plots / page).read_text()  # one shared copy, opens offline
    assert (plots / "plotly.min.js").stat().st_size > 1_000_000


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


# ---- report from run directories -----------------------------------------------------

def test_trials_and_integer_parameters_get_whole_number_ticks():
    from wsss.tuning.plots import integer_ticks

    assert integer_ticks(0.96, 2.04) == [1, 2]
    assert integer_ticks(0.5, 40.5) == [1, 6, 11, 16, 21, 26, 31, 36]  # at most 8
    assert integer_ticks(2.9, 3.1) == [3]


def test_report_table_over_seeds_from_run_directories(tmp_path):
    from wsss.tuning.report import make_report

    runs = tmp_path / "runs"
    write_run(runs, "cam-s0", [0.20, 0.30], seed=0, lr=0.02, full=0.36)
    write_run(runs, "cam-s1", [0.25, 0.34], seed=1, lr=0.02, full=0.38)  # the best seed
    write_run(runs, "cam-other", [0.31], seed=0, lr=0.05)  # one seed of a worse configuration
    write_run(runs, "fsae-s0", [0.40], method="cam+fsae", seed=0, **{"sections": {}})
    result = make_report([str(runs)], str(tmp_path / "out"))
    assert result["rows"] == 2 and result["records"] == 4
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    cam = next(line for line in table if line.startswith("| cam |"))
    # best configuration (lr 0.02, mean 0.32 over 2 seeds) beats the single 0.31 run
    assert "| 32.00 ± 2.83 | 2 | 37.00 |" in cam and "lr=0.02" in cam
    fsae = next(line for line in table if line.startswith("| cam+fsae |"))
    assert "| 40.00 | 1 | — |" in fsae and "fsae.dilation_kernel=3" in fsae
    rows = (tmp_path / "out" / "table.csv").read_text().splitlines()
    assert rows[0].startswith("method,dataset,miou_mean,miou_std,seeds") and len(rows) == 3
    curves = sorted(p.name for p in (tmp_path / "out" / "curves").glob("*.png"))
    assert curves == ["cam-other.png", "cam-s0.png", "cam-s1.png", "fsae-s0.png"]  # every record's
    assert "W&B is offline" in result["wandb"]


def test_wandb_report_page_shows_the_same_table(tmp_path):
    """The W&B Report is built from table.md and the logged wandb.Table. Saving it needs
    W&B online, which the tests never are: this checks the page `wsss report` would save."""
    import wandb_workspaces.reports.v2 as wr

    from wsss.tuning.report import TABLE_KEY, comparison_report

    markdown = "| method | CAM mIoU |\n|---|---|\n| cam | 32.00 ± 2.83 |\n"
    page = comparison_report(markdown, project="wsss", entity="lab", run_name="comparison-1")
    assert (page.project, page.entity) == ("wsss", "lab")
    assert markdown in [block.text for block in page.blocks if isinstance(block, wr.MarkdownBlock)]
    grid = next(block for block in page.blocks if isinstance(block, wr.PanelGrid))
    assert [(r.entity, r.project, r.query) for r in grid.runsets] == [("lab", "wsss", "comparison-1")]
    assert [p.table_name for p in grid.panels] == [TABLE_KEY]


def test_report_errors_name_the_directory(tmp_path):
    from wsss.tuning.report import make_report

    (tmp_path / "empty").mkdir()
    for location, message in [(tmp_path / "absent", "no such directory"),
                              (tmp_path / "empty", "holds no sweep")]:
        with pytest.raises(ConfigError, match=message) as error:
            make_report([str(location)], str(tmp_path / "out"))
        assert str(location) in str(error.value)


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
