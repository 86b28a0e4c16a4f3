"""One live writer per folder: runs, sweeps and shard writers hold the folder's lease; a
second one at once is refused, one after a finished or dead owner goes ahead."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.readers import blocked_writer, files_under, tiny_reader
from tests.helpers.s3 import BUCKET
from wsss.datasets import lease
from wsss.datasets.lease import OWNER_FILE, FolderInUseError, acquire
from wsss.datasets.shards import write_shards

SECRET = "SeCrEt-9f2"


def hold_lease(folder: Path, ready: Path) -> subprocess.Popen:
    """Another process that takes the lease of `folder` and keeps it until killed."""
    script = ("import sys, pathlib, time; from wsss.datasets.lease import acquire; "
              "acquire(sys.argv[1], 'wsss train'); pathlib.Path(sys.argv[2]).touch(); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(folder), str(ready)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
    wait_for(ready, holder)
    return holder


def wait_for(ready: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None, f"the process exited early:\n{process.stderr.read()}"
        assert time.monotonic() < deadline, "the process never got ready"
        time.sleep(0.05)


def stop(process: subprocess.Popen) -> None:
    process.kill()  # SIGKILL: nothing is released
    process.wait()
    process.stderr.close()


def test_a_live_owner_refuses_a_second_start_and_a_dead_one_is_taken_over(tmp_path):
    folder = tmp_path / "runs" / "exp"
    holder = hold_lease(folder, tmp_path / "ready")
    try:
        with pytest.raises(FolderInUseError, match=rf"{folder} is in use by wsss train \(pid {holder.pid} on "):
            acquire(str(folder), "wsss train")
    finally:
        stop(holder)
    assert holder.returncode == -signal.SIGKILL and (folder / OWNER_FILE).is_file()  # left behind, stale
    with acquire(str(folder), "wsss train") as taken:  # its pid is gone on this host: taken over
        assert json.loads((folder / OWNER_FILE).read_text())["pid"] == os.getpid() == taken.record["pid"]
    assert not (folder / OWNER_FILE).exists()  # released
    acquire(str(folder), "wsss train").release()  # a finished run's folder is free again


def test_of_many_simultaneous_starts_exactly_one_wins(tmp_path):
    folder, barrier, won, refused = tmp_path / "exp", threading.Barrier(8), [], []

    def start():
        barrier.wait()
        try:
            won.append(acquire(str(folder), "wsss train"))
        except FolderInUseError:
            refused.append(True)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(won), len(refused)) == (1, 7)
    won[0].release()


def write_lease(folder: Path, **record) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNER_FILE).write_text(json.dumps(record))


def test_a_lease_from_another_host_is_stale_only_without_a_recent_heartbeat(tmp_path):
    folder = tmp_path / "exp"
    write_lease(folder, what="wsss train", host="other-node", pid=1, started="x", heartbeat=time.time() - 10,
                token="t")
    with pytest.raises(FolderInUseError, match="pid 1 on other-node"):
        acquire(str(folder), "wsss train")
    write_lease(folder, what="wsss train", host="other-node", pid=1, started="x",
                heartbeat=time.time() - lease.STALE_AFTER_S - 1, token="t")
    acquire(str(folder), "wsss train").release()


def test_a_lease_being_written_is_respected_and_a_truncated_old_one_taken_over(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / OWNER_FILE).write_text("")  # created exclusively, its content not written yet
    with pytest.raises(FolderInUseError):
        acquire(str(folder), "wsss train")
    old = time.time() - lease.UNREADABLE_STALE_S - 1
    os.utime(folder / OWNER_FILE, (old, old))
    acquire(str(folder), "wsss train").release()


def test_the_heartbeat_refreshes_the_lease_and_notices_a_takeover(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    caplog.set_level(logging.WARNING, logger=lease.__name__)  # whatever level earlier tests left
    folder = tmp_path / "exp"
    held = acquire(str(folder), "wsss train")

    def heartbeat() -> float:  # read as a second start reads it: the beat may be rewriting the file
        return (lease._read(held.fs, held.path) or {}).get("heartbeat", first)

    first = json.loads((folder / OWNER_FILE).read_text())["heartbeat"]
    deadline = time.time() + 30  # a loaded machine may run the heartbeat thread late
    while heartbeat() <= first and time.time() < deadline:
        time.sleep(0.05)
    assert heartbeat() > first
    while "taken over by" not in caplog.text and time.time() < deadline:
        # A beat that read its own lease just before this write rewrites it; a real second start
        # sees that on its read-back and stops, so here the other owner writes again.
        if (lease._read(held.fs, held.path) or {}).get("token") != "t":
            write_lease(folder, what="wsss train", host="other-node", pid=1, started="x", heartbeat=time.time(),
                        token="t")
        time.sleep(0.05)
    held.release()
    assert "taken over by wsss train (pid 1 on other-node" in caplog.text
    assert (folder / OWNER_FILE).is_file(), "release deletes only its own lease"


def test_a_second_shard_writer_into_one_folder_is_refused_and_touches_nothing(tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    writer = blocked_writer(out, ready)
    try:
        wait_for(ready, writer)
        before = files_under(out)
        with pytest.raises(FolderInUseError, match=f"{out} is in use by a job writing shards"):
            write_shards(tiny_reader(), str(out))
        assert files_under(out) == before, "the running writer's staging is not swept as a leftover"
    finally:
        stop(writer)
    manifest = write_shards(tiny_reader(), str(out))  # its owner is dead: the next write goes ahead
    assert OWNER_FILE not in files_under(out) and manifest.splits["train"]["rows"] == 5


def test_cli_prepare_into_a_folder_in_use_is_a_clear_error(tmp_path, capsys):
    from wsss.cli import main

    out = tmp_path / "out"
    holder = hold_lease(out, tmp_path / "ready")
    try:
        code = main(["prepare", "synthetic", "--root", str(tmp_path / "tree"), "--out", str(out),
                     "preset=test"])
    finally:
        stop(holder)
    assert code == 2 and f"{out} is in use by wsss train (pid {holder.pid}" in capsys.readouterr().err


def test_a_sweep_whose_name_is_in_use_is_refused_before_ray_starts(shards, tmp_path):
    import ray

    from tests.helpers.runs import tiny_sweep_config
    from wsss.tuning.tune import run_sweep

    storage = tmp_path / "sweeps"
    holder = hold_lease(storage / "sweep", tmp_path / "ready")
    ray_was_running = ray.is_initialized()  # other tests' Ray may be up; this refusal starts none
    try:
        with pytest.raises(FolderInUseError, match="sweep is in use by"):
            run_sweep(tiny_sweep_config(shards, storage), trials=1, name="sweep")
    finally:
        stop(holder)
    assert not (storage / "sweep" / "sweep.json").exists() and ray.is_initialized() == ray_was_running


@pytest.mark.slow
def test_a_second_train_of_one_name_is_refused_before_it_writes(ray_local, shards, tmp_path):
    from tests.helpers.runs import tiny_run_config
    from wsss.platform.train import fit

    run = tmp_path / "runs" / "run"
    holder = hold_lease(run, tmp_path / "ready")
    try:
        with pytest.raises(FolderInUseError, match=f"{run} is in use by wsss train"):
            fit(tiny_run_config(shards, tmp_path))
    finally:
        stop(holder)
    assert os.listdir(run) == [OWNER_FILE], "nothing written beside the other run's lease"


@pytest.mark.usefixtures("s3")
def test_on_s3_a_second_start_is_refused_and_the_error_keeps_no_credentials():
    from pyarrow import fs as pafs

    bucket = pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    folder = f"s3://testing:{SECRET}@{BUCKET}/lease/exp"  # credentials in the URI, as a user may give them
    held = acquire(folder, "wsss train")
    assert json.loads(bucket.open_input_stream(f"{BUCKET}/lease/exp/{OWNER_FILE}").read())["pid"] == os.getpid()
    with pytest.raises(FolderInUseError, match=rf"s3://\*\*\*@{BUCKET}/lease/exp is in use by wsss train") as refused:
        acquire(folder, "wsss train")
    assert SECRET not in str(refused.value)
    held.release()
    assert bucket.get_file_info(f"{BUCKET}/lease/exp/{OWNER_FILE}").type.name == "NotFound"
    acquire(folder, "wsss train").release()


def test_label_shards_release_their_lease_when_published(shards, tmp_path):
    from wsss.platform.pseudo_labels import ground_truth_labels

    out = tmp_path / "labels"
    ground_truth_labels(shards, str(out), split="val")
    assert (out / "manifest.json").is_file() and not (out / OWNER_FILE).exists()
