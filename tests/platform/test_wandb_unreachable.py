"""W&B online but unreachable (a closed local port): training finishes, says once that
tracking is off, and does not wait minutes for the server."""

from __future__ import annotations

import logging
import time

from wsss.platform.config import TrainConfig
from wsss.platform.plain import train_plain
from wsss.platform.runtime import free_port
from wsss.platform.tracking import INIT_TIMEOUT_S, Tracker, run_id


def test_training_finishes_when_the_wandb_server_is_unreachable(shards, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    config = TrainConfig(method="cam", data=shards, epochs=1, batch_size=8, crop_size=64, backbone="resnet18",
                         backbone_weights="none", eval_max_images=4, wandb="online", log_every=1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="wsss.platform.tracking"):
        tracker = Tracker(project="wsss-test", name="offline-server", run_id=run_id(str(tmp_path), "x"), group="",
                          mode=config.wandb, config=config.to_dict(), directory=tmp_path / "wandb", tags=["cam"])
        waited = time.monotonic() - started
        _, history = train_plain(config, device="cpu", log=tracker.log)
        tracker.log({"epoch/miou": history[-1].get("miou", 0.0)}, step=99)
        tracker.finish()
    assert [m["epoch"] for m in history] == [1], "training ran to the end"
    warnings = [r.getMessage() for r in caplog.records if r.name == "wsss.platform.tracking"]
    assert len(warnings) == 1 and warnings[0].startswith("W&B tracking is off for this run:"), warnings
    # init_timeout bounds the wait (W&B's own default is 90 s and then retries); the slack
    # is for a loaded 2-core machine, where starting W&B's service alone takes seconds.
    assert waited < 3 * INIT_TIMEOUT_S, f"waited {waited:.0f} s for an unreachable W&B server"
