"""The synthetic benchmark trained on one GPU without Ray: `wsss demo`'s runs in the plain loop.

    python benchmarks/gpu_train.py --methods cam,csrm,csrm+ocr --seeds 1 output_stride=8

For a GPU machine without Ray (benchmarks/gpu_check.sh). Each run is the demo's config
(`wsss.platform.demo.demo_config`, with the given `key=value` overrides; `output_stride=8` makes
it the protocol of docs/results.md) trained by `wsss.platform.plain.train_plain`, which
validates on every val image after each epoch at a single scale. That is the in-training
validation, not the full evaluation (multi-scale + flip, on Ray Data), so its numbers sit
beside docs/results.md's `val mIoU` columns, not its final tables. Prints one line per epoch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from wsss.datasets.prepare import prepare
from wsss.platform.config import parse_overrides
from wsss.platform.demo import demo_config
from wsss.platform.plain import train_plain


def print_epoch(metrics: dict) -> None:
    cams = f"{100 * metrics['miou']:.2f} ({metrics['threshold']:.2f})" if "threshold" in metrics else "-"
    seg = f"{100 * metrics['seg_miou']:.2f}" if "seg_miou" in metrics else "-"
    print(f"| {metrics['epoch']} | {cams} | {seg} | {metrics['epoch_time_s']:.1f} | "
          f"{metrics['images_per_s']:.0f} | {metrics['loss']:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="cam,csrm")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument("--data", default="", help="shards of the synthetic `demo` preset (written here if absent)")
    parser.add_argument("--loader-workers", type=int, default=min(6, os.cpu_count() // 2))
    parser.add_argument("overrides", nargs="*", help="key=value, as for `wsss demo`")
    args = parser.parse_args()

    data = args.data or os.path.join(tempfile.mkdtemp(prefix="wsss-gpu-"), "shards")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        started = time.perf_counter()
        prepare("synthetic", os.path.join(os.path.dirname(data), "synthetic"), data, preset="demo")
        print(f"prepared the synthetic benchmark in {time.perf_counter() - started:.0f} s: {data}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {args.loader_workers} loader workers")
    overrides = parse_overrides(args.overrides)
    for method in args.methods.split(","):
        for seed in range(args.seeds):
            config = demo_config(method, data, "unused", "demo", args.epochs, seed,
                                 {"eval_max_images": 0, **overrides})
            print(f"\n{method} seed {seed}: backbone {config.backbone}, OS {config.output_stride}, "
                  f"crop {config.crop_size}, batch {config.batch_size}, lr {config.lr}, amp {config.amp}")
            print("| epoch | CAM val mIoU (threshold) | seg_miou | epoch s | images/s | loss |\n|---|---|---|---|---|---|")
            train_plain(config, loader_workers=args.loader_workers, device=device, on_epoch=print_epoch)


if __name__ == "__main__":
    main()
