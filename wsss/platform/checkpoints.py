"""Checkpoints: one `state.pt` holding model, method state, optimiser and progress.

Method state (prototype banks, EMA teachers, co-occurrence priors) lives in the
method's state_dict, so saving the method saves it. Checkpoints are plain directories
that Ray Train uploads to `storage_path` (local or cloud); `load_method` accepts a
checkpoint directory, a run directory (its latest checkpoint) or a cloud URI.

`state.pt` holds tensors and plain types only and is read with `weights_only=True`, so
loading a checkpoint never runs code from it. A checkpoint counts once complete:
`checkpoint.json` is written after `state.pt`, and a run directory's checkpoints are tried
newest first, skipping (with a warning naming it) one without `checkpoint.json` or whose
`state.pt` does not load, as an upload or a write cut short leaves them. `upload_checkpoint`
keeps that order on object stores too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from pyarrow.fs import FileSelector, FileType

from wsss.io import DataError, join, public_uri, resolve, write_text
from wsss.methods.base import build_method
from wsss.platform.config import ConfigError, TrainConfig, stored_config

logger = logging.getLogger(__name__)
STATE_FILE = "state.pt"
# What makes a checkpoint's model: a run resumes only with the same values (checkpoint.json).
MODEL_KEYS = ("method", "backbone", "output_stride")
INFO_FILE = "checkpoint.json"
UPLOAD_CHUNK = 8 << 20


class UnsafeCheckpointError(DataError):
    """A state.pt that holds more than tensors and plain types: unpickling it could run code."""


def save_checkpoint(directory: str | Path, method, optimizer, *, epoch: int, step: int,
                    config: dict, dataset: dict, metrics: dict | None = None) -> None:
    """Write the checkpoint files into `directory` (rank 0 only): `state.pt`, then
    `checkpoint.json`, whose presence marks the checkpoint complete."""
    directory = Path(directory)
    info = {"epoch": epoch, "step": step, "metrics": metrics or {},
            **{key: config[key] for key in MODEL_KEYS},
            # what `wsss report` shows, so that it never downloads the weights
            "config": config, "dataset": dataset.get("name", "?")}
    try:
        torch.save({"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch, "step": step, "config": config, "dataset": dataset,
                    "torch_rng": torch.get_rng_state(),
                    # dropout on a GPU draws from the device's own generator
                    "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   directory / STATE_FILE)
        write_text(str(directory / INFO_FILE), json.dumps(info, indent=2, default=float))
    except BaseException:  # a full disk, an interrupt: leave no half of a checkpoint
        (directory / STATE_FILE).unlink(missing_ok=True)
        raise


def upload_checkpoint(directory: str | Path, filesystem, path: str) -> None:
    """Copy the checkpoint in the local `directory` to `path` on `filesystem` (a pyarrow
    filesystem), `checkpoint.json` last, each file closed before the next: a write that
    fails raises, and the checkpoint is complete only once its `checkpoint.json` is there.

    Ray Train's own upload (pyarrow's `copy_files`) writes `checkpoint.json` first, and
    into S3 logs and drops a part upload that failed (pyarrow 26): it returns as if the
    checkpoint were there when its `state.pt` never arrived."""
    directory = Path(directory)
    files = sorted((file for file in directory.rglob("*") if file.is_file()),
                   key=lambda file: (file == directory / INFO_FILE, str(file)))
    filesystem.create_dir(path, recursive=True)
    for file in files:
        name = file.relative_to(directory).as_posix()
        if "/" in name:
            filesystem.create_dir(f"{path}/{name.rsplit('/', 1)[0]}", recursive=True)
        with file.open("rb") as source, filesystem.open_output_stream(f"{path}/{name}") as target:
            shutil.copyfileobj(source, target, UPLOAD_CHUNK)


def load_state(checkpoint: str | Path, *, mmap: bool = False) -> dict:
    """The state saved in the checkpoint directory at `checkpoint` (a path or URI).

    DataError naming the file if it is missing or does not load; UnsafeCheckpointError if
    it holds anything but tensors and plain types. `mmap` (local files only) maps the
    tensors instead of reading them, for callers that want the config alone."""
    filesystem, path = resolve(checkpoint)
    name = join(checkpoint, STATE_FILE)
    if filesystem.get_file_info(f"{path}/{STATE_FILE}").type != FileType.File:
        raise FileNotFoundError(f"{checkpoint}: not a wsss checkpoint (no {STATE_FILE})")
    try:
        if mmap and filesystem.type_name == "local":
            return torch.load(f"{path}/{STATE_FILE}", map_location="cpu", weights_only=True, mmap=True)
        with filesystem.open_input_file(f"{path}/{STATE_FILE}") as stream:
            return torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # what weights_only raises for anything else
        # torch's message: a paragraph of advice, then the global it met
        found = next((line for line in str(error).splitlines() if "GLOBAL" in line), "").strip()
        raise UnsafeCheckpointError(name, "refused: it holds objects other than tensors and plain types, "
                                          f"which could run code when loaded. {found}".strip()) from None
    except (RuntimeError, ValueError, EOFError, OSError) as error:  # truncated, not a torch file
        raise DataError(name, f"unreadable checkpoint state ({error})") from None


def restore(state: dict, method, optimizer=None) -> tuple[int, int]:
    """Load model/method state, optimiser and the RNG (so that random augmentations inside
    methods replay identically); returns (epoch done, step done)."""
    method.load_state_dict(state["method"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
    return state["epoch"], state["step"]


def checkpoint_names(filesystem, path: str) -> list[str]:
    """The `checkpoint_*` subdirectories of the run at `path`, newest first."""
    found = filesystem.get_file_info(FileSelector(path, allow_not_found=True))
    return sorted((info.base_name for info in found
                   if info.type == FileType.Directory and info.base_name.startswith("checkpoint_")), reverse=True)


def latest_checkpoint(location: str) -> str:
    """`location` (a path or URI) itself if it is a checkpoint, else its newest complete
    `checkpoint_*` subdirectory: with `checkpoint.json` and a whole `state.pt` (a torch
    file is a zip archive, whose directory, at its end, a cut-short write lacks)."""
    return next(_complete_checkpoints(location))


def load_latest(location: str) -> tuple[str, dict]:
    """(checkpoint, its state): `location` itself if it is a checkpoint, else the newest of
    its complete checkpoints whose state loads (FileNotFoundError when none does); an
    unsafe one is refused, never skipped."""
    for checkpoint in _complete_checkpoints(location):
        try:
            return checkpoint, load_state(checkpoint)
        except UnsafeCheckpointError:
            raise
        except DataError as error:
            if checkpoint == location:
                raise
            logger.warning("skipping checkpoint %s: %s", public_uri(checkpoint), error.problem)


def resume_state(run: str, registered: str | None = None) -> dict | None:
    """The state the run at `run` continues from: that of its newest complete checkpoint
    that loads (warning about each one skipped), or None when it has none (a fresh start).

    `registered`, the checkpoint Ray Train hands back, is only compared with it: Ray's
    bookkeeping cannot know a file damaged after it was registered, and lags behind the
    storage. It adds a checkpoint to its snapshot in the run folder after the upload, so
    storage that stops in between leaves the newest complete checkpoint out of it, and a
    run without a snapshot Ray starts afresh."""
    try:
        checkpoint, state = load_latest(run)
    except FileNotFoundError:
        if registered:
            raise
        return None
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
    if registered is None or registered.rstrip("/").rsplit("/", 1)[-1] != name:
        logger.warning("resuming from %s (epoch %d), the newest complete checkpoint of %s that loads; Ray Train "
                       "handed %s", name, state["epoch"], public_uri(run),
                       public_uri(registered) if registered else "none")
    return state


def _complete_checkpoints(location: str):
    """`location` if it is a checkpoint, else its complete checkpoints newest first (see
    `latest_checkpoint`), warning about each one skipped; FileNotFoundError if none."""
    filesystem, path = resolve(location)
    if filesystem.get_file_info(f"{path}/{STATE_FILE}").type == FileType.File:
        yield location
        return
    for name in checkpoint_names(filesystem, path):
        state, info = (filesystem.get_file_info(f"{path}/{name}/{file}").type == FileType.File
                       for file in (STATE_FILE, INFO_FILE))
        if not state:
            continue  # a folder an upload had not reached yet
        problem = None if info else f"no {INFO_FILE} (written last: the checkpoint is incomplete)"
        problem = problem or _not_whole(filesystem, f"{path}/{name}/{STATE_FILE}")
        if problem:
            logger.warning("skipping checkpoint %s: %s", public_uri(join(location, name)), problem)
            continue
        yield join(location, name)
    raise FileNotFoundError(f"{location}: neither a checkpoint nor a run directory with complete checkpoints")


def _not_whole(filesystem, path: str) -> str | None:
    """Why the torch file at `path` is cut short, or None. Reads its end only."""
    try:
        with filesystem.open_input_file(path) as stream:
            zipfile.ZipFile(stream).close()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"{STATE_FILE} is incomplete ({error})"
    return None


def best_checkpoint(location: str) -> str:
    """`location` (a path or URI) itself if it is a checkpoint, else the run's complete
    checkpoint with the highest val `miou` in its checkpoint.json: the newest of equals, and
    the newest checkpoint when none was evaluated. A run keeps its best checkpoints and its
    newest (`keep_checkpoints`), so this is the one `wsss evaluate` scores by default."""
    chosen, chosen_score = None, None
    try:
        for checkpoint in _complete_checkpoints(location):  # newest first
            if checkpoint == location:
                return location
            filesystem, path = resolve(checkpoint)
            with filesystem.open_input_stream(f"{path}/{INFO_FILE}") as stream:
                score = json.loads(stream.read()).get("metrics", {}).get("miou")
            if chosen is None or (score is not None and (chosen_score is None or score > chosen_score)):
                chosen, chosen_score = checkpoint, score
    except FileNotFoundError:
        if chosen is None:
            raise
    return chosen


CHECKPOINT_CHOICES = {"best": best_checkpoint, "latest": latest_checkpoint}


def check_resumable(run: str, config: dict) -> bool:
    """Whether the run at `run` (a path or URI) has a checkpoint to continue from. Refuses to
    continue it with another model: Ray Train would restore its latest checkpoint into
    whatever `config` builds, and a changed output stride loads without an error.
    Checkpoints from before MODEL_KEYS were recorded pass."""
    filesystem, path = resolve(run)
    for name in checkpoint_names(filesystem, path):
        try:
            with filesystem.open_input_stream(f"{path}/{name}/{INFO_FILE}") as stream:
                recorded = json.loads(stream.read())
        except (FileNotFoundError, ValueError):
            continue  # an upload cut short; Train resumes from an earlier one
        for key in MODEL_KEYS:
            if key in recorded and recorded[key] != config[key]:
                raise ConfigError(f"{key}={config[key]!r}: run {run} was trained with {key}={recorded[key]!r} "
                                  f"({name}); keep it to continue that run, or give a new name")
        return True
    return False


def start_fresh(method, init_from: str = "") -> dict[str, list[str]]:
    """Prepare a run that does not resume: with `init_from` (a run dir, checkpoint dir or URI),
    copy into `method.network` every tensor of that checkpoint's network whose name and shape
    match, leaving the rest (new heads) as built; then the method's own `on_fresh_start`
    (backbone weights unless started from a checkpoint, teachers copied from the network).
    Method state beside the network (banks, teachers, priors) is never copied: it belongs
    to the method that made it. Returns {"loaded": names, "fresh": names}."""
    report = {"loaded": [], "fresh": []}
    if init_from:
        checkpoint, state = load_latest(init_from)
        saved = state["method"]
        own = method.network.state_dict()
        source = {key.removeprefix("network."): value for key, value in saved.items() if key.startswith("network.")}
        matching = {key: value for key, value in source.items() if key in own and own[key].shape == value.shape}
        if not matching:
            raise ConfigError(f"init_from={init_from!r}: no network weight of {checkpoint} matches this "
                              f"{type(method).__name__} network in name and shape")
        method.network.load_state_dict(matching, strict=False)
        report = {"loaded": sorted(matching), "fresh": sorted(set(own) - set(matching))}
        logger.info("init_from %s: loaded %s; fresh %s", checkpoint, _modules(report["loaded"]),
                    _modules(report["fresh"]) or "nothing")
    method.on_fresh_start()
    return report


def _modules(names: list[str]) -> str:
    """'backbone (120 tensors), classifier (1)' from tensor names."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + 1
    return ", ".join(f"{module} ({count})" for module, count in counts.items())


def load_method(checkpoint: str, device: torch.device | str = "cpu", method_overrides: dict | None = None):
    """(method in eval mode, state) from a checkpoint dir, run dir or cloud URI.

    `method_overrides` ({"lnl.export": "shrink"}) change the method's inference-time
    settings; only `section.key` of the checkpoint's own method sections are accepted."""
    _, state = load_latest(checkpoint)
    config = TrainConfig.from_dict(stored_config(state["config"]))
    if method_overrides:
        not_method = [key for key in method_overrides if key.partition(".")[0] not in config.sections
                      or "." not in key]
        if not_method:
            raise ConfigError(f"{not_method[0]}: not a setting of method {config.method!r} "
                              f"(its sections: {', '.join(config.sections) or 'none'})")
        config = config.with_overrides(method_overrides)
    method = build_method(config.method, len(state["dataset"]["classes"]) - 1, config.sections,
                          dataclasses.replace(config.backbone_config, weights="none", init_from=""))
    method.load_state_dict(state["method"])
    return method.to(device).eval(), state
