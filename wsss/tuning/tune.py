"""`wsss tune`: a Ray Tune sweep of a method's hyperparameters (Optuna TPE, ASHA, W&B).

Each trial is a small driver function: it builds the method's TorchTrainer (Train V2)
with the sampled overrides and fits it; the trainer's `TuneReportCallback` passes every
epoch's metrics to Tune. The objective is `miou`, the single-scale CAM mIoU at the best
background threshold on the held-out split, maximised; ASHA stops weak trials at epoch
rungs. The trial function itself holds no CPU (its Train workers reserve their own
placement group), so how many trials run at once is decided here from what a trial's
workers and data pipeline need against the cluster, never by Tune's default of one
trial per CPU, which would starve the workers and deadlock.

Sweep directory `<storage_path>/<name>/`: Tune's experiment (a trial directory each),
`sweep.json` (the settings `--resume` needs), `train/<trial id>/` (each trial's Train
run and checkpoints), `best.json` (the best trial, evaluated with the full protocol)
and, for local storage, the Optuna study `optuna.db` (SQLite; `optuna-dashboard
sqlite:///.../optuna.db`). `--resume` restores Tune's experiment with the searcher's
saved state; unfinished trials restart and their Train runs continue from their last
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime

import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY as CHECKPOINT_PATH
from ray.tune.integration.ray_train import TuneReportCallback

from wsss.datasets.lease import acquire
from wsss.datasets.shards import read_manifest
from wsss.io import (
    canonical,
    delete_file,
    is_redacted,
    is_uri,
    join,
    public_uri,
    read_json,
    read_text,
    resolve,
    write_json,
)
from wsss.platform.config import ConfigError, TrainConfig, check_name, load_config, parse_overrides
from wsss.platform.runtime import ensure_ray
from wsss.platform.tracking import public_config, resolve_mode
from wsss.tuning.spaces import SearchSpace, build_space, load_space_file

logger = logging.getLogger(__name__)

OBJECTIVE = "miou"
DIVERGED = "diverged"  # a trial's last result: its loss became NaN or infinite
HEAD_DRIVER_RESOURCE = "head_driver"  # custom resource of the head node in cluster.yaml
SWEEP_FILE = "sweep.json"
BEST_FILE = "best.json"
TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes: a Python process with torch and Ray imported
DATA_CPUS_PER_TRIAL = 1  # Ray Data's decode/augment tasks beside each trial's Train workers


def run_sweep(config: TrainConfig, *, trials: int, space_specs: dict | None = None,
              scheduler: str = "asha", concurrency: int | None = None, seed: int = 0,
              name: str | None = None, study_storage: str | None = None, resume: bool = False,
              evaluate_best: bool = True) -> dict:
    """Runs (or with `resume`, continues) a sweep and returns the summary in best.json.

    `config` is the base run every trial overrides; `space_specs` narrow or replace the
    method's default space (see `wsss.tuning.spaces`). Everything is validated, and the
    settings written to sweep.json, before Ray starts any trial.
    """
    name = name or f"tune-{config.method.replace('+', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    sweep_dir = join(config.storage_path, name)  # absolute path or URI
    settings = {"name": name, "trials": trials, "space": space_specs or {}, "scheduler": scheduler,
                "concurrency": concurrency, "seed": seed,
                "study_storage": study_storage or default_study_storage(sweep_dir, name),
                "config": config.to_dict()}
    check_name(name, "--name")
    space = _validate(config, settings)
    if resume:
        if read_json(join(sweep_dir, SWEEP_FILE)) is None:
            raise ConfigError(f"--resume: no sweep {name!r} at {public_uri(sweep_dir)} (no {SWEEP_FILE})")
        if not tune.Tuner.can_restore(sweep_dir):
            raise ConfigError(f"--resume: {public_uri(sweep_dir)} holds no Tune experiment state to restore; "
                              f"start the sweep again under a new --name")
    with acquire(sweep_dir, "wsss tune"):  # one driver per sweep, also for --resume
        if not resume:
            if read_json(join(sweep_dir, SWEEP_FILE)) is not None:
                raise ConfigError(f"--name {name}: a sweep already exists at {public_uri(sweep_dir)}; add "
                                  "--resume to continue it or choose another name")
            write_json(join(sweep_dir, SWEEP_FILE), public_config(settings))
        return _sweep(config, settings, space, sweep_dir, resume=resume, evaluate_best=evaluate_best)


def _sweep(config: TrainConfig, settings: dict, space: SearchSpace, sweep_dir: str, *, resume: bool,
           evaluate_best: bool) -> dict:
    name, seed, trials = settings["name"], settings["seed"], settings["trials"]
    dataset = read_manifest(config.data).dataset

    ensure_ray()
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config.to_dict(), train_storage=join(sweep_dir, "train"),
                             wandb=resolve_mode(config.wandb), sweep_name=name),
        trial_resources())
    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"run": public_config(config.to_dict()) | {"dataset": dataset}},
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE, mode="max", num_samples=trials,
                search_alg=optuna_search(space, settings["study_storage"], name, seed),
                scheduler=asha(config.epochs) if settings["scheduler"] == "asha" else None,
                max_concurrent_trials=max_concurrent_trials(config, settings["concurrency"]),
                trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=canonical(config.storage_path),
                                      failure_config=tune.FailureConfig(max_failures=0)))
    results = tuner.fit()
    if results.num_terminated + results.num_errors == len(results):  # interrupted: trials wait for --resume
        fail_abandoned_trials(settings["study_storage"], name)
    summary = summarize(results, name, sweep_dir)
    if evaluate_best and summary.get("checkpoint"):
        summary["evaluation"] = full_evaluation(summary["checkpoint"], config)
    summary = public_config(summary)
    write_json(join(sweep_dir, BEST_FILE), summary)
    return summary


def run_trial(params: dict, base: dict, train_storage: str, wandb: str, sweep_name: str) -> None:
    """One Tune trial: a Train V2 run of the base config with this trial's overrides."""
    from wsss.platform.train import DIVERGED_FILE, make_trainer, remember_read_splits

    overrides = {k: v for k, v in params.items() if k != "run"}
    # The trial's name is its Tune id, so a trial restarted by --resume continues its Train
    # run from the last checkpoint, and its W&B run too. Its W&B run is the Train run's, as
    # for `wsss train` (scalars, CAM overlays), grouped by sweep; `wandb` is the mode the
    # driver resolved, as the workers may not see this machine's W&B login.
    config = TrainConfig.from_dict(base).with_overrides(
        {**overrides, "name": tune.get_context().get_trial_id(), "storage_path": train_storage,
         "wandb": wandb, "wandb_group": sweep_name})
    run_dir = join(train_storage, config.name)
    finished = finished_run_metrics(run_dir, config.epochs)
    if finished:  # restarted by --resume after its last epoch: training would report nothing
        tune.report(finished)
        return
    delete_file(join(run_dir, DIVERGED_FILE))  # a note left by an earlier attempt of this trial
    make_trainer(config, callbacks=[ObjectiveReport()]).fit()
    if config.verify_data:  # later trials read the shards without checking them again
        remember_read_splits(config)
    note = read_text(join(run_dir, DIVERGED_FILE))
    if note is not None:
        # The Train run stopped without an error; this last result makes the trial score 0
        # for the searcher and marks it diverged, so it is never the sweep's best.
        last = last_checkpoint(run_dir)
        tune.report({OBJECTIVE: 0.0, DIVERGED: True, "diverged_at": note,
                     "epoch": (last[1]["epoch"] if last else 0) + 1})


