"""The contract every WSSS method implements, and the registry that builds them.

A method is an `nn.Module` that owns a trainable `network` (backbone + heads) and any
non-trained state (memory banks, EMA teachers) beside it. The platform wraps only
`network` for DDP, calls `training_step` once per batch and sums the returned loss terms.
Nothing here knows about Ray: a method trains in a plain loop just as well.

Composition: `build_method("lnl+fsae", ...)` builds the base method `lnl` and attaches
the add-on `fsae`. Add-ons contribute views (extra images in the same forward pass) and
loss terms computed from the network outputs, so `lnl+fsae` needs no special case.

A part is one module of `wsss.methods`: its class carries everything the platform and
tuning need (config, search space, batch size rule, demo settings), and the package finds
it by importing every module (docs/adding_a_method.md).

Batch keys (made by the data pipeline, see `wsss.datasets.augment`, and turned into
these types on the device by `wsss.platform.loop.model_inputs`):
  image  float [B,3,S,S]  normalised weak view        labels float [B,K] multi-hot
  valid  bool  [B,S,S]    pixels that are image, not padding
  strong float [B,3,S,S]  strong view, same geometry  (if a method lists it in `inputs`)
  raw    uint8 [B,S,S,3]  un-normalised weak view, channels last (e.g. for CRF): a view of
                          the pipeline's uint8 image, added by `model_inputs`
  target long  [B,S,S]    pseudo-label, 255 = ignore  (if listed, stage-2 training)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Progress:
    """Where training is; methods derive warm-ups and ramps from it."""

    epoch: int  # 0-based
    step: int  # global optimiser steps done before this one
    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return max(1, self.steps_per_epoch * self.epochs)

    @property
    def fraction(self) -> float:
        """Share of training done, in [0, 1]."""
        return min(1.0, self.step / self.total_steps)


@dataclass(frozen=True)
class DatasetStats:
    """Computed once from the training split before training (hook `on_dataset`)."""

    num_images: int
    image_labels: torch.Tensor  # bool [L, K+1], column 0 (background) always True


@dataclass
class NoConfig:
    """A method without hyperparameters of its own."""


@dataclass(frozen=True)
class BackboneConfig:
    arch: str = "resnet50"
    output_stride: int = 16
    weights: str = "none"
    init_from: str = ""  # a wsss checkpoint the platform starts the network from (then `weights` is not loaded)


class _Part(nn.Module):
    """What base methods and add-ons share: config, inputs, views, losses, hooks."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    inputs: ClassVar[frozenset[str]] = frozenset()  # extra batch keys the pipeline must produce
    # What `wsss tune` samples: override key ("lnl.erosion", or a run key such as "lr")
    # -> spec {type: float|int|categorical, low, high, log, step, choices, above}, the format
    # of a `--space` file. Plain data: `wsss.tuning.spaces` turns it into Optuna's.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}
    # Smallest per-worker batch this part trains on, and why (shown when a config asks for less).
    min_batch_size: ClassVar[int] = 1
    min_batch_size_reason: ClassVar[str] = ""
    # Overrides `wsss demo` applies to runs of this part (the user's own overrides win).
    demo_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self):
        super().__init__()
        self.notes: dict[str, torch.Tensor] = {}  # this step's diagnostics, see `note`

    def note(self, **values: torch.Tensor) -> None:
        """Record scalars about this step (e.g. the share of pixels given a pseudo-label),
        logged as `<part>/<key>` beside the losses: self-training that degenerates shows here."""
        self.notes.update({f"{self.name}/{key}": value.detach().float() for key, value in values.items()})

    def before_forward(self, batch: dict, progress: Progress) -> dict[str, Any]:
        """Entries added to this step's batch before the forward pass, which `views` and
        `losses` then read (e.g. a teacher's predictions). Keys must be new to the batch."""
        return {}

    def views(self, batch: dict, progress: Progress) -> dict[str, torch.Tensor]:
        """Images to push through the network this step, by view name."""
        return {}

    def losses(self, batch: dict, outputs: dict[str, dict[str, torch.Tensor]], progress: Progress) -> dict:
        """Weighted loss terms by name; the platform sums them. `outputs[view][key]`."""
        return {}

    def on_dataset(self, stats: DatasetStats) -> None:
        """Called once before training with statistics of the training split."""

    def after_step(self, progress: Progress) -> None:
        """Called after every optimiser step (EMA teachers, bank synchronisation)."""


