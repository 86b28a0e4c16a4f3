"""`csrm.warmup_decoder_only`: during the warm-up the decoders train on detached backbone
features, so the backbone's gradient is L_c's alone; after it, and with the option off, the
decoders' losses reach the backbone as in the paper. In one forward pass per step."""

from __future__ import annotations

import pytest
import torch

from wsss.methods.base import BackboneConfig, Progress, build_method
from wsss.methods.cam import classification_loss
from wsss.methods.csrm import CSRM, CSRMConfig

K = 3
SIZE = 64
STEPS_PER_EPOCH = 2  # warmup_epochs = 1: steps 0 and 1 warm up, step 2 trains every term
WARMUP_STEP, AFTER_WARMUP_STEP = 1, 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_method(decoder_only: bool) -> CSRM:
    """The same weights whatever the option (seed 0), so runs with and without it compare."""
    torch.manual_seed(0)
    config = CSRMConfig(crf_workers=0, query_threshold=0.0, warmup_epochs=1.0, warmup_decoder_only=decoder_only)
    return build_method("csrm", K, {"csrm": config}, BackboneConfig("resnet18", 16, "none")).train()


def batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    return {"image": torch.randn(2, 3, SIZE, SIZE, generator=generator), "labels": labels,
            "valid": torch.ones(2, SIZE, SIZE, dtype=torch.bool),
            "raw": torch.randint(0, 256, (2, SIZE, SIZE, 3), generator=generator, dtype=torch.uint8)}


def progress(step: int) -> Progress:
    return Progress(epoch=step // STEPS_PER_EPOCH, step=step, steps_per_epoch=STEPS_PER_EPOCH, epochs=3)


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def step_gradients(method: CSRM, step: int) -> tuple[dict, dict, dict]:
    """(loss terms, backbone + classifier gradients, segmentation decoder gradients) of one
    training step's summed loss."""
    method.zero_grad(set_to_none=True)
    terms = method.training_step(batch(), progress(step))
    sum(terms.values()).backward()
    trunk = {**gradients(method.network.backbone), **gradients(method.network.classifier)}
    return terms, trunk, gradients(method.network.segmentation_head)


def classification_gradients(method: CSRM) -> dict[str, torch.Tensor]:
    """The reference: a plain forward of the student and L_c alone, backward."""
    method.zero_grad(set_to_none=True)
    data = batch()
    classification_loss(method.network(data["image"])["cam_logits"], data["labels"]).backward()
    grads = {**gradients(method.network.backbone), **gradients(method.network.classifier)}
    method.zero_grad(set_to_none=True)
    return grads


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(actual[name], expected[name], rtol=1e-5, atol=1e-8), name


def differ(actual: dict, expected: dict) -> bool:
    return any(not torch.allclose(actual[name], expected[name], rtol=1e-3, atol=1e-6) for name in expected)


def test_during_the_warmup_only_the_classification_loss_trains_the_backbone():
    method = make_method(decoder_only=True)
    forwards = []
    method.network.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    terms, trunk, decoder = step_gradients(method, WARMUP_STEP)
    assert forwards == [2], "one student forward, as without the option"
    assert terms["seg"] > 0 and terms["s2c"] == terms["unsup"] == terms["contrast"] == 0
    assert_same(trunk, classification_gradients(method))
    assert decoder and all(grad.abs().sum() > 0 for grad in decoder.values()), "L_s trains the decoder"


def test_the_decoders_learn_the_same_in_the_warmup_with_or_without_the_option():
    """Detaching changes where the gradient stops, not what the decoders see or learn."""
    on_terms, on_trunk, on_decoder = step_gradients(make_method(decoder_only=True), WARMUP_STEP)
    off = make_method(decoder_only=False)
    off_terms, off_trunk, off_decoder = step_gradients(off, WARMUP_STEP)
    assert on_terms.keys() == off_terms.keys()
    assert all(torch.allclose(on_terms[key], off_terms[key]) for key in on_terms)
    assert_same(on_decoder, off_decoder)
    reference = classification_gradients(off)
    assert differ(off_trunk, reference), "without the option, L_s reaches the backbone in the warm-up (the paper)"
    assert_same(on_trunk, reference)


def test_after_the_warmup_the_decoders_losses_reach_the_backbone_again():
    on = make_method(decoder_only=True)
    on_terms, on_trunk, on_decoder = step_gradients(on, AFTER_WARMUP_STEP)
    assert on_terms["s2c"] > 0 and on_terms["unsup"] > 0
    assert differ(on_trunk, classification_gradients(on))
    off_terms, off_trunk, off_decoder = step_gradients(make_method(decoder_only=False), AFTER_WARMUP_STEP)
    assert_same(on_trunk, off_trunk)
    assert_same(on_decoder, off_decoder)


@pytest.mark.parametrize("decoder_only", [False, True])
def test_the_network_detaches_the_decoders_only_in_the_warmup_with_the_option(decoder_only):
    method = make_method(decoder_only)
    views = {"image": batch()["image"]}
    asked = {step: method.network_options({}, views, progress(step))["detach_decoders"]
             for step in (0, WARMUP_STEP, AFTER_WARMUP_STEP, 5)}
    assert asked == {0: decoder_only, WARMUP_STEP: decoder_only, AFTER_WARMUP_STEP: False, 5: False}
