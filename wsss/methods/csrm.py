"""`csrm`: Cross-Supervision and Relational Model (David et al., VISAPP 2025).

Three branches on the shared backbone (Sec. 3.1): classification (bias-free 1×1 conv, the
CAM), segmentation (DeepLabV3+ decoder, K+1 classes) and representation (256-d per pixel).
An EMA teacher (a copy of the network, no gradient) supervises:
  L = L_c + L_s + λ_s2c·L_s2c + λ_u·L_u + λ_m·L_m                                (Eq. 14)
  L_c   multi-label soft margin on the student's CAMs                           (Eq. 5)
  L_s   CE of the segmentation branch on the teacher's CRF-refined CAM pseudo-labels (Eqs. 6-7)
  L_s2c the student's CAMs against the teacher's confident segmentation          (Eqs. 8-9)
  L_u   the student's segmentation of a ClassMix of the batch against the teacher's
        segmentation mixed the same way, on its reliable (low-entropy) pixels   (Eqs. 10-12)
  L_m   InfoNCE of reliable pixels' representations against class prototypes and a
        per-class bank of hard negatives from the unreliable ones               (Eq. 13)
During warm-up the last three terms are 0 and the teacher is a plain copy of the student;
with `warmup_decoder_only` the decoders then train on detached backbone features, so only L_c
moves the backbone until the warm-up ends (ours, docs/deviations.md).
One student forward per step; the teacher runs in `before_forward`, its CAMs going to the
CRF workers (`csrm_pseudo`) first, so beside an accelerator the CRF works while its decoders
run. Randomness is seeded by (initial seed, step, rank) (`seeded_steps`), so a resumed run
repeats the original exactly. Where this departs from the paper (the representation branch,
the entropy groups, the losses' resolutions): docs/deviations.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wsss.datasets.base import IGNORE_INDEX
from wsss.methods.backbone import Backbone
from wsss.methods.base import BackboneConfig, Method, Progress, register_method, valid_at
from wsss.methods.cam import classification_loss
from wsss.methods.csrm_bank import NegativeBank
from wsss.methods.csrm_contrast import negative_candidates, select_queries
from wsss.methods.csrm_losses import classmix, info_nce, mix_like, reliable_mask, resize_labels, s2c_loss
from wsss.methods.csrm_pseudo import CRFPseudoLabeler
from wsss.methods.csrm_teacher import broadcast_buffers, ema_decay, ema_update
from wsss.methods.deeplab import DeepLabV3PlusHead, fuse_layers, init_new_layers, segmentation_loss
from wsss.methods.ocr import candidate_labels
from wsss.ops.crf import PRESETS

S2C_RAMPS = ("threshold", "weight")
S2C_WEIGHT_START = 0.1  # the "weight" ramp's first λ_s2c, as a share of s2c_weight (the authors' code)


@dataclass(frozen=True)
class CSRMConfig:
    """CSRM hyperparameters; defaults are the paper's (Sec. 4) unless a comment says otherwise.
    crf_workers, export and infer_with are run settings, not the method's."""

    # epochs with λ_s2c = λ_u = λ_m = 0 and teacher = student (the authors' code; the paper gives no length)
    warmup_epochs: float = 1.0
    # During the warm-up the decoders train on detached backbone features: L_s (and any add-on's
    # loss on their outputs) trains them but not the backbone, which only L_c moves (ours;
    # docs/deviations.md). False: the paper, every loss reaches the backbone from the start.
    warmup_decoder_only: bool = False
    fg_threshold: float = 0.35  # δ_fg: CAM above it (after CRF) is foreground (Eq. 6)
    bg_threshold: float = 0.05  # δ_bg: CAM at most it (after CRF) is background; between: 255 (Eq. 6)
    crf_preset: str = "irn"  # dense CRF preset of the double threshold (wsss.ops.crf); the paper gives no CRF settings
    crf_workers: int = -1  # CRF processes; -1: this replica's CPU cores, less one beside an accelerator; 0: in the training process
    s2c_weight: float = 1.0  # λ_s2c (Eq. 14); the paper gives λ_u = λ_m = 1 and no λ_s2c
    # What ramps over training (docs/deviations.md). "threshold", the paper's text (Sec. 4): σ_s2c
    # (Eq. 8) rises linearly from s2c_start_threshold to s2c_end_threshold over training, so L_s2c
    # fades as σ → 1. "weight", the authors' code: σ_s2c stays s2c_threshold and λ_s2c rises
    # linearly from S2C_WEIGHT_START · s2c_weight to s2c_weight over the epochs after the warm-up.
    s2c_ramp: str = "threshold"
    s2c_start_threshold: float = 0.1  # σ_s2c of Eq. 8 at the start of the "threshold" ramp
    s2c_end_threshold: float = 1.0  # σ_s2c of Eq. 8 at the end of the "threshold" ramp
    s2c_threshold: float = 0.5  # σ_s2c of Eq. 8 throughout the "weight" ramp (the authors' code)
    unsup_weight: float = 1.0  # λ_u (Eq. 14)
    unreliable_fraction: float = 0.2  # α₀: L_u drops this share of highest-entropy pixels, falling linearly to 0
    classmix_probability: float = 0.5  # chance that ClassMix pastes into an image of the "mixed" view
    contrast_weight: float = 1.0  # λ_m (Eq. 14)
    queries_per_class: int = 50  # P: queries drawn per class and step
    negatives_per_query: int = 256  # N: bank entries drawn per query
    temperature: float = 0.5  # τ of InfoNCE (Eq. 13)
    query_threshold: float = 0.3  # teacher probability of its pseudo-label class a query pixel needs (U2PL's; the paper gives none)
    rank_low: int = 3  # γ_l: a class ranked ≤ γ_l but absent from the image labels makes a hard negative
    rank_high: int = 6  # γ_h: a class ranked in (γ_l, γ_h] makes a hard negative
    bank_size: int = 256  # negatives kept per class (the paper: N)
    representation_dim: int = 256  # output channels of the representation branch (Eq. 4)
    ema_max_decay: float = 0.99  # cap of the teacher's EMA decay (the authors' code; the paper gives none)
    # lr of the segmentation and representation branches: lr × this (the paper: 10× for new layers).
    # At lr 0.05 that is 0.5, where a DeepLab head learns nothing even from ground truth, so
    # `wsss demo` sets 0.2 (CSRM.demo_overrides).
    decoder_lr_mult: float = 10.0
    restrict_to_image_labels: bool = True  # teacher targets of L_s2c/L_u only over bg + image classes (authors' code)
    export: str = "segmentation"  # segmentation: stage 2 labels from `segmentation_logits` (pseudo-labels --mode segmentation); cam: CAMs only
    infer_with: str = "teacher"  # network used for inference: teacher (EMA) or student

    def __post_init__(self):
        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"csrm.{key}={getattr(self, key)!r}: {why}")

        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(0 <= self.bg_threshold < self.fg_threshold <= 1, "fg_threshold",
              "need 0 <= bg_threshold < fg_threshold <= 1")
        check(self.crf_preset in PRESETS, "crf_preset", f"must be one of {sorted(PRESETS)}")
        check(self.crf_workers >= -1, "crf_workers", "must be >= -1")
        for key in ("s2c_weight", "unsup_weight", "contrast_weight"):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(self.s2c_ramp in S2C_RAMPS, "s2c_ramp", f"must be one of {', '.join(S2C_RAMPS)}")
        for key in ("s2c_start_threshold", "s2c_end_threshold", "s2c_threshold", "unreliable_fraction",
                    "classmix_probability", "query_threshold", "ema_max_decay"):
            check(0 <= getattr(self, key) <= 1, key, "must be in [0, 1]")
        for key in ("queries_per_class", "negatives_per_query", "bank_size", "representation_dim", "rank_low"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.rank_high >= self.rank_low, "rank_high", "must be >= rank_low")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(self.decoder_lr_mult > 0, "decoder_lr_mult", "must be > 0")
        check(self.export in ("segmentation", "cam"), "export", "must be segmentation or cam")
        check(self.infer_with in ("teacher", "student"), "infer_with", "must be teacher or student")


