"""CSRM's loss functions and ClassMix (David et al., VISAPP 2025, Sec. 3.2), as pure functions.

Equation numbers are the paper's. Used by `wsss.methods.csrm`; each is tested against a
loop-based reference written from its equation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss.datasets.base import IGNORE_INDEX

_LABEL_VALUES = 256  # classmix labels are class indices < 255, or 255 = ignore


def s2c_loss(cams: torch.Tensor, bg_logits: torch.Tensor, teacher_probs: torch.Tensor,
             sigma: float) -> torch.Tensor:
    """Activation consistency L_s2c (Eqs. 8-9).

    cams [B,K,H,W]: the student's class activation maps (logits, already resized to H×W);
    bg_logits [B,1,H,W]: the student's segmentation logit of the background (a constant
    here: detached); teacher_probs [B,K+1,H,W]: the teacher's segmentation probabilities.
      Q  = softmax([bg_logits | cams]) over the K+1 channels
      c* = argmax_c teacher_probs,  M = max_c teacher_probs > σ            (Eq. 8)
      L  = −(1/|M|) Σ_{pixels in M} log Q[c*]                              (Eq. 9)
    No pixel in M: a zero that keeps the graph.
    """
    if cams.ndim != 4 or bg_logits.shape != (cams.shape[0], 1, *cams.shape[2:]):
        raise ValueError(f"s2c_loss: cams must be [B,K,H,W] and bg_logits [B,1,H,W], got "
                         f"{tuple(cams.shape)} and {tuple(bg_logits.shape)}")
    expected = (cams.shape[0], cams.shape[1] + 1, *cams.shape[2:])
    if teacher_probs.shape != expected:
        raise ValueError(f"s2c_loss: teacher_probs must be {expected}, got {tuple(teacher_probs.shape)}")
    log_q = F.log_softmax(torch.cat([bg_logits.detach(), cams], dim=1).float(), dim=1)
    confidence, target = teacher_probs.detach().float().max(dim=1)
    confident = confidence > sigma
    nll = -log_q.gather(1, target[:, None])[:, 0]
    return (nll * confident).sum() / confident.sum().clamp(min=1)


def pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H = −Σ_c p log p over dim 1 (Eq. 10), with 0·log 0 = 0: [B,C,H,W] -> [B,H,W]."""
    return -torch.special.xlogy(probs, probs).sum(dim=1)


