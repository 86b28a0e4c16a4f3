"""Shards, training, checkpoints, resume and evaluation on S3: a real S3-compatible server
(moto's) on loopback, used by the real `wsss` CLI as on a cluster, through the AWS_*
environment that every process and every Ray worker inherits.

pyarrow 26 reads AWS_ENDPOINT_URL in `FileSystem.from_uri` (what wsss and Ray use for
every URI) but not in the bare `S3FileSystem()` constructor, hence the explicit
endpoint where the fixture creates its bucket.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import ray
import torch
from pyarrow import fs as pafs

from tests.helpers.s3 import BUCKET, wsss
from wsss.cli import main
from wsss.methods.base import BackboneConfig, build_method
from wsss.platform.checkpoints import latest_checkpoint, start_fresh
from wsss.platform.config import ConfigError, TrainConfig
from wsss.platform.pseudo_labels import checkpoint_threshold

MISSING = "s3://no-such-bucket"


def checkpoint_dirs(filesystem: pafs.FileSystem, run_path: str) -> list[str]:
    """Bucket paths of the run's checkpoints (folders holding a state.pt), oldest first."""
    selector = pafs.FileSelector(run_path, recursive=True, allow_not_found=True)
    return sorted(info.path.rsplit("/", 1)[0] for info in filesystem.get_file_info(selector)
                  if info.path.endswith("/state.pt"))


def read_json(filesystem: pafs.FileSystem, path: str) -> dict:
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


@pytest.mark.slow
def test_prepare_train_resume_and_evaluate_on_s3(s3_env, s3, tmp_path, capsys):
    shards, runs = f"s3://{BUCKET}/shards", f"s3://{BUCKET}/runs"
    assert main(["prepare", "synthetic", "--root", str(tmp_path / "tree"), "--out", shards,
                 "preset=test", "num_train=16", "num_val=4"]) == 0  # no Ray: in-process
    manifest = read_json(s3, f"{BUCKET}/shards/manifest.json")
    assert manifest["splits"]["train"]["rows"] == 16

    train = ["train", "--method", "cam", "--data", shards, f"storage_path={runs}", "name=s3run",
             "batch_size=8", "crop_size=64", "backbone=resnet18", "backbone_weights=none",
             "eval_max_images=4", "wandb=offline", "keep_checkpoints=0"]  # every checkpoint: compared below
    first = wsss([*train, "epochs=1", "--json"], s3_env, tmp_path)
    assert first["metrics"]["epoch"] == 1 and first["metrics"]["resumed_from_epoch"] == 0
    assert first["run"] == f"{runs}/s3run" and first["checkpoint"].startswith(f"{runs}/s3run/checkpoint_")
    epoch_one = checkpoint_dirs(s3, f"{BUCKET}/runs/s3run")
    assert [f"s3://{path}" for path in epoch_one] == [first["checkpoint"]]

    # An upload cut short (the server stopped): state.pt there, checkpoint.json never written.
    cut = f"{BUCKET}/runs/s3run/checkpoint_2999-01-01_00-00-00.000000"
    s3.copy_file(f"{epoch_one[0]}/state.pt", f"{cut}/state.pt")

    # The same name and storage_path again, with more epochs: continues from S3, from the
    # last complete checkpoint.
    second = wsss([*train, "epochs=2", "--json"], s3_env, tmp_path)
    assert second["metrics"]["epoch"] == 2 and second["metrics"]["resumed_from_epoch"] == 1
    checkpoints = [path for path in checkpoint_dirs(s3, f"{BUCKET}/runs/s3run") if path != cut]
    assert len(checkpoints) == 2 and checkpoints[0] == epoch_one[0]
    assert f"s3://{checkpoints[1]}" == second["checkpoint"]
    info = read_json(s3, f"{checkpoints[1]}/checkpoint.json")
    assert info["epoch"] == 2
    # Pseudo-labels of a run directory use its newest checkpoint's threshold, as locally.
    assert latest_checkpoint(f"{runs}/s3run") == second["checkpoint"]
    assert checkpoint_threshold(f"{runs}/s3run") == checkpoint_threshold(second["checkpoint"]) \
        == info["metrics"]["threshold"]
    assert list((tmp_path / "wandb").rglob("offline-run-*")), "W&B writes locally when checkpoints go to S3"

    # An output in a missing bucket is refused before any evaluation (in-process, no Ray).
    assert main(["evaluate", "--checkpoint", second["checkpoint"], "--data", shards, "--out",
                 f"{MISSING}/eval"]) == 2
    assert f"{MISSING}/eval: bucket 'no-such-bucket' does not exist" in capsys.readouterr().err

    wsss(["evaluate", "--checkpoint", second["checkpoint"], "--data", shards, "--out", f"s3://{BUCKET}/eval",
          "--scales", "1.0", "--no-flip", "--max-images", "4"], s3_env, tmp_path)
    results = read_json(s3, f"{BUCKET}/eval/results.json")
    assert results["checkpoint"] == second["checkpoint"] and results["data"] == shards
    assert results["epoch"] == 2 and results["method"] == "cam" and results["scales"] == [1.0]
    assert 0 <= results["miou"] <= 1 and len(results["per_class_iou"]) == len(results["classes"])
    with s3.open_input_stream(f"{BUCKET}/eval/results.md") as stream:
        assert stream.read().decode().startswith("# cam on val")


