"""`wsss demo` end to end on the tiny preset with the session's local Ray."""

from __future__ import annotations

import json

import pytest


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
