"""Training on Ray Train: one function per worker, a driver that builds the TorchTrainer.

The worker function is three steps, as in Ray's examples: (1) data shards, (2) the
method, DDP-wrapped and restored from the run's newest complete checkpoint, (3) epochs of
the plain loop in `loop.py`, each ending in `ray.train.report` with a checkpoint. A run
resumes when started again with the same name and storage_path, from the newest complete
checkpoint in its folder (Train V2's snapshot of reported checkpoints there can lag behind
it). Tune trials call `make_trainer` with their own callbacks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from wsss.datasets.lease import acquire
from wsss.datasets.shards import image_labels, read_manifest
from wsss.datasets.verification import remember_verified
from wsss.io import canonical, check_reachable, delete_file, join, read_text, write_text
from wsss.platform.checkpoints import check_resumable, restore, resume_state, save_checkpoint, upload_checkpoint
from wsss.platform.config import ConfigError, TrainConfig
from wsss.platform.config_text import to_toml
from wsss.platform.console import epoch_line, seconds_left
from wsss.platform.data import eval_dataset, ingest_options, quiet_console, train_dataset
from wsss.platform.loop import (
    NonFiniteLossError,
    augment_config,
    epoch_metrics,
    evaluate_rows,
    overlay_predictions,
    set_up,
    train_epoch,
    validates_after,
)
from wsss.platform.metrics import cooccurring_pairs
from wsss.platform.tracking import Tracker, public_config, run_id

logger = logging.getLogger(__name__)
DIVERGED_FILE = "diverged.txt"
CONFIG_FILE = "config.toml"
EPOCHS_FILE = "epochs.jsonl"  # every epoch's metrics, one JSON object a line
CHECKPOINT_SCORE = "checkpoint_score"  # what Ray Train ranks a run's checkpoints by (see report_checkpoint)


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    config = TrainConfig.from_dict(loop_config["config"])
    dataset = loop_config["dataset"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.cpu_threads, context.get_local_world_size()))
    quiet_report_log()

    # 1. Data: this worker's shards of the streaming pipelines.
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config["has_val"] else None

    # 2. Method: dataset statistics, DDP around the trainable network only, last checkpoint.
    registered = ray.train.get_checkpoint()
    state = resume_state(loop_config["run_dir"], registered.path if registered else None)
    method, optimizer = set_up(config, num_classes=len(dataset["classes"]) - 1,
                               image_labels=loop_config["image_labels"], device=device, fresh=state is None,
                               distribute=ddp if context.get_world_size() > 1 else None)
    start_epoch, step = restore(state, method, optimizer) if state else (0, 0)
    resumed_from = start_epoch

    tracker = Tracker(project=config.wandb_project, name=loop_config["run_name"],
                      run_id=loop_config["wandb_run_id"], group=config.wandb_group,
                      mode=config.wandb, config=config.to_dict(), directory=loop_config["wandb_dir"],
                      tags=[config.method, dataset["name"]], enabled=rank == 0)

    # 3. Epochs: train, evaluate, checkpoint, report.
    steps_per_epoch = loop_config["steps_per_epoch"]
    cooccurring = cooccurring_pairs(np.asarray(loop_config["image_labels"], dtype=bool))
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        batches = train_shard.iter_torch_batches(batch_size=config.batch_size, drop_last=True)
        try:
            step, stats = train_epoch(method, optimizer, batches, config=config, epoch=epoch, step=step,
                                      steps_per_epoch=steps_per_epoch, device=device, log=tracker.log)
        except NonFiniteLossError as error:
            # Not an exception out of the worker: Ray Train would retry from the checkpoint
            # and diverge again, forever with max_failures=-1. The driver reads this note.
            if rank == 0:
                write_text(join(loop_config["run_dir"], DIVERGED_FILE), str(error))
            tracker.finish()
            return
        validation = None
        if validates_after(epoch, config):
            validation = evaluate_rows(
                method, val_shard.iter_rows(), num_classes=len(dataset["classes"]) - 1, device=device,
                keep_overlays=config.cam_images if rank == 0 else 0, max_images=config.eval_max_images)
        metrics = epoch_metrics(stats, validation, epoch, cooccurring) | {"resumed_from_epoch": resumed_from}
        if rank == 0:  # a log record, not print(): Ray Train's print patch doubles prints while W&B wraps stdout
            logger.info(epoch_line(metrics, config.epochs, seconds_left(
                started, time.perf_counter(), epoch + 1 - start_epoch, config.epochs - epoch - 1)))
        tracker.log({f"epoch/{k}": v for k, v in metrics.items()}, step)
        if rank == 0:
            append_epoch(loop_config["run_dir"], metrics)
        if validation is not None and validation.overlays:
            tracker.log_cam_overlays(overlay_predictions(validation.overlays, metrics.get("threshold")),
                                     dataset["classes"], dataset["palette"], step)

        def save(directory: str, epoch: int = epoch, step: int = step, metrics: dict = metrics) -> None:
            save_checkpoint(directory, method, optimizer, epoch=epoch + 1, step=step,
                            config=public_config(config.to_dict()), dataset=dataset, metrics=metrics)
            if config.wandb_checkpoints:
                tracker.log_checkpoint(directory, epoch=epoch + 1, metrics=metrics)

        report_checkpoint(metrics, config, rank, save)
    tracker.finish()


def ddp(method) -> None:
    """DistributedDataParallel around the method's trainable network only."""
    method.distribute(lambda net: ray.train.torch.prepare_model(
        net, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": method.find_unused_parameters}))


def append_epoch(run_dir: str, metrics: dict) -> None:
    """One JSON line per epoch in the run's EPOCHS_FILE: the curves `wsss report` draws
    (Ray keeps only the metrics of the checkpoints it keeps). Rewritten whole, as object
    stores cannot append; an epoch trained again after a failure adds a second line."""
    lines = read_text(join(run_dir, EPOCHS_FILE)) or ""
    write_text(join(run_dir, EPOCHS_FILE), lines + json.dumps(metrics) + "\n")


def quiet_report_log() -> None:
    """Ray Train 2.60 logs every `ray.train.report`'s metrics dict at INFO from a logger
    named after its file, outside the `ray.train` loggers that its LoggingConfig quiets."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def report_checkpoint(metrics: dict, config: TrainConfig, rank: int, save) -> None:
    """`ray.train.report` of the epoch's metrics with rank 0's checkpoint, written by `save`
    into a local directory. Async: Ray uploads it (`upload`) in a thread of its own while the
    next epoch trains, then deletes the directory; an upload that fails (storage gone) Ray
    tries 3 times, then fails the worker as an error in training would. The score Ray keeps
    checkpoints by is `miou`, and -1 (below any mIoU) in an epoch without one, so an
    unevaluated checkpoint is never kept as a best (-inf would reach result JSON as the
    non-standard `-Infinity`)."""
    metrics = metrics | {CHECKPOINT_SCORE: metrics.get("miou", -1.0)}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    directory = tempfile.mkdtemp(prefix="wsss-checkpoint-")
    try:
        save(directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    mode = ray.train.CheckpointUploadMode.ASYNC if config.checkpoint_upload == "async" \
        else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True,
                     checkpoint_upload_fn=upload)


def upload(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
    """Ray Train's `checkpoint_upload_fn`: the local checkpoint into the run's folder as
    `name`, through `upload_checkpoint` (a failed write raises; checkpoint.json last)."""
    storage = ray.train.get_context().get_storage()
    path = storage.build_checkpoint_path_from_name(name)
    upload_checkpoint(checkpoint.path, storage.storage_filesystem, path)
    return ray.train.Checkpoint(filesystem=storage.storage_filesystem, path=path)


def make_trainer(config: TrainConfig, *, callbacks=()) -> ray.train.torch.TorchTrainer:
    """Validate the data against the config, then build the TorchTrainer (nothing runs yet)."""
    if not config.data:
        raise ConfigError("data: the URI of prepared shards is required (wsss prepare ...)")
    manifest = read_manifest(config.data)
    for split in filter(None, (config.train_split, config.val_split)):
        manifest.rows(split)  # raises a DataError naming a missing split
    name = run_name(config)
    run_dir = join(canonical(config.storage_path), name)
    check_start(config, run_dir)  # before the shards' labels are read
    use_gpu = resolve_use_gpu(config.device)
    datasets = {"train": train_dataset(config.data, config.train_split, augment_config(config),
                                       num_classes=manifest.num_classes,
                                       label_uri=config.pseudo_labels or None, verify=config.verify_data)}
    if config.val_split:
        datasets["val"] = eval_dataset(config.data, config.val_split, verify=config.verify_data)
    for dataset in datasets.values():
        quiet_console(dataset.context)  # the epoch lines are the progress; Ray Data's logs stay in its log folder
    rows = manifest.rows(config.train_split)
    steps_per_epoch = rows // (config.batch_size * config.num_workers)
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size={config.batch_size} × num_workers={config.num_workers} is more "
                          f"than the {rows} images of split {config.train_split!r}")
    loop_config = {
        "config": config.to_dict() | {"name": name},
        "dataset": {"name": manifest.dataset, "classes": list(manifest.classes),
                    "palette": [list(c) for c in manifest.palette], "num_images": rows},
        "image_labels": image_labels(manifest, config.train_split),
        "steps_per_epoch": steps_per_epoch,
        "has_val": bool(config.val_split),
        "run_name": name,
        "run_dir": run_dir,
        "wandb_dir": wandb_dir(config.storage_path, name),
        "wandb_run_id": run_id(canonical(config.storage_path), name),
    }
    # The same seed repeats a run: by default Ray Data hands out blocks in the order their
    # tasks finish, so the batches (and the result) would change from run to run.
    options = {name: ingest_options(preserve_order=name == "train") for name in datasets}
    trainer = ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        dataset_config=ray.train.DataConfig(execution_options=options),
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=canonical(config.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # Train's own lines (worker group started, each checkpoint; on a busy machine, tracebacks of
            # retried requests) stay in its log files: the epoch lines are the output, and a failure
            # that ends the run is raised by fit()
            logging_config=ray.train.LoggingConfig(log_level="ERROR"),
            # Ray deletes the others; the newest is always kept, so a resumed run continues from it
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints or None, checkpoint_score_attribute=CHECKPOINT_SCORE,
                checkpoint_score_order="max"),
            callbacks=list(callbacks)),
        datasets=datasets,
    )
    # `--config` of it repeats the run; URIs keep no credentials (give them again)
    write_text(join(run_dir, CONFIG_FILE), to_toml(public_config(loop_config["config"])))
    return trainer


def check_start(config: TrainConfig, run_dir: str | None = None) -> None:
    """A run that exists continues with the same model; a new run's start files exist (a
    resumed one never reads them, so they may be gone). Needs no Ray, so the commands call
    it before starting one (`make_trainer` checks again)."""
    if run_dir is None and config.name:
        run_dir = join(canonical(config.storage_path), config.name)
    if not (run_dir and check_resumable(run_dir, config.to_dict())):
        config.check_inputs()


def run_name(config: TrainConfig) -> str:
    return config.name or f"{config.method.replace('+', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def fit(config: TrainConfig) -> ray.train.Result:
    """Train to the end (or resume); raises NonFiniteLossError if the loss diverged,
    FolderInUseError if a live run of the same name and storage_path is writing there, and
    StorageUnavailableError if the run failed while its storage does not answer."""
    config = dataclasses.replace(config, name=run_name(config))
    with acquire(join(canonical(config.storage_path), config.name), "wsss train"):
        trainer = make_trainer(config)
        run_dir = trainer.train_loop_config["run_dir"]
        diverged = join(run_dir, DIVERGED_FILE)
        delete_file(diverged)  # a note left by an earlier attempt of this run
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as error:
            check_reachable(run_dir, "the run stopped; once it answers, `wsss train` with the same name and "
                                     "storage_path resumes from the last complete checkpoint", cause=error)
            raise
    note = read_text(diverged)
    if note is not None:
        where = result.checkpoint.path if result.checkpoint else "none (diverged in the first epoch)"
        raise NonFiniteLossError(f"{note}; last good checkpoint: {where}")
    if config.verify_data and result.metrics.get("epoch", 0) > result.metrics.get("resumed_from_epoch", 0):
        remember_read_splits(config)
    return result


def remember_read_splits(config: TrainConfig) -> None:
    """Record the splits a finished run read in full, their checksums checked by the read
    tasks: the training split (and its pseudo-labels) in every epoch, the val split when
    every val image was evaluated."""
    manifest = read_manifest(config.data)
    remember_verified(manifest, config.train_split)
    if config.pseudo_labels:
        remember_verified(read_manifest(config.pseudo_labels), config.train_split)
    if config.val_split and config.eval_every and not config.eval_max_images:
        remember_verified(manifest, config.val_split)


def result_locations(config: TrainConfig, result: ray.train.Result) -> tuple[str, str | None]:
    """(run, last checkpoint) as paths or URIs that `wsss evaluate` accepts: Ray's own
    paths drop the URI scheme (`s3://bucket/x` comes back as `bucket/x`)."""
    run = join(canonical(config.storage_path), result.path.rstrip("/").rsplit("/", 1)[-1])
    if not result.checkpoint:
        return run, None
    return run, join(run, result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])


def cpu_threads(requested: int, workers_on_node: int) -> int:
    """Torch threads for a worker training on CPU. Ray starts a worker that reserves one CPU
    with OMP_NUM_THREADS=1, which on a 2-core laptop halves training speed, while Ray Data's
    decoding needs only a small share of a core: so by default the node's cores are shared
    among the training workers on it."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, workers_on_node))


def resolve_use_gpu(device: str) -> bool:
    """auto: GPUs when the cluster has some now. device=gpu is trusted without a check, so
    an autoscaling cluster whose GPU nodes start at zero can bring them up for the run."""
    if device != "auto":
        return device == "gpu"
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else torch.cuda.device_count()
    return gpus > 0


def wandb_dir(storage_path: str, name: str) -> str:
    """W&B writes locally: beside the checkpoints for local storage, else ./wandb."""
    return join(canonical(storage_path), name) if "://" not in storage_path else canonical("wandb")
