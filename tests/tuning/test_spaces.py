"""Search spaces (`wsss/tuning/spaces.py`): every part's keys, valid samples for every
composition, conditionals, and space files."""

from __future__ import annotations

import json
import re

import optuna
import pytest

from tests.helpers.contract import compositions
from wsss.methods.base import ADDONS, METHODS, method_parts, required_inputs
from wsss.platform.config import TrainConfig
from wsss.tuning.spaces import SHARED, SpaceError, build_space, load_space_file, tunable_keys

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space, count: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space(study.ask()) for _ in range(count)]


@pytest.mark.parametrize("part", [*METHODS.values(), *ADDONS.values()], ids=lambda part: part.name)
def test_a_part_sweeps_its_own_keys_and_run_keys_only(part):
    """So that its space stays valid in every composition it is part of."""
    run_keys = {key for key in tunable_keys("cam") if "." not in key}
    for key in part.search_space:
        section, _, _ = key.rpartition(".")
        assert section == part.name or key in run_keys, f"{part.name} sweeps {key!r}"


@pytest.mark.parametrize("method", compositions())
def test_space_samples_valid_configs_of_every_method(method):
    space = build_space(method)
    # stage-2 methods train on pseudo-labels: any URI passes config validation
    base = TrainConfig(method=method, pseudo_labels="s3://pseudo" if "target" in required_inputs(method) else "")
    space.check_against(base)
    expected = {p.name for p in SHARED} | {key for part in method_parts(method) for key in part.search_space}
    assert sorted(space.names) == sorted(expected)  # a composed method sweeps the union, once each
    for overrides in sample(space, 25):
        assert set(overrides) == set(expected)
        config = base.with_overrides(overrides)  # raises on any invalid value
        for key, value in overrides.items():
            section, _, field = key.rpartition(".")
            actual = getattr(config.sections[section], field) if section else getattr(config, key)
            assert actual == value


def test_stage2_sweeps_its_own_lr_range():
    ranges = {method: next(p for p in build_space(method).params if p.name == "lr")
              for method in ("cam", "deeplab", "deeplab+ocr")}
    assert (ranges["cam"].low, ranges["cam"].high) == (1e-3, 1e-1)
    assert ranges["deeplab"] == ranges["deeplab+ocr"]
    assert (ranges["deeplab"].low, ranges["deeplab"].high) == (1e-4, 1e-2)


def test_composed_space_is_the_union_of_its_parts():
    lnl, fsae, both = build_space("lnl"), build_space("cam+fsae"), build_space("lnl+fsae")
    assert set(both.names) == set(lnl.names) | set(fsae.names)


def test_paper_parameters_are_swept():
    names = set(build_space("lnl+fsae").names)
    assert {"lr", "lnl.seed_threshold", "lnl.contrast_weight", "lnl.bank_momentum", "lnl.temperature",
            "lnl.num_prototypes", "lnl.erosion", "lnl.warmup_epochs", "fsae.dilation_kernel", "fsae.fae_threshold",
            "fsae.sae_threshold", "fsae.loss_weight"} <= names
    params = {p.name: p for p in build_space("lnl+fsae").params}
    assert params["lnl.temperature"].log and params["fsae.dilation_kernel"].choices == (1, 3, 5, 7)
    assert {"ocr.margin", "ocr.ic_threshold", "ocr.rectification_weight"} <= set(ADDONS["ocr"].search_space)
    assert {"csrm.temperature", "csrm.negatives_per_query", "csrm.queries_per_class", "csrm.fg_threshold",
            "csrm.bg_threshold", "csrm.rank_low", "csrm.rank_high",
            "csrm.decoder_lr_mult"} <= set(METHODS["csrm"].search_space)


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
    toml.write_text('[lnl.seed_threshold]\nlow = 0.7\nhigh = 0.9\n\n'
                    '["fsae.dilation_kernel"]\nchoices = [3, 5]\n\n'
                    '[lr]\ntype = "categorical"\nchoices = [0.01, 0.02]\n\n'
                    '[weight_decay]\ntype = "float"\nlow = 1e-5\nhigh = 1e-3\nlog = true\n')
    specs = load_space_file(toml)
    assert set(specs) == {"lnl.seed_threshold", "fsae.dilation_kernel", "lr", "weight_decay"}
    space = build_space("lnl+fsae", specs)
    params = {p.name: p for p in space.params}
    assert params["lnl.seed_threshold"].type == "float" and not params["lnl.seed_threshold"].log  # narrowed, rest kept
    for draw in sample(space, 40):
        assert 0.7 <= draw["lnl.seed_threshold"] <= 0.9
        assert draw["fsae.dilation_kernel"] in (3, 5)
        assert draw["lr"] in (0.01, 0.02)
        assert 1e-5 <= draw["weight_decay"] <= 1e-3
        TrainConfig(method="lnl+fsae").with_overrides(draw)


