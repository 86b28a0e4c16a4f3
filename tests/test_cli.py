"""The `wsss` command: user errors are one clear line and exit code 2, before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from wsss.cli import main


def test_prepare_then_bad_train_arguments_are_named(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["prepare", "synthetic", "--root", str(tmp_path / "tree"), "--out", str(out),
                 "--option", "preset=test", "--option", "num_val=4"]) == 0
    assert (out / "manifest.json").is_file()
    assert "wrote" in capsys.readouterr().out

    assert main(["train", "--method", "cam", "--data", str(out), "epochs=zero"]) == 2
    assert "epochs='zero': expected an integer" in capsys.readouterr().err
    assert main(["train", "--method", "cam", "--data", str(out), "lnl.eta=0.5"]) == 2
    assert "[lnl] is not a part of method 'cam'" in capsys.readouterr().err
    assert main(["train", "--method", "cam", "--data", str(tmp_path / "nothing")]) == 2
    assert "manifest missing" in capsys.readouterr().err


def test_evaluate_names_a_bad_checkpoint(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "neither a checkpoint nor a run directory" in capsys.readouterr().err


def test_demo_names_a_bad_override_before_generating_data(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "output_stride=7"]) == 2
    assert "output_stride" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo"), "output_stride"]) == 2
    assert "override 'output_stride' is not key=value" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def trained_run(storage: Path, name: str, output_stride: int) -> None:
    """The model record a finished checkpoint of run `name` carries (checkpoint.json)."""
    checkpoint = storage / name / "checkpoint_2026-01-01_00-00-00"
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint.json").write_text(json.dumps(
        {"method": "cam", "backbone": "resnet18", "output_stride": output_stride}))


def test_train_refuses_to_continue_a_run_with_another_model(shards, tmp_path, capsys):
    trained_run(tmp_path / "runs", "r", output_stride=16)
    assert main(["train", "--method", "cam", "--data", shards, "name=r", f"storage_path={tmp_path / 'runs'}",
                 "backbone=resnet18", "output_stride=8"]) == 2
    assert "output_stride=8: run " in capsys.readouterr().err


def test_train_names_a_missing_start_file_of_a_new_run_only(shards, tmp_path, capsys):
    from wsss.platform.config import TrainConfig
    from wsss.platform.train import check_start

    gone = str(tmp_path / "resnet18.pth")
    assert main(["train", "--method", "cam", "--data", shards, f"backbone_weights={gone}"]) == 2
    assert f"backbone_weights='{gone}': must be none, imagenet or an existing file" in capsys.readouterr().err
    trained_run(tmp_path / "runs", "r", output_stride=16)
    check_start(TrainConfig(method="cam", data=shards, name="r", storage_path=str(tmp_path / "runs"),
                            backbone="resnet18", backbone_weights=gone))  # resumes: never reads its start


def test_user_errors_exit_before_ray_starts(shards, tmp_path):
    """In a fresh interpreter, so that a Ray another test started cannot hide a start."""
    trained_run(tmp_path / "runs", "r", output_stride=16)
    script = f"""
import sys
from wsss.cli import main
codes = [main(["train", "--method", "cam", "--data", {str(tmp_path)!r}, "epochs=zero"]),
         main(["train", "--method", "cam", "--data", {shards!r}, "name=r", "backbone=resnet18",
               "storage_path={tmp_path / 'runs'}", "output_stride=8"]),
         main(["train", "--method", "cam", "--data", {str(tmp_path / "nothing")!r}]),
         main(["train", "--method", "cam", "--data", {shards!r}, "backbone_weights=/no/such/weights.pth"]),
         main(["evaluate", "--checkpoint", {str(tmp_path)!r}, "--data", {str(tmp_path)!r}]),
         main(["demo", "--out", {str(tmp_path / "demo")!r}, "output_stride=7"])]
ray = sys.modules.get("ray")
print(codes, ray is not None and ray.is_initialized())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[2, 2, 2, 2, 2, 2] False", done.stderr


def test_demo_overrides_reach_every_run():
    from wsss.platform.demo import demo_config

    assert demo_config("cam", "d", "r", "demo", None).output_stride == 16
    config = demo_config("lnl", "d", "r", "demo", 2, seed=1, overrides={"output_stride": "8", "lnl.eta": "0.5"})
    assert (config.output_stride, config.epochs, config.seed, config.sections["lnl"].eta) == (8, 2, 1, 0.5)
    assert demo_config("csrm+ocr", "d", "r", "demo", None).sections["csrm"].decoder_lr_mult == 0.2
    mine = demo_config("csrm", "d", "r", "demo", None, overrides={"csrm.decoder_lr_mult": "10"})
    assert mine.sections["csrm"].decoder_lr_mult == 10, "the user's override wins"
