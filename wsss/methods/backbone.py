"""torchvision ResNet backbones with output stride 16 or 8 (dilated last stages)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

CHANNELS = {"resnet18": (64, 512), "resnet50": (256, 2048), "resnet101": (256, 2048)}
_DILATE = {16: [False, False, True], 8: [False, True, True]}
_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class Backbone(nn.Module):
    """ResNet trunk returning {"low": layer1 features, "high": layer4 features}."""

    def __init__(self, arch: str = "resnet50", output_stride: int = 16, weights: str = "none"):
        super().__init__()
        if arch not in CHANNELS:
            raise ValueError(f"backbone {arch!r} is not one of {sorted(CHANNELS)}")
        if output_stride not in _DILATE:
            raise ValueError(f"output_stride must be 16 or 8, got {output_stride}")
        dilate = _DILATE[output_stride]
        if arch == "resnet18":  # BasicBlock has no dilation: keep stride by hand below
            net = torchvision.models.resnet18(weights=None)
        else:
            net = getattr(torchvision.models, arch)(weights=None, replace_stride_with_dilation=dilate)
        load_weights(net, arch, weights)
        if arch == "resnet18":
            _dilate_basic_blocks(net, dilate)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.low_channels, self.out_channels = CHANNELS[arch]
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.layer1(self.stem(x))
        high = self.layer4(self.layer3(self.layer2(low)))
        return {"low": low, "high": high}


def load_weights(net: nn.Module, arch: str, weights: str) -> None:
    if weights == "none":
        return
    if weights == "imagenet":
        enum = getattr(torchvision.models, _WEIGHTS[arch]).IMAGENET1K_V1
        try:
            state = enum.get_state_dict(progress=False)
        except Exception as error:  # no network, proxy, ...: say what to do instead
            raise RuntimeError(
                f"could not get the ImageNet weights for {arch} ({error}); they are downloaded "
                f"from {enum.url} into the torch hub cache. Offline, download that file elsewhere "
                "and pass backbone_weights=PATH, or use backbone_weights=none"
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"backbone_weights: {weights} is not 'none', 'imagenet' or a file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        raise ValueError(f"backbone weights {weights}: missing keys {missing[:5]}...")


def _dilate_basic_blocks(net: nn.Module, dilate: list[bool]) -> None:
    """torchvision refuses dilation for BasicBlock; replace strides by dilation by hand."""
    dilation = 1
    for layer, use in zip((net.layer2, net.layer3, net.layer4), dilate):
        if not use:
            continue
        dilation *= 2
        for block_index, block in enumerate(layer):
            for conv in (block.conv1, block.conv2):
                conv.stride = (1, 1)
                rate = dilation // 2 if (block_index == 0 and conv is block.conv1) else dilation
                conv.dilation, conv.padding = (rate, rate), (rate, rate)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
