"""`wsss evaluate`: full-protocol CAM evaluation of a checkpoint as a Ray Data job.

Multi-scale (1.0, 0.5, 1.5, 2.0) + flip CAMs, a background-threshold sweep in one pass
(per-image confusion matrices for every threshold, summed on the driver), the mIoU at the
best threshold (or at one chosen on another split) with per-class IoU, and optionally dense
CRF at that threshold (a second pass). Where the shards have region maps (the synthetic
benchmark), also where the predictions land on them (`metrics.region_rates`). Inference
runs in actors, on GPUs when the cluster has them.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import ray
import torch

from wsss.datasets.reading import eval_rows
from wsss.datasets.shards import image_labels, read_manifest
from wsss.datasets.verification import remember_verified
from wsss.io import canonical, check_bucket, join, public_uri, write_text
from wsss.ops.crf import dense_crf
from wsss.platform.cams import (
    FULL_SCALES,
    THRESHOLDS,
    best_threshold,
    check_threshold,
    image_tensor,
    normalized_cams,
    region_counts,
    score_at_threshold,
    threshold_confusions,
    threshold_predictions,
    writable_tensor,
)
from wsss.platform.checkpoints import CHECKPOINT_CHOICES, load_method
from wsss.platform.data import eval_dataset
from wsss.platform.metrics import (
    confusion_matrix,
    cooccurrence_confusion,
    cooccurring_pairs,
    foreground_error_rates,
    miou,
    region_rates,
)
from wsss.platform.pictures import cam_panel, picture_name, save_png
from wsss.platform.runtime import ensure_ray, job_batches
from wsss.platform.tracking import log_evaluation, run_id


class CAMScorer:
    """Ray Data actor: rows -> per-image confusion matrices [T*C*C] (or [C*C] with CRF), and
    region counts [T*6] where rows have a region map."""

    def __init__(self, checkpoint: str, scales, flip: bool, crf_threshold: float | None, crf_preset: str,
                 method_overrides: dict | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method, state = load_method(checkpoint, self.device, method_overrides)
        self.num_classes = len(state["dataset"]["classes"])  # K + 1
        self.scales, self.flip = tuple(scales), flip
        self.crf_threshold, self.crf_preset = crf_threshold, crf_preset

    def __call__(self, batch: dict) -> dict:
        out, regions = [], []
        for row in range(len(batch["image"])):
            image = batch["image"][row]
            labels = torch.tensor(np.asarray(batch["labels"][row]), dtype=torch.float32)  # a copy: read-only batches
            cams = normalized_cams(self.method, image_tensor(image, self.device), labels, self.scales, self.flip)
            gt = writable_tensor(batch["mask"][row], np.int64)
            if self.crf_threshold is None:
                out.append(threshold_confusions(cams, gt, self.num_classes).cpu().numpy().ravel())
                if "region" in batch:
                    region = writable_tensor(batch["region"][row])
                    regions.append(region_counts(threshold_predictions(cams), gt, region).cpu().numpy().ravel())
            else:
                prediction = crf_prediction(np.asarray(image, np.uint8), cams.cpu().numpy(), labels.numpy(),
                                            self.crf_threshold, self.crf_preset)
                out.append(confusion_matrix(prediction, gt.numpy(), self.num_classes).ravel())
        return {"confusion": np.stack(out), **({"regions": np.stack(regions)} if regions else {})}


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
                       max_images, num_actors, method_overrides, verify) -> dict[str, np.ndarray]:
    dataset = eval_dataset(data, split, verify=verify)
    if max_images:
        dataset = dataset.limit(max_images)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    # An autoscaling pool: a fixed-size pool that took every CPU would starve the read tasks.
    scorer_args = dict(compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors), batch_size=1,
                       num_gpus=1 if use_gpu else 0, num_cpus=1,
                       fn_constructor_kwargs=dict(checkpoint=checkpoint, scales=scales, flip=flip,
                                                  crf_threshold=crf_threshold, crf_preset=crf_preset,
                                                  method_overrides=method_overrides))
    total: dict[str, np.ndarray] = {}
    for batch in job_batches(dataset.map_batches(CAMScorer, **scorer_args), batch_size=64, batch_format="numpy"):
        for key, values in batch.items():
            total[key] = total.get(key, 0) + values.sum(axis=0)
    if not total:
        raise ValueError(f"{data}: split {split!r} has no images to evaluate")
    return total


def evaluate_checkpoint(checkpoint: str, data: str, *, split: str = "val", scales=FULL_SCALES,
                        flip: bool = True, crf: bool = False, crf_preset: str = "psa",
                        max_images: int = 0, num_actors: int | None = None, out: str | None = None,
                        method_overrides: dict | None = None, threshold: float | None = None,
                        choice: str = "best", verify_data: bool = True, show_dir: str | None = None,
                        show_images: int = 8) -> dict:
    """Full-protocol evaluation; returns (and writes to `out`) the results dict. A bad
    checkpoint, data, output URI, threshold or method override fails before Ray starts
    (joined or started here). `method_overrides` change inference settings, e.g.
    {"lnl.export": "shrink"}; `threshold` scores at that background threshold (one chosen on
    another split) instead of the split's best. A run directory is evaluated at its `choice`
    (best or latest) checkpoint, named in the results. `verify_data`: the read tasks check
    the shards' sha256 until a full pass has recorded them. `show_dir`: a PNG for each of
    the first `show_images` images (`write_cam_pictures`). The results also go to the
    summary of the run's W&B run, where the checkpoint is in a run (`log_to_run`)."""
    checkpoint = CHECKPOINT_CHOICES[choice](checkpoint)
    _, state = load_method(checkpoint, method_overrides=method_overrides)
    manifest = read_manifest(data)
    if threshold is not None:
        check_threshold(threshold)  # before Ray starts
    if out:
        check_bucket(out)
    ensure_ray()
    classes = state["dataset"]["classes"]
    resources = ray.cluster_resources()
    num_actors = num_actors or int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)) // 2)
    sweep = _summed_confusions(checkpoint, data, split, scales, flip, None, crf_preset, max_images, num_actors,
                               method_overrides, verify_data)
    if verify_data and not max_images:
        remember_verified(manifest, split)
    confusions = sweep["confusion"].reshape(len(THRESHOLDS), len(classes), len(classes))
    scored = best_threshold(confusions) if threshold is None else score_at_threshold(confusions, threshold)
    index = THRESHOLDS.index(scored["threshold"])
    fpr, fnr = foreground_error_rates(confusions[index])
    results = {"checkpoint": public_uri(checkpoint), "data": public_uri(data), "split": split,
               "method": state["config"]["method"], "epoch": state["epoch"],
               "method_overrides": dict(method_overrides or {}),
               "scales": list(scales), "flip": flip, "classes": classes,
               "threshold_chosen_on": split if threshold is None else "given", **scored, "fg_fpr": fpr, "fg_fnr": fnr}
    results.update(cooccurrence_scores(confusions[index], manifest, state["config"]["train_split"]))
    if "regions" in sweep:
        results.update(region_rates(sweep["regions"].reshape(len(THRESHOLDS), -1)[index]))
    if crf:
        conf = _summed_confusions(checkpoint, data, split, scales, flip, scored["threshold"], crf_preset, max_images,
                                  num_actors, method_overrides, False)["confusion"].reshape(len(classes), len(classes))
        per_class, mean = miou(conf)
        results["crf"] = {"preset": crf_preset, "miou": mean,
                          "per_class_iou": [None if np.isnan(v) else float(v) for v in per_class]}
    if out:
        write_results(results, out)
    if show_dir:
        results["pictures"] = [str(p) for p in write_cam_pictures(
            checkpoint, data, split, show_dir, count=show_images, scales=scales, flip=flip,
            threshold=results["threshold"], method_overrides=method_overrides, palette=manifest.palette)]
    wandb_run = log_to_run(results, checkpoint, state["config"])
    if wandb_run:
        results["wandb"] = wandb_run
    return results


