#!/bin/bash
# Proves a bundle (benchmarks/gpu/bundle.py) lacks nothing wsss needs: installs it into an
# empty directory and runs Ray Train, Ray Tune and Ray Data from there, in a virtual
# environment with no packages of its own. What the bundle leaves to the target (its
# present.txt, and what those need) is linked from this machine's .venv, and nothing else
# is on the path: not the repository (the commands run in a scratch directory), not .venv.
#
#   python benchmarks/gpu/bundle.py --python 3.11     # this machine's Python: .bundle/cp311
#   bash benchmarks/gpu/smoke.sh                       # about 5 minutes on 2 cores
#
# BUNDLE (default .bundle/cp311) and PYTHON (the environment the base packages come from,
# default .venv/bin/python) change its inputs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bundle=$(cd "${BUNDLE:-$repo/.bundle/cp311}" && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d /tmp/wsss-smoke-XXXXXX)
trap 'rm -rf "$work"' EXIT
started=$SECONDS
step() { echo "== $1 ($((SECONDS - started)) s)"; }

step "the target's own packages, from $python"
"$python" "$repo/benchmarks/gpu/base_site.py" "$bundle/present.txt" "$work/base"
step "install the bundle $bundle"
unset PYTHONPATH
PYTHON=$python source "$bundle/install.sh" "$work/site"  # its pip only unpacks wheels
export PYTHONPATH=$PYTHONPATH:$work/base
"$("$python" -c 'import sys; print(sys._base_executable)')" -m venv --without-pip "$work/venv"
isolated=$work/venv/bin/python
du -sh "$work/site" | sed 's/^/installed: /'
cd "$work"

step "imports"
"$isolated" - "$work/site" <<'EOF'
import sys
import ray, ray.data, ray.train, ray.train.torch, ray.tune, optuna, wandb, pydensecrf.densecrf, wsss, torch
for module in (ray, optuna, wandb, wsss):
    assert module.__file__.startswith(sys.argv[1]), f"{module.__name__} comes from {module.__file__}, not the bundle"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} ({torch.__file__}), ray {ray.__version__}, "
      f"optuna {optuna.__version__}, wandb {wandb.__version__}; sys.path: {sys.path}")
EOF

step "prepare the synthetic test preset"
"$isolated" -m wsss prepare synthetic --root "$work/tree" --out "$work/shards" --option preset=test
small=(epochs=1 batch_size=8 crop_size=64 backbone=resnet18 backbone_weights=none eval_max_images=4 wandb=offline)

step "wsss train: 1 epoch on Ray Train"
"$isolated" -m wsss train --method cam --data "$work/shards" name=smoke "storage_path=$work/runs" "${small[@]}"
ls "$work/runs/smoke" | grep -q '^checkpoint_' || { echo "no checkpoint written"; exit 1; }

step "wsss tune: 2 trials on Ray Tune + Optuna"
"$isolated" -m wsss tune --method cam --data "$work/shards" --trials 2 --storage-path "$work/sweeps" \
    --name smoke --no-eval "${small[@]}"
"$isolated" -c "import json, sys; best = json.load(open(sys.argv[1])); print('best.json:', best);
assert best['finished'] == 2, best" "$work/sweeps/smoke/best.json"
step "passed"
