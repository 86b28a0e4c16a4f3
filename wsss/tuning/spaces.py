"""Search spaces: what `wsss tune` samples for each method, as Optuna define-by-run.

A `SearchSpace` is a picklable callable `space(trial) -> {override key: value}`; the keys
are `TrainConfig.with_overrides` keys (`lr`, `lnl.eta`). Each part of a method (base
method or add-on) contributes its parameters; every method also sweeps the shared `lr`,
over its part's range where a part names one (`deeplab`: a decade below stage 1's).
A composed method (`lnl+fsae`) sweeps the union of its parts' spaces.

Conditional parameters are define-by-run: a parameter with `above` is sampled after the
one it names, from a range starting at that value plus one step (CSRM's γ_h > γ_l).

A user space file (TOML or JSON) maps parameter -> spec
`{type = "float"|"int"|"categorical", low, high, log, step, choices}`; a spec without
`type` narrows the default parameter (only the given fields change), a spec with `type`
replaces it or adds a config key the default space does not sweep. Bad specs are
errors naming the parameter, raised before any trial starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss.methods.base import method_sections
from wsss.platform.config import ConfigError, TrainConfig


class SpaceError(ConfigError):
    pass


SPEC_KEYS = ("type", "low", "high", "log", "step", "choices", "above")
KINDS = ("float", "int", "categorical")
# run keys a sweep never samples: they say what and where, not how to train
NOT_TUNABLE = frozenset({"method", "data", "pseudo_labels", "train_split", "val_split", "name", "storage_path",
                         "wandb", "wandb_project", "wandb_group"})


@dataclass(frozen=True)
class Param:
    """One sampled hyperparameter; `name` is its override key."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    above: str | None = None  # sampled after `above`, strictly greater for ints

    def validate(self) -> None:
        def fail(why: str):
            raise SpaceError(f"search space parameter {self.name!r}: {why}")

        if self.type not in KINDS:
            fail(f"type {self.type!r} must be one of {', '.join(KINDS)}")
        if self.type == "categorical":
            if not self.choices:
                fail("categorical needs a non-empty list of choices")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                fail("categorical takes choices only (no low, high, log or step)")
            if not all(isinstance(c, (str, int, float, bool)) for c in self.choices):
                fail(f"choices must be strings, numbers or booleans, got {list(self.choices)}")
            return
        if self.choices:
            fail(f"{self.type} takes low and high, not choices")
        for bound in ("low", "high"):
            value = getattr(self, bound)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"{bound} must be a finite number, got {value!r}")
            if self.type == "int" and not float(value).is_integer():
                fail(f"{bound} of an int parameter must be an integer, got {value!r}")
        if self.low >= self.high:
            fail(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            fail(f"log scale needs low > 0, got low={self.low}")
        if self.step is not None:
            if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or self.step <= 0:
                fail(f"step must be a number > 0, got {self.step!r}")
            if self.type == "int" and not float(self.step).is_integer():
                fail(f"step of an int parameter must be an integer, got {self.step!r}")
            if self.log and self.step != 1:
                fail("log scale and a step cannot be combined (Optuna samples one or the other)")

    def lowest_above(self, other_value: float) -> float:
        """The low end when the parameter must exceed `other_value` (define-by-run)."""
        if self.type == "int":
            step = int(self.step or 1)
            # first value of the grid low, low+step, ... that is > other_value
            count = max(0, math.floor((other_value - self.low) / step) + 1)
            return int(self.low + count * step)
        return max(self.low, other_value)

    def suggest(self, trial, low: float | None = None) -> Any:
        low = self.low if low is None else low
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(low), float(self.high), step=self.step, log=self.log)

    def extremes(self) -> list:
        """Values a sampler can return at the edges (checked against the config up front)."""
        if self.type == "categorical":
            return list(self.choices)
        high = self.high
        if self.step is not None:  # the grid's last point
            high = self.low + math.floor((self.high - self.low) / self.step) * self.step
        if self.type == "int":
            return [int(self.low), int(high)]
        return [float(self.low), float(high)]


def _p(name, type, low=None, high=None, **options) -> Param:
    return Param(name, type, low, high, **options)


SHARED = (_p("lr", "float", 1e-3, 1e-1, log=True),)

