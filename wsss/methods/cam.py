"""`cam`: the plain CAM baseline every method is compared with.

1×1 convolution without bias on backbone features, global average pooling of the
class maps, multi-label soft margin loss. The CAM is that convolution's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss.methods.backbone import Backbone
from wsss.methods.base import BackboneConfig, Method, register_method


class CAMNetwork(nn.Module):
    """Backbone + bias-free 1×1 classifier: {"features", "cam_logits"}."""

    def __init__(self, num_classes: int, backbone: BackboneConfig):
        super().__init__()
        self.backbone = Backbone(backbone.arch, backbone.output_stride)
        self.classifier = nn.Conv2d(self.backbone.out_channels, num_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)["high"]
        return {"features": features, "cam_logits": self.classifier(features)}


def classification_loss(cam_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss on globally average-pooled class maps."""
    logits = cam_logits.mean(dim=(2, 3))
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())


@register_method
class CAM(Method):
    name = "cam"

    def __init__(self, config, num_classes: int, backbone: BackboneConfig):
        super().__init__(config, num_classes, backbone)
        self.network = CAMNetwork(num_classes, backbone)

    def losses(self, batch, outputs, progress):
        return {"cls": classification_loss(outputs["image"]["cam_logits"], batch["labels"])}
