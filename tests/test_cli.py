"""The `wsss` command: user errors are one clear line and exit code 2, before Ray starts; help
without torch or Ray; the config explained, printed and written beside each run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from wsss.cli import main


def test_prepare_then_bad_train_arguments_are_named(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["prepare", "synthetic", "--root", str(tmp_path / "tree"), "--out", str(out),
                 "preset=test", "num_val=4"]) == 0
    assert (out / "manifest.json").is_file()
    assert "wrote" in capsys.readouterr().out

    assert main(["train", "--method", "cam", "--data", str(out), "epochs=zero"]) == 2
    assert "epochs='zero': expected an integer" in capsys.readouterr().err
    assert main(["train", "--method", "cam", "--data", str(out), "lnl.seed_threshold=0.5"]) == 2
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
    assert "'output_stride' is not KEY=VALUE" in capsys.readouterr().err
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
    config = demo_config("lnl", "d", "r", "demo", 2, seed=1,
                         overrides={"output_stride": "8", "lnl.seed_threshold": "0.5"})
    assert (config.output_stride, config.epochs, config.seed, config.sections["lnl"].seed_threshold) == (8, 2, 1, 0.5)
    assert demo_config("csrm+ocr", "d", "r", "demo", None).sections["csrm"].decoder_lr_mult == 0.2
    mine = demo_config("csrm", "d", "r", "demo", None, overrides={"csrm.decoder_lr_mult": "10"})
    assert mine.sections["csrm"].decoder_lr_mult == 10, "the user's override wins"


def test_help_and_version_import_neither_torch_nor_ray():
    """In a fresh interpreter: `wsss --help` and every `wsss COMMAND --help` answer at once."""
    commands = ["prepare", "train", "evaluate", "demo", "pseudo-labels", "segment", "tune", "report"]
    script = f"""
