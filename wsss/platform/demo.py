"""`wsss demo`: the whole platform on one machine with a local Ray.

Generates the synthetic benchmark, prepares it into shards, trains each requested
method on Ray Train, evaluates it with the full protocol on Ray Data, and prints one
table with the trivial all-background prediction as the floor every method must beat.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import ray

from wsss.datasets.prepare import prepare
from wsss.datasets.shards import read_manifest
from wsss.platform.config import TrainConfig
from wsss.platform.evaluate import evaluate_checkpoint
from wsss.platform.metrics import miou
from wsss.platform.train import fit, wandb_dir

# Small enough for 2 CPUs in minutes, big enough for CAMs to mean something.
DEMO_SETTINGS = {
    "demo": dict(epochs=4, batch_size=16, crop_size=96, lr=0.05),
    "test": dict(epochs=2, batch_size=8, crop_size=64, lr=0.05),
}


def demo_config(method: str, data: str, runs: str, preset: str, epochs: int | None) -> TrainConfig:
    settings = dict(DEMO_SETTINGS[preset])
    if epochs:
        settings["epochs"] = epochs
    return TrainConfig(method=method, data=data, name=f"demo-{method.replace('+', '-')}", storage_path=runs,
                       backbone="resnet18", output_stride=8, backbone_weights="none", num_workers=1,
                       device="auto", eval_max_images=100, wandb="auto", wandb_group="demo", **settings)


def all_background_miou(data: str, split: str = "val") -> float:
    """mIoU of predicting background everywhere: the floor."""
    import pyarrow.parquet as pq

    from wsss.datasets.shards import decode_mask
    from wsss.datasets.storage import resolve

    manifest = read_manifest(data)
    conf = np.zeros((manifest.num_classes + 1,) * 2, np.int64)
    for uri in manifest.files(split):
        fs, path = resolve(uri)
        for png in pq.read_table(path, columns=["mask"], filesystem=fs).column("mask").to_pylist():
            gt = decode_mask(png).astype(np.int64).ravel()
            gt = gt[gt != manifest.ignore_index]
            conf[:, 0] += np.bincount(gt, minlength=manifest.num_classes + 1)
    return miou(conf)[1]


def run_demo(out: str = "wsss-demo", methods=("cam",), epochs: int | None = None, preset: str = "demo") -> list[dict]:
    out_dir = Path(out).absolute()
    data = str(out_dir / "shards")
    if not (out_dir / "shards" / "manifest.json").exists():
        print(f"[1/3] generating the synthetic benchmark ({preset}) and writing shards to {data}")
        prepare("synthetic", str(out_dir / "synthetic"), data, preset=preset)
    configs = [demo_config(m, data, str(out_dir / "runs"), preset, epochs) for m in methods]  # validate all first
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), configure_logging=False)
    rows = []
    for config in configs:
        print(f"[2/3] training {config.method} for {config.epochs} epochs on Ray Train")
        result = fit(config)
        print(f"[3/3] evaluating {config.method} (multi-scale + flip CAMs, threshold sweep) on Ray Data")
        results = evaluate_checkpoint(result.checkpoint.path, data, scales=(1.0, 0.5, 1.5), out=None)
        rows.append({"method": config.method, "miou": results["miou"], "threshold": results["threshold"],
                     "checkpoint": result.checkpoint.path,
                     "wandb": wandb_dir(config.storage_path, config.name)})
    floor = all_background_miou(data)
    print(demo_table(rows, floor))
    return rows


def demo_table(rows: list[dict], floor: float) -> str:
    lines = ["", "| method | CAM mIoU (val) | threshold | checkpoint | W&B run |", "|---|---|---|---|---|",
             f"| all background | {100 * floor:.2f} | — | — | — |"]
    for row in rows:
        lines.append(f"| {row['method']} | {100 * row['miou']:.2f} | {row['threshold']:.2f} | "
                     f"{row['checkpoint']} | {row['wandb']} |")
    return "\n".join(lines) + "\n"
