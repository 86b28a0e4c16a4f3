"""Search spaces: what `wsss tune` samples for each method, as Optuna define-by-run.

A `SearchSpace` is a picklable callable `space(trial) -> {override key: value}`; the keys
are `TrainConfig.with_overrides` keys (`lr`, `lnl.seed_threshold`). Each part of a method (base
method or add-on) contributes the parameters of its class's `search_space`, plain specs in
the format of a space file (below); every method also sweeps the shared `lr`, over its
part's range where a part names one (`deeplab`: a decade below stage 1's). A composed
method (`lnl+fsae`) sweeps the union of its parts' spaces.

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

from wsss.methods.base import method_parts, method_sections
from wsss.platform.config import RENAMED_KEYS, ConfigError, TrainConfig


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


SHARED = (Param("lr", "float", 1e-3, 1e-1, log=True),)


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
    """Shared parameters plus every part's `search_space`, in sampling order; a part's range
    of a shared parameter replaces the shared range."""
    params = {p.name: p for p in SHARED}
    for part in method_parts(method):
        params.update({name: _apply_spec(name, spec, None) for name, spec in part.search_space.items()})
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
                             f"config key of the method (fix the search_space of its part)")
    for name, spec in (user_specs or {}).items():
        if name in RENAMED_KEYS:
            raise SpaceError(f"search space parameter {name!r} is now {RENAMED_KEYS[name]!r}")
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
    """Parameter -> spec from a TOML or JSON file; nested tables (`[lnl.seed_threshold]`) are flattened."""
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