def test_prepare_into_a_missing_bucket_fails_before_reading_the_dataset(s3, tmp_path, capsys):
    assert main(["prepare", "synthetic", "--root", str(tmp_path / "tree"), "--out", f"{MISSING}/shards",
                 "preset=test"]) == 2
    assert f"{MISSING}/shards: bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "tree").exists(), "the synthetic tree was generated before the check"


def test_train_names_a_missing_bucket_before_ray_starts(s3, tmp_path, capsys):
    ray_was_running = ray.is_initialized()
    assert main(["train", "--method", "cam", "--data", f"{MISSING}/shards"]) == 2
    assert f"{MISSING}/shards: bucket 'no-such-bucket' does not exist" in capsys.readouterr().err

    shards = f"s3://{BUCKET}/tiny"
    assert main(["prepare", "synthetic", "--root", str(tmp_path / "tree"), "--out", shards,
                 "preset=test", "num_train=2", "num_val=2"]) == 0
    assert main(["train", "--method", "cam", "--data", shards, f"storage_path={MISSING}/runs"]) == 2
    assert f"{MISSING}/runs: bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert ray.is_initialized() == ray_was_running


def test_evaluate_names_a_missing_checkpoint_uri(s3, capsys):
    ray_was_running = ray.is_initialized()
    checkpoint = f"s3://{BUCKET}/runs/never-trained"
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", f"s3://{BUCKET}/shards"]) == 2
    assert f"{checkpoint}: neither a checkpoint nor a run directory" in capsys.readouterr().err
    assert ray.is_initialized() == ray_was_running