def last_checkpoint(run_dir: str) -> tuple[str, dict] | None:
    """(location, checkpoint.json) of the newest checkpoint of the Train run at `run_dir`."""
    from pyarrow.fs import FileSelector, FileType

    from wsss.platform.checkpoints import INFO_FILE

    fs, path = resolve(run_dir)
    entries = fs.get_file_info(FileSelector(path, allow_not_found=True))
    checkpoints = sorted(e.base_name for e in entries
                         if e.type == FileType.Directory and e.base_name.startswith("checkpoint_"))
    info = read_json(join(run_dir, checkpoints[-1], INFO_FILE)) if checkpoints else None
    return (join(run_dir, checkpoints[-1]), info) if info else None


def finished_run_metrics(run_dir: str, epochs: int) -> dict | None:
    """The last checkpoint's metrics if the Train run at `run_dir` has trained all epochs."""
    last = last_checkpoint(run_dir)
    if not last or last[1]["epoch"] < epochs:
        return None
    return {OBJECTIVE: 0.0, **last[1]["metrics"], CHECKPOINT_PATH: last[0]}


class ObjectiveReport(TuneReportCallback):
    """Passes each epoch's metrics to Tune; an epoch without `miou` scores 0, so the
    searcher learns from it instead of the sweep stopping on a missing metric."""

    def after_report(self, run_context, metrics, checkpoint):
        first = {OBJECTIVE: 0.0, **metrics[0]}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def optuna_search(space: SearchSpace, study_storage: str, study_name: str, seed: int):
    """Seeded TPE over the define-by-run space; the study lives in `study_storage`."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space=space, metric=OBJECTIVE, mode="max",
                        sampler=optuna.samplers.TPESampler(seed=seed), study_name=study_name,
                        storage=optuna.storages.RDBStorage(study_storage))


def fail_abandoned_trials(study_storage: str, study_name: str) -> list[int]:
    """Marks FAIL the Optuna trials a killed driver sampled but Tune never saved.

    Optuna writes a sampled trial at once; Tune saves its experiment every few seconds.
    A driver killed in between leaves that trial RUNNING, and the resumed sweep samples
    a new one in its place. Call it only when every Tune trial has ended (and been told):
    then any trial still RUNNING belongs to no one. Returns their numbers.
    """
    import optuna

    study = optuna.load_study(study_name=study_name, storage=study_storage)
    abandoned = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in abandoned:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    if abandoned:
        logger.warning("Optuna trials %s were sampled by a driver that stopped before Tune saved them; "
                       "marked FAIL", abandoned)
    return abandoned


def asha(epochs: int):
    """ASHA on the per-epoch objective: rungs at 1, 2, 4, ... epochs."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=2)