import sys
from wsss.cli import main
codes = [main(["--help"]), main(["--version"])] + [main([command, "--help"]) for command in {commands!r}]
print(codes, sorted(name for name in ("torch", "ray") if name in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == f"{[0] * (2 + len(commands))} []", done.stderr
    assert "wsss 0.1.0" in done.stdout


def test_every_option_has_help_and_shows_its_default(capsys):
    from wsss.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        for action in parser._actions:
            assert action.help, f"wsss {name} {action.option_strings or action.dest}: no help"
    assert main(["evaluate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("split to evaluate (default: val)", "(default: 1.0,0.5,1.5,2.0)", "(0 = all) (default: 0)"):
        assert shown in out


def test_command_line_defaults_are_the_modules_own():
    from wsss import cli
    from wsss.ops import crf
    from wsss.platform import pseudo_labels, segmentation
    from wsss.platform.cams import FULL_SCALES

    assert cli._scales(cli.FULL_SCALES) == FULL_SCALES
    assert cli._scales(cli.SEG_SCALES) == segmentation.SEG_SCALES
    assert cli.CRF_PRESETS == tuple(sorted(crf.PRESETS))
    assert cli.PSEUDO_LABEL_MODES == (*pseudo_labels.MODES, pseudo_labels.GROUND_TRUTH)
    assert cli.PSEUDO_LABEL_THRESHOLD == pseudo_labels.DEFAULT_THRESHOLD


def test_bad_arguments_name_the_option_and_value(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", "c", "--data", "d", "--scales", "1,a"]) == 2
    assert "argument --scales: '1,a': expected numbers > 0" in capsys.readouterr().err
    assert main(["pseudo-labels", "--data", "d", "--out", "o", "--scales", "1,-2"]) == 2
    assert "argument --scales: '1,-2'" in capsys.readouterr().err
    assert main(["train", "--method", "cam"]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["train", "--method", "cam", "--data", str(tmp_path), "--config", str(tmp_path / "no.toml")]) == 2
    assert f"--config {tmp_path / 'no.toml'}: no such file" in capsys.readouterr().err


def test_old_override_flags_name_the_key_value_form(capsys):
    for argv, new in ((["evaluate", "--checkpoint", "c", "--data", "d", "--set", "lnl.export=shrink"],
                       "--set is gone: write SECTION.KEY=VALUE"),
                      (["prepare", "synthetic", "--root", "r", "--out", "o", "--option", "preset=test"],
                       "--option is gone: write KEY=VALUE"),
                      (["tune", "--storage-path", "runs"], "--storage-path is gone: write storage_path=URI")):
        assert main(argv) == 2
        assert new in capsys.readouterr().err


def test_prepare_takes_reader_options_as_key_values(tmp_path):
    out = tmp_path / "shards"
    assert main(["prepare", "synthetic", "--root", str(tmp_path / "tree"), "--out", str(out),
                 "preset=test", "num_train=8", "num_val=4"]) == 0
    assert json.loads((out / "manifest.json").read_text())["splits"]["val"]["rows"] == 4


def test_only_input_errors_are_one_line():
    from wsss.cli import _input_error
    from wsss.io import DataError
    from wsss.platform.config import ConfigError

    argv = ["evaluate", "--checkpoint", "runs/r1", "--data", "shards", "lnl.export=shrink"]
    assert _input_error(ConfigError("epochs=0: must be >= 1"), argv)
    assert _input_error(DataError("shards/manifest.json", "manifest missing"), argv)
    assert _input_error(FileNotFoundError("runs/r1: neither a checkpoint nor a run directory"), argv)
    assert _input_error(FileNotFoundError(2, "No such file or directory", "shards/manifest.json"), argv)
    assert not _input_error(FileNotFoundError("/tmp/x/state.pt: no such file"), argv), "a file nobody named: a bug"
    assert not _input_error(ValueError("operands could not be broadcast together"), argv)


def test_a_bug_keeps_its_traceback():
    """A ValueError that is not an input error reaches the user as it is, traceback and all."""
    import pytest

    from wsss.cli import _run_guarded, build_parser

    def command_with_a_bug(args):
        raise ValueError("operands could not be broadcast together")

    args = build_parser().parse_args(["report", "somewhere", "--out", "o"])
    args.run = command_with_a_bug
    with pytest.raises(ValueError, match="broadcast"):
        _run_guarded(args, [])


def test_help_config_lists_every_key_with_its_type_default_and_comment(capsys):
    import dataclasses

    from wsss.methods.lnl import LNLConfig
    from wsss.platform.config import TrainConfig

    assert main(["train", "--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for field in dataclasses.fields(TrainConfig):
        if field.name != "sections":
            assert any(line.split()[:1] == [field.name] for line in lines), field.name
    assert any(line.split()[:3] == ["output_stride", "int", "16"] and line.endswith("16 or 8") for line in lines)
    assert not any(line.strip().startswith("lnl.") for line in lines)

    assert main(["train", "--method", "lnl", "--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for field in dataclasses.fields(LNLConfig):
        assert any(line.split()[:1] == [f"lnl.{field.name}"] for line in lines), field.name
    assert any(line.split()[:3] == ["lnl.temperature", "float", "0.5"] and "τ of Eq. 17" in line for line in lines)
    assert main(["train", "--method", "nope", "--help-config"]) == 2


def test_print_config_round_trips_through_config(tmp_path, capsys):
    from wsss.platform.config import load_config

    argv = ["--method", "lnl+fsae", "--data", "s3://bucket/voc", "epochs=3", "lnl.seed_threshold=0.7",
            "fsae.dilation_kernel=5"]
    assert main(["train", *argv, "--print-config"]) == 0
    written = tmp_path / "config.toml"
    written.write_text(capsys.readouterr().out)
    expected = load_config(None, ["epochs=3", "lnl.seed_threshold=0.7", "fsae.dilation_kernel=5"], method="lnl+fsae",
                           data="s3://bucket/voc")
    assert load_config(str(written)).to_dict() == expected.to_dict()


def test_every_method_config_round_trips_through_toml(tmp_path):
    """Each registered method and add-on's sections, as TOML and back: every type a config holds."""
    from wsss.methods.base import ADDONS, METHODS, required_inputs
    from wsss.platform.config import TrainConfig, load_config
    from wsss.platform.config_text import to_toml

    for spec in [*METHODS, *(f"cam+{addon}" for addon in ADDONS)]:
        try:
            required_inputs(spec)
        except ValueError:
            continue  # an add-on that does not compose with cam
        config = TrainConfig(method=spec, pseudo_labels="labels", wandb_project="a \"quoted\" project ü", lr=1e-5)
        path = tmp_path / f"{spec}.toml"
        path.write_text(to_toml(config.to_dict()))
        assert load_config(str(path)).to_dict() == config.to_dict(), spec


def test_epoch_line_and_summary():
    from wsss.platform.console import epoch_line, run_summary, seconds_left

    metrics = {"epoch": 2, "loss": 0.7086, "miou": 0.1794, "threshold": 0.3, "images_per_s": 49.2,
               "input_wait_s": 0.21, "epoch_time_s": 0.81}
    assert epoch_line(metrics, 4, seconds_left(0.0, 100.0, 2, 2)) == (
        "epoch 2/4 | loss 0.7086 | miou 17.94% | 49.2 images/s | input wait 0.2 of 0.8 s | time left 1 min 40 s")
    assert "time left" not in epoch_line({k: v for k, v in metrics.items() if k != "miou"}, 4, None)
    assert run_summary("cam", metrics, 3725, "runs/r", None).splitlines()[0] == (
        "trained cam: 2 epochs in 1 h 02 min, loss 0.7086, miou 17.94% (background threshold 0.30)")
