"""Stage-2 segmentation networks trained on pseudo-labels: DeepLabV2 and DeepLabV3+.

Both output K+1 classes (index 0 = background). `DeepLabV3PlusHead` is the reusable
DeepLabV3+ decoder (CSRM's segmentation and representation branches build on it).

The backbone comes from the `BackboneConfig` the method is built with. The papers' settings
are DeepLabV2 on ResNet-101 with output stride 8 and DeepLabV3+ on ResNet-101 with output
stride 16; smaller backbones work unchanged (tests use ResNet-18).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from wsss.datasets.base import IGNORE_INDEX
from wsss.methods.backbone import Backbone
from wsss.methods.base import BackboneConfig, Method, register_method

VARIANTS = ("v2", "v3plus")
DECODER_INPUT_CHANNELS = 256 + 48  # DeepLabV3+: ASPP output ⊕ projected low-level features


class PaddingSkippingConv2d(nn.Conv2d):
    """A dilated, "same"-padded convolution that leaves out the kernel taps that can only land
    on zero padding: on an 8×8 map (a 128 px crop at output stride 16) ASPP's 3×3 at dilation
    12 or 18 is its centre tap, a 1×1. Exact: the skipped taps multiply zeros, so outputs and
    gradients are the full convolution's (their weights' gradients are 0 either way). Holds
    the same parameters as `nn.Conv2d` (checkpoints are unchanged)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, bias: bool = True):
        if kernel_size % 2 == 0:
            raise ValueError(f"PaddingSkippingConv2d needs an odd kernel size, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                         dilation=dilation, bias=bias)

    def _conv_forward(self, input, weight, bias):
        centre, dilation = self.kernel_size[0] // 2, self.dilation[0]
        # taps up to `reach` from the centre can meet a pixel of an h×w map: |offset| ≤ size − 1
        reach_h, reach_w = (min(centre, (size - 1) // dilation) for size in input.shape[-2:])
        if (reach_h, reach_w) == (centre, centre):
            return super()._conv_forward(input, weight, bias)
        weight = weight[:, :, centre - reach_h:centre + reach_h + 1, centre - reach_w:centre + reach_w + 1]
        return F.conv2d(input, weight, bias, padding=(reach_h * dilation, reach_w * dilation), dilation=dilation)


def _skip_padding_taps(aspp: ASPP) -> ASPP:
    """torchvision's ASPP with its dilated 3×3 branches as `PaddingSkippingConv2d`."""
    for branch in aspp.convs[1:-1]:  # [0] is the 1×1 branch, [-1] image pooling
        conv = branch[0]
        branch[0] = PaddingSkippingConv2d(conv.in_channels, conv.out_channels, 3, conv.dilation[0], bias=False)
    return aspp


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ decoder: ASPP on high-level features, fused with projected low-level ones.

    high [B,in_channels,h,w] → ASPP (torchvision: 1×1 + dilated 3×3 branches + image pooling,
    then a 1×1 projection to 256) → bilinear upsample to low's size → concat with low projected
    to 48 channels (`decoder_input`) → two 3×3 conv-BN-ReLU → 1×1 to `num_outputs` at low's
    resolution (`decode`).

    ASPP's image-pooling branch has BatchNorm on a 1×1 map, so training needs batch size ≥ 2.
    """

    def __init__(self, in_channels: int, low_channels: int, num_outputs: int,
                 aspp_rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.aspp = _skip_padding_taps(ASPP(in_channels, list(aspp_rates), out_channels=256))
        self.low_projection = _conv_bn_relu(low_channels, 48, 1)
        self.fuse = fuse_layers()
        self.classifier = nn.Conv2d(256, num_outputs, 1)
        init_new_layers(self)

    def decoder_input(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """[B, DECODER_INPUT_CHANNELS, *low's size]: what `decode` (and CSRM's representation
        branch) reads."""
        context = self.aspp(high)
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([context, self.low_projection(low)], dim=1)

    def decode(self, decoder_input: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fuse(decoder_input))

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.decode(self.decoder_input(high, low))


def fuse_layers() -> nn.Sequential:
    """The decoder's two 3×3 conv-BN-ReLU on its input, to 256 channels."""
    return nn.Sequential(_conv_bn_relu(DECODER_INPUT_CHANNELS, 256, 3), _conv_bn_relu(256, 256, 3))


def init_new_layers(module: nn.Module) -> None:
    """Kaiming-normal convolutions with zero bias, BatchNorm at identity."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class DeepLabV2Head(nn.Module):
    """DeepLabV2 ASPP: parallel 3×3 convolutions with dilation 6/12/18/24, outputs summed."""

    def __init__(self, in_channels: int, num_outputs: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            PaddingSkippingConv2d(in_channels, num_outputs, 3, dilation=rate) for rate in rates
        )
        for branch in self.branches:  # the original's initialisation: N(0, 0.01), zero bias
            nn.init.normal_(branch.weight, std=0.01)
            nn.init.zeros_(branch.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return sum(branch(features) for branch in self.branches)


class DeepLabNetwork(nn.Module):
    """Backbone + DeepLab head: {"features": layer4 features, "seg_logits": [B,K+1,h,w]}.

    seg_logits are at the backbone's output stride (v2) or a quarter of the input (v3plus).
    """

    def __init__(self, variant: str, num_outputs: int, backbone: BackboneConfig):
        super().__init__()
        self.variant = variant
        self.backbone = Backbone(backbone.arch, backbone.output_stride)
        if variant == "v2":
            self.head = DeepLabV2Head(self.backbone.out_channels, num_outputs)
        else:
            self.head = DeepLabV3PlusHead(self.backbone.out_channels, self.backbone.low_channels, num_outputs)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        if self.variant == "v2":
            logits = self.head(features["high"])
        else:
            logits = self.head(features["high"], features["low"])
        return {"features": features["high"], "seg_logits": logits}


def segmentation_loss(seg_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits upsampled to the target's size, ignoring 255.

    A batch whose pixels are all ignored gives 0 (with a graph), not NaN.
    """
    logits = F.interpolate(seg_logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (target != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


@dataclass(frozen=True)
class DeepLabConfig:
    variant: str = "v2"  # "v2": DeepLabV2 ASPP; "v3plus": DeepLabV3+ ASPP + decoder

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"deeplab.variant must be one of {VARIANTS}, got {self.variant!r}")


@register_method
class DeepLab(Method):
    """Stage 2: a segmentation network trained with CE on pseudo-labels (`target`)."""

    name = "deeplab"
    Config = DeepLabConfig
    inputs = frozenset({"target"})
    network_outputs = frozenset({"features", "seg_logits"})
    validates = "segmentation"
    # A decade below stage 1's lr: at 5e-2 (the stage-1 demo lr) DeepLab learns only
    # background even on ground-truth labels (docs/results.md); the stage-2 default is 1e-3.
    search_space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}

    def __init__(self, config: DeepLabConfig, num_classes: int, backbone: BackboneConfig):
        super().__init__(config, num_classes, backbone)
        self.network = DeepLabNetwork(config.variant, num_classes + 1, backbone)

    def losses(self, batch, outputs, progress):
        target = batch["target"]
        if "valid" in batch:  # padding is never supervised, whatever the pseudo-label says
            target = target.masked_fill(~batch["valid"], IGNORE_INDEX)
        return {"seg": segmentation_loss(outputs["image"]["seg_logits"], target)}

    def segmentation_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)["seg_logits"]

    def cam_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground class probabilities [B,K,h,w]: a stage-2 network has no CAM head."""
        return self.segmentation_logits(images).softmax(dim=1)[:, 1:]
