"""Search spaces, space files, and real sweeps on a local Ray (Tune + Optuna + Train V2)."""

from __future__ import annotations

import json
import re

import optuna
import pytest

from wsss.methods.base import ADDONS, METHODS
from wsss.platform.config import TrainConfig
from wsss.tuning.spaces import PART_SPACES, SHARED, SpaceError, build_space, load_space_file

optuna.logging.set_verbosity(optuna.logging.WARNING)


def compositions() -> list[str]:
    """Every base method alone and with each add-on its network can feed."""
    specs = list(METHODS)
    for base, cls in METHODS.items():
        for addon in ADDONS.values():
            if addon.needs_outputs <= cls.network_outputs:
                specs.append(f"{base}+{addon.name}")
    return specs


def sample(space, count: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space(study.ask()) for _ in range(count)]


def test_every_registered_part_has_a_search_space():
    missing = sorted((set(METHODS) | set(ADDONS)) - set(PART_SPACES))
    assert not missing, f"add search spaces for {missing} to PART_SPACES in wsss/tuning/spaces.py"


@pytest.mark.parametrize("method", compositions())
def test_space_samples_valid_configs_of_every_method(method):
    space = build_space(method)
    base = TrainConfig(method=method)
    space.check_against(base)
    parts = method.split("+")
    expected = [p.name for p in SHARED] + [p.name for part in parts for p in PART_SPACES[part]]
    assert sorted(space.names) == sorted(expected)  # a composed method sweeps the union
    for overrides in sample(space, 25):
        assert set(overrides) == set(expected)
        config = base.with_overrides(overrides)  # raises on any invalid value
        for key, value in overrides.items():
            section, _, field = key.rpartition(".")
            actual = getattr(config.sections[section], field) if section else getattr(config, key)
            assert actual == value


def test_composed_space_is_the_union_of_its_parts():
    lnl, fsae, both = build_space("lnl"), build_space("cam+fsae"), build_space("lnl+fsae")
    assert set(both.names) == set(lnl.names) | set(fsae.names)


def test_paper_parameters_are_swept():
    names = set(build_space("lnl+fsae").names)
    assert {"lr", "lnl.eta", "lnl.lam", "lnl.gamma", "lnl.tau", "lnl.num_prototypes", "lnl.erosion",
            "lnl.warmup_epochs", "fsae.kernel", "fsae.tau_fae", "fsae.tau_sae", "fsae.lam"} <= names
    params = {p.name: p for p in build_space("lnl+fsae").params}
    assert params["lnl.tau"].log and params["fsae.kernel"].choices == (1, 3, 5, 7)
    assert {"ocr.delta", "ocr.t", "ocr.alpha"} <= {p.name for p in PART_SPACES["ocr"]}
    assert {"csrm.temperature", "csrm.negatives_per_query", "csrm.queries_per_class", "csrm.fg_threshold",
            "csrm.bg_threshold", "csrm.rank_low", "csrm.rank_high"} <= {p.name for p in PART_SPACES["csrm"]}


def test_erosion_kernels_are_odd():
    assert {o["lnl.erosion"] for o in sample(build_space("lnl"), 60)} == {1, 3, 5, 7}


def test_conditional_parameter_is_sampled_above_its_partner():
    # the CSRM γ_h > γ_l rule, on a parameter pair every method has: epochs > warm-up
    specs = {"fsae.warmup_epochs": {"type": "int", "low": 0, "high": 4},
             "epochs": {"type": "int", "low": 1, "high": 6, "above": "fsae.warmup_epochs"}}
    space = build_space("cam+fsae", specs)
    assert space.names.index("epochs") > space.names.index("fsae.warmup_epochs")
    draws = sample(space, 80)
    assert all(d["epochs"] > d["fsae.warmup_epochs"] for d in draws)
    assert {d["fsae.warmup_epochs"] for d in draws} == set(range(5))  # the partner's whole range


def test_csrm_rank_high_exceeds_rank_low():
    assert all(d["csrm.rank_high"] > d["csrm.rank_low"] for d in sample(build_space("csrm"), 80))


def test_space_file_narrows_and_replaces(tmp_path):
    toml = tmp_path / "space.toml"
    toml.write_text('[lnl.eta]\nlow = 0.7\nhigh = 0.9\n\n'
                    '["fsae.kernel"]\nchoices = [3, 5]\n\n'
                    '[lr]\ntype = "categorical"\nchoices = [0.01, 0.02]\n\n'
                    '[weight_decay]\ntype = "float"\nlow = 1e-5\nhigh = 1e-3\nlog = true\n')
    specs = load_space_file(toml)
    assert set(specs) == {"lnl.eta", "fsae.kernel", "lr", "weight_decay"}
    space = build_space("lnl+fsae", specs)
    params = {p.name: p for p in space.params}
    assert params["lnl.eta"].type == "float" and not params["lnl.eta"].log  # narrowed, rest kept
    for draw in sample(space, 40):
        assert 0.7 <= draw["lnl.eta"] <= 0.9
        assert draw["fsae.kernel"] in (3, 5)
        assert draw["lr"] in (0.01, 0.02)
        assert 1e-5 <= draw["weight_decay"] <= 1e-3
        TrainConfig(method="lnl+fsae").with_overrides(draw)


