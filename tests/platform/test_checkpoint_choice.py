"""Which checkpoint of a run `wsss evaluate` scores: the best by val `miou`, or the newest."""

from __future__ import annotations

import json

import pytest
import torch

from wsss.platform.checkpoints import INFO_FILE, STATE_FILE, best_checkpoint, latest_checkpoint


def make_run(root, checkpoints: dict[str, float | None], incomplete: tuple[str, ...] = ()) -> str:
    """A run directory with a `checkpoint_*` per entry: name -> the miou it recorded (None: not evaluated)."""
    for name, miou in checkpoints.items():
        directory = root / name
        directory.mkdir(parents=True)
        metrics = {} if miou is None else {"miou": miou}
        (directory / INFO_FILE).write_text(json.dumps({"epoch": 1, "metrics": metrics}))
        if name not in incomplete:
            torch.save({}, directory / STATE_FILE)
    return str(root)


@pytest.mark.parametrize("checkpoints, best", [
    ({"checkpoint_1": 0.3, "checkpoint_2": 0.5, "checkpoint_3": 0.4}, "checkpoint_2"),
    ({"checkpoint_1": 0.3, "checkpoint_2": None}, "checkpoint_1"),  # the newest was not evaluated
    ({"checkpoint_1": 0.5, "checkpoint_2": 0.5}, "checkpoint_2"),  # equals: the newest
    ({"checkpoint_1": None, "checkpoint_2": None}, "checkpoint_2"),  # none evaluated: the newest
])
def test_best_checkpoint_is_the_best_evaluated_one(tmp_path, checkpoints, best):
    run = make_run(tmp_path / "run", checkpoints)
    assert best_checkpoint(run) == str(tmp_path / "run" / best)
    assert latest_checkpoint(run) == str(tmp_path / "run" / max(checkpoints))


def test_an_upload_cut_short_is_never_chosen(tmp_path):
    run = make_run(tmp_path / "run", {"checkpoint_1": 0.3, "checkpoint_2": 0.9}, incomplete=("checkpoint_2",))
    assert best_checkpoint(run) == str(tmp_path / "run" / "checkpoint_1")


def test_a_checkpoint_is_its_own_choice(tmp_path):
    run = make_run(tmp_path / "run", {"checkpoint_1": 0.3, "checkpoint_2": 0.9})
    assert best_checkpoint(f"{run}/checkpoint_1") == f"{run}/checkpoint_1"


def test_a_run_without_checkpoints_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="empty: neither a checkpoint nor a run directory"):
        best_checkpoint(str(tmp_path / "empty"))