def reliable_mask(probs: torch.Tensor, keep_fraction: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Low-entropy ("reliable") pixels of a batch (Eqs. 10-11): bool [B,H,W].

    H = pixel entropy of probs [B,C,H,W]; the threshold is `torch.quantile` of H over the
    valid pixels of the whole batch at `keep_fraction`; reliable = valid ∧ H ≤ threshold.
    keep_fraction 1 keeps every valid pixel; no valid pixel gives an all-False mask.
    """
    if probs.ndim != 4:
        raise ValueError(f"reliable_mask: probs must be [B,C,H,W], got {tuple(probs.shape)}")
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"reliable_mask: keep_fraction must be in [0, 1], got {keep_fraction}")
    entropy = pixel_entropy(probs.detach().float())
    if valid is None:
        valid = torch.ones_like(entropy, dtype=torch.bool)
    elif valid.shape != entropy.shape:
        raise ValueError(f"reliable_mask: valid must be {tuple(entropy.shape)}, got {tuple(valid.shape)}")
    values = entropy[valid]
    if values.numel() == 0:
        return valid.clone()
    threshold = torch.quantile(values, keep_fraction)
    return valid & (entropy <= threshold)


def classmix(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
             probability: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClassMix (Olsson et al., ICCV 2021) of a batch with itself.

    Image i's partner is image i+1 (the last one's is the first). With probability
    `probability` (drawn per image), image i receives every pixel of a random half (rounded
    up) of the foreground classes present in its partner's label map; background (0) and
    ignore (255) pixels are never pasted. images [B,3,H,W], labels long [B,H,W].
    Returns (mixed images, mixed labels, masks bool [B,H,W] = pasted from the partner);
    apply `mix_like` to mix any other per-pixel tensor the same way. The random draws use
    `generator` (a CPU generator) and do not depend on the device.
    """
    if images.ndim != 4 or labels.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"classmix: images must be [B,3,H,W] and labels [B,H,W], got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() > IGNORE_INDEX):
        raise ValueError(f"classmix: labels must be in 0..{IGNORE_INDEX}, got {int(labels.min())}..{int(labels.max())}")
    batch = images.shape[0]
    partner_labels = labels.roll(-1, dims=0)
    present = torch.zeros(batch, _LABEL_VALUES, dtype=torch.bool, device=labels.device)
    present.scatter_(1, partner_labels.flatten(1).long(), True)
    present[:, 0] = present[:, IGNORE_INDEX] = False
    # A random order of each row's present classes: rank them by random keys, absent last.
    keys = torch.rand(batch, _LABEL_VALUES, generator=generator).to(labels.device)
    keys = keys.masked_fill(~present, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    half = (present.sum(dim=1, keepdim=True) + 1) // 2
    applied = (torch.rand(batch, generator=generator) < probability).to(labels.device)
    chosen = present & (rank < half) & applied[:, None]
    masks = chosen.gather(1, partner_labels.flatten(1).long()).view_as(labels)
    return mix_like(images, masks), mix_like(labels, masks), masks


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Integer or bool maps [B,H,W] to `size` by the nearest cell centre. Unlike "nearest"
    (top-left), upsampling then downsampling returns the original map at any size, e.g. a
    quarter-resolution 81×81 prediction taken to a 321×321 crop and back."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(labels.dtype)


def mix_like(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mix `values` [B,...,H,W] the way `classmix` produced `masks` [B,H,W]: where a mask is
    True, take the partner's (next image's) value. Masks are resized (`resize_labels`) to
    the values' H×W when they differ."""
    if masks.shape[-2:] != values.shape[-2:]:
        masks = resize_labels(masks, values.shape[-2:])
    view = masks.view(masks.shape[0], *([1] * (values.ndim - 3)), *masks.shape[-2:])
    return torch.where(view, values.roll(-1, dims=0), values)


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """Contrastive loss L_m (Eq. 13), averaged over the Q queries.

    queries [Q,D], positives [Q,D] (each query's positive anchor), negatives [Q,N,D];
    ⟨·,·⟩ = cosine similarity:
      L = mean_q −log( e^{⟨q,p⟩/τ} / (e^{⟨q,p⟩/τ} + Σ_j e^{⟨q,n_j⟩/τ}) )
    computed as log-sum-exp. No query: a zero that keeps the graph.
    """
    if queries.ndim != 2 or positives.shape != queries.shape or negatives.ndim != 3 \
            or negatives.shape[0] != queries.shape[0] or negatives.shape[2] != queries.shape[1]:
        raise ValueError(f"info_nce: need queries [Q,D], positives [Q,D], negatives [Q,N,D]; got "
                         f"{tuple(queries.shape)}, {tuple(positives.shape)}, {tuple(negatives.shape)}")
    if tau <= 0:
        raise ValueError(f"info_nce: tau must be > 0, got {tau}")
    if queries.shape[0] == 0:
        return queries.sum() * 0.0
    q = F.normalize(queries.float(), dim=1)
    positive = (q * F.normalize(positives.float(), dim=1)).sum(dim=1, keepdim=True) / tau  # [Q,1]
    negative = torch.einsum("qd,qnd->qn", q, F.normalize(negatives.float(), dim=2)) / tau  # [Q,N]
    logits = torch.cat([positive, negative], dim=1)
    return (torch.logsumexp(logits, dim=1) - positive[:, 0]).mean()