def test_json_space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"fsae.lam": {"low": 0.5, "high": 1.5}}))
    assert load_space_file(path) == {"fsae.lam": {"low": 0.5, "high": 1.5}}


@pytest.mark.parametrize("name, spec, message", [
    ("fsae.lam", {"low": 2.0, "high": 1.0}, "low (2.0) must be < high (1.0)"),
    ("fsae.lam", {"low": 1.0, "high": 1.0}, "must be < high"),
    ("lr", {"low": 0.0, "high": 0.1}, "log scale needs low > 0"),
    ("fsae.tau_sae", {"log": True, "low": -0.5}, "log scale needs low > 0"),
    ("fsae.kernel", {"choices": []}, "non-empty list of choices"),
    ("fsae.nonsense", {"type": "float", "low": 0, "high": 1}, "unknown parameter"),
    ("fsae.lam", {"lo": 0.1}, "unknown field"),
    ("momentum", {"low": 0.5, "high": 0.9}, "needs a type"),
    ("momentum", {"type": "normal", "low": 0.5, "high": 0.9}, "must be one of float, int, categorical"),
    ("epochs", {"type": "int", "low": 1.5, "high": 4}, "must be an integer"),
    ("fsae.lam", {"low": "a", "high": 1.0}, "must be a finite number"),
    ("fsae.lam", {"step": 0.1}, "log scale and a step"),
    ("fsae.kernel", {"type": "categorical", "choices": [3], "low": 1}, "choices only"),
    ("data", {"type": "categorical", "choices": ["a"]}, "unknown parameter"),
    ("fsae.tau_fae", {"above": "fsae.nowhere"}, "is not a parameter of this space"),
])
def test_invalid_space_is_an_error_naming_the_parameter(name, spec, message):
    with pytest.raises(SpaceError, match=re.escape(message)) as error:
        build_space("cam+fsae", {name: spec})
    assert repr(name) in str(error.value)


def test_conditional_range_that_can_be_empty_is_an_error():
    specs = {"fsae.warmup_epochs": {"type": "int", "low": 0, "high": 5},
             "epochs": {"type": "int", "low": 1, "high": 5, "above": "fsae.warmup_epochs"}}
    with pytest.raises(SpaceError, match="'epochs'.*leaves no value above"):
        build_space("cam+fsae", specs)


def test_cycle_of_conditionals_is_an_error():
    specs = {"fsae.lam": {"above": "fsae.tau_fae"}, "fsae.tau_fae": {"above": "fsae.lam"}}
    with pytest.raises(SpaceError, match="cycle"):
        build_space("cam+fsae", specs)


def test_values_the_method_rejects_fail_before_any_trial():
    space = build_space("cam+fsae", {"fsae.tau_fae": {"low": 0.9, "high": 1.5}})  # a range is fine...
    with pytest.raises(SpaceError, match="'fsae.tau_fae'.*not a valid config"):
        space.check_against(TrainConfig(method="cam+fsae"))  # ...but τ_FAE > 1 is not a config
    with pytest.raises(SpaceError, match="'fsae.kernel'"):
        build_space("cam+fsae", {"fsae.kernel": {"choices": [2, 3]}}).check_against(
            TrainConfig(method="cam+fsae"))


def test_unknown_method_is_an_error():
    with pytest.raises(SpaceError, match="unknown base method"):
        build_space("nosuch")


@pytest.mark.parametrize("name, text, message", [
    ("space.yaml", "a: 1", "expected a .toml or .json"),
    ("space.toml", "[lnl.eta\nlow = 1", "not valid TOML"),
    ("space.json", "{", "not valid JSON"),
    ("space.json", "[1, 2]", "expected a table"),
])
def test_bad_space_file_is_an_error_naming_it(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpaceError, match=message) as error:
        load_space_file(path)
    assert str(path) in str(error.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(SpaceError, match="no such file"):
        load_space_file(tmp_path / "absent.toml")


def test_space_is_picklable_for_tune_checkpoints():
    import pickle

    space = build_space("lnl+fsae")
    assert pickle.loads(pickle.dumps(space)) == space
