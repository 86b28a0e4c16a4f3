"""`wsss prepare`: read a dataset tree and write it as shards plus manifest.

Arguments are checked before any work (unknown dataset or option, an output that already
holds a prepared dataset, an unreadable root: each reader checks its root when built),
so a mistake costs nothing and nothing is written.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable

from wsss.datasets.base import READERS, build_reader
from wsss.datasets.parallel import default_workers
from wsss.datasets.shards import Manifest, check_writable, write_shards
from wsss.io import canonical, public_uri


def prepare(dataset: str, root: str | os.PathLike, out: str | os.PathLike, sbd: str | os.PathLike | None = None,
            skip_invalid: bool = False, overwrite: bool = False, workers: int | None = None,
            progress: Callable[[str, int], None] | None = None, **options) -> Manifest:
    """Write every split of `dataset` (read from `root`) to `out` and return its manifest.

    `sbd` (voc only) adds the SBD train_aug split; `skip_invalid` skips bad inputs and
    counts them in the manifest instead of stopping at the first; `overwrite` replaces a
    dataset already prepared at `out`; `workers` processes read the images (default: one
    per CPU; the shards are the same for any number); `progress(split, rows)` follows the
    writing; `options` go to the reader (e.g. coco's `year`)."""
    import wsss.datasets  # noqa: F401  (registers the readers)

    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(READERS))}")
    if sbd is not None:
        options["sbd"] = os.fspath(sbd)
    if skip_invalid:
        options["skip_invalid"] = True
    _check_options(dataset, options)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    out = canonical(out)
    check_writable(out, overwrite)
    reader = build_reader(dataset, os.fspath(root), **options)
    source = {"root": public_uri(canonical(root)), "sbd": public_uri(canonical(sbd)) if sbd is not None else None,
              "options": json.loads(json.dumps({k: v for k, v in options.items() if k != "sbd"}, default=str))}  # JSON-safe, checked before any work
    return write_shards(reader, out, overwrite=overwrite, source=source, workers=workers or default_workers(),
                        progress=progress)


def _check_options(dataset: str, options: dict) -> None:
    parameters = inspect.signature(READERS[dataset]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name in parameters if name != "root"]
    for name in options:
        if name not in accepted:
            raise ValueError(f"dataset {dataset!r} takes no option {name!r}; it takes: {', '.join(accepted)}")
