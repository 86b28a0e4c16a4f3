"""`fsae`: Feature-level and Spatial-level Activation Expansion (Choi et al., WACV 2025).

A plug-in loss for any base method (`cam+fsae`, `lnl+fsae`). The base network sees the
weak view (source, "image") and a strong view of it (target, "strong": colour-only
RandAugment plus Gaussian blur, same geometry) in one forward pass. Confident per-pixel
predictions of the source (Eq. 6), widened by one dilation ring of less confident pixels
(Eqs. 7-8), supervise the target with a masked cross-entropy (Eq. 9).

A plain CAM head has no background channel, so the background gets a fixed logit,
`background_logit` (why: docs/deviations.md). On the source, classes absent from the image
labels are out of the softmax; on the target every class stays in, so its cross-entropy
also suppresses them. Pseudo-labels and loss live at feature (CAM) resolution, as in the
paper, so the dilation kernel counts feature cells; padding cells (most of their image
area outside `valid`) neither seed the dilation nor receive a label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsss.methods.base import Addon, Progress, register_addon, valid_at


@dataclass
class FSAEConfig:
    """FSAE hyperparameters. fae_threshold, sae_threshold, dilation_kernel and loss_weight are the
    paper's (Sec. 4.1.3), but loss_weight weighs a per-pixel mean where Eq. 9 sums over pixels
    (docs/deviations.md); background_logit and warmup_epochs are ours."""

    fae_threshold: float = 0.95  # τ_FAE of Eq. 6: confidence of the high-confidence mask M
    sae_threshold: float = 0.8  # τ_SAE of Eq. 7: confidence of the dilation ring M_bdry
    dilation_kernel: int = 3  # k of Eq. 7: dilation kernel size, odd; 1 switches SAE off
    loss_weight: float = 1.0  # λ of Eq. 9: weight of L_FSAE, over the mean of the B·H·W cells
    background_logit: float = 0.0  # fixed background score beside the K CAM logits
    warmup_epochs: int = 0  # epochs without FSAE (the paper uses 10 for MCTformer)

    def __post_init__(self):
        for name in ("fae_threshold", "sae_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fsae.{name} must be in [0, 1], got {value}")
        check_kernel(self.dilation_kernel)
        if self.loss_weight < 0:
            raise ValueError(f"fsae.loss_weight must be >= 0, got {self.loss_weight}")
        if self.warmup_epochs < 0:
            raise ValueError(f"fsae.warmup_epochs must be >= 0, got {self.warmup_epochs}")


def check_kernel(kernel) -> None:
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"fsae.dilation_kernel must be an odd integer >= 1, got {kernel!r}")


def class_scores(cam_logits: torch.Tensor, background_logit: float,
                 image_labels: torch.Tensor | None = None) -> torch.Tensor:
    """[B,K,h,w] CAM logits -> [B,K+1,h,w] scores, channel 0 = constant background logit.

    With `image_labels` (multi-hot [B,K]) absent classes are set to -inf, i.e. left out of
    any softmax over the channels.
    """
    cam_logits = cam_logits.float()
    background = cam_logits.new_full((cam_logits.shape[0], 1, *cam_logits.shape[2:]), background_logit)
    scores = torch.cat([background, cam_logits], dim=1)
    if image_labels is not None:
        absent = torch.cat([image_labels.new_ones(image_labels.shape[0], 1), image_labels], dim=1) <= 0
        scores = scores.masked_fill(absent[:, :, None, None], float("-inf"))
    return scores


def online_pseudo_labels(scores: torch.Tensor, tau_fae: float, tau_sae: float, kernel: int,
                         valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Online pseudo-labels P_s (Eq. 5) and the expanded confidence mask M̂ (Eqs. 6-8).

    scores [B,C,H,W] -> labels long [B,H,W] (argmax), mask bool [B,H,W]:
    M = max softmax ≥ τ_FAE (Eq. 6); ring = Dilation_k(M) − M with a k×k square and zero
    padding; M_bdry = ring ∧ max softmax ≥ τ_SAE (Eq. 7); M̂ = M ∪ M_bdry (Eq. 8).
    `valid` (bool [B,H,W], optional): pixels outside it neither seed the dilation nor enter
    the mask. No gradient flows through the result.
    """
    check_kernel(kernel)
    if scores.dim() != 4:
        raise ValueError(f"scores must be [B,C,H,W], got shape {tuple(scores.shape)}")
    with torch.no_grad():
        confidence, labels = torch.softmax(scores.detach().float(), dim=1).max(dim=1)
        confident = confidence >= tau_fae
        if valid is not None:
            confident &= valid
        # max-pooling a 0/1 map is binary dilation; its -inf padding acts as zero padding
        dilated = F.max_pool2d(confident[:, None].float(), kernel, stride=1, padding=kernel // 2)[:, 0] > 0
        boundary = dilated & ~confident & (confidence >= tau_sae)
        mask = confident | boundary
        if valid is not None:
            mask &= valid
    return labels, mask


def fsae_loss(target_scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
              lam: float) -> torch.Tensor:
    """Eq. 9 normalised by pixel count: λ · Σ_i M̂_i · CE(S_t, P_s)_i / (B·H·W)."""
    batch, _, height, width = target_scores.shape
    if labels.shape != (batch, height, width) or mask.shape != labels.shape:
        raise ValueError(f"fsae_loss: labels {tuple(labels.shape)} and mask {tuple(mask.shape)} "
                         f"must be [B,H,W] = {(batch, height, width)} of target_scores")
    # pixels outside the mask contribute nothing; give them a legal class index
    safe_labels = labels.masked_fill(~mask, 0)
    per_pixel = F.cross_entropy(target_scores.float(), safe_labels, reduction="none")
    return lam * (per_pixel * mask).sum() / (batch * height * width)


@register_addon
class FSAE(Addon):
    name = "fsae"
    Config = FSAEConfig
    inputs = frozenset({"strong"})
    # Ranges bracket the paper's values (comments) by the spans its ablations explored or a bit more.
    search_space = {
        "fsae.dilation_kernel": {"type": "categorical", "choices": (1, 3, 5, 7)},  # k = 3
        "fsae.fae_threshold": {"type": "float", "low": 0.8, "high": 0.99},  # τ_FAE = 0.95 (Eq. 6)
        "fsae.sae_threshold": {"type": "float", "low": 0.5, "high": 0.95},  # τ_SAE = 0.8 (Eq. 7)
        "fsae.loss_weight": {"type": "float", "low": 0.1, "high": 2.0, "log": True},  # λ = 1 (Eq. 9)
        "fsae.warmup_epochs": {"type": "int", "low": 0, "high": 3},  # 0 (10 for MCTformer)
    }

    def _active(self, progress: Progress) -> bool:
        return progress.epoch >= self.config.warmup_epochs

    def views(self, batch, progress):
        return {"strong": batch["strong"]} if self._active(progress) else {}

    def losses(self, batch, outputs, progress):
        source = outputs["image"]["cam_logits"]
        if not self._active(progress):
            return {"fsae": source.new_zeros((), dtype=torch.float32)}
        cfg = self.config
        source_scores = class_scores(source.detach(), cfg.background_logit, batch["labels"])
        valid = valid_at(batch["valid"], tuple(source.shape[2:]))
        labels, mask = online_pseudo_labels(source_scores, cfg.fae_threshold, cfg.sae_threshold, cfg.dilation_kernel,
                                            valid)
        labelled = mask.sum()
        self.note(labelled=labelled / valid.sum().clamp_min(1),
                  labelled_fg=(mask & (labels > 0)).sum() / labelled.clamp_min(1))
        target_scores = class_scores(outputs["strong"]["cam_logits"], cfg.background_logit)
        return {"fsae": fsae_loss(target_scores, labels, mask, cfg.loss_weight)}
