#!/bin/bash
# The GPU checks in one call, for a machine with one NVIDIA GPU and no network (the
# workplace's `device` tool). Its image has torch, torchvision, pyarrow, pillow and pytest,
# but not Ray, W&B, Optuna or pydensecrf, and Ray's wheel (79 MB) is over what may travel
# with the tree (64 MiB). So this checks everything below Ray; Ray Train on a GPU
# needs a machine with Ray installed.
#
# Once, on the machine that sends the tree (pydensecrf is built from its source there):
#   .venv/bin/pip download --no-deps --no-binary=:all: -d .device pydensecrf2==1.1
# Then: run(command="bash benchmarks/gpu_check.sh", carry=[".device"], timeout_s=480)
# Stages: tests steps crf (the default, in that order, each with its own time limit; about 5
# minutes expected) and train (about 4 more: name it, alone or with others). A rerun names
# only the stages it needs. Logs go to $OUT, which comes back.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/wsss-site:$PWD
stages=${*:-tests steps crf}
for stage in $stages; do
  case $stage in tests|steps|crf|train) ;; *) echo "unknown stage $stage (known: tests steps crf train)"; exit 2 ;; esac
done
started=$SECONDS
note() { echo "== $1 ($((SECONDS - started)) s)" | tee -a "$OUT/summary.txt"; }
keep() { tee "$OUT/$1" | grep -E "$2" | tee -a "$OUT/summary.txt"; }  # full log, the lines that matter

note "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import os, sys, torch; print(os.cpu_count(), 'CPUs, python', sys.version.split()[0], 'torch', torch.__version__)"
} 2>&1 | tee -a "$OUT/summary.txt"
note "pydensecrf from source"
[ -d /tmp/wsss-site/pydensecrf ] || timeout 150 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/wsss-site \
    .device/pydensecrf2-*.tar.gz > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }

for stage in $stages; do
  note "$stage"
  case $stage in
    tests)  # every method on the GPU: bfloat16 training, exact resume, CPU serving, validation
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | keep pytest.log "passed|failed|skipped|error|Error" ;;
    steps)  # step time, memory and FLOPs vs cam: the results protocol's size, then a ResNet-50 at 320 px
      timeout 150 python3 benchmarks/train_step.py --methods cam,lnl,cam+fsae,lnl+fsae,csrm,csrm+ocr --backbone resnet18 \
          --size 96 --batch 16 --os 8 --steps 30 --warmup 5 --rounds 1 2>&1 | keep step_small.log "^\||machine|Error"
      timeout 100 python3 benchmarks/train_step.py --methods cam,lnl,cam+fsae,csrm --backbone resnet50 --size 320 \
          --batch 8 --os 16 --steps 10 --warmup 3 --rounds 1 2>&1 | keep step_r50.log "^\||machine|Error" ;;
    crf)  # csrm's CRF pseudo-labels on the CPU cores while the GPU steps (goal < 10% waiting)
      timeout 80 python3 benchmarks/csrm_crf_wait.py --size 320 --batch 8 --steps 10 --workers=-1,1,0 2>&1 \
          | keep crf_wait.log "^\||CPUs|Error" ;;
    train)  # the synthetic benchmark at docs/results.md's protocol (float32), plain loop, in-training validation
      timeout 200 python3 benchmarks/gpu_train.py --methods csrm,cam output_stride=8 amp=false 2>&1 \
          | keep train.log "^\||seed|device|prepared|Error" ;;
  esac
done
note "done"
