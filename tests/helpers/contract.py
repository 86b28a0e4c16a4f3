"""The method contract's pieces: every registered composition, batches with every key a
method asks for, a tiny method built as a run builds it, and the checks that
tests/methods/test_method_contract.py runs over every composition (test_gpu.py runs them on
a GPU; test_adding_a_method.py on the documented example)."""

from __future__ import annotations

import math

import pytest
import torch

from wsss.methods.base import ADDONS, METHODS, BackboneConfig, DatasetStats, Progress, build_method, required_inputs
from wsss.platform.checkpoints import load_state, restore, save_checkpoint
from wsss.platform.config import TrainConfig
from wsss.platform.loop import make_optimizer

K = 3
SIZE = 64
TINY = BackboneConfig("resnet18", 16, "none")


def compositions() -> list[str]:
    specs = []
    for base, cls in sorted(METHODS.items()):
        specs.append(base)
        outputs = set(cls.network_outputs)
        specs += [f"{base}+{name}" for name, addon in sorted(ADDONS.items()) if addon.needs_outputs <= outputs]
    return specs


def fake_batch(spec: str, generator: torch.Generator, batch: int = 2) -> dict:
    """A batch with every key the method asks the pipeline for, and `raw` (`model_inputs` adds it)."""
    labels = torch.zeros(batch, K)
    labels[0, 0] = labels[0, 2] = labels[1, 1] = 1
    out = {"image": torch.randn(batch, 3, SIZE, SIZE, generator=generator), "labels": labels,
           "valid": torch.ones(batch, SIZE, SIZE, dtype=torch.bool)}
    out["valid"][:, :, -8:] = False
    inputs = required_inputs(spec)
    if "strong" in inputs:
        out["strong"] = out["image"] * 0.8 + 0.1 * torch.randn(out["image"].shape, generator=generator)
    out["raw"] = torch.randint(0, 256, (batch, SIZE, SIZE, 3), generator=generator, dtype=torch.uint8)
    for key in {"target", "mask"} & inputs:
        target = torch.randint(0, K + 1, (batch, SIZE, SIZE), generator=generator)
        target[:, :4] = 255
        out[key] = target
    return out


def pipeline_batch(batch: dict) -> dict:
    """`batch` in the types the input pipeline delivers: uint8 images and label maps."""
    out = dict(batch)
    for key in {"image", "strong"} & set(batch):
        out[key] = (batch[key] * 60 + 128).clamp(0, 255).to(torch.uint8)
    for key in {"mask", "target"} & set(batch):
        out[key] = batch[key].to(torch.uint8)
    return out


def stats() -> DatasetStats:
    labels = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    return DatasetStats(num_images=3, image_labels=labels)


def make(spec: str, overrides: dict | None = None):
    torch.manual_seed(0)
    config = TrainConfig(method=spec, data="unused", pseudo_labels="unused", backbone="resnet18",
                         backbone_weights="none", lr=0.01).with_overrides(overrides or {})
    method = build_method(spec, K, config.sections, TINY)
    method.on_dataset(stats())
    return method, make_optimizer(method, config), config


def train_steps(method, optimizer, spec, steps, start=0, epochs=2, device="cpu"):
    generator = torch.Generator().manual_seed(1000 + start)
    history = []
    for step in range(start, start + steps):
        progress = Progress(epoch=step // 2, step=step, steps_per_epoch=2, epochs=epochs)
        batch = {key: value.to(device) for key, value in fake_batch(spec, generator).items()}
        terms = method.training_step(batch, progress)
        loss = sum(terms.values())
        assert torch.isfinite(loss), (spec, step, terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(progress)
        notes = method.step_notes()
        # shares, and seconds: csrm/crf_wait_s passes 1 s while its CRF process starts on a busy machine
        assert all(v.dim() == 0 and not v.requires_grad and 0 <= v < math.inf for v in notes.values()), notes
        history.append({k: float(v.detach()) for k, v in terms.items()})
    return history


def check_trains_checkpoints_and_resumes_exactly(spec: str, folder) -> None:
    """Two steps, a checkpoint in `folder`, two more; a method restored from it replays those two."""
    method, optimizer, config = make(spec)
    train_steps(method, optimizer, spec, steps=2)
    save_checkpoint(folder, method, optimizer, epoch=1, step=2, config=config.to_dict(),
                    dataset={"classes": ["background", "a", "b", "c"]})
    continued = train_steps(method, optimizer, spec, steps=2, start=2)

    resumed, resumed_optimizer, _ = make(spec)
    assert restore(load_state(folder), resumed, resumed_optimizer) == (1, 2)
    replayed = train_steps(resumed, resumed_optimizer, spec, steps=2, start=2)
    for got, want in zip(replayed, continued, strict=True):
        assert got.keys() == want.keys()
        assert [got[k] for k in want] == pytest.approx([want[k] for k in want], rel=1e-4, abs=1e-5), \
            "resume must reproduce training"
    for (name, a), (_, b) in zip(method.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), f"{spec}: state {name} differs after resume"


def check_exports_nonnegative_cams_of_every_class(spec: str) -> None:
    method, _, _ = make(spec)
    method.eval()
    with torch.no_grad():
        cams = method.cam_maps(torch.randn(2, 3, SIZE, SIZE))
    assert cams.shape[:2] == (2, K) and cams.shape[2] >= SIZE // 16
    assert (cams >= 0).all()


def check_bfloat16_epoch(method, optimizer, config, spec: str, device: torch.device) -> None:
    """Two pipeline batches through the loop after every warm-up, under bfloat16 autocast:
    convolutions really in bfloat16, weights still float32 and updated, losses finite."""
    from wsss.platform.loop import train_epoch

    method.on_fresh_start()
    generator = torch.Generator().manual_seed(0)
    batches = [pipeline_batch(fake_batch(spec, generator)) for _ in range(2)]
    conv_dtypes = set()
    for module in method.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda _, __, out: conv_dtypes.add(out.dtype))
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    _, stats = train_epoch(method, optimizer, batches, config=config.with_overrides({"epochs": 4}), epoch=3,
                           step=6, steps_per_epoch=2, device=device, log=lambda values, step: None)
    assert conv_dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in method.parameters())
    assert all(math.isfinite(v) for v in stats.summary().values()), stats.summary()
    assert any(not torch.equal(p, before[name]) for name, p in method.named_parameters())
