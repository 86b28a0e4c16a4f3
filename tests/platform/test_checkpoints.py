"""Loading checkpoints safely: no code runs from a crafted state.pt, and a checkpoint that
a write or an upload cut short (no checkpoint.json, a truncated state.pt, a full disk) is
never picked: loading falls back to the newest complete one and says which it skipped."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest
import torch

from wsss.io import DataError
from wsss.methods.base import BackboneConfig, build_method
from wsss.platform import checkpoints
from wsss.platform.checkpoints import (
    INFO_FILE,
    STATE_FILE,
    UnsafeCheckpointError,
    latest_checkpoint,
    load_method,
    resume_state,
    save_checkpoint,
)
from wsss.platform.config import TrainConfig


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_run(run, epochs: int) -> list:
    """A tiny cam run with one checkpoint per epoch, oldest first."""
    config = TrainConfig(method="cam", data="unused", backbone="resnet18", backbone_weights="none")
    method = build_method("cam", 2, config.sections, BackboneConfig("resnet18", 16, "none"))
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    folders = []
    for epoch in range(1, epochs + 1):
        folders.append(run / f"checkpoint_2026-01-01_00-00-0{epoch}")
        folders[-1].mkdir(parents=True)
        save_checkpoint(folders[-1], method, optimizer, epoch=epoch, step=epoch, config=config.to_dict(),
                        dataset={"name": "tiny", "classes": ["background", "a", "b"]},
                        metrics={"epoch": epoch, "miou": 0.1 * epoch})
    return folders


def test_a_state_that_would_run_code_is_refused_by_name_and_runs_nothing(tmp_path):
    from wsss.tuning.report import read_run

    run = tmp_path / "run"
    newest = write_run(run, epochs=2)[-1]
    marker = tmp_path / "marker"
    torch.save({"method": {}, "config": RunsCode(marker)}, newest / STATE_FILE)
    read_run(run)  # the report reads checkpoint.json, never the weights
    info = json.loads((newest / INFO_FILE).read_text())
    del info["config"]  # as checkpoints written before checkpoint.json held the config
    (newest / INFO_FILE).write_text(json.dumps(info))
    for load in (lambda: load_method(str(run)), lambda: load_method(str(newest)), lambda: read_run(run)):
        with pytest.raises(UnsafeCheckpointError, match="refused: it holds objects other than tensors") as error:
            load()
        assert error.value.path == str(newest / STATE_FILE)  # never skipped for an older one
    assert not marker.exists()


def test_the_newest_checkpoint_cut_short_is_skipped_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    complete, truncated, no_info = write_run(run, epochs=3)
    state = (truncated / STATE_FILE).read_bytes()
    (truncated / STATE_FILE).write_bytes(state[:len(state) // 2])
    (no_info / INFO_FILE).unlink()  # the upload stopped before its last file
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert latest_checkpoint(str(run)) == str(complete)
        method, loaded = load_method(str(run))
    assert loaded["epoch"] == 1 and not method.training
    assert f"skipping checkpoint {no_info}: no {INFO_FILE}" in caplog.text
    assert f"skipping checkpoint {truncated}: {STATE_FILE} is incomplete" in caplog.text
    with pytest.raises(DataError, match="unreadable checkpoint state") as error:
        load_method(str(truncated))  # named directly: an error, not a fallback
    assert error.value.path == str(truncated / STATE_FILE)
    for folder in (complete, truncated):
        (folder / INFO_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="with complete checkpoints"):
        load_method(str(run))


def test_a_state_damaged_inside_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    """Whole as a zip archive, but a record's bytes are wrong: found only by loading it."""
    run = tmp_path / "run"
    older, newest = write_run(run, epochs=2)
    state = bytearray((newest / STATE_FILE).read_bytes())
    start = state.index(b"data.pkl") + 40  # inside the pickle record
    state[start:start + 16] = b"\xff" * 16
    (newest / STATE_FILE).write_bytes(bytes(state))
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        _, loaded = load_method(str(run))
    assert loaded["epoch"] == 1 and f"skipping checkpoint {newest}" in caplog.text


