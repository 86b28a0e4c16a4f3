"""Credentials in URIs never reach what is logged, saved or printed; runs still use them.
W&B ids are unique per (storage path, run name)."""

from __future__ import annotations

import json

import pytest

from wsss.io import DataError, is_redacted, public_uri
from wsss.platform.config import ConfigError, TrainConfig
from wsss.platform.tracking import Tracker, public_config, run_id

SECRET = "SeCrEt-9f2"


@pytest.mark.parametrize("uri, public", [
    (f"s3://AKIA:{SECRET}@bucket/runs", "s3://***@bucket/runs"),
    (f"postgresql://user:{SECRET}@db.host:5432/optuna", "postgresql://***@db.host:5432/optuna"),
    (f"mysql://{SECRET}@host/db", "mysql://***@host/db"),
    (f"gs://bucket/x?access_key=AK&secret_key={SECRET}&region=eu", "gs://bucket/x?access_key=***&secret_key=***&region=eu"),
    (f"error reading s3://AK:{SECRET}@b/x/manifest.json: no such file", "error reading s3://***@b/x/manifest.json: no such file"),
    ("s3://bucket/a@b/c", "s3://bucket/a@b/c"),  # an @ in the path is no credential
    ("sqlite:////tmp/sweep/optuna.db", "sqlite:////tmp/sweep/optuna.db"),
    ("runs/exp-1", "runs/exp-1"),
])
def test_public_uri_keeps_scheme_host_and_path(uri, public):
    assert public_uri(uri) == public
    assert is_redacted(public_uri(uri)) == (public != uri)


def test_public_config_strips_credentials_at_any_depth():
    config = TrainConfig(method="csrm", data=f"s3://AK:{SECRET}@bucket/voc", storage_path=f"s3://AK:{SECRET}@b/runs",
                         backbone_weights=f"gs://bucket/r50.pth?secret_key={SECRET}").to_dict()
    config["init_from"] = f"s3://AK:{SECRET}@b/runs/cam-1"
    public = public_config(config | {"api_key": "k", "paths": [f"s3://AK:{SECRET}@b/x"]})
    assert SECRET not in json.dumps(public) and "api_key" not in public
    assert public["data"] == "s3://***@bucket/voc" and public["init_from"] == "s3://***@b/runs/cam-1"
    assert public["paths"] == ["s3://***@b/x"] and public["epochs"] == config["epochs"]
    assert config["data"] == f"s3://AK:{SECRET}@bucket/voc", "the run itself keeps the real URI"
    TrainConfig.from_dict(public_config(config))  # what a checkpoint keeps still loads


def test_errors_name_the_uri_without_its_credentials(capsys):
    from wsss.cli import main

    error = DataError(f"s3://AK:{SECRET}@bucket/voc/manifest.json", f"cannot read s3://AK:{SECRET}@bucket/voc")
    assert SECRET not in str(error) and "s3://***@bucket/voc/manifest.json" in str(error)
    with pytest.raises(ConfigError) as raised:
        TrainConfig(crop_size=8, data=f"s3://AK:{SECRET}@bucket/voc")
    assert SECRET not in str(raised.value)
    assert main(["evaluate", "--checkpoint", f"/nonexistent/{SECRET}-run", "--data",
                 f"file://AK:{SECRET}@/nonexistent"]) == 2
    assert SECRET not in capsys.readouterr().err.replace(f"/nonexistent/{SECRET}-run", "")


def test_wandb_run_config_keeps_no_credentials_and_its_id_is_unique_per_storage_and_name(tmp_path):
    config = TrainConfig(data=f"s3://AK:{SECRET}@bucket/voc").to_dict()
    tracker = Tracker(project="wsss-test", name="exp.1", run_id=run_id(str(tmp_path), "exp.1"), group="",
                      mode="offline", config=config, directory=tmp_path / "wandb", tags=["cam"])
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files), "a real offline W&B run was written"
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]
    assert any(b"s3://***@bucket/voc" in p.read_bytes() for p in files)

    ids = {run_id("/runs", "exp.1"), run_id("/runs", "exp-1"), run_id("/runs", "exp_1"), run_id("/other", "exp.1"),
           run_id("s3://bucket/runs", "exp.1")}
    assert len(ids) == 5
    assert run_id("/runs", "exp.1") == run_id("/runs", "exp.1"), "stable: a resumed run continues its W&B run"
    assert run_id("s3://AK:a@bucket/runs", "x") == run_id("s3://AK:b@bucket/runs", "x") == run_id("s3://bucket/runs", "x")
    long = run_id("/runs", "x" * 128)
    assert len(long) <= 64 and long.startswith("x" * 48)


