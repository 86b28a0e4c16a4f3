"""Sweep overhead and ASHA savings on the synthetic benchmark (tiny settings, CPU).

1. A K-trial sweep without a scheduler (one trial at a time) against K plain `fit`s of the
   same K configurations, one after another: the ratio of wall times is what Tune, the
   searcher and the trial drivers cost on top of training.
2. The same sweep (same seed, so TPE's first, random, suggestions are the same K
   configurations) with ASHA: trial-epochs trained, and the best objective, against (1).

    python benchmarks/sweep.py --trials 4 --epochs 3 --out /tmp/wsss-bench-sweep

Prints one JSON object and a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from wsss.datasets.prepare import prepare  # noqa: E402
from wsss.platform.config import TrainConfig  # noqa: E402
from wsss.platform.runtime import ensure_ray  # noqa: E402
from wsss.platform.train import fit  # noqa: E402
from wsss.tuning.tune import run_sweep  # noqa: E402


def trials_of(sweep_dir: Path) -> list[dict]:
    """Last result of every trial (params, objective, epochs trained), in start order."""
    trials = []
    for path in sweep_dir.glob("trial_*/result.json"):
        results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        first, last = results[0], results[-1]
        trials.append({"params": {k: v for k, v in last["config"].items() if k != "run"},
                       "miou": last["miou"], "epochs": last["epoch"],
                       "started": first["timestamp"] - first["time_total_s"]})
    return sorted(trials, key=lambda t: t["started"])


def timed_sweep(base: TrainConfig, trials: int, scheduler: str, name: str, seed: int) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    run_sweep(base, trials=trials, scheduler=scheduler, concurrency=1, seed=seed, name=name,
              evaluate_best=False)
    return time.perf_counter() - started, trials_of(Path(base.storage_path) / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--method", default="cam+fsae")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/wsss-bench-sweep")
    args = parser.parse_args()

    out = Path(args.out).absolute()
    data = out / "shards"
    if not (data / "manifest.json").exists():
        prepare("synthetic", out / "synthetic", data, preset="test")
    stamp = time.strftime("%H%M%S")
    base = TrainConfig(method=args.method, data=str(data), storage_path=str(out / f"runs-{stamp}"),
                       epochs=args.epochs, batch_size=8, crop_size=64, backbone="resnet18",
                       backbone_weights="none", eval_max_images=8, wandb="disabled")
    ensure_ray()

    sweep_s, trials = timed_sweep(base, args.trials, "none", "fifo", args.seed)
    plain_s = 0.0
    for index, trial in enumerate(trials):
        config = base.with_overrides({**trial["params"], "name": f"plain-{index}"})
        started = time.perf_counter()
        fit(config)
        plain_s += time.perf_counter() - started
    asha_s, asha_trials = timed_sweep(base, args.trials, "asha", "asha", args.seed)

    same_configs = [t["params"] for t in trials] == [t["params"] for t in asha_trials]
    full_epochs = sum(t["epochs"] for t in trials)
    asha_epochs = sum(t["epochs"] for t in asha_trials)
    result = {
        "method": args.method, "trials": args.trials, "epochs": args.epochs, "cpus": os.cpu_count(),
        "sweep_s": round(sweep_s, 1), "plain_s": round(plain_s, 1), "sweep_over_plain": round(sweep_s / plain_s, 3),
        "fifo_trial_epochs": full_epochs, "asha_trial_epochs": asha_epochs,
        "asha_epochs_saved": round(1 - asha_epochs / full_epochs, 3), "asha_s": round(asha_s, 1),
        "fifo_best_miou": max(t["miou"] for t in trials), "asha_best_miou": max(t["miou"] for t in asha_trials),
        "same_configurations": same_configs,
    }
    print(json.dumps(result, indent=2))
    print(f"\n| sweep ({args.trials} trials × {args.epochs} epochs, {args.method}, {os.cpu_count()} CPUs) "
          f"| value |\n|---|---|\n"
          f"| sweep / plain trainings wall time | {result['sweep_over_plain']:.2f}× "
          f"({result['sweep_s']:.0f} s vs {result['plain_s']:.0f} s) |\n"
          f"| trial-epochs, FIFO → ASHA | {full_epochs} → {asha_epochs} "
          f"({100 * result['asha_epochs_saved']:.0f}% saved) |\n"
          f"| best CAM mIoU, FIFO vs ASHA | {100 * result['fifo_best_miou']:.2f} vs "
          f"{100 * result['asha_best_miou']:.2f} (same configurations: {same_configs}) |")


if __name__ == "__main__":
    main()
