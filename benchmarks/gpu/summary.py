"""The GPU goals, met or not, from the JSON files benchmarks/gpu/run.sh writes.

    python benchmarks/gpu/summary.py OUT     # reads OUT/steps.json, crf_wait.json, ingest.json

Prints a markdown table: goal, measured, met / not met (a stage that did not run: "not
measured"). The goals are the ones docs/benchmarks.md lists for one H100.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGES_PER_S_GOAL = {"cam": 300, "csrm": 100}  # one H100; ≥ 35× CSRM's published 2.8 images/s per P100
CSRM_PUBLISHED_PER_GPU = 2.8


def read(out: Path, name: str) -> dict | None:
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


def verdict(met: bool) -> str:
    return "met" if met else "not met"


def goal_rows(steps: dict | None, crf: dict | None, ingest: dict | None) -> list[tuple[str, str, str]]:
    rows = []
    by_method = {row["method"]: row for row in (steps or {}).get("rows", [])}
    for method in ("cam", "lnl", "csrm"):
        row = by_method.get(method)
        goal = IMAGES_PER_S_GOAL.get(method)
        name = f"`{method}` images/s" + (f" ≥ {goal}" if goal else " (no goal)")
        if row is None:
            rows.append((name, "not measured", "—"))
            continue
        share = f", {row['peak_share']:.1%} of bf16 peak" if "peak_share" in row else ""
        measured = (f"{row['images_per_s']:.1f} ({row['images_per_s'] / CSRM_PUBLISHED_PER_GPU:.0f}× CSRM per GPU"
                    f"{share}; {row['tflop_per_s']:.1f} TFLOP/s; memory peak {row['peak_mb'] / 1024:.1f} GiB)")
        rows.append((name, measured, verdict(row["images_per_s"] >= goal) if goal else "—"))

    timing = (steps or {}).get("ray_vs_plain")
    if timing:
        ray_epoch = timing["ray"]
        plain = list(timing["plain"].values())[-1]  # on CPU: torch's default threads
        ratio = ray_epoch["epoch_time_s"] / plain["epoch_time_s"]
        rows.append(("Ray Train / plain loop, epoch after start-up ≤ 1.1×",
                     f"{ratio:.2f} ({ray_epoch['epoch_time_s']:.1f} s / {plain['epoch_time_s']:.1f} s, cam)",
                     verdict(ratio <= 1.1)))
        wait = ray_epoch["input_wait_s"] / ray_epoch["epoch_time_s"]
        rows.append(("input wait share of the Ray Train epoch < 5%",
                     f"{wait:.1%} ({ray_epoch['input_wait_s']:.2f} s of {ray_epoch['epoch_time_s']:.1f} s)",
                     verdict(wait < 0.05)))
    else:
        rows += [("Ray Train / plain loop, epoch after start-up ≤ 1.1×", "not measured", "—"),
                 ("input wait share of the Ray Train epoch < 5%", "not measured", "—")]

    if ingest and "cam" in by_method:
        supply = ingest["images_per_s"]["ray"]
        demand = by_method["cam"]["images_per_s"]
        rows.append((f"Ray Data on {ingest['cpus']} cores ≥ cam's step rate (input wait ≈ 0)",
                     f"{supply:.0f} images/s for {demand:.0f} (wait share ≥ {max(0.0, 1 - supply / demand):.0%})",
                     verdict(supply >= demand)))
    else:
        rows.append(("Ray Data's decode rate vs cam's step rate", "not measured", "—"))

    auto = next((row for row in (crf or {}).get("rows", []) if row["crf_workers"] > 0), None)
    if auto:
        rows.append(("`csrm` CRF wait share < 10%",
                     f"{auto['crf_wait_fraction']:.1%} with {auto['crf_workers']} CRF workers "
                     f"(step {auto['step_s']:.3f} s)", verdict(auto["crf_wait_fraction"] < 0.10)))
    else:
        rows.append(("`csrm` CRF wait share < 10%", "not measured", "—"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder run.sh wrote")
    out = Path(parser.parse_args().out)
    steps, crf, ingest = (read(out, name) for name in ("steps.json", "crf_wait.json", "ingest.json"))
    settings = (steps or {}).get("settings", {})
    print(f"settings: {json.dumps(settings)}\n")
    print("| goal | measured | status |\n|---|---|---|")
    for goal, measured, status in goal_rows(steps, crf, ingest):
        print(f"| {goal} | {measured} | {status} |")


if __name__ == "__main__":
    main()
