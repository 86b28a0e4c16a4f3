"""CAM inference and the background-threshold sweep shared by training-time and full evaluation.

A CAM becomes a segmentation by placing a constant background score t beside the
normalised foreground maps of the image's classes and taking the argmax; the sweep
scores every t at once (one confusion matrix per threshold) so the best t is found
in a single pass over the data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wsss.datasets.base import IGNORE_INDEX, REGION_BODY, REGION_CONTEXT, REGION_PART
from wsss.platform.metrics import miou

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))
FULL_SCALES = (1.0, 0.5, 1.5, 2.0)
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> ImageNet-normalised float32 on the same device."""
    return (images.float() / 255 - _MEAN.to(images.device)) / _STD.to(images.device)


def writable_tensor(array, dtype=None) -> torch.Tensor:
    """A CPU tensor of `array` as `dtype`. Ray hands arrays over read-only (rows, and what a
    worker gets through the object store) and torch warns on sharing read-only memory, so
    such an array is copied: once, with the dtype conversion where there is one."""
    array = np.asarray(array, dtype=dtype)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def image_tensor(image_hwc: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [H,W,3] -> ImageNet-normalised float [1,3,H,W] on device."""
    return normalize_images(torch.from_numpy(np.array(image_hwc, dtype=np.uint8)).to(device).permute(2, 0, 1)[None])


@torch.no_grad()
def normalized_cams(method, image: torch.Tensor, labels: torch.Tensor,
                    scales=(1.0,), flip: bool = False) -> torch.Tensor:
    """CAMs [K,H,W] in [0,1] at image size: summed over scales (and flips), then each
    present class divided by its max; classes absent from `labels` [K] are zeroed."""
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = F.interpolate(image, size=size, mode="bilinear", align_corners=False) if scale != 1.0 else image
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        maps = method.cam_maps(batch).float()
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        maps = maps[0] + maps[1].flip(-1) if flip else maps[0]
        total = maps if total is None else total + maps
    total = F.relu(total) * (labels.to(total.device).view(-1, 1, 1) > 0.5)
    peak = total.flatten(1).amax(dim=1).clamp_min(1e-5).view(-1, 1, 1)
    return total / peak


def threshold_predictions(cams: torch.Tensor, thresholds=THRESHOLDS) -> torch.Tensor:
    """[K,H,W] normalised CAMs -> long [T,H,W] label maps, background = 0 when the best
    foreground score is below the threshold."""
    best, index = cams.max(dim=0)
    t = torch.tensor(thresholds, device=cams.device, dtype=cams.dtype).view(-1, 1, 1)
    return torch.where(best[None] >= t, index[None] + 1, torch.zeros_like(index[None]))


def threshold_confusions(cams: torch.Tensor, gt: torch.Tensor, num_classes: int,
                         thresholds=THRESHOLDS, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64 [T,C,C] confusion matrices (rows = ground truth), C = K+1, one per threshold.
    The same counts as `metrics.confusion_matrix` per threshold, in one bincount on the
    CAMs' device (this runs for every evaluated image)."""
    preds = threshold_predictions(cams, thresholds)
    gt = gt.to(preds.device)
    counted = gt != ignore_index
    if bool(((gt[counted] < 0) | (gt[counted] >= num_classes)).any()):
        raise ValueError(f"ground truth holds labels outside [0, {num_classes}) and != {ignore_index}")
    pairs = (gt * num_classes)[None] + preds
    offsets = torch.arange(len(thresholds), device=preds.device).view(-1, 1, 1) * num_classes ** 2
    index = (pairs + offsets)[counted[None].expand_as(preds)]
    counts = torch.bincount(index, minlength=len(thresholds) * num_classes ** 2)
    return counts.view(len(thresholds), num_classes, num_classes)


def region_counts(predictions: torch.Tensor, gt: torch.Tensor, region: torch.Tensor,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64 [T, 6] `wsss.platform.metrics.REGION_COUNTS` of label maps `predictions` [T,H,W]
    against ground truth `gt` [H,W] and a region map `region` [H,W] (void pixels skipped)."""
    gt, region = gt.to(predictions.device), region.to(predictions.device)
    counted = gt != ignore_index
    hit = predictions == gt[None]
    out = []
    for kind in (REGION_PART, REGION_BODY):
        pixels = counted & (region == kind) & (gt > 0)
        out += [(hit & pixels[None]).flatten(1).sum(1), pixels.sum().expand(len(predictions))]
    context = counted & (region == REGION_CONTEXT)
    out += [((predictions > 0) & context[None]).flatten(1).sum(1), context.sum().expand(len(predictions))]
    return torch.stack(out, dim=1).long()


def best_threshold(confusions: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """The threshold with the best mIoU, with its per-class IoU (see `score_at_threshold`)."""
    scores = [miou(np.asarray(c))[1] for c in confusions]
    return score_at_threshold(confusions, thresholds[int(np.nanargmax(scores))], thresholds)


def check_threshold(threshold: float, thresholds=THRESHOLDS) -> None:
    """ValueError unless `threshold` is one of the swept `thresholds`."""
    if threshold not in thresholds:
        raise ValueError(f"threshold={threshold!r}: must be one of the swept thresholds {list(thresholds)}")


def score_at_threshold(confusions: np.ndarray, threshold: float, thresholds=THRESHOLDS) -> dict:
    """mIoU and per-class IoU at `threshold` (one of `thresholds`, chosen elsewhere, e.g. on a
    dev split), and the mIoU at every threshold."""
    check_threshold(threshold, thresholds)
    scores = [miou(np.asarray(c)) for c in confusions]
    per_class, mean = scores[thresholds.index(threshold)]
    return {"miou": float(mean), "threshold": float(threshold),
            "per_class_iou": [None if np.isnan(v) else float(v) for v in per_class],
            "miou_by_threshold": {str(t): float(s[1]) for t, s in zip(thresholds, scores, strict=True)}}