@pytest.mark.slow
def test_sweep_files_keep_no_database_password(ray_local, shards, tmp_path, capsys):
    """The study storage URL with a password reaches Optuna, not sweep.json or the output;
    --resume asks for it again instead of using the redacted one."""
    from tests.helpers.runs import tiny_sweep_config
    from wsss.cli import main
    from wsss.tuning.tune import run_sweep

    storage = f"postgresql://optuna:{SECRET}@127.0.0.1:9/optuna"  # port 9: nothing listens
    with pytest.raises(Exception) as raised:  # no driver or no server: Optuna fails to open it
        run_sweep(tiny_sweep_config(shards, tmp_path), trials=1, name="pg", study_storage=storage)
    saved = (tmp_path / "pg" / "sweep.json").read_text()
    assert SECRET not in saved and "postgresql://***@127.0.0.1:9/optuna" in saved
    assert not (tmp_path / "pg" / "owner.json").exists(), "the sweep's lease is released"
    del raised
    code = main(["tune", "--resume", "--name", "pg", f"storage_path={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "give it again (--study-storage)" in err and SECRET not in err
    code = main(["tune", "--resume", "--name", "pg", f"storage_path={tmp_path}", "epochs=9"])
    assert code == 2 and "epochs='9' would change it" in capsys.readouterr().err



@pytest.mark.slow
def test_a_run_on_a_credentialed_s3_uri_writes_the_uri_nowhere_with_its_credentials(s3_env, s3, tmp_path,  # noqa: F811
                                                                                    capsys):
    """The real CLI on moto's S3 with `s3://KEY:SECRET@bucket` URIs: the run reads and writes
    through them, and its checkpoint, W&B files, results.json and output hold `s3://***@`."""
    import io

    import torch

    from tests.helpers.s3 import BUCKET, wsss
    from wsss.cli import main

    secret_uri = f"s3://AKIAFAKE:{SECRET}@{BUCKET}/cred"
    assert main(["prepare", "synthetic", "--root", str(tmp_path / "tree"), "--out", f"{secret_uri}/shards",
                 "preset=test", "num_train=8", "num_val=2"]) == 0
    assert SECRET not in capsys.readouterr().out.replace(f"wrote {secret_uri}/shards", "")
    printed = wsss(["train", "--method", "cam", "--data", f"{secret_uri}/shards", f"storage_path={secret_uri}/runs",
                    "name=cred", "epochs=1", "batch_size=8", "crop_size=64", "backbone=resnet18",
                    "backbone_weights=none", "eval_max_images=2", "wandb=offline", "--json"], s3_env, tmp_path)
    assert printed["run"] == f"s3://***@{BUCKET}/cred/runs/cred"
    checkpoint = printed["checkpoint"].replace("s3://***@", "")
    with s3.open_input_stream(f"{checkpoint}/state.pt") as stream:
        state = torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)
    assert state["config"]["data"] == f"s3://***@{BUCKET}/cred/shards"
    assert state["config"]["storage_path"] == f"s3://***@{BUCKET}/cred/runs"
    wandb_files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert wandb_files and not [p for p in wandb_files if SECRET.encode() in p.read_bytes()]

    wsss(["evaluate", "--checkpoint", f"{secret_uri}/runs/cred", "--data", f"{secret_uri}/shards",
          "--out", f"{secret_uri}/eval", "--scales", "1.0", "--no-flip", "--max-images", "2"], s3_env, tmp_path)
    with s3.open_input_stream(f"{BUCKET}/cred/eval/results.json") as stream:
        results = json.loads(stream.read())
    assert results["data"] == f"s3://***@{BUCKET}/cred/shards" and SECRET not in json.dumps(results)

    from pyarrow import fs as pafs

    # every object the run left in the bucket, Ray Train's own state files included
    written = [info.path for info in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/cred", recursive=True))
               if info.type == pafs.FileType.File]
    assert {"state.pt", "config.toml", "epochs.jsonl"} <= {path.rsplit("/", 1)[1] for path in written}
    holding = []
    for path in written:
        with s3.open_input_stream(path) as stream:
            if SECRET.encode() in stream.read():
                holding.append(path)
    assert not holding, f"files in the bucket holding the secret: {holding}"
