"""The training loop, top to bottom. No Ray here: `train.py` feeds it Ray Data shards on
Ray Train workers, `plain.py` feeds it a local loader; both run exactly this code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from wsss.datasets.augment import AugmentConfig
from wsss.methods.base import Method, Progress, required_inputs
from wsss.platform.cams import (THRESHOLDS, best_threshold, image_tensor, normalize_images, normalized_cams,
                               threshold_confusions)
from wsss.platform.config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops, the last good checkpoint stays."""


def augment_config(config: TrainConfig) -> AugmentConfig:
    """The training augmentation of a run, with the views its method asks for."""
    return AugmentConfig(crop_size=config.crop_size, scale_range=(config.scale_min, config.scale_max),
                         views=required_inputs(config.method), seed=config.seed)


def make_optimizer(method: Method, config: TrainConfig) -> torch.optim.SGD:
    """SGD over the method's groups: backbone at lr, new layers at lr × multiplier."""
    return torch.optim.SGD(method.param_groups(config.lr), lr=config.lr,
                           momentum=config.momentum, weight_decay=config.weight_decay)


def set_poly_lr(optimizer, config: TrainConfig, step: int, total_steps: int) -> float:
    """Poly decay lr = base · (1 − step/total)^power per group; returns the backbone lr."""
    factor = (1 - min(step, total_steps) / max(1, total_steps)) ** config.poly_power
    for group in optimizer.param_groups:
        group["lr"] = config.lr * group.get("lr_mult", 1.0) * factor
    return config.lr * factor


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every replica (so all stop together)."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass
class EpochStats:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    notes: dict[str, float] = field(default_factory=dict)

    def add(self, terms: dict[str, torch.Tensor], images: int, notes: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.images += images
        for key, value in terms.items():
            self.terms[key] = self.terms.get(key, 0.0) + float(value.detach())
        for key, value in notes.items():
            self.notes[key] = self.notes.get(key, 0.0) + float(value)

    def summary(self) -> dict[str, float]:
        out = {f"loss/{k}": v / max(1, self.steps) for k, v in self.terms.items()}
        out.update({k: v / max(1, self.steps) for k, v in self.notes.items()})
        out["loss"] = sum(self.terms.values()) / max(1, self.steps)
        out["images_per_s"] = self.images / max(self.seconds, 1e-9)
        out["epoch_time_s"] = self.seconds
        return out


def model_inputs(batch: dict, device: torch.device) -> dict:
    """A pipeline batch (uint8 images and label maps, `wsss.datasets.augment`) -> the
    tensors methods take, on `device`: images ImageNet-normalised with 0 on padding, label
    maps int64, and `raw`, the uint8 weak view channels last (a view, not a copy). Converting
    after the copy moves a quarter of the bytes through Ray's object store and to the GPU
    (benchmarks/ingest.py)."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    out["raw"] = out["image"].permute(0, 2, 3, 1)
    for key in ("image", "strong"):
        if key in out:
            out[key] = normalize_images(out[key]) * out["valid"][:, None]
    for key in ("mask", "target"):
        if key in out:
            out[key] = out[key].long()
    return out


def train_epoch(method: Method, optimizer, batches: Iterable[dict], *, config: TrainConfig,
                epoch: int, step: int, steps_per_epoch: int, device: torch.device,
                log: Callable[[dict, int], None]) -> tuple[int, EpochStats]:
    """One pass over pipeline `batches` (`model_inputs`); returns the global step after it and the epoch's stats.
    AMP is bfloat16 autocast on GPU: no loss scaling needed, unlike float16."""
    method.train()
    stats = EpochStats()
    use_amp = config.amp and device.type == "cuda"
    total_steps = steps_per_epoch * config.epochs
    start = time.perf_counter()
    for batch in batches:
        batch = model_inputs(batch, device)
        progress = Progress(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=config.epochs)
        lr = set_poly_lr(optimizer, config, step, total_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            terms = method.training_step(batch, progress)
        loss = sum(terms.values())
        if not all_ranks_finite(loss):
            values = {k: float(v.detach()) for k, v in terms.items()}
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, step {step}: {values}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(progress)
        step += 1
        notes = method.step_notes()
        stats.add(terms, images=len(batch["image"]), notes=notes)
        if step % config.log_every == 0:
            log({"train/loss": float(loss.detach()), "train/lr": lr,
                 **{f"train/{k}": float(v.detach()) for k, v in terms.items()},
                 **{f"train/{k}": float(v) for k, v in notes.items()}}, step)
    stats.seconds = time.perf_counter() - start
    return step, stats


@torch.no_grad()
def evaluate_rows(method: Method, rows: Iterable[dict], *, num_classes: int, device: torch.device,
                  keep_overlays: int = 0, max_images: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Single-scale CAM threshold sweep over rows {"id","image" HWC,"mask","labels" [K]}.
    Returns summed confusions [T,C,C] (all-reduced across replicas) and a few overlays."""
    method.eval()
    total = torch.zeros(len(THRESHOLDS), num_classes + 1, num_classes + 1, dtype=torch.int64, device=device)
    overlays = []
    for index, row in enumerate(rows):
        if max_images and index >= max_images:
            break
        labels = torch.tensor(np.asarray(row["labels"]), dtype=torch.float32)  # a copy: Ray rows are read-only
        cams = normalized_cams(method, image_tensor(row["image"], device), labels)
        gt = torch.as_tensor(np.asarray(row["mask"]), dtype=torch.int64, device=device)
        confusions = threshold_confusions(cams, gt, num_classes + 1)
        total += confusions
        if len(overlays) < keep_overlays:
            overlays.append({"id": str(row["id"]), "image": np.asarray(row["image"]), "cams": cams.cpu(),
                             "ground_truth": np.asarray(row["mask"])})
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    method.train()
    return total.cpu().numpy(), overlays


def epoch_metrics(stats: EpochStats, confusions: np.ndarray | None, epoch: int) -> dict:
    """What every epoch reports: losses, throughput and (when evaluated) the objective."""
    metrics = {"epoch": epoch + 1, **stats.summary()}
    if confusions is not None and confusions.sum() > 0:
        best = best_threshold(confusions)
        metrics.update(miou=best["miou"], threshold=best["threshold"])
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}


def overlay_predictions(overlays: list[dict], threshold: float) -> list[dict]:
    """CAM overlays at the chosen threshold, for W&B."""
    out = []
    for item in overlays:
        cams = item["cams"]
        best, index = cams.max(dim=0)
        prediction = torch.where(best >= threshold, index + 1, torch.zeros_like(index))
        out.append({"id": item["id"], "image": item["image"], "prediction": prediction.numpy(),
                    "ground_truth": item["ground_truth"]})
    return out
