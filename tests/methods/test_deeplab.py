"""Stage-2 DeepLab models: shapes, the reusable V3+ decoder, the V2 ASPP sum, the CE loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss.methods.base import BackboneConfig, Progress, build_method, required_inputs
from wsss.methods.deeplab import (
    DeepLabConfig,
    DeepLabV2Head,
    DeepLabV3PlusHead,
    PaddingSkippingConv2d,
    segmentation_loss,
)

NUM_CLASSES = 3  # K foreground classes; the networks output K+1


def deeplab(variant: str, arch: str = "resnet18", output_stride: int = 16):
    return build_method("deeplab", NUM_CLASSES, {"deeplab": DeepLabConfig(variant=variant)},
                        backbone=BackboneConfig(arch=arch, output_stride=output_stride, weights="none"))


@pytest.mark.parametrize("variant, arch, output_stride, logits_size", [
    ("v2", "resnet18", 8, 8),       # v2 logits at the output stride
    ("v2", "resnet18", 16, 4),
    ("v3plus", "resnet18", 16, 16),  # v3plus logits at a quarter of the input
    ("v3plus", "resnet50", 16, 16),
])
def test_forward_shapes(variant, arch, output_stride, logits_size):
    method = deeplab(variant, arch, output_stride)
    images = torch.randn(2, 3, 64, 64)
    out = method.network(images)
    assert set(out) == set(method.network_outputs) == {"features", "seg_logits"}
    assert out["seg_logits"].shape == (2, NUM_CLASSES + 1, logits_size, logits_size)
    method.eval()
    with torch.no_grad():
        assert method.segmentation_logits(images).shape == (2, NUM_CLASSES + 1, logits_size, logits_size)
        cams = method.cam_maps(images)
    assert cams.shape == (2, NUM_CLASSES, logits_size, logits_size) and (cams >= 0).all()


def test_v3plus_head_is_reusable_with_its_documented_signature():
    head = DeepLabV3PlusHead(in_channels=32, low_channels=8, num_outputs=5, aspp_rates=(2, 4))
    out = head(torch.randn(2, 32, 4, 6), torch.randn(2, 8, 16, 24))
    assert out.shape == (2, 5, 16, 24)
    assert len(head.aspp.convs) == 4  # 1×1, two dilated 3×3, image pooling


def test_v2_head_sums_its_four_dilated_branches():
    head = DeepLabV2Head(in_channels=6, num_outputs=4)
    features = torch.randn(1, 6, 30, 30)
    expected = torch.zeros(1, 4, 30, 30)
    for branch, rate in zip(head.branches, (6, 12, 18, 24), strict=True):
        assert branch.dilation == (rate, rate) and branch.kernel_size == (3, 3)
        expected += F.conv2d(features, branch.weight, branch.bias, padding=rate, dilation=rate)
    torch.testing.assert_close(head(features), expected)


@pytest.mark.parametrize("height, width, dilation", [(8, 8, 12), (5, 9, 6), (8, 8, 6), (20, 20, 6)])
def test_dilated_convolution_skipping_padding_taps_equals_the_full_one(height, width, dilation):
    """Outputs and every gradient equal a plain dilated convolution's, whether no tap, some
    or all taps off the centre fall wholly on padding."""
    conv = PaddingSkippingConv2d(4, 3, 3, dilation)
    features = torch.randn(2, 4, height, width, requires_grad=True)
    skipped = conv(features)
    full = F.conv2d(features, conv.weight, conv.bias, padding=dilation, dilation=dilation)
    torch.testing.assert_close(skipped, full)
    grad = torch.randn_like(full)
    skipped_grads = torch.autograd.grad(skipped, (features, conv.weight, conv.bias), grad)
    full_grads = torch.autograd.grad(full, (features, conv.weight, conv.bias), grad)
    for got, expected in zip(skipped_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_segmentation_loss_is_cross_entropy_on_upsampled_logits_ignoring_255():
    logits = torch.randn(2, 4, 4, 4)
    target = torch.randint(0, 4, (2, 16, 16))
    target[0, :5] = 255
    upsampled = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    counted = target != 255
    picked = upsampled.log_softmax(1).permute(0, 2, 3, 1)[counted]  # [N, K+1]
    expected = -picked.gather(1, target[counted][:, None]).mean()
    torch.testing.assert_close(segmentation_loss(logits, target), expected)


def test_segmentation_loss_with_every_pixel_ignored_is_zero_not_nan():
    logits = torch.randn(1, 4, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 8, 8), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_padding_is_never_supervised():
    method = deeplab("v3plus")
    method.eval()
    images = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, NUM_CLASSES + 1, (2, 64, 64))
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, 40:] = False
    with_valid = method.training_step({"image": images, "target": target, "valid": valid,
                                       "labels": torch.ones(2, NUM_CLASSES)}, Progress(0, 0, 1, 1))
    padded_target = target.masked_fill(~valid, 255)
    without = method.training_step({"image": images, "target": padded_target,
                                    "labels": torch.ones(2, NUM_CLASSES)}, Progress(0, 0, 1, 1))
    torch.testing.assert_close(with_valid["seg"], without["seg"])


def test_config_rejects_unknown_variant():
    with pytest.raises(ValueError, match="deeplab.variant"):
        DeepLabConfig(variant="v3")


def test_method_contract():
    method = deeplab("v2")
    assert required_inputs("deeplab") == required_inputs("deeplab+ocr") == {"target"}
    groups = {g["name"]: g for g in method.param_groups(0.01)}
    backbone_ids = {id(p) for p in method.network.backbone.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone_ids
    assert {id(p) for p in groups["new"]["params"]} == {id(p) for p in method.network.head.parameters()}
    assert groups["new"]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("variant", ["v2", "v3plus"])
def test_deeplab_trains_a_few_steps(variant):
    torch.manual_seed(0)
    method = deeplab(variant)
    images = F.interpolate(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)), size=32)
    batch = {"image": images, "target": (images[:, 0] > 0).long(), "labels": torch.ones(2, NUM_CLASSES)}
    optimizer = torch.optim.SGD(method.param_groups(3e-4), lr=3e-4, momentum=0.9)
    losses = []
    for step in range(4):
        loss = method.training_step(batch, Progress(0, step, 4, 1))["seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