class Method(_Part):
    """A stage-1 (or stage-2) method: owns `network`, may carry add-ons."""

    find_unused_parameters: ClassVar[bool] = False  # DDP flag for heads unused in some steps
    network_outputs: ClassVar[frozenset[str]] = frozenset({"features", "cam_logits"})
    new_layer_lr_mult: ClassVar[float] = 10.0
    # What validation scores as `miou`, the objective tuning optimises: "cams" (the CAM
    # threshold sweep: stage 1) or "segmentation" (the argmax of `segmentation_logits`: stage 2).
    validates: ClassVar[str] = "cams"
    # Each training step draws its random numbers (dropout, sampling through generators seeded
    # by `step_seed`) from a seed of (initial torch seed, step, rank) and leaves the process's
    # generator as it found it: a resumed run repeats the original on every replica, whose
    # generator states a checkpoint does not hold (only rank 0's).
    seeded_steps: ClassVar[bool] = False

    def __init__(self, config, num_classes: int, backbone: BackboneConfig):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone_weights = backbone.weights  # loaded by `on_fresh_start`, never for a resumed run
        # The platform loads the network from a checkpoint before `on_fresh_start`
        # (`wsss.platform.checkpoints.start_fresh`); methods may treat such layers as trained.
        self.started_from_checkpoint = bool(backbone.init_from)
        self.addons = nn.ModuleList()
        self._distributed_network: nn.Module | None = None  # not a submodule: keeps state_dict clean
        self.initial_seed = torch.initial_seed()  # see `seeded_steps`

    # ---- what subclasses implement -------------------------------------------------
    network: nn.Module  # forward(images) -> dict of [B, ...] tensors; must include "cam_logits"

    def views(self, batch, progress):
        return {"image": batch["image"]}

    def cam_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Non-negative class activation maps [B,K,h,w] for inference (eval mode)."""
        return F.relu(self.network(images)["cam_logits"])

    def segmentation_logits(self, images: torch.Tensor) -> torch.Tensor | None:
        """[B,K+1,h,w] for methods with a segmentation branch, else None."""
        return None

    def network_options(self, batch: dict, views: dict[str, torch.Tensor], progress: Progress) -> dict[str, Any]:
        """Keyword arguments of this step's network call, e.g. to run a branch on the first
        view's rows only (see `split_views`) or to keep a branch's gradient out of the backbone
        during a warm-up. `batch` holds what `before_forward` added."""
        return {}

    def step_seed(self, progress: Progress) -> int:
        """The seed of this step on this replica (see `seeded_steps`)."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return ((self.initial_seed * 1_000_003 + progress.step) * 1009 + rank) % (2 ** 63)

    # ---- what the platform calls ---------------------------------------------------
    def training_step(self, batch: dict, progress: Progress) -> dict[str, torch.Tensor]:
        """Every part's `before_forward`, one forward over all views of all parts (the base
        method's first), then every part's loss terms."""
        parts = [self, *self.addons]
        with self._step_randomness(batch["image"].device, progress):
            for part in parts:
                part.notes.clear()
                added = part.before_forward(batch, progress)
                if set(added) & set(batch):
                    raise KeyError(f"batch keys {sorted(set(added) & set(batch))} added twice (by {part.name})")
                batch = {**batch, **added}
            views: dict[str, torch.Tensor] = {}
            for part in parts:
                views.update(part.views(batch, progress))
            outputs = self.run_network(views, self.network_options(batch, views, progress))
            losses: dict[str, torch.Tensor] = {}
            for part in parts:
                for key, value in part.losses(batch, outputs, progress).items():
                    if key in losses:
                        raise KeyError(f"loss term {key!r} returned twice (by {part.name})")
                    losses[key] = value
        return losses

    @contextlib.contextmanager
    def _step_randomness(self, device: torch.device, progress: Progress):
        """With `seeded_steps`, the process's generators (and the GPU's) seeded for this step
        inside, and restored after."""
        if not self.seeded_steps:
            yield
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.step_seed(progress))
            yield

    def step_notes(self) -> dict[str, torch.Tensor]:
        """The last training step's diagnostics of every part (see `note`)."""
        return {key: value for part in (self, *self.addons) for key, value in part.notes.items()}

    def run_network(self, views: dict[str, torch.Tensor],
                    options: dict[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Runs the (possibly DDP-wrapped) network once on the concatenated views, with
        `options` (see `network_options`) as keyword arguments."""
        network = self._distributed_network or self.network
        return split_views(network(torch.cat(list(views.values())), **(options or {})), views)

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap only the trainable network (e.g. in DDP); state_dict keys stay unchanged."""
        object.__setattr__(self, "_distributed_network", wrap(self.network))  # bypass registration

    def param_groups(self, lr: float) -> list[dict]:
        """Backbone at lr, every other trainable parameter (heads, add-ons) at lr × mult."""
        backbone = [p for p in self.network.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in backbone}
        new = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": backbone, "lr": lr, "lr_mult": 1.0, "name": "backbone"}]
        if new:
            groups.append({"params": new, "lr": lr * self.new_layer_lr_mult,
                           "lr_mult": self.new_layer_lr_mult, "name": "new"})
        return groups

    def on_dataset(self, stats):
        for addon in self.addons:
            addon.on_dataset(stats)

    def on_fresh_start(self) -> None:
        """Called before the first step of a run that does not resume: load `backbone_weights`
        unless the network was started from a checkpoint. Not when a checkpoint is restored or
        loaded for inference, so such a checkpoint loads after its starting weights are gone."""
        if not self.started_from_checkpoint:
            self.network.backbone.load_pretrained(self.backbone_weights)

    def after_step(self, progress):
        for addon in self.addons:
            addon.after_step(progress)


class Addon(_Part):
    """A loss that plugs onto any base method whose network has `needs_outputs`."""

    needs_outputs: ClassVar[frozenset[str]] = frozenset({"cam_logits"})

    def __init__(self, config, num_classes: int):
        super().__init__()
        self.config = config
        self.num_classes = num_classes


def split_views(out: dict[str, torch.Tensor], views: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A forward's outputs over the concatenated `views`, back by view: `out[key]` has a row
    per image of every view, or only the first view's rows (a branch no other view needs)."""
    sizes = [view.shape[0] for view in views.values()]
    split: dict[str, list[torch.Tensor]] = {}
    for key, value in out.items():
        if value.shape[0] == sum(sizes):
            split[key] = list(torch.split(value, sizes))
        elif value.shape[0] == sizes[0]:
            split[key] = [value]
        else:
            raise ValueError(f"network output {key!r} has {value.shape[0]} rows; "
                             f"views {dict(zip(views, sizes, strict=True))}")
    return {name: {key: parts[i] for key, parts in split.items() if i < len(parts)}
            for i, name in enumerate(views)}


def valid_at(valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The batch's bool [B,S,S] `valid` at feature resolution [B,h,w]: cells mostly image."""
    return F.adaptive_avg_pool2d(valid[:, None].float(), size)[:, 0] > 0.5


METHODS: dict[str, type[Method]] = {}
ADDONS: dict[str, type[Addon]] = {}


def register_method(cls):
    _check_new_name(cls)
    METHODS[cls.name] = cls
    return cls


def register_addon(cls):
    _check_new_name(cls)
    ADDONS[cls.name] = cls
    return cls


def _check_new_name(cls) -> None:
    """A part's name is its config section: two parts may not share one."""
    taken = METHODS.get(cls.name) or ADDONS.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: the name {cls.name!r} is taken by "
                         f"{taken.__module__}.{taken.__qualname__}")


def parse_method(spec: str) -> tuple[type[Method], list[type[Addon]]]:
    """'lnl+fsae' -> (LNL, [FSAE]). Errors name the unknown part."""
    import wsss.methods  # noqa: F401  (registers every method)

    base, *addons = spec.split("+")
    if base not in METHODS:
        hint = f" (an add-on: compose it as cam+{base})" if base in ADDONS else ""
        raise ValueError(f"method {spec!r}: unknown base method {base!r}{hint}; "
                         f"known: {', '.join(sorted(METHODS))}")
    for name in addons:
        if name not in ADDONS:
            raise ValueError(f"method {spec!r}: unknown add-on {name!r}; known: {', '.join(sorted(ADDONS))}")
    if len(set(addons)) != len(addons):
        raise ValueError(f"method {spec!r}: an add-on is listed twice")
    return METHODS[base], [ADDONS[name] for name in addons]


def method_parts(spec: str) -> list[type[_Part]]:
    """'lnl+fsae' -> [LNL, FSAE]: the base method, then its add-ons."""
    base, addons = parse_method(spec)
    return [base, *addons]


def required_inputs(spec: str) -> frozenset[str]:
    """Batch keys beyond image/labels/valid that the pipeline must produce for `spec`."""
    return frozenset().union(*(part.inputs for part in method_parts(spec)))


def method_sections(spec: str) -> dict[str, type]:
    """Config section name -> config dataclass for every part of a composed method."""
    return {part.name: part.Config for part in method_parts(spec)}


def build_method(spec: str, num_classes: int, configs: dict | None = None,
                 backbone: BackboneConfig = BackboneConfig()) -> Method:
    """Builds base method and add-ons; `configs` maps section name -> config instance."""
    base, addons = parse_method(spec)
    configs = configs or {}
    method = base(configs.get(base.name) or base.Config(), num_classes, backbone)
    produced = set(method.network_outputs)
    for addon_cls in addons:
        missing = addon_cls.needs_outputs - produced
        if missing:
            raise ValueError(f"method {spec!r}: add-on {addon_cls.name!r} needs network outputs "
                             f"{sorted(missing)} that {base.name!r} does not produce")
        method.addons.append(addon_cls(configs.get(addon_cls.name) or addon_cls.Config(), num_classes))
    return method