def trial_resources() -> dict:
    """What the trial driver itself holds: no CPU, the memory its process uses (Tune
    refuses an empty request), and a driver slot on the head where the cluster has them."""
    resources = {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    if ray.cluster_resources().get(HEAD_DRIVER_RESOURCE):
        resources[HEAD_DRIVER_RESOURCE] = 1
    return resources


def max_concurrent_trials(config: TrainConfig, requested: int | None) -> int:
    """Trials whose Train workers and data tasks fit in the cluster at once (>= 1).

    An autoscaling cluster shows only the nodes up now: pass --concurrency there.
    """
    if requested:
        return requested
    from wsss.platform.train import resolve_use_gpu

    available = ray.cluster_resources()
    use_gpu = resolve_use_gpu(config.device)
    fits = int(available.get("CPU", 0) // (config.num_workers + DATA_CPUS_PER_TRIAL))
    if use_gpu:
        fits = min(fits, int(available.get("GPU", 0) // config.num_workers))
    return max(1, fits)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def summarize(results, name: str, sweep_dir: str) -> dict:
    """Best trial by its final objective (what Optuna records), with its checkpoint; a
    diverged trial is listed as such and never the best."""
    diverged = [r for r in results if r.metrics and r.metrics.get(DIVERGED)]
    finished = [r for r in results if r.metrics and OBJECTIVE in r.metrics and not r.metrics.get(DIVERGED)]
    summary = {"sweep": name, "sweep_dir": sweep_dir, "trials": len(results),
               "finished": len(finished), "errored": len(results.errors),
               "diverged": {r.metrics.get("trial_id"): r.metrics.get("diverged_at") for r in diverged}}
    if not finished:
        return summary
    best = max(finished, key=lambda r: r.metrics[OBJECTIVE])
    summary.update({
        "trial_id": best.metrics.get("trial_id"), "miou": best.metrics[OBJECTIVE],
        "threshold": best.metrics.get("threshold"), "epoch": best.metrics.get("epoch"),
        "params": {k: v for k, v in best.config.items() if k != "run"},
        "checkpoint": best.metrics.get(CHECKPOINT_PATH),
    })
    return summary


def full_evaluation(checkpoint: str, config: TrainConfig) -> dict:
    """The full protocol on the held-out split: multi-scale + flip CAMs with a threshold
    sweep, or for stage-2 methods (`validates == "segmentation"`) `wsss segment`'s."""
    from wsss.methods.base import parse_method

    if parse_method(config.method)[0].validates == "segmentation":
        from wsss.platform.segmentation import evaluate_segmentation

        results = evaluate_segmentation(checkpoint, config.data, split=config.val_split)
    else:
        from wsss.platform.evaluate import evaluate_checkpoint

        results = evaluate_checkpoint(checkpoint, config.data, split=config.val_split)
    return {k: results[k] for k in ("miou", "threshold", "per_class_iou", "scales", "flip", "split")
            if k in results}


def default_study_storage(sweep_dir: str, name: str) -> str:
    """SQLite beside the sweep when it is local; on the driver's disk when it is a URI."""
    if is_uri(sweep_dir):
        folder = os.path.expanduser("~/.wsss/studies")
        return f"sqlite:///{os.path.join(folder, name)}.db"
    return f"sqlite:///{os.path.join(canonical(sweep_dir), 'optuna.db')}"


def _validate(config: TrainConfig, settings: dict) -> SearchSpace:
    """Every mistake a sweep can hold, found before Ray starts."""
    if settings["trials"] < 1:
        raise ConfigError(f"--trials {settings['trials']}: must be >= 1")
    if settings["scheduler"] not in ("asha", "none"):
        raise ConfigError(f"--scheduler {settings['scheduler']!r}: must be asha or none")
    if settings["concurrency"] is not None and settings["concurrency"] < 1:
        raise ConfigError(f"--concurrency {settings['concurrency']}: must be >= 1")
    if not config.val_split or config.eval_every != 1:
        raise ConfigError("a sweep needs the per-epoch objective: set val_split and keep eval_every=1")
    if not config.data:
        raise ConfigError("--data: the URI of prepared shards is required")
    read_manifest(config.data).rows(config.val_split)
    config.check_inputs()
    storage = settings["study_storage"]
    if storage.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(storage[len("sqlite:///"):]) or ".", exist_ok=True)
    space = build_space(config.method, settings["space"])
    space.check_against(config)
    return space


def with_credentials(saved: dict, args) -> tuple[TrainConfig, str]:
    """The base config and study storage of a sweep to resume. sweep.json keeps URIs
    without their credentials (`s3://***@bucket/x`): those, and only those, are given
    again on the command line (--data, --storage-path, --study-storage, KEY=VALUE)."""
    given = {**{k: v for k, v in (("data", args.data), ("storage_path", args.storage_path)) if v},
             **parse_overrides(args.overrides)}
    values = {"study_storage": saved["study_storage"], **TrainConfig.from_dict(saved["config"]).to_dict()}
    flat = {**values, **{f"{s}.{k}": v for s, section in values.pop("sections").items() for k, v in section.items()}}
    if args.study_storage:
        given["study_storage"] = args.study_storage
    for key, value in given.items():
        if key not in flat or not (isinstance(flat[key], str) and is_redacted(flat[key])):
            if key == "storage_path" or value == flat.get(key):
                continue  # where the sweep was found; or unchanged
            raise ConfigError(f"--resume continues the sweep as it was saved: {key}={value!r} would change it "
                              f"(only values {SWEEP_FILE} keeps without credentials are given again)")
    flat.update(given)
    for key, value in flat.items():
        if isinstance(value, str) and is_redacted(value):
            flag = {"data": "--data", "storage_path": "--storage-path", "study_storage": "--study-storage"}
            raise ConfigError(f"--resume: {SWEEP_FILE} keeps {key}={value!r} without its credentials; give it "
                              f"again ({flag.get(key, f'{key}=URI')})")
    study_storage = flat.pop("study_storage")
    config = TrainConfig.from_dict(saved["config"]).with_overrides(
        {k: v for k, v in given.items() if k != "study_storage"})
    return config, study_storage


# ---- command line ------------------------------------------------------------------

def main(args) -> int:
    if args.resume:
        if not args.name:
            raise ConfigError("--resume needs the --name of the sweep to continue")
        storage = parse_overrides(args.overrides).get("storage_path", TrainConfig().storage_path)
        saved = read_json(join(storage, args.name, SWEEP_FILE))
        if saved is None:
            raise ConfigError(f"--resume: no sweep {args.name!r} under {storage}")
        config, study_storage = with_credentials(saved, args)
        summary = run_sweep(config, trials=saved["trials"], space_specs=saved["space"],
                            scheduler=saved["scheduler"], concurrency=saved["concurrency"],
                            seed=saved["seed"], name=saved["name"], study_storage=study_storage,
                            resume=True, evaluate_best=not args.no_eval)
    else:
        for flag in ("method", "data", "trials"):
            if getattr(args, flag) is None:
                raise ConfigError(f"--{flag} is required (unless --resume)")
        config = load_config(args.config, args.overrides, method=args.method, data=args.data)
        specs = load_space_file(args.space) if args.space else None
        summary = run_sweep(config, trials=args.trials, space_specs=specs, scheduler=args.scheduler,
                            concurrency=args.concurrency, seed=args.seed, name=args.name,
                            study_storage=args.study_storage, evaluate_best=not args.no_eval)
    print(json.dumps(summary, indent=2, default=str))
    return 0
