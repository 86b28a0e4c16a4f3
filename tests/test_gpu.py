"""What only a CUDA GPU can check: every method and composition trains on the device the
way a GPU worker does, resumes there exactly, validates there, and its checkpoint serves
the same CAMs on a CPU. Skipped without a GPU; `benchmarks/gpu_check.sh` runs them on one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.contract import SIZE, K, check_bfloat16_epoch, compositions, make, train_steps
from wsss.platform.checkpoints import load_method, load_state, restore, save_checkpoint
from wsss.platform.loop import evaluate_rows, make_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these on one)")
GPU = torch.device("cuda")
CLASSES = {"classes": ["background", "a", "b", "c"]}


def make_on_gpu(spec: str, overrides: dict | None = None):
    """`make`, moved to the GPU before its optimiser is built, as the training function does."""
    method, _, config = make(spec, overrides)
    method.to(GPU)
    return method, make_optimizer(method, config), config


def tensors_off_the_gpu(method) -> list[str]:
    return [name for name, value in method.state_dict().items()
            if torch.is_tensor(value) and value.device.type != "cuda"]


@pytest.mark.parametrize("spec", compositions())
def test_method_trains_on_the_gpu_in_bfloat16_with_all_its_state_there(spec):
    """The GPU worker's path after every warm-up: uint8 pipeline batches copied to the device
    (`model_inputs`), bfloat16 autocast (`amp`, on by default), teachers, banks and CRF
    pseudo-labels fed from device tensors."""
    method, optimizer, config = make_on_gpu(spec)
    assert config.amp
    check_bfloat16_epoch(method, optimizer, config, spec, GPU)
    assert tensors_off_the_gpu(method) == []


@pytest.mark.parametrize("spec,overrides", [*((spec, {}) for spec in compositions()),
                                             ("deeplab", {"deeplab.variant": "v3plus"})])  # ASPP dropout
def test_method_resumes_exactly_on_the_gpu(spec, overrides, tmp_path):
    """The contract test's resume, on the device: `csrm` seeds its own draws per step, and
    dropout elsewhere draws from the CUDA generator, whose state the checkpoint holds."""
    method, optimizer, config = make_on_gpu(spec, overrides)
    train_steps(method, optimizer, spec, steps=2, device=GPU)
    save_checkpoint(tmp_path, method, optimizer, epoch=1, step=2, config=config.to_dict(), dataset=CLASSES)
    continued = train_steps(method, optimizer, spec, steps=2, start=2, device=GPU)

    resumed, resumed_optimizer, _ = make_on_gpu(spec, overrides)
    assert restore(load_state(tmp_path), resumed, resumed_optimizer) == (1, 2)
    assert tensors_off_the_gpu(resumed) == []
    replayed = train_steps(resumed, resumed_optimizer, spec, steps=2, start=2, device=GPU)
    for got, want in zip(replayed, continued, strict=True):
        assert [got[k] for k in want] == pytest.approx([want[k] for k in want], rel=1e-3, abs=1e-4), \
            "resume must reproduce training (up to the GPU's non-deterministic atomics)"


@pytest.mark.parametrize("spec", compositions())
def test_a_gpu_checkpoint_serves_the_same_cams_on_a_cpu(spec, tmp_path):
    """Runs train on GPU workers and are often evaluated elsewhere: `load_method` maps the
    state to the CPU, and the CAMs match the GPU's (float32, TF32 off)."""
    method, optimizer, config = make_on_gpu(spec)
    train_steps(method, optimizer, spec, steps=2, device=GPU)
    save_checkpoint(tmp_path, method, optimizer, epoch=1, step=2, config=config.to_dict(), dataset=CLASSES)
    loaded, _ = load_method(str(tmp_path), "cpu")
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    method.eval()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        on_gpu = method.cam_maps(images.to(GPU)).cpu()
        on_cpu = loaded.cam_maps(images)
    assert torch.allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-4 * float(on_cpu.abs().max())), \
        float((on_gpu - on_cpu).abs().max())


@pytest.mark.parametrize("spec", ["cam", "csrm"])
def test_validation_runs_on_the_gpu(spec):
    """The per-epoch validation on the device: the CAM threshold sweep (both) and the
    segmentation branch's confusion (`csrm`), counting every valid pixel once."""
    method, _, _ = make_on_gpu(spec)
    rng = np.random.default_rng(0)
    rows = [{"id": str(i), "image": rng.integers(0, 256, (SIZE, SIZE + 8, 3), dtype=np.uint8),
             "mask": rng.integers(0, K + 1, (SIZE, SIZE + 8), dtype=np.uint8),
             "labels": np.array([1, 0, 1], dtype=np.float32)} for i in range(3)]
    validation = evaluate_rows(method, rows, num_classes=K, device=GPU)
    pixels = 3 * SIZE * (SIZE + 8)
    assert validation.cams is not None and (validation.cams.sum(axis=(1, 2)) == pixels).all()
    if spec == "csrm":
        assert validation.segmentation is not None and validation.segmentation.sum() == pixels
