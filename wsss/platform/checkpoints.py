"""Checkpoints: one `state.pt` holding model, method state, optimiser and progress.

Method state (prototype banks, EMA teachers, co-occurrence priors) lives in the
method's state_dict, so saving the method saves it. Checkpoints are plain directories
that Ray Train uploads to `storage_path` (local or cloud); `load_method` accepts a
checkpoint directory, a run directory (its latest checkpoint) or a cloud URI.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path

import torch
from pyarrow.fs import FileSelector, FileType

from wsss.datasets.storage import join, resolve
from wsss.methods.base import build_method
from wsss.platform.config import ConfigError

logger = logging.getLogger(__name__)
STATE_FILE = "state.pt"
# What makes a checkpoint's model: a run resumes only with the same values (checkpoint.json).
MODEL_KEYS = ("method", "backbone", "output_stride")
INFO_FILE = "checkpoint.json"


def save_checkpoint(directory: str | Path, method, optimizer, *, epoch: int, step: int,
                    config: dict, dataset: dict, metrics: dict | None = None) -> None:
    """Write the checkpoint files into `directory` (rank 0 only)."""
    directory = Path(directory)
    torch.save({"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "step": step, "config": config, "dataset": dataset,
                "torch_rng": torch.get_rng_state(),
                # dropout on a GPU draws from the device's own generator
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               directory / STATE_FILE)
    info = {"epoch": epoch, "step": step, "metrics": metrics or {},
            **{key: config[key] for key in MODEL_KEYS},
            # what `wsss report` shows, so that it never downloads the weights
            "config": config, "dataset": dataset.get("name", "?")}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2, default=float))


def load_state(checkpoint: str | Path) -> dict:
    """The state saved in the checkpoint directory at `checkpoint` (a path or URI)."""
    filesystem, path = resolve(checkpoint)
    if filesystem.get_file_info(f"{path}/{STATE_FILE}").type != FileType.File:
        raise FileNotFoundError(f"{checkpoint}: not a wsss checkpoint (no {STATE_FILE})")
    with filesystem.open_input_file(f"{path}/{STATE_FILE}") as stream:
        return torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=False)


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
    `checkpoint_*` subdirectory."""
    filesystem, path = resolve(location)
    if filesystem.get_file_info(f"{path}/{STATE_FILE}").type == FileType.File:
        return location
    for name in checkpoint_names(filesystem, path):
        if filesystem.get_file_info(f"{path}/{name}/{STATE_FILE}").type == FileType.File:
            return join(location, name)
    raise FileNotFoundError(f"{location}: neither a checkpoint nor a run directory with checkpoints")


def best_checkpoint(location: str) -> str:
    """`location` (a path or URI) itself if it is a checkpoint, else the run's complete
    checkpoint with the highest val `miou` in its checkpoint.json: the newest of equals, and
    the newest checkpoint when none was evaluated. A run keeps its best checkpoints and its
    newest (`keep_checkpoints`), so this is the one `wsss evaluate` scores by default."""
    filesystem, path = resolve(location)
    if filesystem.get_file_info(f"{path}/{STATE_FILE}").type == FileType.File:
        return location
    chosen, chosen_score = None, None
    for name in checkpoint_names(filesystem, path):  # newest first
        if filesystem.get_file_info(f"{path}/{name}/{STATE_FILE}").type != FileType.File:
            continue  # an upload cut short
        try:
            with filesystem.open_input_stream(f"{path}/{name}/{INFO_FILE}") as stream:
                score = json.loads(stream.read()).get("metrics", {}).get("miou")
        except FileNotFoundError:
            score = None
        if chosen is None or (score is not None and (chosen_score is None or score > chosen_score)):
            chosen, chosen_score = name, score
    if chosen is None:
        raise FileNotFoundError(f"{location}: neither a checkpoint nor a run directory with checkpoints")
    return join(location, chosen)


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
        except FileNotFoundError:
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
        checkpoint = latest_checkpoint(init_from)
        saved = load_state(checkpoint)["method"]
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
    state = load_state(latest_checkpoint(checkpoint))
    from wsss.platform.config import TrainConfig

    config = TrainConfig.from_dict(state["config"])
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
