"""torchvision ResNet backbones with output stride 16 or 8 (dilated last stages)."""

from __future__ import annotations

import io

import torch
import torchvision
from torch import nn

from wsss.io import read_bytes

CHANNELS = {"resnet18": (64, 512), "resnet50": (256, 2048), "resnet101": (256, 2048)}
_DILATE = {16: [False, False, True], 8: [False, True, True]}
_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class Backbone(nn.Module):
    """ResNet trunk returning {"low": layer1 features, "high": layer4 features}. Built with
    random weights; `load_pretrained` loads starting weights when a run starts fresh."""

    def __init__(self, arch: str = "resnet50", output_stride: int = 16):
        super().__init__()
        if arch not in CHANNELS:
            raise ValueError(f"backbone {arch!r} is not one of {sorted(CHANNELS)}")
        if output_stride not in _DILATE:
            raise ValueError(f"output_stride must be 16 or 8, got {output_stride}")
        dilate = _DILATE[output_stride]
        if arch == "resnet18":  # torchvision refuses dilation for BasicBlock: set it by hand
            net = torchvision.models.resnet18(weights=None)
            _dilate_basic_blocks(net, dilate)
        else:
            net = getattr(torchvision.models, arch)(weights=None, replace_stride_with_dilation=dilate)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.arch = arch
        self.low_channels, self.out_channels = CHANNELS[arch]
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.layer1(self.stem(x))
        high = self.layer4(self.layer3(self.layer2(low)))
        return {"low": low, "high": high}

    def load_pretrained(self, weights: str) -> None:
        """`weights`: "none", "imagenet" (torchvision's), or a torchvision ResNet state dict
        at a path or URI (s3://, gs://), so an offline cluster can read it from its bucket."""
        if weights == "none":
            return
        state = imagenet_state_dict(self.arch) if weights == "imagenet" else read_state_dict(weights)
        state = {_trunk_key(key): value for key, value in state.items() if not key.startswith("fc.")}
        try:
            missing, _ = self.load_state_dict(state, strict=False)
        except RuntimeError as error:  # a tensor of another shape: another architecture
            raise ValueError(f"backbone_weights={weights!r}: does not fit {self.arch} ({error})") from None
        if missing:
            raise ValueError(f"backbone_weights={weights!r}: not {self.arch} weights in torchvision's layout, "
                             f"missing {missing[:3]}...")


_STEM = {"conv1": "stem.0", "bn1": "stem.1"}  # torchvision's names for what `stem` holds


def _trunk_key(torchvision_key: str) -> str:
    head, _, rest = torchvision_key.partition(".")
    return f"{_STEM.get(head, head)}.{rest}"


def imagenet_state_dict(arch: str) -> dict:
    enum = getattr(torchvision.models, _WEIGHTS[arch]).IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=False)
    except Exception as error:  # no network, proxy, ...: say what to do instead
        raise RuntimeError(
            f"could not get the ImageNet weights for {arch} ({error}); they are downloaded "
            f"from {enum.url} into the torch hub cache. Offline, download that file elsewhere "
            "and pass backbone_weights=PATH (or a bucket URI), or use backbone_weights=none"
        ) from None


def read_state_dict(location: str) -> dict:
    data = read_bytes(location)
    if data is None:
        raise FileNotFoundError(f"backbone_weights={location!r}: not 'none', 'imagenet' or an existing file")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def _dilate_basic_blocks(net: nn.Module, dilate: list[bool]) -> None:
    """torchvision refuses dilation for BasicBlock; replace strides by dilation by hand."""
    dilation = 1
    for layer, use in zip((net.layer2, net.layer3, net.layer4), dilate, strict=True):
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
