"""What `wsss report` reads of sweeps and runs on cloud storage (s3://, gs://), copied to
a local folder: the JSON files (Tune's result.json and params.json, best.json,
checkpoint.json, results.json, a run's epochs.jsonl) and images, never the checkpoints' weights, except a run's
newest `state.pt` when its checkpoint.json predates the config being recorded there.
"""

from __future__ import annotations

from pathlib import Path

from pyarrow import fs as pafs

from wsss.io import resolve
from wsss.platform.checkpoints import INFO_FILE, STATE_FILE
from wsss.platform.config import ConfigError

COPIED_SUFFIXES = (".json", ".jsonl", ".png", ".jpg", ".jpeg")


def mirror(uri: str, into: Path) -> Path:
    """Copy what a report reads under `uri` to `into` (same layout); returns `into`."""
    import json

    fs, root = resolve(uri)
    root = root.rstrip("/")
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = [info.path for info in found if info.type == pafs.FileType.File]
    if not files:
        raise ConfigError(f"{uri}: nothing there (no such bucket folder, or it is empty)")
    for path in files:
        if path.endswith(COPIED_SUFFIXES):
            _copy(fs, path, into / path[len(root) + 1:])
    # runs whose newest checkpoint.json has no config: their newest state.pt holds it
    newest: dict[str, str] = {}
    for path in files:
        run, checkpoint, name = path.rsplit("/", 2)
        if name == INFO_FILE and checkpoint.startswith("checkpoint_"):
            newest[run] = max(newest.get(run, checkpoint), checkpoint)
    for run, checkpoint in newest.items():
        relative = f"{run}/{checkpoint}"[len(root) + 1:]
        if "config" not in json.loads((into / relative / INFO_FILE).read_text()):
            _copy(fs, f"{run}/{checkpoint}/{STATE_FILE}", into / relative / STATE_FILE)
    return into


def _copy(fs: pafs.FileSystem, path: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(path) as stream, open(target, "wb") as out:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
