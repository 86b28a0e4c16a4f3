"""Segmentation metrics: confusion matrix, IoU, foreground FPR/FNR, out-of-candidate rate.

Inputs may be numpy arrays or torch tensors (moved to the CPU); results are always numpy
arrays or Python floats, so they can be summed across Ray Data batches and written as JSON.
Class 0 is background throughout.
"""

from __future__ import annotations

import numpy as np

from wsss.datasets.base import IGNORE_INDEX


def _numpy(name: str, array) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach"):  # a torch tensor; torch is not imported for a type check
        return array.detach().cpu().numpy()
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(array).__name__}")


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """int64 [C,C] counts: rows = ground-truth class, columns = predicted class.

    Pixels whose ground truth is `ignore_index` are skipped. Any other value outside
    [0, num_classes) in gt, or in pred at a counted pixel, is an error.
    """
    pred, gt = _numpy("pred", pred), _numpy("gt", gt)
    if pred.shape != gt.shape:
        raise ValueError(f"confusion_matrix: pred shape {pred.shape} != gt shape {gt.shape}")
    for name, array in (("pred", pred), ("gt", gt)):
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"confusion_matrix: {name} must hold integer labels, got {array.dtype}")
    if num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
    counted = gt != ignore_index
    gt, pred = gt[counted].astype(np.int64), pred[counted].astype(np.int64)
    for name, array in (("gt", gt), ("pred", pred)):
        bad = (array < 0) | (array >= num_classes)
        if bad.any():
            raise ValueError(f"confusion_matrix: {name} holds label {array[bad][0]} outside "
                             f"[0, {num_classes}) (ignore_index {ignore_index})")
    counts = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou(conf) -> tuple[np.ndarray, float]:
    """Per-class IoU (float64 [C]) and their mean.

    IoU_c = TP / (TP + FP + FN). A class neither in the ground truth nor predicted has no IoU
    (NaN) and is left out of the mean; a class in either counts (a class only predicted has
    IoU 0). The mean is NaN when no class is present at all.
    """
    conf = _numpy("conf", conf).astype(np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"miou: confusion matrix must be square [C,C], got shape {conf.shape}")
    true_positive = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    mean = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return iou, mean


def foreground_error_rates(conf) -> tuple[float, float]:
    """(FPR, FNR) of foreground vs background, FSAE Table 5.

    FSAE defines them in words as "the proportion of background regions predicted as objects"
    and "of object regions predicted as background"; here the proportions are of the
    ground-truth regions (the usual FP/(FP+TN) and FN/(FN+TP) with any object class as
    positive): FPR = #(gt background, pred object) / #(gt background),
    FNR = #(gt object, pred background) / #(gt object). Confusing two object classes counts
    in neither. NaN where the ground truth has no background (FPR) or no object (FNR).
    """
    conf = _numpy("conf", conf).astype(np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] < 2:
        raise ValueError(f"foreground_error_rates: need a square [C,C] matrix with C >= 2, got {conf.shape}")
    background, objects = conf[0].sum(), conf[1:].sum()
    fpr = conf[0, 1:].sum() / background if background > 0 else float("nan")
    fnr = conf[1:, 0].sum() / objects if objects > 0 else float("nan")
    return float(fpr), float(fnr)


