"""Tiny configs for runs and sweeps on the synthetic shards, and run directories as
`wsss train` leaves them, for the report."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wsss.platform.checkpoints import save_checkpoint
from wsss.platform.config import TrainConfig


def tiny_run_config(shards, tmp_path, **overrides) -> TrainConfig:
    """A 2-epoch `cam` run named `run` under tmp_path/runs."""
    values = dict(method="cam", data=shards, name="run", storage_path=str(tmp_path / "runs"), epochs=2,
                  batch_size=8, crop_size=64, backbone="resnet18", output_stride=16, backbone_weights="none",
                  lr=0.02, eval_max_images=8, wandb="offline", log_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def tiny_sweep_config(shards: str, storage, method: str = "cam+fsae", **values) -> TrainConfig:
    """The config each trial of a 1-epoch sweep of `method` starts from."""
    settings = dict(method=method, data=shards, storage_path=str(storage), epochs=1, batch_size=8,
                    crop_size=64, backbone="resnet18", backbone_weights="none", eval_max_images=4,
                    wandb="offline")
    return TrainConfig(**{**settings, **values})


def write_run(storage: Path, name: str, mious: list[float], *, full: float | None = None, **values) -> Path:
    """A run directory as `wsss train` leaves it: one checkpoint per epoch (a stand-in module)."""
    config = TrainConfig(**{"method": "cam", **values}).to_dict()
    module = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    run = storage / name
    for epoch, miou in enumerate(mious, start=1):
        folder = run / f"checkpoint_2026-01-01_00-00-0{epoch}"
        folder.mkdir(parents=True)
        save_checkpoint(folder, module, optimizer, epoch=epoch, step=epoch, config=config,
                        dataset={"name": "synthetic", "classes": ["background", "a"]},
                        metrics={"epoch": epoch, "miou": miou, "threshold": 0.3})
    if full is not None:
        (run / "results.json").write_text(json.dumps({"miou": full}))
    return run
