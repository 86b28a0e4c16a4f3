#!/bin/bash
# The GPU goals in one run on one GPU, side by side (about 6 minutes on an H100 expected,
# 7 at most by the stages' limits): installs the bundle (benchmarks/gpu/bundle.py), then
#   steps   cam, lnl, csrm stage-1 steps, ResNet-50 OS16, 512², batch 16, bf16: images/s,
#           TFLOP/s and share of the bf16 peak, GPU memory peak (train_step.py); then one
#           epoch after start-up, Ray Train (1 GPU worker, NCCL) vs the plain loop, with the
#           share of the Ray epoch spent waiting for Ray Data's batches
#   crf     csrm's wait for its CRF pseudo-labels, CRF workers on the spare cores (csrm_crf_wait.py)
#   ingest  Ray Data's decode + augment rate at 512² on the cores but one (ingest.py)
# and writes summary.md (every goal met / not met), the JSON of each stage and its log to $OUT.
#
# Build the bundle here, then send it with the tree (docs/benchmarks.md, "GPU machine"):
#   python benchmarks/gpu/bundle.py                              # .bundle/cp312
#   one call, if bundle and tree fit in 64 MiB:
#     run(command="bash benchmarks/gpu/run.sh", carry=[".bundle/cp312"], timeout_s=540)
#   else two calls back to back (the warm machine keeps /tmp/wsss-site between them):
#     run(command="bash .bundle/cp312/install.sh", carry=[".bundle/cp312/install.sh",
#         ".bundle/cp312/ray-2.60.0-slim.tar.xz"], timeout_s=120)
#     run(command="bash benchmarks/gpu/run.sh", carry=[".bundle/cp312/install.sh",
#         ".bundle/cp312/wheels"], timeout_s=540)
# Checked on CPU with tiny sizes (64 px, batch 2, 2 steps; a few minutes on 2 cores):
#   WSSS_GPU_TINY=1 BUNDLE=.bundle/cp311 PYTHON=.venv/bin/python bash benchmarks/gpu/run.sh
# Stages: steps crf ingest (the default); a rerun names only those it needs.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
bundle=${BUNDLE:-$repo/.bundle/cp312}
python=${PYTHON:-python3}
stages=${*:-steps crf ingest}
for stage in $stages; do
  case $stage in steps|crf|ingest) ;; *) echo "unknown stage $stage (known: steps crf ingest)"; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1
cores=$(nproc)
if [ -n "${WSSS_GPU_TINY:-}" ]; then  # the same commands at sizes a CPU runs in minutes
  size=64 batch=2 steps=2 warmup=1 epoch_images=32 ingest_images=64 device=cpu limit=10
else
  size=512 batch=16 steps=20 warmup=5 epoch_images=1024 ingest_images=2048 device=cuda limit=1
fi
started=$SECONDS
note() { echo "== $1 ($((SECONDS - started)) s)" | tee -a "$OUT/summary.txt"; }
# timeout scaled up for the CPU check; the full log goes to $OUT, the lines that matter here
limited() { local seconds=$1; shift; timeout $((seconds * limit)) "$@"; }
keep() { tee "$OUT/$1" | grep -E "$2" | tee -a "$OUT/summary.txt"; }

note "install the bundle $bundle"
PYTHON=$python source "$bundle/install.sh" /tmp/wsss-site > "$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }
"$python" -c "import ray, ray.train.torch, ray.data, optuna, wandb, pydensecrf.densecrf, wsss" > "$OUT/imports.log" 2>&1 \
  || { tail -3 "$OUT/imports.log"; echo "the bundle is not all here: sent in two parts, Ray's goes first (see above)"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$python" -c "import os, sys, torch, ray; print(os.cpu_count(), 'CPUs, python', sys.version.split()[0],
    'torch', torch.__version__, 'ray', ray.__version__)"
} 2>&1 | tee -a "$OUT/summary.txt"

for stage in $stages; do
  note "$stage"
  case $stage in
    steps)
      limited 270 "$python" benchmarks/train_step.py --device $device --methods cam,lnl,csrm --backbone resnet50 \
          --os 16 --size $size --batch $batch --steps $steps --warmup $warmup --rounds 3 --no-os8 --peak-tflops "${PEAK_TFLOPS:-989}" \
          --ray-vs-plain --images $epoch_images --loader-workers $((cores - 1)) --json "$OUT/steps.json" 2>&1 \
          | keep steps.log "^\||epoch time|plain loop|machine|Error" ;;
    crf)
      limited 80 "$python" benchmarks/csrm_crf_wait.py --device $device --backbone resnet50 --size $size \
          --batch $batch --steps $((steps / 2 + 1)) --warmup $warmup --workers=-1,0 --rounds 1 --json "$OUT/crf_wait.json" 2>&1 \
          | keep crf_wait.log "^\||CPUs|Error" ;;
    ingest)
      limited 100 "$python" benchmarks/ingest.py --cpus $((cores - 1)) --images $ingest_images --crop $size \
          --batch $batch --rounds 1 --json "$OUT/ingest.json" 2>&1 | keep ingest.log "images/s|Error" ;;
  esac
done
note "summary"
"$python" benchmarks/gpu/summary.py "$OUT" | tee "$OUT/summary.md"
note "done"
