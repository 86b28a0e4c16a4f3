"""`ocr`: Out-of-Candidate Rectification (Cheng et al., CVPR 2023), a stage-2 add-on loss.

L = L_seg + α·L_rec (Eq. 4). For every pixel whose predicted class is not among its image's
labels (an out-of-candidate, OC, pixel), L_rec ranks an adaptively chosen in-candidate (IC)
group of classes above all OC classes with a margin Δ. Works on any base method whose
network outputs "seg_logits" [B,K+1,h,w] (stage-2 `deeplab`, CSRM's segmentation branch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsss.methods.base import Addon, register_addon

# Stands in for "not in this group" inside log-sum-exp: finite (an empty group gives a
# finite, hugely negative value and zero gradient instead of -inf and NaN gradients), yet
# exp() of it is exactly 0 next to any real logit.
_EXCLUDED = -1e30


def cooccurrence(image_labels: torch.Tensor) -> torch.Tensor:
    """Prior class correlation M float [K+1,K+1] (Eq. 7, read as a conditional frequency).

    M[k,l] = #images holding k and l / #images holding k. Background (column 0) counts as
    present in every image. A class in no image gets a row of zeros with 1 on the diagonal,
    so the anchor class always stays in its own IC group (P^A − P^A·1 = 0 < t, Eq. 9).
    """
    if not torch.is_tensor(image_labels) or image_labels.dtype != torch.bool or image_labels.ndim != 2 \
            or image_labels.shape[1] < 2:
        kind = f"{image_labels.dtype} {tuple(image_labels.shape)}" if torch.is_tensor(image_labels) \
            else type(image_labels).__name__
        raise ValueError(f"cooccurrence: image_labels must be a bool tensor [L,K+1] with K >= 1, got {kind}")
    present = image_labels.clone()
    present[:, 0] = True
    present = present.double()
    together = present.T @ present  # [K+1,K+1]: images holding both k and l
    images_with = together.diagonal()
    seen = images_with > 0
    matrix = torch.where(seen[:, None], together / images_with.clamp(min=1)[:, None], 0.0)
    matrix[~seen, ~seen] = 1.0  # unseen classes: identity rows (diagonal entries only)
    return matrix.float()


def candidate_labels(labels: torch.Tensor) -> torch.Tensor:
    """bool [B,K+1]: background (always a candidate) + multi-hot image labels [B,K] > 0.5."""
    background = torch.ones_like(labels[:, :1], dtype=torch.bool)
    return torch.cat([background, labels > 0.5], dim=1)


def rectification_loss(logits: torch.Tensor, image_labels: torch.Tensor, cooc: torch.Tensor,
                       t: float, delta: float) -> torch.Tensor:
    """Per-pixel rectification loss [B,H,W] (Eq. 19), zero on pixels that are not OC.

    logits z [B,K+1,H,W]; image_labels bool [B,K+1] (S, background forced in: S' = S ∪ {bg});
    cooc M [K+1,K+1] from `cooccurrence`. Per pixel:
      m_oc = argmax_k z^k ∉ S'                                     (Eq. 5)
      A    = argmax_{j ∈ S'} z^j                                    (Eq. 8)
      G_ic = {k ∈ S' : P^A − P^k·M[A,k] < t},  P = softmax(z)       (Eq. 9)
      G_oc = {l ∉ S'}                                               (Eq. 10)
      loss = m_oc · log(1 + Σ_{k∈G_ic} e^{−z^k} · Σ_{l∈G_oc} e^{z^l+Δ})
           = m_oc · softplus(LSE_{G_ic}(−z) + LSE_{G_oc}(z) + Δ)    (Eq. 19, stable form)
    The group choice (m_oc, A, G_ic) is not differentiated; gradients flow through z only.
    """
    if logits.ndim != 4:
        raise ValueError(f"rectification_loss: logits must be [B,K+1,H,W], got {tuple(logits.shape)}")
    batch, classes = logits.shape[:2]
    if image_labels.dtype != torch.bool or tuple(image_labels.shape) != (batch, classes):
        raise ValueError(f"rectification_loss: image_labels must be bool [{batch},{classes}], "
                         f"got {image_labels.dtype} {tuple(image_labels.shape)}")
    if tuple(cooc.shape) != (classes, classes):
        raise ValueError(f"rectification_loss: cooc must be [{classes},{classes}], got {tuple(cooc.shape)}")
    z = logits.float()
    in_candidate = image_labels.clone()
    in_candidate[:, 0] = True
    in_candidate = in_candidate[:, :, None, None].expand_as(z)  # [B,K+1,H,W]
    with torch.no_grad():
        predicted = z.argmax(dim=1, keepdim=True)
        is_oc_pixel = ~in_candidate.gather(1, predicted).squeeze(1)  # Eq. 5
        anchor = z.masked_fill(~in_candidate, float("-inf")).argmax(dim=1, keepdim=True)  # Eq. 8
        probs = z.softmax(dim=1)
        anchor_prob = probs.gather(1, anchor)
        anchor_prior = cooc.to(z)[anchor.squeeze(1)].permute(0, 3, 1, 2)  # M[A,·] as [B,K+1,H,W]
        in_ic_group = in_candidate & (anchor_prob - probs * anchor_prior < t)  # Eq. 9
    ic_term = torch.logsumexp((-z).masked_fill(~in_ic_group, _EXCLUDED), dim=1)
    oc_term = torch.logsumexp(z.masked_fill(in_candidate, _EXCLUDED), dim=1)  # Eq. 10: l ∉ S'
    return F.softplus(ic_term + oc_term + delta) * is_oc_pixel


@dataclass(frozen=True)
class OCRConfig:
    """The paper's values (Sec. 4.1; Fig. 5 for Δ and α)."""

    ic_threshold: float = 0.2  # t of Eq. 9: the in-candidate group's filter threshold
    margin: float = 2.0  # Δ of Eq. 19
    rectification_weight: float = 1.0  # α of Eq. 4: weight of L_rec

    def __post_init__(self):
        if self.rectification_weight < 0:
            raise ValueError(f"ocr.rectification_weight must be >= 0, got {self.rectification_weight}")


@register_addon
class OCR(Addon):
    """Adds {"ocr": α · mean of Eq. 19 over the counted pixels of the "image" view}.

    Counted pixels, at the logits' resolution (nearest downsampling): the `valid` ones (not
    padding) when the batch has that, every pixel otherwise. Pixels whose pseudo-label is
    255 count too: Eq. 19 reads only the prediction and the image labels, never the
    pseudo-label, so it rectifies the uncertain pixels that L_seg ignores. The co-occurrence
    prior is a buffer, so it is saved in and restored from checkpoints.
    """

    name = "ocr"
    Config = OCRConfig
    needs_outputs = frozenset({"seg_logits"})
    # Ranges bracket the paper's values (comments) by the spans its ablations explored or a bit more.
    search_space = {
        "ocr.margin": {"type": "float", "low": 0.0, "high": 4.0},  # Δ = 2 (Eq. 19)
        "ocr.ic_threshold": {"type": "float", "low": 0.05, "high": 0.5},  # t = 0.2 (Eq. 9)
        "ocr.rectification_weight": {"type": "float", "low": 0.1, "high": 2.0, "log": True},  # α = 1 (Eq. 4)
    }

    def __init__(self, config: OCRConfig, num_classes: int):
        super().__init__(config, num_classes)
        self.register_buffer("cooc", torch.eye(num_classes + 1))
        self._has_statistics = False
        self.register_load_state_dict_post_hook(self._prior_loaded)

    def _prior_loaded(self, module, incompatible_keys) -> None:
        self._has_statistics = True  # a checkpoint holds the prior computed before training

    def on_dataset(self, stats) -> None:
        if stats.image_labels.shape[1] != self.num_classes + 1:
            raise ValueError(f"ocr: dataset image_labels have {stats.image_labels.shape[1]} columns, "
                             f"expected K+1 = {self.num_classes + 1}")
        self.cooc.copy_(cooccurrence(stats.image_labels.bool()))
        self._has_statistics = True

    def losses(self, batch, outputs, progress):
        if not self._has_statistics:
            raise RuntimeError("ocr: the co-occurrence prior is missing; on_dataset(stats) must run "
                               "before training (or a checkpoint be loaded)")
        logits = outputs["image"]["seg_logits"]
        per_pixel = rectification_loss(logits, candidate_labels(batch["labels"]), self.cooc,
                                       self.config.ic_threshold, self.config.margin)
        counted = self._counted_pixels(batch, per_pixel.shape[-2:])
        mean = (per_pixel * counted).sum() / counted.sum().clamp(min=1)
        return {"ocr": self.config.rectification_weight * mean}

    @staticmethod
    def _counted_pixels(batch: dict, size: torch.Size) -> torch.Tensor:
        if "valid" not in batch:
            return torch.ones((batch["labels"].shape[0], *size), device=batch["labels"].device)
        return F.interpolate(batch["valid"][:, None].float(), size=size, mode="nearest")[:, 0]
