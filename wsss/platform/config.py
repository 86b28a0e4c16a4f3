"""Typed run configuration: defaults, config files, `key=value` overrides, validation.

A run is one `TrainConfig` plus one config dataclass per part of the method
(`lnl+fsae` has sections `lnl` and `fsae`). Overrides are `key=value` for run keys
and `section.key=value` for method keys; a TOML config file has the same keys at
top level and `[section]` tables. Unknown keys and values of the wrong type are
errors that name the key, raised before anything expensive starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss.io import is_file, public_uri
from wsss.methods.base import BackboneConfig, method_parts, method_sections, required_inputs


class ConfigError(ValueError):
    pass


# Keys that were renamed, old -> new: naming the old one is an error that names the new one,
# and a config stored with it (in a checkpoint) loads under the new one (`stored_config`).
RENAMED_KEYS = {
    "csrm.init_checkpoint": "init_from",
    "csrm.s2c_sigma_start": "csrm.s2c_start_threshold",
    "csrm.s2c_sigma_end": "csrm.s2c_end_threshold",
    "csrm.s2c_sigma": "csrm.s2c_threshold",
    "csrm.query_confidence": "csrm.query_threshold",
    "fsae.tau_fae": "fsae.fae_threshold",
    "fsae.tau_sae": "fsae.sae_threshold",
    "fsae.kernel": "fsae.dilation_kernel",
    "fsae.lam": "fsae.loss_weight",
    "lnl.eta": "lnl.seed_threshold",
    "lnl.gamma": "lnl.bank_momentum",
    "lnl.tau": "lnl.temperature",
    "lnl.lam": "lnl.contrast_weight",
    "ocr.t": "ocr.ic_threshold",
    "ocr.delta": "ocr.margin",
    "ocr.alpha": "ocr.rectification_weight",
}
LR_SCHEDULES = ("poly", "exponential")
# A run or sweep name is one folder under storage_path (and part of a W&B id).
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def check_name(name: str, key: str) -> None:
    """ConfigError unless `name` is one safe path segment: `../x` would write outside the
    storage path, `a/b` would nest one run inside another's folder."""
    if not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{key}={name!r}: must be 1-128 letters, digits, '-', '_' or '.' (one folder "
                          "name, not '.' or '..')")


