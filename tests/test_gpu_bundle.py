"""benchmarks/gpu/: the bundle's dependency walk (on wheels made here, no network) and the
GPU summary's verdicts. The bundle itself is proved by benchmarks/gpu/smoke.sh (minutes)."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.helpers import ROOT

GPU = ROOT / "benchmarks" / "gpu"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_wheel(folder: Path, name: str, requires: list[str], tag: str = "py3-none-any") -> None:
    dist = f"{name.replace('-', '_')}-1.0"
    metadata = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}".format(
        name, "".join(f"Requires-Dist: {line}\n" for line in requires))
    with zipfile.ZipFile(folder / f"{dist}-{tag}.whl", "w") as wheel:
        wheel.writestr(f"{dist}.dist-info/METADATA", metadata)


def test_the_walk_stops_at_what_the_target_has_and_evaluates_markers_for_its_python(tmp_path):
    bundle = load("bundle")
    make_wheel(tmp_path, "top", ["mid[x]", "backport; python_version < '3.12'", "Have_Me>=1",
                                 "windows-only; sys_platform == 'win32'"])
    make_wheel(tmp_path, "mid", ["leaf; extra == 'x'", "unused; extra == 'y'"])
    make_wheel(tmp_path, "leaf", ["have-me"])
    make_wheel(tmp_path, "backport", [])
    roots = [Requirement("top")]

    wheels, present = bundle.resolve(roots, {"have-me"}, "3.12", tmp_path, build_python="unused")
    assert sorted(wheels) == ["leaf", "mid", "top"]
    assert present == {"have-me"}
    wheels, _ = bundle.resolve(roots, {"have-me"}, "3.11", tmp_path, build_python="unused")
    assert sorted(wheels) == ["backport", "leaf", "mid", "top"]


def test_a_cached_wheel_serves_only_the_pythons_it_installs_on(tmp_path):
    bundle = load("bundle")
    make_wheel(tmp_path, "native", [], tag="cp311-cp311-manylinux_2_17_x86_64")
    make_wheel(tmp_path, "stable", [], tag="cp311-abi3-manylinux2014_x86_64")
    make_wheel(tmp_path, "built-here", [], tag="cp312-cp312-linux_x86_64")
    make_wheel(tmp_path, "mac", [], tag="cp312-cp312-macosx_11_0_arm64")
    assert sorted(bundle.wheels_by_name(tmp_path, "3.11")) == ["native", "stable"]
    assert sorted(bundle.wheels_by_name(tmp_path, "3.12")) == ["built-here", "stable"]


def test_a_package_the_bundle_needs_but_this_python_lacks_is_named(tmp_path):
    bundle = load("bundle")
    make_wheel(tmp_path, "top", ["no-such-package-here"])
    with pytest.raises(SystemExit, match="no-such-package-here"):
        bundle.resolve([Requirement("top")], set(), "3.12", tmp_path, build_python="unused")


def test_the_summary_judges_each_gpu_goal_and_marks_missing_stages():
    summary = load("summary")
    steps = {"rows": [
        {"method": "cam", "images_per_s": 320.0, "tflop_per_s": 100.0, "peak_share": 0.1, "peak_mb": 9000},
        {"method": "csrm", "images_per_s": 90.0, "tflop_per_s": 80.0, "peak_share": 0.08, "peak_mb": 20000}],
        "ray_vs_plain": {"ray": {"epoch_time_s": 10.5, "input_wait_s": 0.2},
                         "plain": {"16": {"epoch_time_s": 10.0, "input_wait_s": 0.1}}}}
    rows = {goal: (measured, status) for goal, measured, status in summary.goal_rows(steps, None, None)}
    assert rows["`cam` images/s ≥ 300"][1] == "met"
    assert rows["`csrm` images/s ≥ 100"][1] == "not met"
    assert rows["`lnl` images/s (no goal)"] == ("not measured", "—")
    assert rows["Ray Train / plain loop, epoch after start-up ≤ 1.1×"][1] == "met"
    assert rows["input wait share of the Ray Train epoch < 5%"][1] == "met"
    assert rows["`csrm` CRF wait share < 10%"] == ("not measured", "—")
