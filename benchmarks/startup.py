"""Start-up of a tiny Ray Train run, with Train's preemption watcher off (what a local Ray
gets from `ensure_ray`) and on (Ray's default), and the import a Ray Data worker pays for
the training pipeline's module vs the torch DataLoader's module, side by side in one run.

    python benchmarks/startup.py --rounds 1

Each watcher setting runs in a fresh process (the setting must precede `ray.init`) with its
own local Ray of 2 CPUs: one run to warm the worker pool, then one timed run (`cam`,
ResNet-18, 1 epoch of the `test` preset's 40 images at 64 px). Imports are timed in fresh
interpreters, the way a new Ray worker process meets them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ONE_SETTING = """
import json, os, sys, time
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
from wsss.datasets.prepare import prepare
from wsss.platform.config import TrainConfig
from wsss.platform.runtime import ensure_ray
from wsss.platform.train import fit
root = sys.argv[1]
prepare("synthetic", root + "/tree", root + "/shards", preset="test")
ensure_ray(num_cpus=2)
seconds = []
for name in ("warm", "timed"):
    started = time.perf_counter()
    fit(TrainConfig(method="cam", data=root + "/shards", name=name, storage_path=root + "/runs", epochs=1,
                    batch_size=8, crop_size=64, backbone="resnet18", output_stride=16, backbone_weights="none",
                    eval_every=0, wandb="disabled"))
    seconds.append(time.perf_counter() - started)
print("RESULT", json.dumps(seconds))
"""


def run_seconds(watcher: bool) -> list[float]:
    env = {**os.environ, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1" if watcher else "0"}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory() as root:
        done = subprocess.run([sys.executable, "-c", ONE_SETTING, root], env=env, capture_output=True, text=True)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not result:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(result[-1].removeprefix("RESULT "))


def import_seconds(module: str) -> tuple[float, bool]:
    code = f"import sys, time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t, 'torch' in sys.modules)"
    seconds, torch = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.split()
    return float(seconds), torch == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"machine: {os.uname().machine}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")

    print("| module a Ray Data worker imports | seconds | imports torch |\n|---|---|---|")
    for module in ("wsss.platform.data", "wsss.datasets.loader"):
        seconds, torch = min(import_seconds(module) for _ in range(3))
        print(f"| {module} | {seconds:.2f} | {torch} |")

    timed = {False: [], True: []}
    for _ in range(args.rounds):  # alternate, so load from other processes hits both alike
        for watcher in (False, True):
            timed[watcher].append(run_seconds(watcher)[1])
    off, on = min(timed[False]), min(timed[True])
    print("\n| preemption watcher | warm tiny run, s |\n|---|---|")
    print(f"| off (local Ray) | {off:.1f} |\n| on (Ray's default) | {on:.1f} |")
    print(f"\noff / on: {off / on:.2f}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
