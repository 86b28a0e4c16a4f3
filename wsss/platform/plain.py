"""Training without Ray: the same loop as the Ray Train workers, fed by a torch DataLoader.

For hacking on a method in one process and for measuring what Ray adds
(`benchmarks/train_step.py`). No checkpoints, no W&B: those are Ray-side concerns.
"""

from __future__ import annotations

import torch

from wsss.datasets.loader import train_loader
from wsss.datasets.reading import eval_rows
from wsss.datasets.shards import image_labels, read_manifest
from wsss.methods.base import DatasetStats, Method, build_method
from wsss.platform.checkpoints import start_fresh
from wsss.platform.config import TrainConfig
from wsss.platform.loop import (augment_config, epoch_metrics, evaluate_rows, make_optimizer, set_flush_denormal,
                                train_epoch)
from wsss.platform.metrics import cooccurring_pairs


def train_plain(config: TrainConfig, *, loader_workers: int = 0, device: str | None = None,
                log=lambda values, step: None, on_epoch=lambda metrics: None) -> tuple[Method, list[dict]]:
    """Train `config` in this process; returns the method and each epoch's metrics, also
    handed to `on_epoch` as each epoch ends."""
    manifest = read_manifest(config.data)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_flush_denormal(config, device)
    torch.manual_seed(config.seed)
    labels = image_labels(manifest, config.train_split)
    method = build_method(config.method, manifest.num_classes, config.sections, config.backbone_config)
    method.on_dataset(DatasetStats(num_images=len(labels), image_labels=torch.from_numpy(labels)))
    method.to(device)
    start_fresh(method, config.init_from)
    optimizer = make_optimizer(method, config)
    loader = train_loader(config.data, config.train_split, augment_config(config),
                          batch_size=config.batch_size, num_workers=loader_workers,
                          label_uri=config.pseudo_labels or None)
    steps_per_epoch = manifest.rows(config.train_split) // config.batch_size
    history, step = [], 0
    for epoch in range(config.epochs):
        loader.dataset.set_epoch(epoch)
        step, stats = train_epoch(method, optimizer, loader, config=config, epoch=epoch, step=step,
                                  steps_per_epoch=steps_per_epoch, device=device, log=log)
        validation = None
        if config.val_split and config.eval_every and (epoch + 1) % config.eval_every == 0:
            validation = evaluate_rows(method, eval_rows(config.data, config.val_split),
                                       num_classes=manifest.num_classes, device=device,
                                       max_images=config.eval_max_images)
        history.append(epoch_metrics(stats, validation, epoch, cooccurring_pairs(labels)))
        on_epoch(history[-1])
    return method, history