# Per part (base method or add-on), keyed by the part's registry name. Ranges bracket the
# papers' defaults (in comments) by the spans their ablations explored or a bit more.
PART_SPACES: dict[str, tuple[Param, ...]] = {
    "cam": (),
    # STAGE2_DEFAULTS lr 1e-3; at 5e-2 (the stage-1 demo lr) DeepLab learns only background
    # even on ground-truth labels (docs/results.md)
    "deeplab": (_p("lr", "float", 1e-4, 1e-2, log=True),),
    "lnl": (
        _p("lnl.eta", "float", 0.2, 0.95),  # the paper: 0.8, ablation 0.5..0.9 (Table XI); the default 0.3 was chosen on dev
        _p("lnl.lam", "float", 0.01, 1.0, log=True),  # 0.1; ablation 0.05..0.2
        _p("lnl.gamma", "float", 0.5, 0.999),  # 0.9 (Eq. 14 bank momentum)
        _p("lnl.tau", "float", 0.05, 1.0, log=True),  # 0.5 (Eq. 17 temperature)
        _p("lnl.num_prototypes", "int", 50, 1000, log=True),  # N = 500
        _p("lnl.erosion", "int", 1, 7, step=2),  # odd square kernel; 1 = no erosion
        _p("lnl.warmup_epochs", "int", 0, 3),  # 2 of 10
    ),
    "fsae": (
        _p("fsae.kernel", "categorical", choices=(1, 3, 5, 7)),  # k = 3
        _p("fsae.tau_fae", "float", 0.8, 0.99),  # 0.95 (Eq. 6)
        _p("fsae.tau_sae", "float", 0.5, 0.95),  # 0.8 (Eq. 7)
        _p("fsae.lam", "float", 0.1, 2.0, log=True),  # 1 (Eq. 9)
        _p("fsae.warmup_epochs", "int", 0, 3),  # 0 (10 for MCTformer)
    ),
    "ocr": (
        _p("ocr.delta", "float", 0.0, 4.0),  # Δ = 2 (Eq. 19 margin)
        _p("ocr.t", "float", 0.05, 0.5),  # 0.2 (Eq. 9 IC threshold)
        _p("ocr.alpha", "float", 0.1, 2.0, log=True),  # 1 (Eq. 4 weight)
    ),
    "csrm": (
        _p("csrm.temperature", "float", 0.05, 1.0, log=True),  # τ = 0.5 (Eq. 13)
        _p("csrm.negatives_per_query", "int", 64, 512, log=True),  # N = 256
        _p("csrm.queries_per_class", "int", 10, 100, log=True),  # P = 50
        _p("csrm.fg_threshold", "float", 0.2, 0.6),  # δ_fg = 0.35 (Eq. 6)
        _p("csrm.bg_threshold", "float", 0.01, 0.15),  # δ_bg = 0.05 (Eq. 6)
        _p("csrm.rank_low", "int", 1, 5),  # γ_l = 3
        _p("csrm.rank_high", "int", 2, 10, above="csrm.rank_low"),  # γ_h = 6, above γ_l
        _p("csrm.warmup_epochs", "float", 0.0, 3.0),  # 1 (authors' code)
        _p("csrm.decoder_lr_mult", "float", 0.02, 20.0, log=True),  # 10 (paper); 0.2 in the demo (docs/results.md)
    ),
}


