"""The test bucket on moto's S3 server (the `s3_env` and `s3` fixtures in tests/conftest.py)
and the `wsss` CLI run in a process of its own against it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

BUCKET = "wsss-test"


def run_wsss(args: list[str], s3_env: dict, cwd) -> subprocess.CompletedProcess:
    """Run `wsss ARGS` in a fresh process, which starts a local Ray of its own (never joins
    one), in the environment `s3_env`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env |= s3_env | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "wsss", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=400)


def wsss(args: list[str], s3_env: dict, cwd) -> dict | None:
    """`run_wsss`, which must succeed; returns the JSON object it printed last, if any."""
    done = run_wsss(args, s3_env, cwd)
    assert done.returncode == 0, f"wsss {args[0]} failed ({done.returncode}):\n{done.stderr[-6000:]}"
    printed = re.search(r"^{", done.stdout, re.MULTILINE)
    return json.loads(done.stdout[printed.start():]) if printed else None
