"""`lnl`: Learning From Pixel-Level Noisy Labels (Xiang et al.), on the `cam` baseline.

Training follows Fig. 2. From one forward pass:
  shrinking  F_s -> CAM head -> M_s; FSCM(F_s, M_s) -> E_s (Eqs. 1-3, with erosion) -> bank
  expansion  DFSM(F_s) -> F_e -> the same CAM head -> M_e; FSCM(F_e, M_e) -> E_e (no erosion)
  contrast   features of F_s under E_e are anchors against the bank's prototypes (Eqs. 15-18)
  L = L_cls(M_s) + L_cls(M_e) + λ·L_con (Eq. 19), λ = 0 during the first `warmup_epochs`,
  and the bank is fed only from the warm-up's last step on (docs/deviations.md).

FSCM needs M with a background channel; the CAM head has K channels. We build M as
M^k = ReLU(CAM^k) / max_hw ReLU(CAM^k) for classes in the image labels (0 for the others, so
they can never become seeds), and M^0 = 1 − max_k M^k, the background of SIPE [32], the
baseline the paper builds on (the paper itself does not say). The prototype bank lives on
the method, beside `network`, so DDP never touches it and checkpoints carry it.

Defaults chosen on the synthetic benchmark's dev split (docs/results.md): the similarity
and η that give the most right seeds from a trained `cam` start, background and foreground
(the authors' sigmoid of the cosine at η 0.3; at the paper's η 0.8 no similarity gives a
seed there); and the expansion branch's CAM M_e as the export (from scratch it beat M_s in
every seed; from a trained start M_s wins on dev, which the protocol then uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wsss.datasets.base import IGNORE_INDEX
from wsss.methods.base import BackboneConfig, Method, register_method, valid_at
from wsss.methods.cam import CAMNetwork, classification_loss
from wsss.methods.lnl_bank import PrototypeBank, contrastive_loss, subsample_per_class

SIMILARITY_KINDS = ("cosine", "softmax", "sigmoid")
EXPORTS = ("shrink", "expand", "fusion")


def feature_similarity(features: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Pixel-to-pixel feature similarity T [B,HW,HW] of features [B,C,H,W] (FSCM, Eq. 1).

    kind="softmax" is Eq. 1 literally: row softmax of XXᵀ. Every row then sums to 1, which
    caps the Eq. 2 score near 1/(object size in pixels): the paper's η = 0.8 is never reached.
    kind="cosine" is cosine similarity clipped at 0: each element is in [0,1],
    T_i(i) = 1, and Eq. 2 becomes a soft IoU between a class map and pixel i's similarity map.
    kind="sigmoid" (the default) is the authors' released code: the sigmoid of the cosine, in [0.27, 0.73].
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B,C,H,W], got {tuple(features.shape)}")
    x = features.float().flatten(2).transpose(1, 2)  # [B,HW,C]
    if kind == "softmax":
        return torch.softmax(x @ x.transpose(1, 2), dim=-1)
    if kind in ("cosine", "sigmoid"):
        x = F.normalize(x, dim=2)
        cosine = x @ x.transpose(1, 2)
        return cosine.clamp_min(0.0) if kind == "cosine" else torch.sigmoid(cosine)
    raise ValueError(f"similarity kind must be one of {SIMILARITY_KINDS}, got {kind!r}")


def consistency_scores(similarity: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """Eq. 2: c^k(i) = Σ_j M^k(j)T_i(j) / Σ_j (M^k(j) + T_i(j) − M^k(j)T_i(j)), T_i(j) = similarity[b,i,j].

    similarity [B,HW,HW], cams M [B,K+1,H,W] -> scores C [B,K+1,H,W]. The numerator is one
    batched matrix product and the denominator splits into Σ_j M^k(j) + Σ_j T_i(j) − numerator,
    so no [B,K+1,HW,HW] tensor is formed. A zero denominator (both maps empty) scores 0.
    """
    batch, channels, height, width = cams.shape
    if similarity.shape != (batch, height * width, height * width):
        raise ValueError(f"similarity must be [B,HW,HW] = {(batch, height * width, height * width)} "
                         f"for cams {tuple(cams.shape)}, got {tuple(similarity.shape)}")
    maps = cams.float().flatten(2)  # [B,K+1,HW]
    similarity = similarity.float()
    intersection = maps @ similarity.transpose(1, 2)  # [B,K+1,HW]: Σ_j M^k(j) T_i(j)
    union = maps.sum(dim=2, keepdim=True) + similarity.sum(dim=2)[:, None, :] - intersection
    scores = torch.where(union > 0, intersection / union.clamp_min(1e-12), torch.zeros_like(union))
    return scores.view(batch, channels, height, width)


def seed_labels(scores: torch.Tensor, eta: float, erosion: int) -> torch.Tensor:
    """Eq. 3 then erosion: long [B,H,W] labels from scores [B,K+1,H,W], 255 = no seed.

    A pixel gets its argmax class where that score is >= η. Erosion with an odd square
    `erosion`×`erosion` window (1 = none) keeps a label only where every in-image pixel of
    the window has the same label: window max == window min (max-pooling pads with −inf,
    so pixels outside the image are ignored, and a 255 in the window breaks the equality).
    """
    if erosion < 1 or erosion % 2 == 0:
        raise ValueError(f"erosion must be an odd kernel size >= 1 (1 = no erosion), got {erosion}")
    best, labels = scores.max(dim=1)
    labels = labels.masked_fill(best < eta, IGNORE_INDEX)
    if erosion == 1:
        return labels
    padded = labels[:, None].float()
    highest = F.max_pool2d(padded, erosion, stride=1, padding=erosion // 2)
    lowest = -F.max_pool2d(-padded, erosion, stride=1, padding=erosion // 2)
    return labels.masked_fill((highest != lowest)[:, 0], IGNORE_INDEX)


def location_map(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised location map D̃ [HW,HW] for an h×w grid (Eqs. 6-8, 10).

    d = Euclidean distance of the pixel positions (Eq. 6) over the diagonal √(h²+w²) (Eq. 7),
    D = exp(−d) (Eq. 8), then min-max normalised to [0,1] (Eq. 10); a 1×1 grid gives [[1]].
    """
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    distance = ((rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2).sqrt()
    closeness = torch.exp(-distance / math.sqrt(h * h + w * w))
    low, high = closeness.min(), closeness.max()
    if high <= low:
        return torch.ones_like(closeness)
    return (closeness - low) / (high - low)


class DFSM(nn.Module):
    """Distance-constrained feature similarity module (Eqs. 4-12), single head.

    Q, K, V = XW^q, XW^k, XW^v (Eq. 4); A_e = softmax(QKᵀ/√C) over keys (Eq. 5);
    S = A_e ∘ D̃ (Eq. 11); F_o = SV (Eq. 12), reshaped back to [B,C,H,W].
    `value` starts as the identity so that F_e starts as a location-weighted average of
    F_s, on which the shared CAM head is already meaningful. The projections run as 1×1
    convolutions on the [B,C,H,W] map, the same products: on CPU oneDNN's convolution
    computes them 1.5–2× faster than the matrix multiply (docs/benchmarks.md).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Linear(channels, channels, bias=False)
        self.key = nn.Linear(channels, channels, bias=False)
        self.value = nn.Linear(channels, channels, bias=False)
        nn.init.eye_(self.value.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape

        def project(linear: nn.Linear) -> torch.Tensor:  # XWᵀ at every cell: [B,C,HW]
            return F.conv2d(features, linear.weight[:, :, None, None]).flatten(2)

        query, key, value = project(self.query), project(self.key), project(self.value)
        attention = torch.softmax(query.transpose(1, 2) @ key / math.sqrt(channels), dim=-1)  # [B,HW,HW]
        weights = attention * location_map(height, width, features.device).to(attention.dtype)
        return (value @ weights.transpose(1, 2)).view(batch, channels, height, width)  # (SV)ᵀ


class LNLNetwork(CAMNetwork):
    """CAM network plus DFSM; the CAM head is shared by F_s and F_e (Fig. 2)."""

    def __init__(self, num_classes: int, backbone: BackboneConfig):
        super().__init__(num_classes, backbone)
        self.dfsm = DFSM(self.backbone.out_channels)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = super().forward(images)
        expanded = self.dfsm(outputs["features"])
        return {**outputs, "features_expanded": expanded, "cam_logits_expanded": self.classifier(expanded)}


@dataclass(frozen=True)
class LNLConfig:
    """Hyperparameters of `lnl`. bank_momentum, temperature, contrast_weight, num_prototypes and
    warmup_epochs are the paper's (Sec. IV-B-1); `similarity` and `seed_threshold` were chosen on
    a dev split (docs/deviations.md; the paper's Eq. 1 and η 0.8 are `configs/lnl/voc.toml`); the
    rest are ours."""

    seed_threshold: float = 0.3  # η of Eq. 3: the consistency score a seed needs (the paper: 0.8)
    bank_momentum: float = 0.9  # γ of Eq. 14
    temperature: float = 0.5  # τ of Eq. 17
    contrast_weight: float = 0.1  # λ of Eq. 19: weight of the contrastive loss
    num_prototypes: int = 500  # N prototypes per class in the bank
    erosion: int = 3  # odd erosion window of E_s (1 = none); the paper gives no size
    similarity: str = "sigmoid"  # FSCM similarity: "sigmoid", "cosine" or "softmax" (Eq. 1; see feature_similarity)
    max_pixels_per_class: int = 512  # anchors per class in the contrastive loss (cost bound)
    bank_pixels_per_class: int = 4096  # seed features per class per step sent to the bank
    warmup_epochs: int = 2  # epochs with λ = 0 (paper: 2 of 10)
    kmeans_iterations: int = 10  # Lloyd iterations of the bank's K-means initialisation
    bank_seed: int = 0  # seed of the bank's k-means++ draws (identical on every replica)
    export: str = "expand"  # CAM exported by cam_maps: "shrink" (M_s), "expand" (M_e), "fusion" (mean)

    def __post_init__(self):
        rules = [
            ("seed_threshold", 0.0 < self.seed_threshold <= 1.0, "in (0, 1]"),
            ("bank_momentum", 0.0 <= self.bank_momentum <= 1.0, "in [0, 1]"),
            ("temperature", self.temperature > 0, "> 0"),
            ("contrast_weight", self.contrast_weight >= 0, ">= 0"),
            ("num_prototypes", self.num_prototypes >= 1, ">= 1"),
            ("erosion", self.erosion >= 1 and self.erosion % 2 == 1, "odd and >= 1"),
            ("similarity", self.similarity in SIMILARITY_KINDS, f"one of {SIMILARITY_KINDS}"),
            ("max_pixels_per_class", self.max_pixels_per_class >= 1, ">= 1"),
            ("bank_pixels_per_class", self.bank_pixels_per_class >= 1, ">= 1"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("kmeans_iterations", self.kmeans_iterations >= 0, ">= 0"),
            ("export", self.export in EXPORTS, f"one of {EXPORTS}"),
        ]
        for key, ok, wanted in rules:
            if not ok:
                raise ValueError(f"lnl config: {key} must be {wanted}, got {getattr(self, key)!r}")


def max_normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each [h,w] map of non-negative maps [B,K,h,w] over its own maximum (all-zero stays 0)."""
    return maps / (maps.amax(dim=(2, 3), keepdim=True) + 1e-5)


def class_maps_with_background(cam_logits: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
    """M [B,K+1,h,w] for FSCM from CAM logits [B,K,h,w] and multi-hot image labels [B,K].

    Foreground: max-normalised ReLU CAMs of the image's classes, 0 for absent classes.
    Background (channel 0): 1 − max over foreground, as in SIPE [32].
    """
    foreground = max_normalised(F.relu(cam_logits.float()) * image_labels.float()[:, :, None, None])
    background = 1.0 - foreground.amax(dim=1, keepdim=True)
    return torch.cat([background, foreground], dim=1)


def fscm_seeds(features: torch.Tensor, cam_logits: torch.Tensor, image_labels: torch.Tensor,
               valid: torch.Tensor, kind: str, eta: float, erosion: int) -> torch.Tensor:
    """FSCM + Eq. 3 (+ erosion): seed labels long [B,h,w], 255 outside seeds and padding.

    `valid` bool [B,h,w] marks image (not padding) cells; padding takes no part in Eq. 2.
    Float32 even under mixed precision: the scores are compared with η.
    """
    with torch.autocast(features.device.type, enabled=False):
        cams = class_maps_with_background(cam_logits, image_labels) * valid[:, None]
        similarity = feature_similarity(features, kind) * valid.flatten(1)[:, None, :]
        seeds = seed_labels(consistency_scores(similarity, cams), eta, erosion)
    return seeds.masked_fill(~valid, IGNORE_INDEX)


def labelled_pixels(features: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [M,C] of features [B,C,h,w] where seeds [B,h,w] != 255, and their labels [M]."""
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    labels = seeds.reshape(-1)
    keep = labels != IGNORE_INDEX
    return flat[keep], labels[keep]


@register_method
class LNL(Method):
    """Shrinking + expansion + prototype contrast on the `cam` baseline (Fig. 2, Eq. 19)."""

    name = "lnl"
    Config = LNLConfig
    network_outputs = frozenset({"features", "cam_logits", "features_expanded", "cam_logits_expanded"})
    # Ranges bracket the paper's values (comments) by the spans its ablations explored or a bit more.
    search_space = {
        # the paper: 0.8, ablation 0.5..0.9 (Table XI); the default 0.3 was chosen on dev
        "lnl.seed_threshold": {"type": "float", "low": 0.2, "high": 0.95},
        "lnl.contrast_weight": {"type": "float", "low": 0.01, "high": 1.0, "log": True},  # λ = 0.1; ablation 0.05..0.2
        "lnl.bank_momentum": {"type": "float", "low": 0.5, "high": 0.999},  # γ = 0.9 (Eq. 14)
        "lnl.temperature": {"type": "float", "low": 0.05, "high": 1.0, "log": True},  # τ = 0.5 (Eq. 17)
        "lnl.num_prototypes": {"type": "int", "low": 50, "high": 1000, "log": True},  # N = 500
        "lnl.erosion": {"type": "int", "low": 1, "high": 7, "step": 2},  # odd square kernel; 1 = no erosion
        "lnl.warmup_epochs": {"type": "int", "low": 0, "high": 3},  # 2 of 10
    }

    def __init__(self, config: LNLConfig, num_classes: int, backbone: BackboneConfig):
        super().__init__(config, num_classes, backbone)
        self.network = LNLNetwork(num_classes, backbone)
        self.prototype_bank = PrototypeBank(num_classes, config.num_prototypes, self.network.backbone.out_channels,
                                            config.bank_momentum, config.kmeans_iterations, config.bank_seed)

    def losses(self, batch, outputs, progress):
        config = self.config
        out = outputs["image"]
        labels = batch["labels"]
        features = out["features"]
        terms = {"cls": classification_loss(out["cam_logits"], labels),
                 "cls_expanded": classification_loss(out["cam_logits_expanded"], labels)}
        with torch.no_grad():
            valid = valid_at(batch["valid"], features.shape[-2:])
            shrunk = fscm_seeds(features, out["cam_logits"], labels, valid, config.similarity,
                                config.seed_threshold, config.erosion)  # E_s
            expanded = fscm_seeds(out["features_expanded"], out["cam_logits_expanded"], labels, valid,
                                  config.similarity, config.seed_threshold, 1)  # E_e
            seeded, cells = shrunk != IGNORE_INDEX, valid.sum().clamp_min(1)
            self.note(seeds=seeded.sum() / cells, seeds_fg=(seeded & (shrunk > 0)).sum() / seeded.sum().clamp_min(1),
                      anchors=(expanded != IGNORE_INDEX).sum() / cells)
        if progress.epoch < config.warmup_epochs or config.contrast_weight == 0:
            terms["con"] = features.new_zeros((), dtype=torch.float32)
        else:
            anchors, anchor_labels = labelled_pixels(features, expanded)
            terms["con"] = config.contrast_weight * contrastive_loss(
                anchors, anchor_labels, self.prototype_bank.prototypes, config.temperature,
                self.prototype_bank.initialized, config.max_pixels_per_class)
        # The bank is fed from the warm-up's last step on, so that the contrast starts with
        # prototypes whose K-means initialisation clustered features of the network trained
        # through the warm-up, not the untrained features of step 0.
        # After the loss: it used normalised copies, so the in-place update cannot break backward.
        if progress.step + 1 >= config.warmup_epochs * progress.steps_per_epoch:
            bank_features, bank_labels = labelled_pixels(features.detach(), shrunk)
            keep = subsample_per_class(bank_labels, config.bank_pixels_per_class)
            self.prototype_bank.update(bank_features[keep], bank_labels[keep])
        return terms

    def cam_maps(self, images: torch.Tensor) -> torch.Tensor:
        """M_s ("shrink"), M_e ("expand") or the mean of both max-normalised ("fusion")."""
        out = self.network(images)
        shrink, expand = F.relu(out["cam_logits"]), F.relu(out["cam_logits_expanded"])
        if self.config.export == "shrink":
            return shrink
        if self.config.export == "expand":
            return expand
        return 0.5 * (max_normalised(shrink) + max_normalised(expand))
