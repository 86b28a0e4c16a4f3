"""Training without Ray: the same loop as the Ray Train workers, fed by a torch DataLoader.

For hacking on a method in one process and for measuring what Ray adds
(`benchmarks/train_step.py`). No checkpoints, no W&B: those are Ray-side concerns.
"""

from __future__ import annotations

import torch

from wsss.datasets.loader import train_loader
from wsss.datasets.reading import eval_rows
from wsss.datasets.shards import image_labels, read_manifest
from wsss.methods.base import Method
from wsss.platform.config import TrainConfig
from wsss.platform.loop import augment_config, epoch_metrics, evaluate_rows, set_up, train_epoch, validates_after
from wsss.platform.metrics import cooccurring_pairs


def train_plain(config: TrainConfig, *, loader_workers: int = 0, device: str | None = None,
                log=lambda values, step: None, on_epoch=lambda metrics: None) -> tuple[Method, list[dict]]:
    """Train `config` in this process; returns the method and each epoch's metrics, also
    handed to `on_epoch` as each epoch ends."""
    manifest = read_manifest(config.data)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labels = image_labels(manifest, config.train_split)
    method, optimizer = set_up(config, num_classes=manifest.num_classes, image_labels=labels, device=device)
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
        if validates_after(epoch, config):
            validation = evaluate_rows(method, eval_rows(config.data, config.val_split),
                                       num_classes=manifest.num_classes, device=device,
                                       max_images=config.eval_max_images)
        history.append(epoch_metrics(stats, validation, epoch, cooccurring_pairs(labels)))
        on_epoch(history[-1])
    return method, history
