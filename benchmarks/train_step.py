"""Step time, FLOPs and peak memory of each method vs `cam`, and Ray Train epoch time vs the plain loop.

    python benchmarks/train_step.py                    # methods: cam lnl cam+fsae lnl+fsae, 5 interleaved rounds
    python benchmarks/train_step.py --ray-vs-plain     # also one epoch on shards, Ray Train vs plain
    python benchmarks/train_step.py --keep-denormals   # steps without flushing subnormal floats (flush_denormal=false)
    python benchmarks/train_step.py --cpu-amp          # also every method in bfloat16 autocast on CPU
    python benchmarks/train_step.py --profile 12       # also each method's top operators (2 untimed steps)
    python benchmarks/train_step.py --methods cam,lnl,csrm --size 512 --batch 16 --peak-tflops 989 \
        --json steps.json                              # on a GPU: bf16 autocast, share of the chip's peak

Every method is measured in its own fresh process (peak memory: CUDA max allocated on
GPU, else the process's peak RSS above its level after building the model), on the same
batch of synthetic images (`synthetic_batch`), so the printed ratios come from one run on one
machine. The timed steps come after `--warmup` training steps at the run's default lr:
weights then reach the ranges where, without flushing, some methods compute on subnormal
floats; `csrm`'s teacher follows the student (EMA decay 0), so that it segments by then and
ClassMix pastes as in training. GFLOP counts the torch
operations of as many more steps (at most 5), the mean per step (forward and backward, not
work in CRF processes): the time ratio a compute-bound machine cannot beat; "time/FLOP" is
the step's time ratio over its FLOP ratio (1 = as fast per FLOP as `cam`); divided by the
step time it is the achieved TFLOP/s, and by --peak-tflops the share of the chip's peak.
The FLOPs of each forward are also broken down by module (a method's teacher modules appear
by class name: they run outside the network's forward). Rounds are interleaved and each
method's time is divided by `cam`'s of the same round, the median round shown: load that
comes and goes hits both alike. Goals: lnl ≤ 1.5× cam's time at OS 16 and ≤ 2× at OS 8,
time/FLOP ≤ 1.15; fsae ≤ 2.2× time; csrm ≤ 3.5× FLOPs and ≤ 4× time; Ray Train ≤ 1.1×
plain after start-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue as queue_module
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

PROFILED_STEPS = 2
NUM_CLASSES = 5  # the synthetic dataset's foreground classes
COUNTED_STEPS = 5  # at most; the mean FLOPs per step


def measure_step(spec: str, args: dict, queue) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from wsss.methods.base import BackboneConfig, DatasetStats, Progress, build_method, required_inputs
    from wsss.platform.config import TrainConfig
    from wsss.platform.loop import make_optimizer, set_flush_denormal, uses_amp

    torch.manual_seed(0)
    device = torch.device(args["device"])
    k, size, batch = NUM_CLASSES, args["size"], args["batch"]
    overrides = {"lnl.warmup_epochs": 0} if "lnl" in spec else {}  # measure the full method
    if "csrm" in spec:  # see the module's docstring
        overrides["csrm.ema_max_decay"] = 0.0
    config = TrainConfig(method=spec, data="-", backbone=args["backbone"], output_stride=args["os"],
                         backbone_weights="none", cpu_amp=args["cpu_amp"],
                         flush_denormal=args["flush_denormal"]).with_overrides(overrides)
    set_flush_denormal(config, device)  # as training on this device does
    method = build_method(spec, k, config.sections, BackboneConfig(args["backbone"], args["os"], "none"))
    labels = torch.zeros(4, k + 1, dtype=torch.bool)
    labels[:, 0] = True
    labels[torch.arange(4), torch.arange(4) % k + 1] = True
    method.on_dataset(DatasetStats(4, labels))
    method.to(device)
    optimizer = make_optimizer(method, config)
    data = synthetic_batch(batch, size)
    if "strong" in required_inputs(spec):
        data["strong"] = data["image"].flip(1)
    data = {key: value.to(device) for key, value in data.items()}
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step(step: int, forward_counter=None) -> None:
        progress = Progress(epoch=5, step=100 + step, steps_per_epoch=100, epochs=10)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_amp(config, device)), \
                forward_counter or nullcontext():
            loss = sum(method.training_step(data, progress).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(progress)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for step in range(args["warmup"] + args["steps"]):
        start = time.perf_counter()
        train_step(step)
        if step >= args["warmup"]:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    # More steps, counted: a machine-independent cost, the mean per step (csrm's varies with
    # the images ClassMix pastes into). Each forward is also counted on its own: the counter
    # files backward matmuls under the modules of their forward.
    counted, first = [], args["warmup"] + args["steps"]
    for step in range(first, first + min(args["steps"], COUNTED_STEPS)):
        forward = FlopCounterMode(display=False, depth=3)
        with FlopCounterMode(display=False, depth=3) as counter:
            train_step(step, forward)
        counted.append(forward_flops_by_module(forward.get_flop_counts(), counter.get_total_flops())
                       | {"step": counter.get_total_flops() / 1e9})
    keys = dict.fromkeys(key for step_flops in counted for key in step_flops)  # a module may run in some steps only
    flops = {key: statistics.mean(step_flops.get(key, 0.0) for step_flops in counted) for key in keys}
    operators = ""
    if args["profile"]:  # after the timed steps, so that the profiler's overhead is not timed
        with torch.profiler.profile() as profiler:
            for step in range(PROFILED_STEPS):
                train_step(first + len(counted) + step)
        operators = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args["profile"])
    step_s = statistics.median(times)
    queue.put({"method": spec, "os": args["os"], "cpu_amp": args["cpu_amp"], "amp": uses_amp(config, device),
               "step_s": step_s, "images_per_s": batch / step_s, "peak_mb": peak_mb, "operators": operators,
               "gflop": flops.pop("step"), "forward_gflop": flops})


def synthetic_batch(batch: int, size: int) -> dict:
    """The first `batch` images of the synthetic dataset's train split, drawn at `size`: what
    `wsss demo` trains on. Content matters to the cost: a CRF on random pixels takes twice as long.
    {"image" normalised [B,3,S,S], "raw" uint8 [B,S,S,3], "labels" multi-hot [B,K], "valid"}."""
    import numpy as np
    import torch

    from wsss.datasets.synthetic import render_image
    from wsss.platform.cams import normalize_images

    samples = [render_image(0, "train", index, size) for index in range(batch)]
    raw = torch.from_numpy(np.stack([sample.image for sample in samples]))
    labels = torch.zeros(batch, NUM_CLASSES)
    for row, sample in enumerate(samples):
        labels[row, torch.tensor(sample.labels) - 1] = 1
    return {"image": normalize_images(raw.permute(0, 3, 1, 2)), "raw": raw, "labels": labels,
            "valid": torch.ones(batch, size, size, dtype=torch.bool)}


def forward_flops_by_module(forward_counts: dict, total_flops: int) -> dict[str, float]:
    """GFLOP of the forward by module: each module called from outside another (the network,
    and a teacher's parts called one by one), the network's children, and the backward (the
    step's total less the forward) as one entry."""
    forward = {module: sum(ops.values()) / 1e9 for module, ops in forward_counts.items()}
    roots = [m for m in forward if "." not in m and m != "Global" and forward[m] >= 0.05]
    network = max(roots, key=forward.get)

    def parent(module: str) -> str:
        return module.rsplit(".", 1)[0]

    # the network's children, or grandchildren where a child is not called as a module
    children = [m for m in forward if forward[m] >= 0.05 and m.startswith(network + ".") and
                (parent(m) == network or (parent(m) not in forward and parent(parent(m)) == network))]
    backward = (total_flops - sum(forward_counts["Global"].values())) / 1e9
    return {m: forward[m] for m in roots + children} | {"backward": backward}


def in_fresh_process(target, *arguments):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*arguments, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():  # died before reporting: fail rather than wait forever
                raise RuntimeError(f"measuring process exited with code {process.exitcode}") from None
    process.join()
    return result


def ray_vs_plain(args) -> dict:
    """One epoch on the same shards: Ray Train (1 worker) vs the plain loop, after warm-up.

    On CPU the Ray Train worker trains with `cpu_threads` torch threads (default: every core
    of the node, as the plain loop's torch default); the plain loop runs with one thread and
    with torch's default, so both the equal-threads ratio and the one-thread baseline show.
    On a GPU both train there (bf16 autocast; Ray Train's worker on the NCCL backend), the
    plain loop decoding in --loader-workers DataLoader processes, Ray Data on the other cores."""
    import torch

    from wsss.datasets.prepare import prepare
    from wsss.platform.config import TrainConfig
    from wsss.platform.plain import train_plain
    from wsss.platform.runtime import ensure_ray
    from wsss.platform.train import cpu_threads, fit

    work = tempfile.mkdtemp(prefix="wsss-bench-")
    prepare("synthetic", f"{work}/tree", f"{work}/shards", num_train=args.images, num_val=8, size=args.size)
    common = dict(method="cam", data=f"{work}/shards", backbone=args.backbone, output_stride=args.os,
                  backbone_weights="none", batch_size=args.batch, crop_size=args.size, epochs=2,
                  eval_every=0, wandb="disabled", storage_path=f"{work}/runs")
    plain = {}
    if args.device == "cuda":
        _, history = train_plain(TrainConfig(**common), loader_workers=args.loader_workers, device="cuda")
        plain[torch.get_num_threads()] = history[-1]  # the second epoch: start-up excluded
    else:
        for threads in sorted({1, torch.get_num_threads()}):
            torch.set_num_threads(threads)
            _, history = train_plain(TrainConfig(**common), device="cpu")
            plain[threads] = history[-1]
    ensure_ray(os.cpu_count())  # as `wsss train` starts a local Ray
    device = "gpu" if args.device == "cuda" else "cpu"
    ray_epoch = fit(TrainConfig(name="bench", device=device, **common)).metrics
    return {"ray": ray_epoch, "ray_threads": cpu_threads(0, 1), "plain": plain, "device": device}


def write_json(path: str, results: dict) -> None:
    with open(path, "w") as file:
        json.dump(results, file, indent=1, default=str)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="cam,lnl,cam+fsae,lnl+fsae")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--os", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per process; the median")
    parser.add_argument("--warmup", type=int, default=20, help="training steps before the timed ones")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; ratios are each round's, the median shown")
    parser.add_argument("--keep-denormals", action="store_true", help="train with flush_denormal=false (CPU)")
    parser.add_argument("--ray-vs-plain", action="store_true")
    parser.add_argument("--os8", action=argparse.BooleanOptionalAction, default=True,
                        help="with lnl at OS 16, also cam and lnl at OS 8")
    parser.add_argument("--cpu-amp", action="store_true", help="also measure every method with `cpu_amp` (CPU only)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print each method's N top operators (torch profiler, self time) over 2 more steps")
    parser.add_argument("--images", type=int, default=256, help="images in the Ray vs plain epoch")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if there is one")
    parser.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="DataLoader processes of the plain epoch on a GPU")
    parser.add_argument("--peak-tflops", type=float, default=0, help="the chip's peak, for the share column")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = dict(backbone=args.backbone, size=args.size, batch=args.batch,
                    os=args.os, steps=args.steps, warmup=args.warmup, cpu_amp=False,
                    flush_denormal=not args.keep_denormals, device=args.device, profile=args.profile)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"load {os.getloadavg()[0]:.1f}; {json.dumps(settings)}")
    runs = [(spec, settings) for spec in dict.fromkeys(["cam", *args.methods.split(",")])]
    if "lnl" in args.methods.split(",") and args.os == 16 and args.os8:
        runs += [("cam", settings | {"os": 8}), ("lnl", settings | {"os": 8})]
    if args.cpu_amp:
        runs += [(spec, run_settings | {"cpu_amp": True}) for spec, run_settings in runs]
    # Interleaved rounds, each method's time over cam's of the same round: load that comes
    # and goes hits both alike; the median round is shown, with the spread over rounds.
    measured = [in_fresh_process(measure_step, spec, run_settings) | {"round": index}
                for index in range(args.rounds) for spec, run_settings in runs]

    def setting(run: dict) -> tuple:
        return run["os"], run["cpu_amp"]

    def rounds_of(spec: str, key: tuple) -> list[dict]:
        return [r for r in measured if r["method"] == spec and setting(r) == key]

    print("| method | OS | bf16 | step s | × cam (rounds) | images/s | TFLOP/s | peak share | peak MB | × cam | GFLOP "
          "| × cam | time/FLOP |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for spec, run_settings in runs:
        key = setting(run_settings)
        own, cam = rounds_of(spec, key), rounds_of("cam", key)
        ratios = sorted(r["step_s"] / c["step_s"] for r, c in zip(own, cam, strict=True))
        step_s = statistics.median(r["step_s"] for r in own)
        row = own[0] | {"step_s": step_s, "images_per_s": own[0]["images_per_s"] * own[0]["step_s"] / step_s,
                        "ratio": statistics.median(ratios), "peak_mb": min(r["peak_mb"] for r in own)}
        row["tflop_per_s"] = row["gflop"] / row["step_s"] / 1e3
        if args.peak_tflops:
            row["peak_share"] = row["tflop_per_s"] / args.peak_tflops
        rows.append(row)
        flops = row["gflop"] / cam[0]["gflop"]
        peak = row["peak_mb"] / max(min(c["peak_mb"] for c in cam), 1e-9)
        share = f"{row['peak_share']:.1%}" if "peak_share" in row else "-"
        print(f"| {spec} | {row['os']} | {'yes' if row['amp'] else '-'} | {row['step_s']:.3f} | "
              f"{row['ratio']:.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f}) | {row['images_per_s']:.1f} | "
              f"{row['tflop_per_s']:.2f} | {share} | {row['peak_mb']:.0f} | {peak:.2f} | "
              f"{row['gflop']:.1f} | {flops:.2f} | {row['ratio'] / flops:.2f} |")
    for row in rows:
        parts = ", ".join(f"{module} {gflop:.1f}" for module, gflop in row["forward_gflop"].items())
        print(f"{row['method']} OS {row['os']}{' bf16' if row['cpu_amp'] else ''} GFLOP by module: {parts}")
    for row in rows:
        if row["operators"]:
            print(f"\n{row['method']} OS {row['os']}{' bf16' if row['cpu_amp'] else ''}, first round, "
                  f"top operators over {PROFILED_STEPS} more steps:\n{row['operators']}")
    for row in rows:
        if row["cpu_amp"]:
            fp32 = next(r for r in rows if r["method"] == row["method"] and setting(r) == (row["os"], False))
            print(f"{row['method']} OS {row['os']}: bf16 step / float32 step {row['step_s'] / fp32['step_s']:.2f}")
    if args.json:  # the steps' results stay if the epochs below fail
        write_json(args.json, {"settings": settings, "rows": rows})
    if args.ray_vs_plain:
        timing = ray_vs_plain(args)
        if args.json:
            write_json(args.json, {"settings": settings, "rows": rows, "ray_vs_plain": timing})
        ray_epoch = timing["ray"]

        def parts(epoch: dict) -> str:  # waiting for input vs the rest (the steps)
            return f"{epoch['input_wait_s']:.2f} s waiting for input, {epoch['epoch_time_s'] - epoch['input_wait_s']:.1f} s in steps"

        print(f"epoch time after start-up: Ray Train (1 {timing['device']} worker, {timing['ray_threads']} torch thread(s)) "
              f"{ray_epoch['epoch_time_s']:.1f} s ({parts(ray_epoch)})")
        for threads, plain in timing["plain"].items():
            print(f"  plain loop, {threads} torch thread(s): {plain['epoch_time_s']:.1f} s ({parts(plain)}) "
                  f"-> Ray / plain {ray_epoch['epoch_time_s'] / plain['epoch_time_s']:.2f}")


if __name__ == "__main__":
    main()