def out_of_candidate_counts(pred, image_labels, valid=None) -> dict[str, int]:
    """Counts behind `out_of_candidate_rate`, to be summed over batches.

    pred int [B,H,W] (classes 0..K), image_labels bool [B,K+1] (column 0, background, is
    always allowed whatever it holds), valid bool [B,H,W] or None: pixels to count.
    Returns {"images", "oc_images", "pixels", "oc_pixels"}.
    """
    pred, labels = _numpy("pred", pred), _numpy("image_labels", image_labels)
    if pred.ndim != 3:
        raise ValueError(f"out_of_candidate: pred must be [B,H,W], got shape {pred.shape}")
    if labels.ndim != 2 or labels.shape[0] != pred.shape[0] or labels.dtype != np.bool_:
        raise ValueError(f"out_of_candidate: image_labels must be bool [B={pred.shape[0]},K+1], "
                         f"got {labels.dtype} {labels.shape}")
    if pred.min(initial=0) < 0 or pred.max(initial=0) >= labels.shape[1]:
        raise ValueError(f"out_of_candidate: pred holds classes outside [0, {labels.shape[1]})")
    allowed = labels.copy()
    allowed[:, 0] = True
    out_of_candidate = ~allowed[np.arange(pred.shape[0])[:, None, None], pred]  # [B,H,W]
    if valid is None:
        valid = np.ones(pred.shape, dtype=bool)
    else:
        valid = _numpy("valid", valid).astype(bool)
        if valid.shape != pred.shape:
            raise ValueError(f"out_of_candidate: valid shape {valid.shape} != pred shape {pred.shape}")
    out_of_candidate &= valid
    return {
        "images": int(pred.shape[0]),
        "oc_images": int(out_of_candidate.reshape(pred.shape[0], -1).any(axis=1).sum()),
        "pixels": int(valid.sum()),
        "oc_pixels": int(out_of_candidate.sum()),
    }


def out_of_candidate_rate(pred, image_labels, valid=None) -> tuple[float, float]:
    """(fraction of images with any out-of-candidate pixel, fraction of such pixels).

    A pixel is out of candidate when its predicted class is not among its image's labels
    (background always allowed): the OCR paper's error rate (Fig. 6a). Pixel fraction is
    over all counted pixels of the batch. See `out_of_candidate_counts` for the arguments.
    """
    counts = out_of_candidate_counts(pred, image_labels, valid)
    images, pixels = counts["images"], counts["pixels"]
    return (counts["oc_images"] / images if images else float("nan"),
            counts["oc_pixels"] / pixels if pixels else float("nan"))


# What `wsss.platform.cams.region_counts` counts per threshold, in this order.
REGION_COUNTS = ("part_hits", "part_pixels", "body_hits", "body_pixels", "context_fg", "context_pixels")


def region_rates(counts) -> dict[str, float]:
    """Where a prediction lands on the region map (`wsss.datasets.base.REGION_*`), from
    summed `REGION_COUNTS`: `part_recall` and `body_recall`, the share of objects'
    discriminative-part / body pixels predicted as their class, and `context_fpr`, the share
    of context pixels (labelled background) predicted as an object. NaN without such pixels."""
    counts = dict(zip(REGION_COUNTS, np.asarray(counts, dtype=np.float64), strict=True))

    def share(hits: str, pixels: str) -> float:
        return float(counts[hits] / counts[pixels]) if counts[pixels] > 0 else float("nan")

    return {"part_recall": share("part_hits", "part_pixels"), "body_recall": share("body_hits", "body_pixels"),
            "context_fpr": share("context_fg", "context_pixels")}


def cooccurring_pairs(image_labels, min_share: float = 0.5) -> list[tuple[int, int]]:
    """Class pairs (a < b, indices into the K+1 classes) where each class appears in at least
    `min_share` of the images of the other: the pairs a classifier can credit one for the
    other (OCR's co-occurrence problem). `image_labels` bool [L,K+1], column 0 background."""
    labels = _numpy("image_labels", image_labels)[:, 1:].astype(np.float64)
    together = labels.T @ labels
    images = np.diag(together)
    with np.errstate(invalid="ignore", divide="ignore"):
        given = np.where(images[:, None] > 0, together / images[:, None], 0.0)  # P(column | row)
    return [(a + 1, b + 1) for a in range(len(images)) for b in range(a + 1, len(images))
            if min(given[a, b], given[b, a]) >= min_share]


def cooccurrence_confusion(conf, pairs) -> float:
    """Share of the pixels of paired classes predicted as the other class of their pair,
    e.g. horse pixels predicted as rider and rider as horse. NaN without pairs or pixels."""
    conf = _numpy("conf", conf).astype(np.float64)
    confused = sum(conf[a, b] + conf[b, a] for a, b in pairs)
    pixels = sum(conf[a].sum() + conf[b].sum() for a, b in pairs)
    return float(confused / pixels) if pixels > 0 else float("nan")
