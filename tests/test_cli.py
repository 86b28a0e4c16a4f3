"""The `wsss` command: user errors are one clear line and exit code 2, before Ray starts."""

from __future__ import annotations

import ray

from wsss.cli import main


def test_prepare_then_bad_train_arguments_fail_before_ray(tmp_path, capsys):
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
    assert not ray.is_initialized()


def test_evaluate_names_a_bad_checkpoint(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "neither a checkpoint nor a run directory" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_demo_names_a_bad_override_before_generating_data(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "output_stride=7"]) == 2
    assert "output_stride" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo"), "output_stride"]) == 2
    assert "override 'output_stride' is not key=value" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    assert not ray.is_initialized()


def test_demo_overrides_reach_every_run():
    from wsss.platform.demo import demo_config

    assert demo_config("cam", "d", "r", "demo", None).output_stride == 16
    config = demo_config("lnl", "d", "r", "demo", 2, seed=1, overrides={"output_stride": "8", "lnl.eta": "0.5"})
    assert (config.output_stride, config.epochs, config.seed, config.sections["lnl"].eta) == (8, 2, 1, 0.5)
