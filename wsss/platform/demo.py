"""`wsss demo`: the whole platform on one machine with a local Ray.

Generates the synthetic benchmark, prepares it into shards, trains each requested
method on Ray Train, evaluates it with the full protocol on Ray Data, and prints one
table with the trivial all-background prediction as the floor every method must beat.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from wsss.datasets.prepare import prepare
from wsss.datasets.shards import read_manifest
from wsss.methods.base import method_parts
from wsss.platform.config import TrainConfig
from wsss.platform.metrics import miou

# Small enough for 2 CPUs in minutes, big enough for CAMs to mean something. Output stride
# 16, not 8: a CPU step costs half as much, so the demo fits its 10 minutes on the slower
# 2-core machines too (docs/benchmarks.md); its CAM mIoU was 23.0 there, 24.6 at stride 8.
DEMO_SETTINGS = {
    "demo": dict(epochs=4, batch_size=16, crop_size=96, lr=0.05, output_stride=16),
    "test": dict(epochs=2, batch_size=8, crop_size=64, lr=0.05, output_stride=8),
}


def demo_config(method: str, data: str, runs: str, preset: str, epochs: int | None, seed: int = 0,
                overrides: dict | None = None) -> TrainConfig:
    settings = dict(DEMO_SETTINGS[preset])
    if epochs:
        settings["epochs"] = epochs
    config = TrainConfig(method=method, data=data, name=f"demo-{method.replace('+', '-')}-seed{seed}", seed=seed,
                         storage_path=runs, backbone="resnet18", backbone_weights="none", num_workers=1,
                         device="auto", eval_max_images=100, wandb="auto", wandb_group="demo", **settings)
    part_settings = {key: value for part in method_parts(method) for key, value in part.demo_overrides.items()}
    return config.with_overrides({**part_settings, **(overrides or {})})


def all_background_miou(data: str, split: str = "val") -> float:
    """mIoU of predicting background everywhere: the floor."""
    import pyarrow.parquet as pq

    from wsss.datasets.shards import decode_mask
    from wsss.io import resolve

    manifest = read_manifest(data)
    conf = np.zeros((manifest.num_classes + 1,) * 2, np.int64)
    for uri in manifest.files(split):
        fs, path = resolve(uri)
        for png in pq.read_table(path, columns=["mask"], filesystem=fs).column("mask").to_pylist():
            gt = decode_mask(png).astype(np.int64).ravel()
            gt = gt[gt != manifest.ignore_index]
            conf[:, 0] += np.bincount(gt, minlength=manifest.num_classes + 1)
    return miou(conf)[1]


def run_demo(out: str = "wsss-demo", methods=("cam",), epochs: int | None = None, preset: str = "demo",
             seeds: int = 1, overrides: dict | None = None) -> list[dict]:
    """Train and evaluate every method with `seeds` seeds, each config with `overrides`
    (`key` / `section.key`) applied; prints and returns the table rows."""
    # Ray only here: demo_config also serves where Ray is not installed (benchmarks/gpu_train.py)
    from ray.data import DataContext

    from wsss.platform.console import duration
    from wsss.platform.data import quiet_console
    from wsss.platform.evaluate import evaluate_checkpoint
    from wsss.platform.runtime import ensure_ray
    from wsss.platform.train import fit, wandb_dir

    out_dir = Path(out).absolute()
    data = str(out_dir / "shards")
    configs = [demo_config(m, data, str(out_dir / "runs"), preset, epochs, seed, overrides)  # validate all first
               for m in methods for seed in range(seeds)]
    if not (out_dir / "shards" / "manifest.json").exists():
        print(f"[1/3] generating the synthetic benchmark ({preset}) and writing shards to {data}")
        prepare("synthetic", str(out_dir / "synthetic"), data, preset=preset)
    ensure_ray()
    quiet_console(DataContext.get_current())  # the steps below are the demo's progress: it fits one screen
    runs = []
    for config in configs:
        run_dir = Path(config.storage_path) / config.name
        results = finished_results(run_dir, config.epochs)
        if results:
            print(f"[2/3] {config.method} (seed {config.seed}): already trained and evaluated in {run_dir}")
        else:
            print(f"[2/3] training {config.method} (seed {config.seed}) for {config.epochs} epochs on Ray Train")
            started = time.perf_counter()
            checkpoint = fit(config).checkpoint.path
            print(f"      trained in {duration(time.perf_counter() - started)}\n"
                  f"[3/3] evaluating {config.method} (multi-scale + flip CAMs, threshold sweep) on Ray Data")
            started = time.perf_counter()
            # beside the checkpoints, where `wsss report` finds it
            results = evaluate_checkpoint(checkpoint, data, scales=(1.0, 0.5, 1.5), out=str(run_dir))
            print(f"      evaluated in {duration(time.perf_counter() - started)}: "
                  f"CAM mIoU {100 * results['miou']:.2f}%")
        runs.append({"method": config.method, "seed": config.seed, "miou": results["miou"],
                     "threshold": results["threshold"], "checkpoint": results["checkpoint"],
                     "wandb": wandb_dir(config.storage_path, config.name)})
    print(demo_table(runs, all_background_miou(data)))
    return runs


def finished_results(run_dir: Path, epochs: int) -> dict | None:
    """The evaluation a previous demo wrote for this run, if it evaluated the final epoch,
    so an interrupted multi-seed demo continues where it stopped."""
    path = run_dir / "results.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    return results if results.get("epoch") == epochs else None


def demo_table(runs: list[dict], floor: float) -> str:
    """One row per method: mean ± std of CAM mIoU over seeds, the last seed's paths."""
    lines = ["", "| method | CAM mIoU (val, %) | seeds | threshold | checkpoint | W&B run |",
             "|---|---|---|---|---|---|", f"| all background | {100 * floor:.2f} | — | — | — | — |"]
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        scores = 100 * np.array([run["miou"] for run in mine])
        spread = f" ± {scores.std(ddof=1):.2f}" if len(scores) > 1 else ""
        last = mine[-1]
        lines.append(f"| {method} | {scores.mean():.2f}{spread} | {len(mine)} | {last['threshold']:.2f} | "
                     f"{last['checkpoint']} | {last['wandb']} |")
    return "\n".join(lines) + "\n"