def test_a_resume_checkpoint_that_does_not_load_falls_back_to_the_newest_that_does(tmp_path, caplog):
    """The checkpoint Ray Train registered last, damaged after: the run resumes from the
    newest one that loads, saying so; an unsafe one is refused, never skipped."""
    run = tmp_path / "run"
    older, middle, newest = write_run(run, epochs=3)
    (newest / STATE_FILE).write_bytes((newest / STATE_FILE).read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert resume_state(str(run), str(newest))["epoch"] == 2
    assert f"skipping checkpoint {newest}: {STATE_FILE} is incomplete" in caplog.text
    assert f"resuming from {middle.name} (epoch 2), the newest complete checkpoint of {run} that loads; " \
           f"Ray Train handed {newest}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert resume_state(str(run), str(middle))["epoch"] == 2
    assert "resuming from" not in caplog.text  # Ray's own choice: nothing to say
    for folder in (older, middle):
        (folder / STATE_FILE).write_bytes(b"broken")
    with pytest.raises(FileNotFoundError, match="with complete checkpoints"):
        resume_state(str(run), str(newest))


def test_a_run_resumes_from_its_newest_complete_checkpoint_that_ray_never_registered(tmp_path, caplog):
    """Ray Train records a checkpoint after its upload; storage that stopped in between
    leaves Ray with an older one, or none (it would start the run afresh)."""
    run = tmp_path / "run"
    older, newest = write_run(run, epochs=2)
    (run / "checkpoint_2026-01-01_00-00-09").mkdir()  # the upload that was cut: nothing of it arrived
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert resume_state(str(run), str(older))["epoch"] == 2
        assert resume_state(str(run), None)["epoch"] == 2
    assert "Ray Train handed none" in caplog.text
    assert resume_state(str(tmp_path / "new-run"), None) is None  # a fresh start


def test_a_full_disk_while_saving_leaves_no_checkpoint_to_pick(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (older,) = write_run(run, epochs=1)
    real_save = torch.save

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        data = open(path, "rb").read()
        with open(path, "wb") as file:  # what a full disk leaves: the first part only
            file.write(data[:len(data) // 3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    folder = run / "checkpoint_2026-01-01_00-00-09"
    folder.mkdir()
    config = TrainConfig(method="cam", data="unused", backbone="resnet18", backbone_weights="none")
    method = build_method("cam", 2, config.sections, BackboneConfig("resnet18", 16, "none"))
    monkeypatch.setattr(checkpoints.torch, "save", save_until_the_disk_fills)
    with pytest.raises(OSError) as error:
        save_checkpoint(folder, method, torch.optim.SGD(method.parameters(), lr=0.1), epoch=2, step=2,
                        config=config.to_dict(), dataset={"classes": ["background", "a", "b"]})
    assert error.value.errno == errno.ENOSPC
    assert list(folder.iterdir()) == []  # neither half of state.pt nor a checkpoint.json
    monkeypatch.undo()
    assert latest_checkpoint(str(run)) == str(older)
    assert load_method(str(run))[1]["epoch"] == 1


def test_a_full_disk_while_writing_the_info_file_leaves_the_old_one(tmp_path, monkeypatch):
    """checkpoint.json (and every results.json, sweep.json) goes through one atomic write."""
    from wsss import io

    target = tmp_path / "results.json"
    io.write_text(str(target), '{"miou": 0.5}')
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", disk_full)
    with pytest.raises(OSError):
        io.write_text(str(target), '{"miou": 0.7, "per_class_iou": [0.1, 0.2]}')
    monkeypatch.setattr(io.os, "fsync", real_fsync)
    assert target.read_text() == '{"miou": 0.5}' and os.listdir(tmp_path) == ["results.json"]
