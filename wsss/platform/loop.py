"""The training loop, top to bottom. No Ray here: `train.py` feeds it Ray Data shards on
Ray Train workers, `plain.py` feeds it a local loader; both set up with `set_up`, validate
when `validates_after` says so, and run exactly this code.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from wsss.datasets.augment import AugmentConfig
from wsss.methods.base import DatasetStats, Method, Progress, build_method, required_inputs
from wsss.platform.cams import (
    THRESHOLDS,
    best_threshold,
    image_tensor,
    normalize_images,
    normalized_cams,
    region_counts,
    threshold_confusions,
    threshold_predictions,
    writable_tensor,
)
from wsss.platform.checkpoints import start_fresh
from wsss.platform.config import TrainConfig
from wsss.platform.metrics import REGION_COUNTS, confusion_matrix, cooccurrence_confusion, miou, region_rates

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops, the last good checkpoint stays."""


def set_up(config: TrainConfig, *, num_classes: int, image_labels: np.ndarray, device: torch.device,
           fresh: bool = True, distribute: Callable[[Method], None] | None = None) -> tuple[Method, torch.optim.SGD]:
    """What every feeder does before its first epoch: seeds, the method with the training
    split's statistics (`image_labels` bool [N, K+1]) on `device`, its start weights unless a
    checkpoint will be restored into it (`fresh=False`), `distribute` (data-parallel
    wrapping, before the optimizer sees the parameters), and the optimizer."""
    set_flush_denormal(config, device)
    torch.manual_seed(config.seed)
    method = build_method(config.method, num_classes, config.sections, config.backbone_config)
    labels = writable_tensor(image_labels, bool)
    method.on_dataset(DatasetStats(num_images=len(labels), image_labels=labels))
    method.to(device)  # after on_dataset: it may create buffers (e.g. the ocr co-occurrence prior)
    if fresh:
        start_fresh(method, config.init_from)
    if distribute is not None:
        distribute(method)
    return method, make_optimizer(method, config)


def validates_after(epoch: int, config: TrainConfig) -> bool:
    """Whether validation follows `epoch` (0-based): every `eval_every` epochs, and after the
    last one, so a run always ends with its objective."""
    if not (config.val_split and config.eval_every):
        return False
    return (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs


def augment_config(config: TrainConfig) -> AugmentConfig:
    """The training augmentation of a run, with the views its method asks for."""
    return AugmentConfig(crop_size=config.crop_size, scale_range=(config.scale_min, config.scale_max),
                         views=required_inputs(config.method), seed=config.seed)


def make_optimizer(method: Method, config: TrainConfig) -> torch.optim.SGD:
    """SGD over the method's groups: backbone at lr, new layers at lr × multiplier."""
    return torch.optim.SGD(method.param_groups(config.lr), lr=config.lr,
                           momentum=config.momentum, weight_decay=config.weight_decay)


def set_lr(optimizer, config: TrainConfig, step: int, total_steps: int) -> float:
    """Sets every group's lr to base · lr_mult · the schedule's factor at `step`; returns the backbone lr.

    poly:        (1 − step/total)^poly_power (poly_power 1: linear decay to 0)
    exponential: lr_decay_per_epoch^(epochs done), epochs done = step / steps per epoch
    """
    done = min(step, total_steps) / max(1, total_steps)
    if config.lr_schedule == "exponential":
        factor = config.lr_decay_per_epoch ** (done * config.epochs)
    else:
        factor = (1 - done) ** config.poly_power
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
    input_wait_seconds: float = 0.0  # in `next(batches)`: high means the input pipeline limits training
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
        out["input_wait_s"] = self.input_wait_seconds
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


def set_flush_denormal(config: TrainConfig, device: torch.device) -> bool:
    """On CPU, set this process to flush subnormal floats to zero as `flush_denormal` says;
    returns whether it flushes. x86 cores take a slow path for every subnormal operand, and
    trained weights make many in some methods (lnl's attention): their steps then ran
    several times slower (docs/benchmarks.md). Values that small are below float32's
    precision beside anything they are added to. GPU kernels flush on their own."""
    if device.type != "cpu":
        return False
    flush = torch.set_flush_denormal(config.flush_denormal) and config.flush_denormal
    if config.flush_denormal and not flush:
        logger.warning("flush_denormal=true: this CPU cannot flush subnormal floats; they are computed as is")
    logger.info("CPU training: flush_denormal=%s", flush)
    return flush


def uses_amp(config: TrainConfig, device: torch.device) -> bool:
    return config.amp and (device.type == "cuda" or config.cpu_amp)


def train_epoch(method: Method, optimizer, batches: Iterable[dict], *, config: TrainConfig,
                epoch: int, step: int, steps_per_epoch: int, device: torch.device,
                log: Callable[[dict, int], None]) -> tuple[int, EpochStats]:
    """One pass over pipeline `batches` (`model_inputs`); returns the global step after it and the epoch's stats.
    AMP is bfloat16 autocast (no loss scaling needed, unlike float16): on GPU, and on CPU with `cpu_amp`."""
    method.train()
    stats = EpochStats()
    use_amp = uses_amp(config, device)
    total_steps = steps_per_epoch * config.epochs
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        waiting_since = time.perf_counter()
        batch = next(iterator, None)
        stats.input_wait_seconds += time.perf_counter() - waiting_since
        if batch is None:
            break
        batch = model_inputs(batch, device)
        progress = Progress(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=config.epochs)
        lr = set_lr(optimizer, config, step, total_steps)
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


@dataclass
class Validation:
    """Summed confusions of one validation pass (rows = ground truth), all-reduced across replicas."""

    cams: np.ndarray | None  # [T,C,C], one per CAM threshold, for methods that validate CAMs
    segmentation: np.ndarray | None  # [C,C] of the segmentation argmax, for methods with that branch
    overlays: list[dict]  # {"id", "image", "ground_truth", and "cams" [K,H,W] or "prediction" [H,W]}
    regions: np.ndarray | None = None  # [T, len(REGION_COUNTS)] of the CAMs, where rows have region maps


@torch.no_grad()
def evaluate_rows(method: Method, rows: Iterable[dict], *, num_classes: int, device: torch.device,
                  keep_overlays: int = 0, max_images: int = 0) -> Validation:
    """Single-scale validation over rows {"id","image" HWC,"mask","labels" [K]}, optionally
    "region" HW: the CAM threshold sweep (methods that validate CAMs), with region counts
    where rows have a region map, and the segmentation argmax over all K+1 classes (methods
    with a segmentation branch)."""
    method.eval()
    classes = num_classes + 1
    with_cams = method.validates == "cams"
    cam_total = torch.zeros(len(THRESHOLDS), classes, classes, dtype=torch.int64, device=device)
    region_total = torch.zeros(len(THRESHOLDS), len(REGION_COUNTS), dtype=torch.int64, device=device)
    has_regions = False
    seg_total = torch.zeros(classes, classes, dtype=torch.int64, device=device)
    has_segmentation = False
    overlays = []
    for index, row in enumerate(rows):
        if max_images and index >= max_images:
            break
        image = image_tensor(row["image"], device)
        gt = writable_tensor(row["mask"], np.int64).to(device)
        overlay = {"id": str(row["id"]), "image": np.asarray(row["image"]), "ground_truth": np.asarray(row["mask"])}
        if with_cams:
            labels = torch.tensor(np.asarray(row["labels"]), dtype=torch.float32)  # a copy: Ray rows are read-only
            cams = normalized_cams(method, image, labels)
            cam_total += threshold_confusions(cams, gt, classes)
            if "region" in row:
                has_regions = True
                region_total += region_counts(threshold_predictions(cams), gt, writable_tensor(row["region"]))
            overlay["cams"] = cams.cpu()
            overlay["labels"] = labels.numpy()
        logits = method.segmentation_logits(image)
        if logits is not None:
            has_segmentation = True
            logits = F.interpolate(logits.float(), size=gt.shape, mode="bilinear", align_corners=False)
            prediction = logits[0].argmax(dim=0)
            seg_total += torch.from_numpy(confusion_matrix(prediction.cpu().numpy(), gt.cpu().numpy(),
                                                           classes)).to(device)
            overlay.setdefault("prediction", prediction.cpu().numpy())
        if len(overlays) < keep_overlays:
            overlays.append(overlay)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cam_total)
        dist.all_reduce(seg_total)
        dist.all_reduce(region_total)
    method.train()
    return Validation(cams=cam_total.cpu().numpy() if with_cams else None,
                      segmentation=seg_total.cpu().numpy() if has_segmentation else None, overlays=overlays,
                      regions=region_total.cpu().numpy() if with_cams and has_regions else None)


