"""docs/adding_a_method.md, followed to the letter: its example file, registered by importing
it, validates as a config, has a search space, passes the contract tests and trains in the
plain loop; and every module of wsss/methods is found without a list."""

from __future__ import annotations

import importlib.util
import math
import pkgutil
import re
import sys

import pytest

import wsss.methods
from tests.helpers import ROOT
from tests.helpers.contract import (
    check_exports_nonnegative_cams_of_every_class,
    check_trains_checkpoints_and_resumes_exactly,
)
from wsss.methods.base import ADDONS, METHODS, Addon, Method
from wsss.platform.config import ConfigError, load_config
from wsss.tuning.spaces import build_space

DOC = ROOT / "docs" / "adding_a_method.md"


@pytest.fixture
def example(tmp_path):
    """The doc's example file as a module of its own: importing it registers `lse`."""
    source = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    path = tmp_path / "lse.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lse_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        METHODS.pop("lse", None)
        sys.modules.pop(spec.name, None)


def test_every_part_in_the_package_is_registered_without_a_list():
    for info in pkgutil.iter_modules(wsss.methods.__path__):
        module = sys.modules[f"wsss.methods.{info.name}"]  # imported by the package
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == module.__name__ and "name" in vars(value):
                registry = METHODS if issubclass(value, Method) else ADDONS if issubclass(value, Addon) else None
                if registry is not None:
                    assert registry.get(value.name) is value, f"{module.__name__}.{value.__name__} is not registered"


def test_the_example_is_configured_and_swept_like_any_method(example):
    config = load_config(overrides=["method=lse", "lse.sharpness=8", "backbone=resnet18"])
    assert config.sections["lse"] == example.LSEConfig(sharpness=8.0)
    with pytest.raises(ConfigError, match="lse.sharpness must be > 0"):
        config.with_overrides({"lse.sharpness": "0"})
    with pytest.raises(ConfigError, match="unknown config key 'lse.sharp'"):
        config.with_overrides({"lse.sharp": "1"})
    space = build_space("lse+fsae")
    assert {"lr", "lse.sharpness"} <= set(space.names)
    space.check_against(config.with_overrides({"method": "lse+fsae"}))


def test_the_example_passes_the_contract_tests(example, tmp_path):
    for spec in ("lse", "lse+fsae"):
        (tmp_path / spec).mkdir()
        check_trains_checkpoints_and_resumes_exactly(spec, tmp_path / spec)
        check_exports_nonnegative_cams_of_every_class(spec)


def test_the_example_trains_in_the_plain_loop(example, shards):
    from wsss.platform.plain import train_plain

    config = load_config(overrides={"method": "lse", "data": shards, "backbone": "resnet18",
                                    "backbone_weights": "none", "epochs": 1, "batch_size": 8, "crop_size": 64,
                                    "output_stride": 16, "eval_max_images": 10, "lse.sharpness": 3})
    method, history = train_plain(config, device="cpu")
    assert isinstance(method, example.LSE) and method.config.sharpness == 3
    assert math.isfinite(history[0]["loss/cls"]) and 0 <= history[0]["miou"] <= 1
