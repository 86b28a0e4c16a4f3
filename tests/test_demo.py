"""`wsss demo` end to end on the tiny preset with the session's local Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_demo_trains_evaluates_and_continues_where_it_stopped(ray_local, tmp_path, capsys):
    from wsss.platform.demo import run_demo

    out = tmp_path / "demo"
    runs = run_demo(out=str(out), methods=("cam",), epochs=1, preset="test")
    assert [(run["method"], run["seed"]) for run in runs] == [("cam", 0)]
    results = json.loads((out / "runs" / "demo-cam-seed0" / "results.json").read_text())
    assert results["miou"] == runs[0]["miou"] and results["epoch"] == 1
    table = capsys.readouterr().out
    assert "| all background |" in table and f"| cam | {100 * runs[0]['miou']:.2f} | 1 |" in table

    again = run_demo(out=str(out), methods=("cam",), epochs=1, preset="test")  # nothing left to do
    assert again == runs
    assert "already trained and evaluated" in capsys.readouterr().out


def test_the_demos_runs_train_in_the_plain_loop_where_ray_is_not_installed(shards, tmp_path):
    """benchmarks/gpu_train.py as a GPU machine without Ray, W&B or Optuna runs it
    (benchmarks/gpu_check.sh): the demo's config, trained and validated in the plain loop."""
    script = ROOT / "benchmarks" / "gpu_train.py"
    argv = [str(script), "--data", shards, "--methods", "cam", "--epochs", "1", "--loader-workers", "0"]
    code = ("import runpy, sys\n"
            "for name in ('ray', 'wandb', 'optuna'):\n"
            "    sys.modules[name] = None  # `import ray` now raises ImportError\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    epoch = [line for line in result.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(epoch) == 1 and float(epoch[0].split("|")[2].split()[0]) > 0, result.stdout