def epoch_metrics(stats: EpochStats, validation: Validation | None, epoch: int,
                  cooccurring: list[tuple[int, int]] = ()) -> dict:
    """What every epoch reports: losses, throughput and (when evaluated) the objective
    `miou`: the best CAM threshold's, or the segmentation's for methods that validate it.
    Methods with a segmentation branch also report its mIoU as `seg_miou`. At the best CAM
    threshold, the region rates where validation had region maps, and the confusion of the
    `cooccurring` class pairs (`metrics.cooccurring_pairs`)."""
    metrics = {"epoch": epoch + 1, **stats.summary()}
    if validation is not None:
        if validation.segmentation is not None and validation.segmentation.sum() > 0:
            metrics["seg_miou"] = float(miou(validation.segmentation)[1])
        if validation.cams is not None:
            if validation.cams.sum() > 0:
                best = best_threshold(validation.cams)
                metrics.update(miou=best["miou"], threshold=best["threshold"])
                index = THRESHOLDS.index(best["threshold"])
                if validation.regions is not None:
                    metrics.update(region_rates(validation.regions[index]))
                if cooccurring:
                    metrics["cooccurrence_confusion"] = cooccurrence_confusion(validation.cams[index], cooccurring)
        elif "seg_miou" in metrics:
            metrics["miou"] = metrics["seg_miou"]
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}


def overlay_predictions(overlays: list[dict], threshold: float | None) -> list[dict]:
    """Overlays for W&B: the CAMs (numpy) and their prediction at the chosen threshold where
    there are CAMs, else the segmentation's prediction."""
    out = []
    for item in overlays:
        if "cams" not in item or threshold is None:
            if "prediction" in item:
                out.append({k: item[k] for k in ("id", "image", "prediction", "ground_truth")})
            continue
        best, index = item["cams"].max(dim=0)
        prediction = torch.where(best >= threshold, index + 1, torch.zeros_like(index))
        out.append({"id": item["id"], "image": item["image"], "prediction": prediction.numpy(),
                    "ground_truth": item["ground_truth"], "cams": item["cams"].numpy(), "labels": item["labels"],
                    "threshold": threshold})
    return out