class CSRMNetwork(nn.Module):
    """Backbone + classification, segmentation and representation branches (Eqs. 1, 3, 4):
    {"features", "cam_logits" [B,K,h,w], "seg_logits" [B,K+1,H/4,W/4],
     "representation" [R,D,H/4,W/4]}, R = `representation_rows` (default B). With
    `detach_decoders` the decoders read the backbone's features detached: their outputs train
    the decoders only."""

    def __init__(self, num_classes: int, backbone: BackboneConfig, representation_dim: int):
        super().__init__()
        self.backbone = Backbone(backbone.arch, backbone.output_stride)
        high, low = self.backbone.out_channels, self.backbone.low_channels
        self.classifier = nn.Conv2d(high, num_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight)
        self.segmentation_head = DeepLabV3PlusHead(high, low, num_classes + 1)
        self.representation_head = nn.Sequential(fuse_layers(), nn.Conv2d(256, representation_dim, 1))
        init_new_layers(self.representation_head)

    def forward(self, images: torch.Tensor, representation_rows: int | None = None,
                detach_decoders: bool = False) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        decoder_features = {key: value.detach() for key, value in features.items()} if detach_decoders else features
        return {"features": features["high"], "cam_logits": self.classifier(features["high"]),
                **self.decode(decoder_features, representation_rows)}

    def decode(self, features: dict[str, torch.Tensor], representation_rows: int | None = None):
        """{"seg_logits", "representation"} from the backbone's features; the representation of
        the first `representation_rows` images only (all by default)."""
        shared = self.segmentation_head.decoder_input(features["high"], features["low"])
        rows = shared if representation_rows is None else shared[:representation_rows]
        return {"seg_logits": self.segmentation_head.decode(shared), "representation": self.representation_head(rows)}

    def cam_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images)["high"])

    def seg_logits(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return self.segmentation_head(features["high"], features["low"])


class CSRMStep:
    """What one training step carries from `before_forward` to `losses` (batch["csrm_step"])."""

    def __init__(self, seed: int, device: torch.device):
        self.cpu_generator = torch.Generator().manual_seed(seed)
        self.device_generator = torch.Generator(device=device).manual_seed(seed)
        self.pseudo_labels = None  # PendingPseudoLabels
        self.crf_wait_before = 0.0  # the labeler's wait_seconds when this step submitted its CRFs
        self.teacher_probs = self.teacher_targets = self.teacher_rep = self.mix_masks = None
        self.mixed_images = None  # the rows ClassMix pasted into: the "mixed" view
        self.mixed_rows = None  # long [M]: those rows' indices in the batch


@register_method
class CSRM(Method):
    name = "csrm"
    Config = CSRMConfig
    network_outputs = frozenset({"features", "cam_logits", "seg_logits", "representation"})
    find_unused_parameters = True  # the representation branch has no loss during warm-up
    seeded_steps = True
    min_batch_size = 2
    min_batch_size_reason = "its ClassMix pastes from another image of a worker's batch"
    # At the paper's 10× lr, the decoders would train at 0.5 at the demo's lr 0.05, where a
    # DeepLab head learns nothing even from ground truth; 0.2× puts them at 0.01, stage 2's
    # head lr, and gave better CAMs over 3 seeds (docs/results.md).
    demo_overrides = {"csrm.decoder_lr_mult": 0.2}
    # Ranges bracket the paper's values (comments) by the spans its ablations explored or a bit more.
    search_space = {
        "csrm.temperature": {"type": "float", "low": 0.05, "high": 1.0, "log": True},  # τ = 0.5 (Eq. 13)
        "csrm.negatives_per_query": {"type": "int", "low": 64, "high": 512, "log": True},  # N = 256
        "csrm.queries_per_class": {"type": "int", "low": 10, "high": 100, "log": True},  # P = 50
        "csrm.fg_threshold": {"type": "float", "low": 0.2, "high": 0.6},  # δ_fg = 0.35 (Eq. 6)
        "csrm.bg_threshold": {"type": "float", "low": 0.01, "high": 0.15},  # δ_bg = 0.05 (Eq. 6)
        "csrm.rank_low": {"type": "int", "low": 1, "high": 5},  # γ_l = 3
        "csrm.rank_high": {"type": "int", "low": 2, "high": 10, "above": "csrm.rank_low"},  # γ_h = 6, above γ_l
        "csrm.warmup_epochs": {"type": "float", "low": 0.0, "high": 3.0},  # 1 (authors' code)
        # 10 (paper); 0.2 in the demo (docs/results.md)
        "csrm.decoder_lr_mult": {"type": "float", "low": 0.02, "high": 20.0, "log": True},
    }

    def __init__(self, config: CSRMConfig, num_classes: int, backbone: BackboneConfig):
        super().__init__(config, num_classes, backbone)
        self.network = CSRMNetwork(num_classes, backbone, config.representation_dim)
        self.teacher = copy.deepcopy(self.network).requires_grad_(False).eval()
        self.negative_bank = NegativeBank(num_classes + 1, config.bank_size, config.representation_dim)
        self.pseudo_labeler = CRFPseudoLabeler(config.crf_workers, config.fg_threshold, config.bg_threshold,
                                               config.crf_preset)
        self._new_negatives: tuple[torch.Tensor, torch.Tensor] | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # its BatchNorm statistics are copied from the student, never updated
        return self

    def on_fresh_start(self) -> None:
        super().on_fresh_start()
        self.teacher.load_state_dict(self.network.state_dict())

    def param_groups(self, lr: float) -> list[dict]:
        """Backbone at lr; the decoders at lr × decoder_lr_mult; the classifier at lr × the new-layer
        multiplier, or at lr when started from a checkpoint (Sec. 3.2.1)."""
        groups = super().param_groups(lr)
        backbone, new = groups[0], groups[1]
        decoders = [*self.network.segmentation_head.parameters(), *self.network.representation_head.parameters()]
        moved = {id(p) for p in decoders}
        if self.started_from_checkpoint:  # a stage-1 run's classifier (`init_from`) is not new
            classifier = list(self.network.classifier.parameters())
            backbone["params"] = backbone["params"] + classifier
            moved |= {id(p) for p in classifier}
        new["params"] = [p for p in new["params"] if id(p) not in moved]
        mult = self.config.decoder_lr_mult
        decoder_group = {"params": decoders, "lr": lr * mult, "lr_mult": mult, "name": "decoders"}
        return [backbone, *([new] if new["params"] else []), decoder_group]

    # ---- schedules -----------------------------------------------------------------
    def _warmup_steps(self, progress: Progress) -> int:
        return round(self.config.warmup_epochs * progress.steps_per_epoch)

    def _warming_up(self, progress: Progress) -> bool:
        return progress.step < self._warmup_steps(progress)

    def _unreliable_fraction(self, progress: Progress) -> float:
        """α_t: α₀ falling linearly to 0 over training."""
        return self.config.unreliable_fraction * (1.0 - progress.fraction)

    def _s2c_schedule(self, progress: Progress) -> tuple[float, float]:
        """(λ_s2c, σ_s2c) at this step, by `s2c_ramp`."""
        cfg = self.config
        if cfg.s2c_ramp == "threshold":
            start, end = cfg.s2c_start_threshold, cfg.s2c_end_threshold
            return cfg.s2c_weight, start + (end - start) * progress.fraction
        warmup = self._warmup_steps(progress)
        after_warmup = (progress.step - warmup) / max(1, progress.total_steps - warmup)
        ramp = S2C_WEIGHT_START + (1 - S2C_WEIGHT_START) * min(1.0, max(0.0, after_warmup))
        return cfg.s2c_weight * ramp, cfg.s2c_threshold

    # ---- training ------------------------------------------------------------------
    def before_forward(self, batch, progress):
        """The teacher on the weak view: CAMs to the CRF workers, then its decoders; ClassMix."""
        if "raw" not in batch:
            raise KeyError("csrm needs batch['raw'] (uint8 [B,S,S,3], the un-normalised weak view) for its "
                           "CRF pseudo-labels")
        images = batch["image"]
        step = CSRMStep(self.step_seed(progress), images.device)
        valid = _valid(batch)
        step.crf_wait_before = self.pseudo_labeler.wait_seconds
        with torch.no_grad():
            features = self.teacher.backbone(images)
            cam_logits = self.teacher.classifier(features["high"])
            step.pseudo_labels = self.pseudo_labeler.submit(batch["raw"], cam_logits, batch["labels"], valid)
            decoded = self.teacher.decode(features)
            step.teacher_rep = decoded["representation"]
            step.teacher_probs = decoded["seg_logits"].float().softmax(dim=1)
            step.teacher_targets = step.teacher_probs
            if self.config.restrict_to_image_labels:
                allowed = candidate_labels(batch["labels"])[:, :, None, None]
                restricted = step.teacher_probs * allowed
                step.teacher_targets = restricted / restricted.sum(dim=1, keepdim=True).clamp(min=1e-12)
        if self._warming_up(progress):
            return {"csrm_step": step}
        with torch.no_grad():
            labels = step.teacher_targets.argmax(dim=1)
            labels = labels.masked_fill(~valid_at(valid, labels.shape[-2:]), IGNORE_INDEX)
            labels = resize_labels(labels, images.shape[-2:])
            mixed, _, step.mix_masks = classmix(images, labels, step.cpu_generator, self.config.classmix_probability)
        # A row ClassMix pasted nothing into is the weak image itself (half of them at the
        # paper's probability 0.5): its outputs are the weak view's, so only pasted rows run.
        step.mixed_rows = step.mix_masks.flatten(1).any(dim=1).nonzero()[:, 0]
        step.mixed_images = mixed[step.mixed_rows]
        return {"csrm_step": step}

    def views(self, batch, progress):
        mixed = batch["csrm_step"].mixed_images
        return {"image": batch["image"]} if mixed is None else {"image": batch["image"], "mixed": mixed}

    def network_options(self, batch, views, progress):
        """The representation branch runs on the weak view's rows only (the first view); with
        `warmup_decoder_only`, the decoders read detached features during the warm-up."""
        return {"representation_rows": views["image"].shape[0],
                "detach_decoders": self.config.warmup_decoder_only and self._warming_up(progress)}

    def losses(self, batch, outputs, progress):
        with torch.autocast(batch["image"].device.type, enabled=False):  # losses in float32
            return self._losses(batch, outputs, progress)

    def _losses(self, batch, outputs, progress):
        cfg, step = self.config, batch["csrm_step"]
        student = outputs["image"]
        size = student["seg_logits"].shape[-2:]
        valid = valid_at(_valid(batch), size)
        alpha = self._unreliable_fraction(progress)
        reliable = reliable_mask(step.teacher_probs, 1.0 - alpha, valid)
        # Filled during warm-up too, so the bank is ready when L_m starts.
        self._new_negatives = negative_candidates(
            step.teacher_rep, step.teacher_probs, valid & ~reliable, candidate_labels(batch["labels"]), cfg.rank_low,
            cfg.rank_high, self.negative_bank.per_replica_quota(), step.cpu_generator)

        terms = {"cls": classification_loss(student["cam_logits"], batch["labels"])}
        warming_up = self._warming_up(progress)
        if not warming_up:
            cams = F.interpolate(student["cam_logits"].float(), size=size, mode="bilinear", align_corners=False)
            teacher = step.teacher_targets * valid[:, None]  # padding is never confident
            s2c_weight, sigma = self._s2c_schedule(progress)
            terms["s2c"] = s2c_weight * s2c_loss(cams, student["seg_logits"][:, :1], teacher, sigma)
            # Entropy of the teacher's own probabilities, the label from its targets (as the authors' code).
            mixed_reliable = reliable_mask(mix_like(step.teacher_probs, step.mix_masks), 1.0 - alpha,
                                           mix_like(valid, step.mix_masks))
            target = mix_like(step.teacher_targets, step.mix_masks).argmax(dim=1)
            mixed_logits = student["seg_logits"].index_copy(0, step.mixed_rows, outputs["mixed"]["seg_logits"])
            terms["unsup"] = cfg.unsup_weight * segmentation_loss(mixed_logits,
                                                                  target.masked_fill(~mixed_reliable, IGNORE_INDEX))

        pseudo_labels = step.pseudo_labels.result(batch["image"].device)  # last: the CRF ran meanwhile
        terms["seg"] = segmentation_loss(student["seg_logits"], pseudo_labels)
        labelled = pseudo_labels != IGNORE_INDEX
        self.note(crf_labelled_fg=(labelled & (pseudo_labels > 0)).sum() / labelled.sum().clamp_min(1),
                  crf_wait_s=torch.tensor(self.pseudo_labeler.wait_seconds - step.crf_wait_before))
        if warming_up:
            zero = terms["cls"].new_zeros(())
            return {**terms, "s2c": zero, "unsup": zero, "contrast": zero}
        terms["contrast"] = cfg.contrast_weight * self._contrast_loss(student["representation"], pseudo_labels,
                                                                      reliable, step)
        return terms

    def _contrast_loss(self, representation, pseudo_labels, reliable, step: CSRMStep):
        """L_m (Eq. 13): queries from the reliable (low-entropy) pixels."""
        cfg = self.config
        size = representation.shape[-2:]
        pseudo_small = resize_labels(pseudo_labels, size)
        queries, positives, classes = select_queries(
            representation, step.teacher_rep, step.teacher_probs, pseudo_small, reliable,
            cfg.query_threshold, cfg.queries_per_class, step.device_generator)
        usable = self.negative_bank.count[classes] > 0
        negatives = self.negative_bank.sample(classes[usable], cfg.negatives_per_query, step.device_generator)
        return info_nce(queries[usable], positives[usable], negatives, cfg.temperature)

    def after_step(self, progress):
        super().after_step(progress)
        decay = ema_decay(progress.step + 1, self._warmup_steps(progress), self.config.ema_max_decay)
        ema_update(self.teacher, self.network, decay)
        broadcast_buffers(self.teacher)
        if self._new_negatives is None:  # no step ran: still take part in the collective
            bank = self.negative_bank
            self._new_negatives = bank.items.new_zeros(0, bank.items.shape[2]), bank.count.new_zeros(0)
        self.negative_bank.push_from_replicas(*self._new_negatives)
        self._new_negatives = None

    # ---- inference -----------------------------------------------------------------
    def _inference_network(self) -> CSRMNetwork:
        return self.teacher if self.config.infer_with == "teacher" else self.network

    def cam_maps(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self._inference_network().cam_logits(images))

    def segmentation_logits(self, images: torch.Tensor) -> torch.Tensor | None:
        if self.config.export == "cam":
            return None
        return self._inference_network().seg_logits(images)


def _valid(batch: dict) -> torch.Tensor:
    if "valid" in batch:
        return batch["valid"]
    image = batch["image"]
    return torch.ones(image.shape[0], *image.shape[2:], dtype=torch.bool, device=image.device)
