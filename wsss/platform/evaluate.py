"""`wsss evaluate`: full-protocol CAM evaluation of a checkpoint as a Ray Data job.

Multi-scale (1.0, 0.5, 1.5, 2.0) + flip CAMs, a background-threshold sweep in one pass
(per-image confusion matrices for every threshold, summed on the driver), the best
mIoU with its threshold and per-class IoU, and optionally dense CRF at that threshold
(a second pass). Inference runs in actors, on GPUs when the cluster has them.
"""

from __future__ import annotations

import json

import numpy as np
import ray
import torch

from wsss.datasets.shards import read_manifest
from wsss.datasets.credentials import public_uri
from wsss.datasets.storage import check_bucket, join, write_text
from wsss.platform.cams import FULL_SCALES, THRESHOLDS, best_threshold, image_tensor, normalized_cams, \
    threshold_confusions
from wsss.platform.checkpoints import load_method
from wsss.platform.crf import dense_crf
from wsss.platform.data import eval_dataset
from wsss.platform.metrics import confusion_matrix, foreground_error_rates, miou
from wsss.platform.runtime import ensure_ray, job_batches


class CAMScorer:
    """Ray Data actor: rows -> per-image confusion matrices [T*C*C] (or [C*C] with CRF)."""

    def __init__(self, checkpoint: str, scales, flip: bool, crf_threshold: float | None, crf_preset: str,
                 method_overrides: dict | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method, state = load_method(checkpoint, self.device, method_overrides)
        self.num_classes = len(state["dataset"]["classes"])  # K + 1
        self.scales, self.flip = tuple(scales), flip
        self.crf_threshold, self.crf_preset = crf_threshold, crf_preset

    def __call__(self, batch: dict) -> dict:
        out = []
        for image, mask, labels in zip(batch["image"], batch["mask"], batch["labels"]):
            labels = torch.tensor(np.asarray(labels), dtype=torch.float32)  # a copy: Ray batches are read-only
            cams = normalized_cams(self.method, image_tensor(image, self.device), labels, self.scales, self.flip)
            gt = torch.as_tensor(np.asarray(mask), dtype=torch.int64)
            if self.crf_threshold is None:
                out.append(threshold_confusions(cams, gt, self.num_classes).cpu().numpy().ravel())
            else:
                prediction = crf_prediction(np.asarray(image, np.uint8), cams.cpu().numpy(), labels.numpy(),
                                            self.crf_threshold, self.crf_preset)
                out.append(confusion_matrix(prediction, gt.numpy(), self.num_classes).ravel())
        return {"confusion": np.stack(out)}


def crf_prediction(image: np.ndarray, cams: np.ndarray, labels: np.ndarray, threshold: float,
                   preset: str) -> np.ndarray:
    """Dense CRF over [background = threshold, present classes' CAMs] -> label map [H,W]."""
    present = np.flatnonzero(labels > 0.5)
    scores = np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams[present]])
    probs = scores / scores.sum(axis=0, keepdims=True).clip(min=1e-5)
    refined = dense_crf(np.ascontiguousarray(image), probs, preset=preset)
    class_ids = np.concatenate([[0], present + 1])
    return class_ids[refined.argmax(axis=0)]


def _summed_confusions(checkpoint, data, split, scales, flip, crf_threshold, crf_preset,
                       max_images, num_actors, method_overrides) -> np.ndarray:
    dataset = eval_dataset(data, split)
    if max_images:
        dataset = dataset.limit(max_images)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    # An autoscaling pool: a fixed-size pool that took every CPU would starve the read tasks.
    scorer_args = dict(compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors), batch_size=1,
                       num_gpus=1 if use_gpu else 0, num_cpus=1,
                       fn_constructor_kwargs=dict(checkpoint=checkpoint, scales=scales, flip=flip,
                                                  crf_threshold=crf_threshold, crf_preset=crf_preset,
                                                  method_overrides=method_overrides))
    total = None
    for batch in job_batches(dataset.map_batches(CAMScorer, **scorer_args), batch_size=64, batch_format="numpy"):
        part = batch["confusion"].sum(axis=0)
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"{data}: split {split!r} has no images to evaluate")
    return total


def evaluate_checkpoint(checkpoint: str, data: str, *, split: str = "val", scales=FULL_SCALES,
                        flip: bool = True, crf: bool = False, crf_preset: str = "psa",
                        max_images: int = 0, num_actors: int | None = None, out: str | None = None,
                        method_overrides: dict | None = None) -> dict:
    """Full-protocol evaluation; returns (and writes to `out`) the results dict. A bad
    checkpoint, data, output URI or method override fails before Ray starts (joined or
    started here). `method_overrides` change inference settings, e.g. {"lnl.export": "shrink"}."""
    _, state = load_method(checkpoint, method_overrides=method_overrides)
    read_manifest(data)
    if out:
        check_bucket(out)
    ensure_ray()
    classes = state["dataset"]["classes"]
    resources = ray.cluster_resources()
    num_actors = num_actors or int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)) // 2)
    sweep = _summed_confusions(checkpoint, data, split, scales, flip, None, crf_preset, max_images, num_actors,
                               method_overrides)
    confusions = sweep.reshape(len(THRESHOLDS), len(classes), len(classes))
    best = best_threshold(confusions)
    best_index = THRESHOLDS.index(best["threshold"])
    fpr, fnr = foreground_error_rates(confusions[best_index])
    results = {"checkpoint": public_uri(checkpoint), "data": public_uri(data), "split": split,
               "method": state["config"]["method"], "epoch": state["epoch"], "method_overrides": dict(method_overrides or {}),
               "scales": list(scales), "flip": flip, "classes": classes,
               **best, "fg_fpr": fpr, "fg_fnr": fnr}
    if crf:
        conf = _summed_confusions(checkpoint, data, split, scales, flip, best["threshold"], crf_preset,
                                  max_images, num_actors, method_overrides).reshape(len(classes), len(classes))
        per_class, mean = miou(conf)
        results["crf"] = {"preset": crf_preset, "miou": mean,
                          "per_class_iou": [None if np.isnan(v) else float(v) for v in per_class]}
    if out:
        write_results(results, out)
    return results


def results_table(results: dict) -> str:
    """Readable Markdown table of per-class IoU plus the headline numbers."""
    settings = "".join(f", {key}={value}" for key, value in results.get("method_overrides", {}).items())
    lines = [f"# {results['method']}{settings} on {results['split']} ({results['data']})", "",
             f"mIoU **{100 * results['miou']:.2f}** at background threshold {results['threshold']:.2f}"
             f" (scales {results['scales']}, flip {results['flip']}); foreground FPR "
             f"{results['fg_fpr']:.3f}, FNR {results['fg_fnr']:.3f}", ""]
    crf = results.get("crf")
    lines += ["| class | IoU |" + (" IoU + CRF |" if crf else ""), "|---|---|" + ("---|" if crf else "")]
    for index, name in enumerate(results["classes"]):
        value = results["per_class_iou"][index]
        row = f"| {name} | {'—' if value is None else f'{100 * value:.2f}'} |"
        if crf:
            refined = crf["per_class_iou"][index]
            row += f" {'—' if refined is None else f'{100 * refined:.2f}'} |"
        lines.append(row)
    if crf:
        lines += ["", f"with dense CRF ({crf['preset']}): mIoU **{100 * crf['miou']:.2f}**"]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: str) -> None:
    """results.json and results.md in `out`, a local directory or a URI (s3://, gs://)."""
    write_text(join(out, "results.json"), json.dumps(results, indent=2))
    write_text(join(out, "results.md"), results_table(results))
