"""Build the bundle that brings Ray, Optuna, W&B and pydensecrf to a machine without network.

    python benchmarks/gpu/bundle.py                  # cp312, for the GPU machine: .bundle/cp312/
    python benchmarks/gpu/bundle.py --python 3.11 --have-file '' --out .bundle/cp311   # this machine

The bundle holds what the target lacks of the project's dependencies (pyproject.toml) and
of theirs, at the versions installed in the Python that runs this script (the versions the
tests ran with), as wheels from PyPI for CPython on manylinux x86-64:
- `ray-<version>-slim.tar.xz`: Ray's wheel unpacked without what wsss never imports (Java
  jars, RLlib, Serve, Ray LLM, the dashboard's source maps);
- `wheels/`: every other missing package, and wsss itself;
- `install.sh`: `source install.sh DIR` unpacks both into DIR and puts DIR on PYTHONPATH.
Packages the target has are named in --have-file (default: the GPU machine's list); the
dependency walk reads each wheel's METADATA `Requires-Dist`, with markers evaluated for the
target, and stops at those. It prints the bundle's size and the tracked tree's beside it:
a device call carries at most 64 MiB of both.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[2]
LIMIT = 64 * 2**20
# the glibc tags pip must be told one by one (it matches N exactly); the GPU machine's is newer
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64"]
RAY_SLIMMED = ("ray/jars", "ray/rllib", "ray/serve", "ray/llm")

INSTALL_SH = """\
# Source it: `source install.sh [DIR]` (default /tmp/wsss-site) unpacks the parts of this
# bundle that are beside it (wheels/, ray-*-slim.tar.xz) into DIR and puts DIR first on
# PYTHONPATH; it changes nothing else. Sent in two parts (two calls to one warm machine),
# the first call's part stays in DIR for the second.
_bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_site=${1:-/tmp/wsss-site}
mkdir -p "$_site" &&
  if [ -d "$_bundle/wheels" ]; then
    ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --disable-pip-version-check --target "$_site" "$_bundle"/wheels/*.whl
  fi &&
  _ray=$(ls "$_bundle"/ray-*-slim.tar.xz 2>/dev/null || true) &&
  { [ -z "$_ray" ] || tar -xJf "$_ray" -C "$_site"; } &&
  export PYTHONPATH="$_site${PYTHONPATH:+:$PYTHONPATH}"
"""


def target_environment(python: str) -> dict:
    """PEP 508 marker values of CPython `python` on Linux x86-64."""
    environment = default_environment()
    environment.update(python_version=python, python_full_version=f"{python}.0", sys_platform="linux",
                       platform_system="Linux", platform_machine="x86_64", os_name="posix",
                       implementation_name="cpython", platform_python_implementation="CPython")
    return environment


def read_have(path: str) -> set[str]:
    if not path:
        return set()
    words = [word for line in Path(path).read_text().splitlines() if not line.startswith("#")
             for word in line.split()]
    return {canonicalize_name(word) for word in words}


def pinned_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{name} is needed on the target but not installed in {sys.prefix}: "
                         f"the bundle takes each package's version from there") from None


def download(requirements: list[str], python: str, cache: Path, build_python: str) -> None:
    """Wheels for the target from PyPI, one version each, no dependencies; a package with
    no wheel there (pydensecrf2) is built from its source by `build_python`."""
    flags = ["--only-binary=:all:", "--no-deps", "--python-version", python, "--implementation", "cp",
             "--abi", f"cp{python.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    for requirement in requirements:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", *flags,
               "-d", str(cache), requirement]
        if subprocess.run(pip, stderr=subprocess.DEVNULL).returncode == 0:
            continue
        print(f"no {python} wheel of {requirement} on PyPI: building it with {build_python}", flush=True)
        subprocess.run([build_python, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                        "-w", str(cache), requirement], check=True)


def supported_tags(python: str) -> set[Tag]:
    """The wheel tags CPython `python` on manylinux x86-64 installs (and `linux_x86_64`, the
    tag of a wheel built here from source)."""
    version = tuple(map(int, python.split(".")))
    platforms = [*PLATFORMS, "linux_x86_64"]
    return {*cpython_tags(version, platforms=platforms), *compatible_tags(version, f"cp{version[0]}{version[1]}",
                                                                           platforms)}


def wheels_by_name(cache: Path, python: str) -> dict[str, Path]:
    """The cached wheels that install on the target (one cache serves every target)."""
    tags = supported_tags(python)
    return {canonicalize_name(name): path for path in cache.glob("*.whl")
            for name, _, _, wheel_tags in [parse_wheel_filename(path.name)] if wheel_tags & tags}


def requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def resolve(roots: list[Requirement], have: set[str], python: str, cache: Path,
            build_python: str) -> tuple[dict, set]:
    """Walk Requires-Dist from `roots` down to what the target has: the wheels to bring
    ({name: path}), and the packages the target must have ({name})."""
    environment = target_environment(python)
    extras: dict[str, set[str]] = {}
    pending = list(roots)
    needed: set[str] = set()
    present: set[str] = set()
    while pending:
        fetch = []
        for requirement in pending:
            name = canonicalize_name(requirement.name)
            if name in have:
                present.add(name)
                continue
            known = extras.setdefault(name, set())
            if name in needed and requirement.extras <= known:
                continue
            known |= requirement.extras
            needed.add(name)
            fetch.append(name)
        cached = wheels_by_name(cache, python)
        missing = [f"{name}=={pinned_version(name)}" for name in fetch if name not in cached]
        if missing:
            download(missing, python, cache, build_python)
            cached = wheels_by_name(cache, python)
        pending = []
        for name in fetch:
            for requirement in requires(cached[name]):
                markers = [{**environment, "extra": extra} for extra in extras[name] | {""}]
                if requirement.marker is None or any(requirement.marker.evaluate(m) for m in markers):
                    pending.append(requirement)
    cached = wheels_by_name(cache, python)
    return {name: cached[name] for name in sorted(needed)}, present


def slim_ray(wheel: Path, out: Path, xz_level: int) -> Path:
    """Ray's wheel unpacked without the parts wsss never imports, as a tar.xz."""
    with tempfile.TemporaryDirectory() as unpacked, zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            path = archive.extract(member, unpacked)
            mode = member.external_attr >> 16 & 0o777  # zipfile drops it: Ray's gcs_server and raylet are programs
            if mode:
                os.chmod(path, mode)
        for folder in RAY_SLIMMED:
            shutil.rmtree(Path(unpacked, folder))
        for source_map in Path(unpacked, "ray/dashboard").rglob("*.map"):
            source_map.unlink()
        _, version, _, _ = parse_wheel_filename(wheel.name)
        archive = out / f"ray-{version}-slim.tar.xz"
        subprocess.run(["tar", "-C", unpacked, "-cJf", str(archive), "."], check=True,
                       env={**os.environ, "XZ_OPT": f"-{xz_level} -T2"})
    return archive


def project_wheel(out: Path) -> Path:
    """wsss from its tracked files (a build in the tree would leave build/ behind)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as source:
        for name in files.splitlines():
            if Path(REPO, name).is_file():  # a file deleted but not yet committed is listed too
                Path(source, name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(REPO, name), Path(source, name))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(out), source], check=True)
    return next(out.glob("wsss-*.whl"))


def find_python(version: str) -> str:
    if sys.version_info[:2] == tuple(map(int, version.split("."))):
        return sys.executable
    found = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    return str(found[-1]) if found else f"python{version}"


def tree_bytes() -> int:
    """What a device call sends besides carried folders: the tracked files (untracked ones
    that git does not ignore travel too; commit or ignore them)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum(os.path.getsize(REPO / name) for name in files.decode().split("\0") if name and (REPO / name).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12", help="the target's CPython version")
    parser.add_argument("--have-file", default=str(Path(__file__).with_name("target_packages.txt")),
                        help="names of the packages the target has ('' for none)")
    parser.add_argument("--also-have", default="", help="comma-separated names added to --have-file's")
    parser.add_argument("--build-python", default=None,
                        help="a CPython of the target's version, to build wheels PyPI lacks "
                             "(default: /root/.pyenv/versions/<version>*/bin/python, else pythonX.Y)")
    parser.add_argument("--xz-level", type=int, default=6, help="xz preset of Ray's tar.xz (1: faster, larger)")
    parser.add_argument("--out", default=None, help="default: .bundle/cp<version> in the repository")
    args = parser.parse_args()

    tag = "cp" + args.python.replace(".", "")
    out = Path(args.out or REPO / ".bundle" / tag).resolve()
    cache = REPO / ".bundle" / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    have = read_have(args.have_file) | {canonicalize_name(n) for n in args.also_have.split(",") if n}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = [Requirement(line) for line in project["dependencies"]]

    build_python = args.build_python or find_python(args.python)
    wheels, present = resolve(roots, have, args.python, cache, build_python)
    if "ray" not in wheels:
        raise SystemExit("ray is on the target already (--have-file): this bundle is for one without it")
    shutil.rmtree(out, ignore_errors=True)
    (out / "wheels").mkdir(parents=True)
    ray = slim_ray(wheels.pop("ray"), out, args.xz_level)
    for wheel in wheels.values():
        shutil.copy2(wheel, out / "wheels")
    project_wheel(out / "wheels")
    (out / "install.sh").write_text(INSTALL_SH)
    (out / "present.txt").write_text("".join(f"{name}\n" for name in sorted(present)))

    sizes = {path.name: path.stat().st_size for path in [ray, *sorted((out / "wheels").iterdir())]}
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        print(f"{size / 2**20:8.2f} MiB  {name}")
    bundle, tree = sum(sizes.values()), tree_bytes()
    print(f"bundle {out}: {bundle / 2**20:.1f} MiB in {len(sizes)} files; tracked tree {tree / 2**20:.1f} MiB; "
          f"together {(bundle + tree) / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB a call carries"
          + ("" if bundle + tree <= LIMIT else " (over: send in two calls, see docs/benchmarks.md)"))
    print(f"the target must have: {', '.join(sorted(present))}")


if __name__ == "__main__":
    main()