def write_cam_pictures(checkpoint: str, data: str, split: str, show_dir: str, *, count: int, scales, flip: bool,
                       threshold: float, method_overrides: dict | None, palette) -> list[Path]:
    """`show_dir/<image id>.png` for the split's first `count` images: image | ground truth
    | CAM heatmap of each class present | prediction at `threshold`, from the CAMs the
    evaluation scores (same scales and flips). Computed here, on the driver: a few images."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method, state = load_method(checkpoint, device, method_overrides)
    classes = state["dataset"]["classes"]
    written = []
    for row in islice(eval_rows(data, split), count):
        labels = torch.from_numpy(np.array(row["labels"], np.float32))
        cams = normalized_cams(method, image_tensor(row["image"], device), labels, scales, flip)
        prediction = threshold_predictions(cams, (threshold,))[0].cpu().numpy()
        picture = cam_panel(np.asarray(row["image"]), cams.cpu().numpy(), labels.numpy(), prediction,
                            np.asarray(row["mask"]), classes, palette,
                            title=f"{row['id']}: {state['config']['method']} on {split}",
                            prediction_caption=f"prediction (t={threshold:.2f})")
        written.append(save_png(picture, Path(show_dir) / f"{picture_name(row['id'])}.png"))
    return written


def log_to_run(results: dict, checkpoint: str, config: dict) -> str | None:
    """The results into the W&B run of the training run that holds `checkpoint` (a
    `checkpoint_*` folder in the run's folder), resumed by the id training gave it; None
    for a checkpoint outside its run or a run trained without W&B."""
    from wsss.platform.train import wandb_dir  # Ray Train: only when there is a run to log to

    run_dir, _ = canonical(checkpoint).rstrip("/").rsplit("/", 1)
    storage, folder = run_dir.rsplit("/", 1)
    name = config.get("name")
    if not name or folder != name:
        return None
    return log_evaluation(results, project=config.get("wandb_project", "wsss"), name=name,
                          run_id=run_id(storage, name), directory=wandb_dir(storage, name),
                          mode=config.get("wandb", "auto"), group=config.get("wandb_group", ""),
                          tags=[config["method"]])


def cooccurrence_scores(confusion: np.ndarray, manifest, train_split: str) -> dict:
    """`cooccurring_pairs` of the run's training split and their `cooccurrence_confusion`
    in `confusion`; nothing when the data has no such split or no such pair."""
    pairs = cooccurring_pairs(image_labels(manifest, train_split)) if train_split in manifest.splits else []
    if not pairs:
        return {}
    return {"cooccurring_pairs": [[manifest.classes[a], manifest.classes[b]] for a, b in pairs],
            "cooccurrence_confusion": cooccurrence_confusion(confusion, pairs)}


def results_table(results: dict) -> str:
    """Readable Markdown table of per-class IoU plus the headline numbers."""
    settings = "".join(f", {key}={value}" for key, value in results.get("method_overrides", {}).items())
    lines = [f"# {results['method']}{settings} on {results['split']} ({results['data']})", "",
             f"mIoU **{100 * results['miou']:.2f}** at background threshold {results['threshold']:.2f}"
             f" (scales {results['scales']}, flip {results['flip']}); foreground FPR "
             f"{results['fg_fpr']:.3f}, FNR {results['fg_fnr']:.3f}", ""]
    regions = [f"{key} {results[key]:.3f}" for key in ("part_recall", "body_recall", "context_fpr",
                                                       "cooccurrence_confusion") if key in results]
    if regions:
        lines[-1:-1] = ["; ".join(regions)]
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
