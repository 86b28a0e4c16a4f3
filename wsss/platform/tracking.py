"""Weights & Biases on rank 0: config, scalars and CAM overlays.

Offline unless the user has configured W&B (an API key in the environment or a
`wandb login`). Tracking is best effort: a W&B failure is logged once and tracking
turns itself off, it never stops training.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import re
from pathlib import Path

import numpy as np

from wsss.datasets.base import IGNORE_INDEX
from wsss.io import REDACTED, public_uri

logger = logging.getLogger(__name__)
_SECRET = re.compile(r"key|token|secret|password|credential", re.IGNORECASE)
# How long wandb.init waits for an online server before tracking turns off (W&B's default
# is 90 s, then it may retry): a run must not wait minutes on an unreachable server.
INIT_TIMEOUT_S = 20
OVERLAY_KEY = "cam_overlays"  # W&B key (and media file prefix) of the composed overlay pictures
EVALUATION_TABLE = "evaluation/per_class_iou"


def resolve_mode(mode: str) -> str:
    """auto -> online when W&B is configured on this machine, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"
    return "online" if any("wandb" in host for host in hosts) else "offline"


def public_config(config: dict) -> dict:
    """Config as it may be logged or saved: keys that look like secrets dropped and the
    credentials of every URI (`s3://KEY:SECRET@bucket`) replaced by ***, at any depth."""
    return {k: _public_value(v) for k, v in config.items() if not _SECRET.search(k)}


def _public_value(value):
    if isinstance(value, dict):
        return public_config(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_public_value(v) for v in value)
    return public_uri(value) if isinstance(value, str) else value


class Tracker:
    """Logs to one W&B run; a no-op off rank 0, when disabled, or after a W&B failure."""

    def __init__(self, *, project: str, name: str, run_id: str, group: str, mode: str, config: dict,
                 directory: str | Path, tags: list[str], enabled: bool = True):
        self.run = None
        mode = resolve_mode(mode)
        if not enabled or mode == "disabled":
            return
        try:
            import wandb

            Path(directory).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=project, name=name, id=run_id, resume="allow",
                                  group=group or None, mode=mode, dir=str(directory), tags=tags,
                                  config=public_config(config), reinit="finish_previous",
                                  # the run's own epoch lines are the console output; W&B's are in its folder
                                  settings=wandb.Settings(silent=True, init_timeout=INIT_TIMEOUT_S))
        except Exception as error:  # unreachable server, bad key...: train anyway
            logger.warning("W&B tracking is off for this run: %s", error)
            self.run = None

    def log(self, values: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(values, step=step)
        except Exception as error:
            logger.warning("W&B logging failed, tracking stops: %s", error)
            self.run = None

    def log_cam_overlays(self, samples: list[dict], classes: list[str], palette, step: int) -> None:
        """samples: {"id", "image" uint8 HWC, "prediction" HW, "ground_truth" HW or None, and
        where there are CAMs "cams" [K,H,W], "labels" [K], "threshold"}. Logged twice: `cams`,
        the image with W&B's interactive class masks, and `cam_overlays`, our own composed
        picture (image | ground truth | CAM per class | prediction), which stays readable
        outside W&B's viewer (`wsss report` takes its contact sheets from these files)."""
        if self.run is None or not samples:
            return
        import wandb

        from wsss.platform.pictures import cam_panel, prediction_panel

        labels = {i: name for i, name in enumerate(classes)} | {IGNORE_INDEX: "void"}
        images, overlays = [], []
        for sample in samples:
            masks = {"prediction": {"mask_data": np.asarray(sample["prediction"], np.uint8),
                                    "class_labels": labels}}
            if sample.get("ground_truth") is not None:
                masks["ground_truth"] = {"mask_data": np.asarray(sample["ground_truth"], np.uint8),
                                         "class_labels": labels}
            images.append(wandb.Image(sample["image"], masks=masks, caption=sample["id"]))
            if "cams" in sample:
                picture = cam_panel(sample["image"], sample["cams"], sample["labels"], sample["prediction"],
                                    sample.get("ground_truth"), classes, palette, title=sample["id"],
                                    prediction_caption=f"prediction (t={sample['threshold']:.2f})")
            else:
                picture = prediction_panel(sample["image"], sample["prediction"], sample.get("ground_truth"),
                                           classes, palette, title=sample["id"])
            overlays.append(wandb.Image(picture, caption=sample["id"]))
        self.log({"cams": images, OVERLAY_KEY: overlays}, step=step)

    def log_checkpoint(self, directory: str, *, epoch: int, metrics: dict) -> None:
        """The checkpoint directory as a W&B model artifact (aliases `latest` and
        `epoch-N`). Its files are copied to W&B's staging folder at once, so the directory
        may be deleted after this returns."""
        if self.run is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(f"checkpoint-{self.run.id}", type="model", metadata={
                "epoch": epoch, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
            artifact.add_dir(directory)
            self.run.log_artifact(artifact, aliases=["latest", f"epoch-{epoch}"])
        except Exception as error:
            logger.warning("W&B checkpoint upload failed, tracking stops: %s", error)
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as error:
                logger.warning("W&B finish failed: %s", error)
            self.run = None


def run_id(storage_path: str, name: str) -> str:
    """W&B id of the run `name` under `storage_path` (canonical): stable, so a resumed run
    continues its W&B run, and unique per (storage path, name). The readable part alone
    would make `exp.1` and `exp-1`, or one name under two storage paths, one W&B run."""
    location = public_uri(storage_path).replace(f"://{REDACTED}@", "://")  # the same place, whoever reads it
    digest = hashlib.sha256(f"{location}\0{name}".encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', name)[:48]}-{digest}"


def log_evaluation(results: dict, *, project: str, name: str, run_id: str, directory: str, mode: str,
                   group: str = "", tags: list[str] = ()) -> str | None:
    """A full evaluation (`wsss evaluate`) into the summary of the training run's W&B run,
    resumed by its id, with a table of per-class IoU; returns where it went, or None when
    W&B is off. Offline, the resumed run is a folder of its own beside the training's, and
    `wandb sync` of both fills one run. Best effort, as in training."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    tracker = Tracker(project=project, name=name, run_id=run_id, group=group, mode=mode, config={},
                      directory=directory, tags=list(tags))
    if tracker.run is None:
        return None
    try:
        import wandb

        crf = results.get("crf") or {}
        rows = [[cls, iou, (crf.get("per_class_iou") or [None] * len(results["classes"]))[i]]
                for i, (cls, iou) in enumerate(zip(results["classes"], results["per_class_iou"], strict=True))]
        summary = {f"evaluation/{key}": results[key] for key in
                   ("miou", "threshold", "fg_fpr", "fg_fnr", "split", "checkpoint", "epoch", "part_recall",
                    "body_recall", "context_fpr", "cooccurrence_confusion") if key in results}
        if crf:
            summary["evaluation/crf_miou"] = crf["miou"]
        summary["evaluation/scales"] = ",".join(str(s) for s in results["scales"])
        summary[EVALUATION_TABLE] = wandb.Table(columns=["class", "IoU", "IoU + CRF"], data=rows)
        tracker.run.summary.update(summary)
        where = tracker.run.dir
    except Exception as error:
        logger.warning("W&B evaluation summary failed: %s", error)
        where = None
    tracker.finish()
    return where
