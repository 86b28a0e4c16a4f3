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
