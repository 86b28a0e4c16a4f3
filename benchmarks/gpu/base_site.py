"""Stand in for the packages a bundle's target has: link them from this Python's environment.

    python benchmarks/gpu/base_site.py .bundle/cp311/present.txt /tmp/base

Links into DIR each package named in the bundle's present.txt (those it leaves to the
target), with what they need in turn (their Requires-Dist), as installed in the Python that
runs this, and nothing else: with DIR and the bundle's site on PYTHONPATH and an empty
virtual environment, a package the bundle lacks fails to import (benchmarks/gpu/smoke.sh).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(names: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions of `names` and of what they require (markers evaluated
    for this Python, without extras)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        try:
            found[name] = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} (needed on the target) is not installed in {sys.prefix}") from None
        for line in found[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("present", help="a bundle's present.txt: one package name a line")
    parser.add_argument("out", help="an empty or new directory")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [line.strip() for line in Path(args.present).read_text().splitlines() if line.strip()]
    distributions = closure(names)
    for distribution in distributions.values():
        site = Path(distribution.locate_file(""))
        # each top-level entry of the package's files: its modules, .libs and .dist-info
        for top in {Path(str(file)).parts[0] for file in distribution.files or []}:
            if top not in ("..", "__pycache__") and (site / top).exists() and not (out / top).exists():
                os.symlink(site / top, out / top)
    print(f"linked {len(distributions)} packages into {out}: {', '.join(sorted(distributions))}")


if __name__ == "__main__":
    main()