def test_a_checkpoint_whose_upload_was_cut_is_never_loaded(s3, tmp_path, caplog):
    """The server stopped mid-upload: the newest folder holds half a state.pt, or a whole one
    without its checkpoint.json (written last). Loading the run takes the complete one."""
    from wsss.platform.checkpoints import load_method, save_checkpoint
    from wsss.platform.config import TrainConfig

    config = TrainConfig(method="cam", data="x", backbone="resnet18", backbone_weights="none")
    cam = build_method("cam", 2, config.sections, config.backbone_config)
    optimizer = torch.optim.SGD(cam.parameters(), lr=0.1)
    run = f"s3://{BUCKET}/runs/cut"
    for epoch in (1, 2, 3):
        local = tmp_path / f"epoch{epoch}"
        local.mkdir()
        save_checkpoint(local, cam, optimizer, epoch=epoch, step=epoch, config=config.to_dict(),
                        dataset={"classes": ["background", "a", "b"]})
        for name in ("state.pt", "checkpoint.json"):
            data = (local / name).read_bytes()
            if epoch == 3 and name == "checkpoint.json":
                continue  # epoch 3: the upload stopped before its last file
            if epoch == 2 and name == "state.pt":
                data = data[:len(data) // 2]  # epoch 2: the upload stopped inside state.pt
            with s3.open_output_stream(f"{BUCKET}/runs/cut/checkpoint_00000{epoch}/{name}") as stream:
                stream.write(data)
    with caplog.at_level(logging.WARNING, logger="wsss.platform.checkpoints"):
        assert latest_checkpoint(run) == f"{run}/checkpoint_000001"
        _, state = load_method(run)
    assert state["epoch"] == 1
    assert f"skipping checkpoint {run}/checkpoint_000003: no checkpoint.json" in caplog.text
    assert f"skipping checkpoint {run}/checkpoint_000002: state.pt is incomplete" in caplog.text


def test_init_from_reads_a_cam_run_on_s3(s3):
    """On a cluster the starting checkpoint is where runs are: in the bucket, not on a disk."""
    cam = build_method("cam", 3, backbone=BackboneConfig("resnet18", 16, "none"))
    buffer = io.BytesIO()
    torch.save({"method": cam.state_dict()}, buffer)
    with s3.open_output_stream(f"{BUCKET}/runs/cam/checkpoint_000001/state.pt") as stream:
        stream.write(buffer.getvalue())
    with s3.open_output_stream(f"{BUCKET}/runs/cam/checkpoint_000001/checkpoint.json") as stream:
        stream.write(b"{}")  # written last: the checkpoint is complete
    config = TrainConfig(method="csrm", data="x", backbone="resnet18", output_stride=16,
                         init_from=f"s3://{BUCKET}/runs/cam").with_overrides({"csrm.crf_workers": 0})
    config.check_inputs()
    csrm = build_method("csrm", 3, config.sections, config.backbone_config)
    start_fresh(csrm, config.init_from)
    for name, value in cam.network.state_dict().items():
        assert torch.equal(csrm.network.state_dict()[name], value), name
    with pytest.raises(ConfigError, match=f"init_from='s3://{BUCKET}/runs/none': .*neither a checkpoint"):
        config.with_overrides({"init_from": f"s3://{BUCKET}/runs/none"}).check_inputs()


def test_backbone_weights_are_read_from_the_bucket(s3):
    """An offline cluster keeps its ImageNet weights where its runs are."""
    import torchvision

    from wsss.platform.config import ConfigError, TrainConfig

    weights = torchvision.models.resnet18().state_dict()
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    with s3.open_output_stream(f"{BUCKET}/weights/resnet18.pth") as stream:
        stream.write(buffer.getvalue())
    config = TrainConfig(method="cam", data="x", backbone="resnet18", backbone_weights=f"s3://{BUCKET}/weights/"
                                                                                       "resnet18.pth")
    config.check_inputs()
    cam = build_method("cam", 3, backbone=config.backbone_config)
    cam.on_fresh_start()
    assert torch.equal(cam.network.backbone.stem[0].weight, weights["conv1.weight"])
    with pytest.raises(ConfigError, match=f"backbone_weights='s3://{BUCKET}/weights/none.pth': must be none, "
                                          "imagenet or an existing file"):
        config.with_overrides({"backbone_weights": f"s3://{BUCKET}/weights/none.pth"}).check_inputs()


def write_sweep(folder, mious: list[float]) -> None:
    """A sweep directory as `wsss tune` leaves it: one trial, its per-epoch results and params."""
    trial = folder / "trial_0001"
    trial.mkdir(parents=True)
    run = {"method": "cam", "dataset": "synthetic", "seed": 0, "epochs": len(mious)}
    (trial / "params.json").write_text(json.dumps({"lr": 0.03, "run": run}))
    (trial / "result.json").write_text("".join(
        json.dumps({"miou": m, "epoch": e, "trial_id": "0001", "timestamp": 100 + e, "time_total_s": e}) + "\n"
        for e, m in enumerate(mious, start=1)))
    (folder / "best.json").write_text(json.dumps({"trial_id": "0001", "evaluation": {"miou": 0.5}}))


def test_report_reads_sweeps_and_runs_straight_from_s3(s3, tmp_path):
    """The same tables as from local copies, runs named by their URI, and no weights
    downloaded except for a run whose checkpoint.json predates the recorded config."""
    from tests.helpers.runs import write_run
    from wsss.tuning.report import collect, make_report

    local = tmp_path / "local"
    write_run(local / "runs", "cam-s0", [0.20, 0.30], seed=0, lr=0.02, full=0.36)
    old = write_run(local / "runs", "cam-s1", [0.25, 0.34], seed=1, lr=0.02)
    newest = sorted(old.glob("checkpoint_*"))[-1] / "checkpoint.json"
    info = json.loads(newest.read_text())
    del info["config"], info["dataset"]  # as written before checkpoint.json recorded them
    newest.write_text(json.dumps(info))
    write_sweep(local / "sweeps" / "sw", [0.1, 0.4])
    pafs.copy_files(str(local), f"{BUCKET}/report", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)

    uris = [f"s3://{BUCKET}/report/runs", f"s3://{BUCKET}/report/sweeps/sw"]
    from_s3 = make_report(uris, str(tmp_path / "from-s3"))
    from_disk = make_report([str(local / "runs"), str(local / "sweeps" / "sw")], str(tmp_path / "from-disk"))
    assert from_s3["records"] == from_disk["records"] == 3
    table = (tmp_path / "from-s3" / "table.md").read_text()
    assert table == (tmp_path / "from-disk" / "table.md").read_text().replace(str(local), f"s3://{BUCKET}/report")
    assert f"s3://{BUCKET}/report/runs/cam-s1" in (tmp_path / "from-s3" / "records.csv").read_text()

    records, _ = collect(uris, tmp_path / "scratch")
    copied_weights = [p.relative_to(tmp_path / "scratch") for p in (tmp_path / "scratch").rglob("state.pt")]
    assert [p.parts[-3:] for p in copied_weights] == [("cam-s1", newest.parent.name, "state.pt")]


def test_report_names_an_empty_s3_folder(s3, tmp_path):
    from wsss.platform.config import ConfigError
    from wsss.tuning.report import make_report

    with pytest.raises(ConfigError, match=f"s3://{BUCKET}/nothing-here: nothing there"):
        make_report([f"s3://{BUCKET}/nothing-here"], str(tmp_path / "out"))