@dataclass
class TrainConfig:
    """Every setting of a training run, with its default."""

    method: str = "cam"  # base method plus add-ons, e.g. "lnl+fsae"
    data: str = ""  # URI of prepared shards (directory holding manifest.json)
    pseudo_labels: str = ""  # URI of pseudo-label shards (`wsss pseudo-labels`), the stage-2 target
    verify_data: bool = True  # check the shards' sha256 in the read tasks until a run has read them all once
    train_split: str = "train"  # split of `data` to train on (e.g. train_aug for VOC with SBD)
    val_split: str = "val"  # held-out split for the per-epoch objective ("" to skip)
    name: str = ""  # run name; the same name and storage_path resumes the run ("" = generated)
    storage_path: str = "runs"  # local directory or cloud URI (s3://, gs://) for checkpoints
    epochs: int = 5  # total epochs; a resumed run with more epochs trains on to them
    batch_size: int = 16  # per worker
    lr: float = 0.01  # backbone lr; new layers get lr × the method's new_layer_lr_mult
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    lr_schedule: str = "poly"  # poly | exponential (see `wsss.platform.loop.set_lr`)
    poly_power: float = 0.9  # poly: lr = base · (1 − step/total)^power (1 = linear decay)
    lr_decay_per_epoch: float = 0.9  # exponential: lr = base · this^epochs done (fractional, updated every step)
    crop_size: int = 320  # side of the square training crop, pixels
    scale_min: float = 0.7  # random rescale range of the training augmentation
    scale_max: float = 1.3  # (see scale_min)
    backbone: str = "resnet50"  # resnet18 | resnet50 | resnet101
    output_stride: int = 16  # 16 or 8
    backbone_weights: str = "imagenet"  # none | imagenet | torchvision ResNet state dict (path or URI)
    # A wsss run or checkpoint (path or URI) to start from: network weights whose names and shapes match are
    # loaded (e.g. backbone + classifier of a `cam` run), the rest starts fresh; backbone_weights is then not read
    init_from: str = ""
    num_workers: int = 1  # Ray Train workers (data-parallel replicas)
    device: str = "auto"  # auto (GPU when the cluster has one) | cpu | gpu
    cpu_threads: int = 0  # torch threads per worker training on CPU (0 = the node's cores shared by its workers)
    amp: bool = True  # bfloat16 mixed precision on GPU
    cpu_amp: bool = False  # the same on CPU: ~2× faster steps on CPUs with AMX (Intel Xeon 4th gen+), slower without
    flush_denormal: bool = True  # CPU training treats subnormal floats as 0: x86 computes on them up to ~100× slower
    max_failures: int = 1  # worker failures survived by restarting from the last checkpoint
    keep_checkpoints: int = 1  # the N best checkpoints by val `miou` are kept, and always the newest (0 = all)
    checkpoint_upload: str = "async"  # async: training goes on while a checkpoint uploads | sync
    seed: int = 0  # seeds model init, augmentation and shard order: the same seed repeats a run
    eval_every: int = 1  # epochs between single-scale val evaluations (0 = never)
    eval_max_images: int = 0  # cap on val images per evaluation (0 = all)
    wandb: str = "auto"  # auto (online if W&B is configured, else offline) | online | offline | disabled
    wandb_project: str = "wsss"  # W&B project of the run
    wandb_group: str = ""  # e.g. the sweep name
    log_every: int = 10  # steps between W&B scalar logs
    cam_images: int = 4  # CAM overlays logged per evaluation
    wandb_checkpoints: bool = False  # also log each checkpoint as a W&B model artifact (a copy of every epoch's)
    sections: dict[str, Any] = field(default_factory=dict)  # method section -> config dataclass

    def __post_init__(self):
        self.validate()

    @property
    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(self.backbone, self.output_stride, self.backbone_weights, self.init_from)

    def validate(self) -> None:
        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(public_uri(f"{key}={getattr(self, key)!r}: {why}"))

        check_finite_floats(self, "")

        try:
            sections = method_sections(self.method)
        except ValueError as error:
            raise ConfigError(f"method: {error}") from None
        for name in self.sections:
            if name not in sections:
                raise ConfigError(f"config section [{name}] is not a part of method {self.method!r}")
        for name, cls in sections.items():
            self.sections.setdefault(name, cls())
            check_finite_floats(self.sections[name], f"{name}.")
        if self.name:
            check_name(self.name, "name")
        if "target" in required_inputs(self.method) and not self.pseudo_labels:
            raise ConfigError(f"method {self.method!r} trains on pseudo-labels: set pseudo_labels=URI "
                              "(written by `wsss pseudo-labels`)")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        for part in method_parts(self.method):
            check(self.batch_size >= part.min_batch_size, "batch_size",
                  f"must be >= {part.min_batch_size} for {part.name} ({part.min_batch_size_reason})")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
        check(0 < self.lr_decay_per_epoch <= 1, "lr_decay_per_epoch", "must be in (0, 1]")
        check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.poly_power >= 0, "poly_power", "must be >= 0 (0 = constant lr)")
        check(self.crop_size >= 16, "crop_size", "must be >= 16")
        check(0 < self.scale_min <= self.scale_max, "scale_min", "need 0 < scale_min <= scale_max")
        check(self.backbone in ("resnet18", "resnet50", "resnet101"), "backbone",
              "must be resnet18, resnet50 or resnet101")
        check(self.output_stride in (8, 16), "output_stride", "must be 8 or 16")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.cpu_threads >= 0, "cpu_threads", "must be >= 0 (0 = the node's cores shared by its workers)")
        check(self.device in ("auto", "cpu", "gpu"), "device", "must be auto, cpu or gpu")
        check(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = unlimited)")
        check(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 = keep every checkpoint)")
        check(self.checkpoint_upload in ("async", "sync"), "checkpoint_upload", "must be async or sync")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.eval_every >= 0, "eval_every", "must be >= 0")
        check(self.eval_max_images >= 0, "eval_max_images", "must be >= 0 (0 = all)")
        check(self.cam_images >= 0, "cam_images", "must be >= 0")
        check(self.wandb in ("auto", "online", "offline", "disabled"), "wandb",
              "must be auto, online, offline or disabled")
        check(self.log_every >= 1, "log_every", "must be >= 1")

    def check_inputs(self) -> None:
        """The files a new run starts from exist. Asked before a new run, not by `validate`
        or for a resumed run: a checkpoint's config names them too, and it must load and
        train on after they are gone."""
        if self.init_from:
            from wsss.platform.checkpoints import latest_checkpoint

            try:
                latest_checkpoint(self.init_from)
            except FileNotFoundError as error:
                raise ConfigError(f"init_from={self.init_from!r}: {error}") from None
        elif self.backbone_weights not in ("none", "imagenet") and not is_file(self.backbone_weights):
            raise ConfigError(f"backbone_weights={self.backbone_weights!r}: must be none, imagenet or an existing "
                              "file (path or URI)")
        for section in self.sections.values():
            if hasattr(section, "check_inputs"):
                try:
                    section.check_inputs()  # raises a ValueError naming `section.key`
                except ValueError as error:
                    raise ConfigError(str(error)) from None

    def to_dict(self) -> dict:
        """Plain, JSON-able dict (what checkpoints, W&B and Ray workers receive)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        out["sections"] = {name: dataclasses.asdict(cfg) for name, cfg in self.sections.items()}
        return out

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        raw_sections = values.pop("sections", {}) or {}
        method = values.get("method", cls.method)
        try:
            known = method_sections(method)
        except ValueError as error:
            raise ConfigError(f"method: {error}") from None
        sections = {}
        for name, section_values in raw_sections.items():
            if name not in known:
                raise ConfigError(f"config section [{name}] is not a part of method {method!r}")
            sections[name] = _build(known[name], section_values, prefix=f"{name}.")
        run = _coerce_fields(cls, values, prefix="")
        return cls(**run, sections=sections)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """New config with `key` / `section.key` overrides applied (strings are parsed)."""
        values = self.to_dict()
        if "method" in overrides and overrides["method"] != self.method:
            values["method"] = overrides["method"]
            values["sections"] = {k: v for k, v in values["sections"].items()
                                  if k in method_sections(overrides["method"])}
        for key, value in overrides.items():
            if "." in key:
                section, sub = key.split(".", 1)
                values["sections"].setdefault(section, {})[sub] = value
            else:
                values[key] = value
        return TrainConfig.from_dict(values)


def stored_config(values: dict) -> dict:
    """`TrainConfig.to_dict()` as a checkpoint holds it, with keys renamed since it was
    written moved to their new names, for `TrainConfig.from_dict`."""
    values = {**values, "sections": {name: dict(section) for name, section in (values.get("sections") or {}).items()}}
    for old, new in RENAMED_KEYS.items():
        old_section, _, old_name = old.rpartition(".")
        holder = values["sections"].get(old_section) if old_section else values
        if holder is None or old_name not in holder:
            continue
        value = holder.pop(old_name)
        new_section, _, new_name = new.rpartition(".")
        (values["sections"].setdefault(new_section, {}) if new_section else values).setdefault(new_name, value)
    return values


def load_config(path: str | None = None, overrides: list[str] | dict | None = None, *,
                defaults: dict | None = None, **values) -> TrainConfig:
    """TrainConfig defaults < `defaults` (a command's own, shaped like the file: `key` and
    `{section: {key: value}}`) < config file < keyword values < `key=value` overrides."""
    in_file: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            in_file = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"--config {path}: not valid TOML ({error})") from None
    merged = dict(defaults or {})
    for key, value in in_file.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    sections = {k: merged.pop(k) for k in list(merged) if isinstance(merged[k], dict)}
    merged.update({k: v for k, v in values.items() if v is not None})
    merged["sections"] = sections
    config = TrainConfig.from_dict(merged)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return config.with_overrides(overrides) if overrides else config


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _build(cls: type, values: dict, prefix: str):
    fields = _coerce_fields(cls, values, prefix)
    try:  # method configs check their own ranges in __post_init__
        return cls(**fields)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[{prefix.rstrip('.')}] {error}") from None


def _coerce_fields(cls: type, values: dict, prefix: str) -> dict:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"sections"}
    out = {}
    for key, value in values.items():
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise ConfigError(f"config key '{prefix}{key}' is now '{RENAMED_KEYS[prefix + key]}'")
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        out[key] = coerce(hints[key], value, f"{prefix}{key}")
    return out


def coerce(kind: Any, value: Any, key: str) -> Any:
    """Convert a config value (maybe a string from the command line) to `kind`."""
    origin = typing.get_origin(kind)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or value == "none" and type(None) in typing.get_args(kind):
            return None
        kind = options[0]
        origin = typing.get_origin(kind)
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (tuple, list):
        item_kind = typing.get_args(kind)[0] if typing.get_args(kind) else str
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return origin(coerce(item_kind, v, key) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
        return finite(number, key)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    return value


def finite(number: float, key: str) -> float:
    """Every float setting is finite: nan passes every `x > 0` check by failing none."""
    if not math.isfinite(number):
        raise ConfigError(f"{key}={number!r}: must be a finite number")
    return number


def check_finite_floats(values: Any, prefix: str) -> None:
    """`finite` for the float fields of a config dataclass built in code, not through `coerce`."""
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        if isinstance(value, float):
            finite(value, f"{prefix}{f.name}")
        elif isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, float):
                    finite(item, f"{prefix}{f.name}")
