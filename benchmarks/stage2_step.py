"""Stage-2 training-step time with and without `ocr`, same batch and resolution, plain loop.

    python benchmarks/stage2_step.py --backbone resnet18 --batch 4 --size 128 --steps 5 --rounds 3

`deeplab` and `deeplab+ocr` (same seed, same synthetic batch: random images, 1-2 image
classes, pseudo-labels drawn from background + those classes with 10% ignored) each run
forward, loss, backward and an SGD step. Rounds alternate which method goes first, so load
from other processes hits both alike; per method the median over all timed steps counts,
after two warm-up steps. Each step is timed twice: wall clock, and the CPU time of this
process (all torch threads), which other processes on a shared machine disturb far less.
One torch thread by default: on a loaded machine, several threads spin-wait on one another
and small element-wise kernels (the ocr loss is made of them) get tens of times slower,
which measures the machine, not the loss. Goal: ocr / plain ≤ 1.05.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from wsss.datasets.base import IGNORE_INDEX
from wsss.methods.base import BackboneConfig, DatasetStats, Progress, build_method
from wsss.methods.deeplab import DeepLabConfig


def make_batch(batch: int, size: int, num_classes: int, generator: torch.Generator) -> dict:
    labels = torch.zeros(batch, num_classes)
    for row in range(batch):
        labels[row, torch.randperm(num_classes, generator=generator)[: 1 + row % 2]] = 1
    candidates = torch.cat([torch.ones(batch, 1), labels], dim=1)  # background always
    choice = torch.multinomial(candidates, size * size, replacement=True, generator=generator)
    target = choice.view(batch, size, size)
    target[torch.rand(batch, size, size, generator=generator) < 0.1] = IGNORE_INDEX
    return {"image": torch.randn(batch, 3, size, size, generator=generator), "labels": labels,
            "valid": torch.ones(batch, size, size, dtype=torch.bool), "target": target}


def build(spec: str, args, stats: DatasetStats):
    torch.manual_seed(0)
    method = build_method(spec, args.classes, {"deeplab": DeepLabConfig(args.variant)},
                          backbone=BackboneConfig(args.backbone, args.output_stride, "none"))
    method.on_dataset(stats)
    method.train()
    return method, torch.optim.SGD(method.param_groups(1e-3), lr=1e-3, momentum=0.9)


def step(method, optimizer, batch: dict, index: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one training step."""
    started, started_cpu = time.perf_counter(), time.process_time()
    terms = method.training_step(batch, Progress(epoch=0, step=index, steps_per_epoch=100, epochs=1))
    optimizer.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    optimizer.step()
    return time.perf_counter() - started, time.process_time() - started_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--variant", default="v3plus", choices=("v2", "v3plus"))
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--classes", type=int, default=20, help="K foreground classes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batch = make_batch(args.batch, args.size, args.classes, generator)
    image_labels = torch.rand(200, args.classes + 1, generator=generator) < 0.15
    image_labels[:, 0] = True
    stats = DatasetStats(num_images=200, image_labels=image_labels)
    runs = {spec: build(spec, args, stats) for spec in ("deeplab", "deeplab+ocr")}
    times: dict[str, list[tuple[float, float]]] = {spec: [] for spec in runs}
    for method, optimizer in runs.values():
        for index in range(2):
            step(method, optimizer, batch, index)  # warm-up: allocator, kernels
    for round_index in range(args.rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for spec in order:
            method, optimizer = runs[spec]
            times[spec] += [step(method, optimizer, batch, 2 + i) for i in range(args.steps)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{args.threads}, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.backbone} DeepLab {args.variant}, K={args.classes}, batch {args.batch} at {args.size} px, "
          f"{args.rounds} rounds × {args.steps} steps")
    median = {}
    for index, clock in enumerate(("wall", "cpu")):
        for spec, values in times.items():
            median[spec, clock] = statistics.median(v[index] for v in values)
            print(f"  {spec:12s} {clock:4s} median {1000 * median[spec, clock]:8.1f} ms/step  "
                  f"(min {1000 * min(v[index] for v in values):.1f})")
    for clock in ("wall", "cpu"):
        ratio = median["deeplab+ocr", clock] / median["deeplab", clock]
        print(f"ocr / plain ({clock} time) = {ratio:.3f} (goal <= 1.05): {'met' if ratio <= 1.05 else 'NOT met'}")


if __name__ == "__main__":
    main()
