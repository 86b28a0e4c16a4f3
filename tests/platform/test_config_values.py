"""Values of the right type but unusable are refused by the config, naming the key."""

import dataclasses

import pytest

from wsss.methods.base import method_sections
from wsss.methods.fsae import FSAEConfig
from wsss.platform.config import ConfigError, TrainConfig, load_config


@pytest.mark.parametrize("item, message", [
    ("poly_power=nan", "poly_power=nan: must be a finite number"),
    ("poly_power=-5", "poly_power=-5.0: must be >= 0"),
    ("lr=inf", "lr=inf: must be a finite number"),
    ("lr=-inf", "lr=-inf: must be a finite number"),
    ("weight_decay=inf", "weight_decay=inf: must be a finite number"),
    ("momentum=nan", "momentum=nan: must be a finite number"),
    ("scale_max=inf", "scale_max=inf: must be a finite number"),
    ("seed=-1", "seed=-1: must be >= 0"),
    ("eval_max_images=-3", "eval_max_images=-3: must be >= 0"),
    ("cam_images=-1", "cam_images=-1: must be >= 0"),
    ("epochs=inf", "epochs='inf': expected an integer"),
    ("fsae.background_logit=nan", "fsae.background_logit=nan: must be a finite number"),
    ("fsae.loss_weight=inf", "fsae.loss_weight=inf: must be a finite number"),
])
def test_non_finite_and_negative_values_are_refused_naming_the_key(item, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [item], method="cam+fsae")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_floats_from_a_config_file_or_a_checkpoints_dict(tmp_path, value):
    values = TrainConfig(method="cam+fsae").to_dict()
    values["sections"]["fsae"]["fae_threshold"] = value
    with pytest.raises(ConfigError, match="fsae.fae_threshold"):
        TrainConfig.from_dict(values)
    path = tmp_path / "run.toml"
    path.write_text(f"lr = {'nan' if value != value else 'inf'}\n")
    with pytest.raises(ConfigError, match="lr="):
        load_config(str(path))


def test_config_built_in_code_is_checked_too():
    with pytest.raises(ConfigError, match="lr=nan"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match="fsae.background_logit=inf"):
        TrainConfig(method="cam+fsae", sections={"fsae": FSAEConfig(background_logit=float("inf"))})


@pytest.mark.parametrize("method", ["cam", "lnl+fsae", "csrm+ocr", "deeplab+ocr"])
def test_every_float_of_every_method_section_must_be_finite(method):
    """Through the one general path, not key by key: each float field of each section."""
    base = {"pseudo_labels": "labels"} if method.startswith("deeplab") else {}
    for section, cls in method_sections(method).items():
        for f in dataclasses.fields(cls):
            if isinstance(getattr(cls(), f.name), float):
                with pytest.raises(ConfigError, match=f"{section}.{f.name}=nan: must be a finite number"):
                    load_config(None, {f"{section}.{f.name}": "nan"}, method=method, **base)


@pytest.mark.parametrize("name", ["../../etc", "..", ".", "a/b", "/abs", "a\\b", "a b", "x" * 129, "exp\n1",
                                  "s3://bucket/x"])
def test_run_name_is_one_safe_path_segment(name):
    with pytest.raises(ConfigError, match="name="):
        load_config(None, {"name": name})


@pytest.mark.parametrize("name", ["exp-1", "exp.1", "exp_1", "Run.2026-12-06", "x" * 128])
def test_safe_names_pass(name):
    assert load_config(None, {"name": name}).name == name


def test_cli_refuses_a_bad_value_before_ray_starts(capsys, tmp_path):
    from wsss.cli import main

    assert main(["train", "--method", "cam", "--data", str(tmp_path / "none"), "name=../../etc"]) == 2
    assert "name='../../etc'" in capsys.readouterr().err
