"""How much of a `csrm` training step is spent waiting for the CRF pseudo-labels (goal < 10%).

    python benchmarks/csrm_crf_wait.py                       # CRF workers: auto, and 0 for comparison
    python benchmarks/csrm_crf_wait.py --workers 4 --size 320 --batch 8

Each setting runs in a fresh process: `csrm` (after warm-up: every loss term on) trains
`--steps` measured steps on one random batch in the plain loop. Reported per setting: median
step time, the share of measured time the training process was blocked on CRF results
(`CRFPseudoLabeler.wait_seconds`; on GPU an upper bound on the stall, since queued kernels
may still run meanwhile), and the CRF's own cost per step measured in-process (workers 0,
where all of it is waiting).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time


def measure(settings: dict, workers: int, queue) -> None:
    import torch

    from wsss.methods.base import BackboneConfig, DatasetStats, Progress, build_method
    from wsss.methods.csrm import CSRMConfig

    torch.manual_seed(0)
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    k, size, batch = settings["classes"], settings["size"], settings["batch"]
    config = CSRMConfig(crf_workers=workers, warmup_epochs=0)
    method = build_method("csrm", k, {"csrm": config}, BackboneConfig(settings["backbone"], 16, "none"))
    labels = torch.ones(2, k + 1, dtype=torch.bool)
    method.on_dataset(DatasetStats(2, labels))
    method.to(device).train()
    optimizer = torch.optim.SGD(method.param_groups(1e-3), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    image_labels = (torch.rand(batch, k, generator=generator) < 2 / k).float()
    image_labels[torch.arange(batch), torch.arange(batch) % k] = 1
    data = {"image": torch.randn(batch, 3, size, size, generator=generator), "labels": image_labels,
            "valid": torch.ones(batch, size, size, dtype=torch.bool),
            "raw": torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)}
    data = {key: value.to(device) for key, value in data.items()}
    times, waited = [], 0.0
    for step in range(settings["warmup"] + settings["steps"]):
        if step == settings["warmup"]:
            waited = method.pseudo_labeler.wait_seconds
        start = time.perf_counter()
        progress = Progress(epoch=0, step=step, steps_per_epoch=1000, epochs=1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sum(method.training_step(data, progress).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(progress)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= settings["warmup"]:
            times.append(time.perf_counter() - start)
    waited = method.pseudo_labeler.wait_seconds - waited
    queue.put({"crf_workers": method.pseudo_labeler.workers, "device": device.type,
               "step_s": statistics.median(times), "crf_wait_s_per_step": waited / len(times),
               "crf_wait_fraction": waited / sum(times)})


def in_fresh_process(settings: dict, workers: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(settings, workers, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", default="-1,0", help="comma-separated csrm.crf_workers values")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the training process (0: default)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if there is one")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = dict(backbone=args.backbone, size=args.size, batch=args.batch, classes=args.classes,
                    steps=args.steps, warmup=args.warmup, threads=args.threads, device=args.device)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {json.dumps(settings)}")
    print("| crf_workers | device | step s | CRF wait s/step | wait share |\n|---|---|---|---|---|")
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        rows.append(in_fresh_process(settings, workers))
        row = rows[-1]
        print(f"| {row['crf_workers']} | {row['device']} | {row['step_s']:.3f} | {row['crf_wait_s_per_step']:.3f} | "
              f"{100 * row['crf_wait_fraction']:.1f}% |", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"settings": settings, "cpus": os.cpu_count(), "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