def test_json_space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"fsae.loss_weight": {"low": 0.5, "high": 1.5}}))
    assert load_space_file(path) == {"fsae.loss_weight": {"low": 0.5, "high": 1.5}}


@pytest.mark.parametrize("name, spec, message", [
    ("fsae.loss_weight", {"low": 2.0, "high": 1.0}, "low (2.0) must be < high (1.0)"),
    ("fsae.loss_weight", {"low": 1.0, "high": 1.0}, "must be < high"),
    ("lr", {"low": 0.0, "high": 0.1}, "log scale needs low > 0"),
    ("fsae.sae_threshold", {"log": True, "low": -0.5}, "log scale needs low > 0"),
    ("fsae.dilation_kernel", {"choices": []}, "non-empty list of choices"),
    ("fsae.nonsense", {"type": "float", "low": 0, "high": 1}, "unknown parameter"),
    ("fsae.loss_weight", {"lo": 0.1}, "unknown field"),
    ("momentum", {"low": 0.5, "high": 0.9}, "needs a type"),
    ("momentum", {"type": "normal", "low": 0.5, "high": 0.9}, "must be one of float, int, categorical"),
    ("epochs", {"type": "int", "low": 1.5, "high": 4}, "must be an integer"),
    ("fsae.loss_weight", {"low": "a", "high": 1.0}, "must be a finite number"),
    ("fsae.loss_weight", {"step": 0.1}, "log scale and a step"),
    ("fsae.dilation_kernel", {"type": "categorical", "choices": [3], "low": 1}, "choices only"),
    ("data", {"type": "categorical", "choices": ["a"]}, "unknown parameter"),
    ("fsae.fae_threshold", {"above": "fsae.nowhere"}, "is not a parameter of this space"),
    ("fsae.tau_fae", {"low": 0.9, "high": 0.95}, "is now 'fsae.fae_threshold'"),
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
    specs = {"fsae.loss_weight": {"above": "fsae.fae_threshold"}, "fsae.fae_threshold": {"above": "fsae.loss_weight"}}
    with pytest.raises(SpaceError, match="cycle"):
        build_space("cam+fsae", specs)


def test_values_the_method_rejects_fail_before_any_trial():
    space = build_space("cam+fsae", {"fsae.fae_threshold": {"low": 0.9, "high": 1.5}})  # a range is fine...
    with pytest.raises(SpaceError, match="'fsae.fae_threshold'.*not a valid config"):
        space.check_against(TrainConfig(method="cam+fsae"))  # ...but τ_FAE > 1 is not a config
    with pytest.raises(SpaceError, match="'fsae.dilation_kernel'"):
        build_space("cam+fsae", {"fsae.dilation_kernel": {"choices": [2, 3]}}).check_against(
            TrainConfig(method="cam+fsae"))


def test_unknown_method_is_an_error():
    with pytest.raises(SpaceError, match="unknown base method"):
        build_space("nosuch")


@pytest.mark.parametrize("name, text, message", [
    ("space.yaml", "a: 1", "expected a .toml or .json"),
    ("space.toml", "[lnl.seed_threshold\nlow = 1", "not valid TOML"),
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
