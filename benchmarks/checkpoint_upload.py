"""Training time while checkpoints upload to S3 (a moto server on loopback), with Ray
Train's synchronous upload (`checkpoint_upload=sync`) and its asynchronous one (`async`,
the default), side by side in one local Ray of 2 CPUs.

    python benchmarks/checkpoint_upload.py --epochs 4 --backbone resnet50
    python benchmarks/checkpoint_upload.py --cpu-threads 1   # torch on one core, the upload on the other

Each setting trains `cam` from scratch on the `test` preset's 40 images at 64 px (5 steps
an epoch, no evaluation), checkpointing every epoch (ResNet-50: ~190 MB with the SGD
momentum). Printed per setting: the run's wall time, the training time of each epoch
(`epoch_time_s`: the steps, without the report) and the mean step time in epochs 2.. (the
ones that train while the previous checkpoint uploads in `async`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="torch threads of the training worker (0: every core, as `wsss train` does)")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    from wsss.platform.runtime import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # before Ray starts: every Ray worker inherits them
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    os.environ.pop("RAY_ADDRESS", None)
    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing",
                      region="us-east-1", allow_bucket_creation=True).create_dir("bench")

    from wsss.datasets.prepare import prepare
    from wsss.platform.config import TrainConfig
    from wsss.platform.runtime import ensure_ray
    from wsss.platform.train import fit

    try:
        with tempfile.TemporaryDirectory() as root:
            prepare("synthetic", f"{root}/tree", f"{root}/shards", preset="test")
            ensure_ray(num_cpus=2)
            for index, mode in enumerate(("sync", "async", "sync", "async")):  # interleaved: the machine is shared
                started = time.perf_counter()
                result = fit(TrainConfig(
                    method="cam", data=f"{root}/shards", name=f"{mode}-{index}", storage_path="s3://bench/runs",
                    epochs=args.epochs, batch_size=8, crop_size=64, backbone=args.backbone,
                    backbone_weights="none", eval_every=0, wandb="disabled", keep_checkpoints=0,
                    checkpoint_upload=mode, verify_data=False, cpu_threads=args.cpu_threads))
                wall = time.perf_counter() - started
                per_epoch = [m["epoch_time_s"] for _, m in sorted(result.best_checkpoints,
                                                                  key=lambda item: item[1]["epoch"])]
                steps = 40 // 8
                print(mode, json.dumps({
                    "wall_s": round(wall, 1), "epoch_time_s": [round(s, 2) for s in per_epoch],
                    "step_s_epoch_1": round(per_epoch[0] / steps, 3),
                    "step_s_while_uploading": round(statistics.mean(per_epoch[1:]) / steps, 3)}), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
