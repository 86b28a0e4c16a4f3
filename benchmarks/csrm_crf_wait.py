"""Where `csrm`'s CRF pseudo-labels should run, and how much of a step waits for them (goal
on an accelerator: < 10%).

    python benchmarks/csrm_crf_wait.py                       # CRF workers: auto, auto overlapping, 0
    python benchmarks/csrm_crf_wait.py --workers 4 --size 320 --batch 8

Each setting runs in a fresh process, `--rounds` interleaved rounds: `csrm` (after warm-up:
every loss term on) trains `--steps` measured steps on one batch of synthetic images in the
plain loop. Settings: `crf_workers` auto (on CPU: every core, the batch sent when its labels
are needed; on GPU: cores − 1, sent at once so that the CRF overlaps the step), on CPU the same
setting forced to overlap (`CRFPseudoLabeler.overlap`: cores − 1 CRF processes beside torch's
threads), and 0 (in the training process). Reported per setting: median step time and its
ratio to the first setting's in the same round, and the share of measured time the training
process was blocked on CRF results (`CRFPseudoLabeler.wait_seconds`; on GPU an upper bound on
the stall, since queued kernels may still run meanwhile).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time


def measure(settings: dict, workers: int, overlap: bool | None, queue) -> None:
    import torch
    from train_step import NUM_CLASSES, synthetic_batch  # this folder

    from wsss.methods.base import BackboneConfig, DatasetStats, Progress, build_method
    from wsss.methods.csrm import CSRMConfig

    torch.manual_seed(0)
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    torch.set_flush_denormal(device.type == "cpu")  # as CPU training does
    k, size, batch = NUM_CLASSES, settings["size"], settings["batch"]
    config = CSRMConfig(crf_workers=workers, warmup_epochs=0)
    method = build_method("csrm", k, {"csrm": config}, BackboneConfig(settings["backbone"], 16, "none"))
    labels = torch.ones(2, k + 1, dtype=torch.bool)
    method.on_dataset(DatasetStats(2, labels))
    method.pseudo_labeler.overlap = overlap
    method.to(device).train()
    optimizer = torch.optim.SGD(method.param_groups(1e-3), lr=1e-3, momentum=0.9)
    data = {key: value.to(device) for key, value in synthetic_batch(batch, size).items()}
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
    queue.put({"crf_workers": method.pseudo_labeler.workers, "device": device.type, "overlap": overlap,
               "step_s": statistics.median(times), "crf_wait_s_per_step": waited / len(times),
               "crf_wait_fraction": waited / sum(times)})


def in_fresh_process(settings: dict, workers: int, overlap: bool | None) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(settings, workers, overlap, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", default="-1,0", help="comma-separated csrm.crf_workers values")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median shown")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the training process (0: default)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if there is one")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = dict(backbone=args.backbone, size=args.size, batch=args.batch,
                    steps=args.steps, warmup=args.warmup, threads=args.threads, device=args.device)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {json.dumps(settings)}")
    runs = []
    for workers in (int(w) for w in args.workers.split(",")):
        runs.append((workers, None))
        if workers and args.device == "cpu":  # on GPU the default already overlaps
            runs.append((workers, True))
    measured = [in_fresh_process(settings, *run) | {"round": index, "setting": run}
                for index in range(args.rounds) for run in runs]
    print("| crf_workers | overlap | device | step s | × first row (rounds) | CRF wait s/step | wait share |\n"
          "|---|---|---|---|---|---|---|")
    rows = []
    for run in runs:
        own, first = ([r for r in measured if r["setting"] == setting] for setting in (run, runs[0]))
        ratios = sorted(r["step_s"] / f["step_s"] for r, f in zip(own, first, strict=True))
        row = {key: statistics.median(r[key] for r in own) for key in ("step_s", "crf_wait_s_per_step",
                                                                       "crf_wait_fraction")}
        row |= {"crf_workers": own[0]["crf_workers"], "overlap": run[1], "device": own[0]["device"],
                "ratio": statistics.median(ratios)}
        rows.append(row)
        print(f"| {row['crf_workers']} | {'forced' if run[1] else 'auto'} | {row['device']} | {row['step_s']:.3f} | "
              f"{row['ratio']:.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f}) | {row['crf_wait_s_per_step']:.3f} | "
              f"{100 * row['crf_wait_fraction']:.1f}% |", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"settings": settings, "cpus": os.cpu_count(), "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