@dataclass(frozen=True)
class SearchSpace:
    """Define-by-run space of one method: `space(trial) -> overrides` (picklable)."""

    method: str
    params: tuple[Param, ...] = field(default_factory=tuple)

    def __call__(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for param in self.params:
            low = param.lowest_above(values[param.above]) if param.above else None
            values[param.name] = param.suggest(trial, low)
        return values

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def check_against(self, config: TrainConfig) -> None:
        """Every edge value must make a valid config: fails here, not in trial 37."""
        by_name = {p.name: p for p in self.params}
        partners = {p.above for p in self.params if p.above}
        checks: list[tuple[Param, dict]] = []
        for param in self.params:
            if param.above:  # lowest with lowest, highest with highest
                other = by_name[param.above]
                low, high = other.extremes()
                checks.append((param, {other.name: low, param.name: param.lowest_above(low)}))
                checks.append((param, {other.name: high, param.name: param.extremes()[1]}))
            elif param.name not in partners:
                checks.extend((param, {param.name: value}) for value in param.extremes())
        for param, overrides in checks:
            try:
                config.with_overrides(overrides)
            except ConfigError as error:
                raise SpaceError(f"search space parameter {param.name!r}: {overrides} is not a "
                                 f"valid config ({error})") from None


def tunable_keys(method: str) -> set[str]:
    """Override keys a sweep of `method` may sample."""
    run = {f.name for f in dataclasses.fields(TrainConfig)} - NOT_TUNABLE - {"sections"}
    sections = {f"{name}.{f.name}" for name, cls in method_sections(method).items()
                for f in dataclasses.fields(cls)}
    return run | sections


def default_params(method: str) -> list[Param]:
    """Shared parameters plus every part's, in sampling order; a part's range of a shared
    parameter replaces the shared range."""
    params = {p.name: p for p in SHARED}
    for part in method_sections(method):
        if part not in PART_SPACES:
            raise SpaceError(f"method part {part!r} has no search space; add one to PART_SPACES in "
                             f"wsss/tuning/spaces.py (an empty tuple if it has no hyperparameters)")
        params.update({p.name: p for p in PART_SPACES[part]})
    return list(params.values())


def build_space(method: str, user_specs: dict[str, dict] | None = None) -> SearchSpace:
    """The default space of `method`, narrowed or replaced by `user_specs` (see module doc)."""
    try:
        method_sections(method)
    except ValueError as error:
        raise SpaceError(f"method: {error}") from None
    known = tunable_keys(method)
    params = {p.name: p for p in default_params(method)}
    for name in params:
        if name not in known:
            raise SpaceError(f"default search space of {method!r} names {name!r}, which is not a "
                             f"config key of the method (fix PART_SPACES in wsss/tuning/spaces.py)")
    for name, spec in (user_specs or {}).items():
        if name not in known:
            close = sorted(k for k in known if k.split(".")[-1][:3] == name.split(".")[-1][:3])
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SpaceError(f"search space parameter {name!r}: unknown parameter for method "
                             f"{method!r}{hint}")
        params[name] = _apply_spec(name, spec, params.get(name))
    ordered = _sampling_order(list(params.values()))
    for param in ordered:
        param.validate()
    _check_conditionals(ordered)
    return SearchSpace(method, tuple(ordered))


def _apply_spec(name: str, spec: Any, default: Param | None) -> Param:
    if not isinstance(spec, dict):
        raise SpaceError(f"search space parameter {name!r}: expected a table of "
                         f"{', '.join(SPEC_KEYS)}, got {spec!r}")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise SpaceError(f"search space parameter {name!r}: unknown field(s) {sorted(unknown)}; "
                         f"allowed: {', '.join(SPEC_KEYS)}")
    values = dict(spec)
    if "choices" in values:
        if not isinstance(values["choices"], (list, tuple)):
            raise SpaceError(f"search space parameter {name!r}: choices must be a list")
        values["choices"] = tuple(values["choices"])
    if "type" in values:  # a full replacement
        return Param(name=name, **values)
    if default is None:
        raise SpaceError(f"search space parameter {name!r}: not in the default space, so it needs "
                         f"a type (float, int or categorical)")
    return dataclasses.replace(default, **values)


def _sampling_order(params: list[Param]) -> list[Param]:
    """Keep the given order, but sample a parameter after the one it must exceed."""
    names = {p.name for p in params}
    ordered: list[Param] = []
    pending = list(params)
    while pending:
        progressed = False
        for param in list(pending):
            if param.above is None or param.above in {p.name for p in ordered}:
                ordered.append(param)
                pending.remove(param)
                progressed = True
            elif param.above not in names:
                raise SpaceError(f"search space parameter {param.name!r}: above={param.above!r} "
                                 f"is not a parameter of this space")
        if not progressed:
            raise SpaceError(f"search space parameters {[p.name for p in pending]}: `above` forms a cycle")
    return ordered


def _check_conditionals(params: list[Param]) -> None:
    """A conditional range must stay non-empty for every value of its partner."""
    by_name = {p.name: p for p in params}
    for param in params:
        if not param.above:
            continue
        other = by_name[param.above]
        if param.type == "categorical" or other.type == "categorical":
            raise SpaceError(f"search space parameter {param.name!r}: above= needs numeric "
                             f"parameters on both sides")
        if param.lowest_above(other.extremes()[1]) > param.high:
            raise SpaceError(f"search space parameter {param.name!r}: must exceed {other.name!r}, but "
                             f"its high ({param.high}) leaves no value above {other.name}'s high "
                             f"({other.extremes()[1]})")


def load_space_file(path: str | Path) -> dict[str, dict]:
    """Parameter -> spec from a TOML or JSON file; nested tables (`[lnl.eta]`) are flattened."""
    file = Path(path)
    if not file.is_file():
        raise SpaceError(f"--space {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix == ".toml":
            raw = tomllib.loads(text)
        elif file.suffix == ".json":
            raw = json.loads(text)
        else:
            raise SpaceError(f"--space {path}: expected a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise SpaceError(f"--space {path}: not valid {file.suffix[1:].upper()} ({error})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"--space {path}: expected a table of parameters")
    return _flatten_specs(raw, prefix="")


def _flatten_specs(raw: dict, prefix: str) -> dict[str, dict]:
    out = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not set(value) & set(SPEC_KEYS):
            out.update(_flatten_specs(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out
