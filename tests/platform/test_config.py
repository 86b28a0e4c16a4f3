"""Config: defaults, files, overrides; unknown keys and bad values are named before Ray starts."""

import copy
import os
import tomllib
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT
from wsss.methods.base import ADDONS, METHODS, BackboneConfig, build_method
from wsss.platform.checkpoints import load_method, save_checkpoint
from wsss.platform.config import RENAMED_KEYS, ConfigError, TrainConfig, load_config, stored_config
from wsss.platform.loop import set_lr
from wsss.platform.segmentation import stage2_config


def test_overrides_parse_types_and_method_sections(tmp_path):
    config = load_config(None, ["epochs=3", "lr=0.5", "amp=false", "fsae.dilation_kernel=5"], method="cam+fsae")
    assert (config.epochs, config.lr, config.amp) == (3, 0.5, False)
    assert config.sections["fsae"].dilation_kernel == 5


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "cam+fsae"\nepochs = 7\n[fsae]\ndilation_kernel = 7\n')
    config = load_config(str(path), ["epochs=2"])
    assert config.epochs == 2 and config.sections["fsae"].dilation_kernel == 7


def test_defaults_sit_below_the_config_file_and_the_command_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = 7\n[fsae]\ndilation_kernel = 7\n')
    defaults = {"method": "cam+fsae", "epochs": 20, "lr": 0.5, "batch_size": 4,
                "fsae": {"dilation_kernel": 5, "loss_weight": 0.5}}
    config = load_config(str(path), ["batch_size=2"], defaults=defaults)
    assert (config.method, config.epochs, config.lr, config.batch_size) == ("cam+fsae", 7, 0.5, 2)
    # a file's table merges into them
    assert (config.sections["fsae"].dilation_kernel, config.sections["fsae"].loss_weight) == (7, 0.5)
    assert load_config(None, defaults=defaults, lr=0.1).lr == 0.1
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        load_config(None, defaults={"epoch": 3})


def test_round_trip_through_dict():
    config = load_config(None, ["fsae.dilation_kernel=1"], method="cam+fsae")
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("items, message", [
    (["epoch=3"], "unknown config key 'epoch'"),
    (["epochs=three"], "epochs='three': expected an integer"),
    (["epochs=0"], "epochs=0: must be >= 1"),
    (["lr=fast"], "lr='fast': expected a number"),
    (["amp=maybe"], "amp='maybe': expected true or false"),
    (["fsae.nope=1"], "unknown config key 'fsae.nope'"),
    (["lnl.seed_threshold=0.5"], r"\[lnl\] is not a part of method 'cam\+fsae'"),
    (["fsae.dilation_kernel=4"], "4"),
    (["device=tpu"], "device='tpu'"),
    (["noequals"], "not key=value"),
])
def test_bad_overrides_name_the_key(items, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, items, method="cam+fsae")


def test_unknown_method_and_missing_file():
    with pytest.raises(ConfigError, match="unknown base method 'camm'"):
        TrainConfig(method="camm")
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/run.toml")


def test_cpu_training_shares_the_nodes_cores_among_its_workers():
    from wsss.platform.train import cpu_threads

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(0, 1) == cores  # Ray alone would give this worker one thread
    assert cpu_threads(0, cores) == 1 and cpu_threads(0, 4 * cores) == 1
    assert cpu_threads(3, 1) == 3  # an explicit setting wins
    with pytest.raises(ConfigError, match="cpu_threads"):
        TrainConfig(method="cam", data="x", cpu_threads=-1).validate()


def test_cpu_training_flushes_subnormal_floats_unless_turned_off(caplog):
    import torch

    from wsss.platform.loop import set_flush_denormal

    torch.set_flush_denormal(False)  # an earlier training in this process may have left it on
    subnormal = torch.tensor([1e-39])  # made while not flushing: a flushing thread reads it as 0
    cpu = torch.device("cpu")
    try:
        with caplog.at_level("INFO", logger="wsss.platform.loop"):
            assert set_flush_denormal(TrainConfig(method="cam", data="x"), cpu)  # the default
        assert "flush_denormal=True" in caplog.text
        assert float(subnormal * 1.0) == 0.0
        assert not set_flush_denormal(TrainConfig(method="cam", data="x", flush_denormal=False), cpu)
        assert float(subnormal * 1.0) > 0.0
        assert not set_flush_denormal(TrainConfig(method="cam", data="x"), torch.device("cuda"))
    finally:
        torch.set_flush_denormal(False)


def test_check_inputs_names_missing_start_files_that_a_rebuilt_config_accepts(tmp_path):
    """A checkpoint's config names the files its run started from; they may be gone since."""
    saved = TrainConfig(method="csrm", data="x", backbone_weights=str(tmp_path / "gone.pth")).to_dict()
    config = TrainConfig.from_dict(saved)
    with pytest.raises(ConfigError, match="backbone_weights=.*gone.pth.*existing file"):
        config.check_inputs()
    config = config.with_overrides({"backbone_weights": "none", "init_from": str(tmp_path / "cam")})
    with pytest.raises(ConfigError, match="init_from=.*cam.*neither a checkpoint nor a run directory"):
        config.check_inputs()


# ---- renamed keys -------------------------------------------------------------------------

# A valid value other than the default for every key that has an old name.
RENAMED_VALUES = {
    "init_from": "runs/cam", "csrm.s2c_start_threshold": 0.2, "csrm.s2c_end_threshold": 0.9,
    "csrm.s2c_threshold": 0.4, "csrm.query_threshold": 0.35, "fsae.fae_threshold": 0.9, "fsae.sae_threshold": 0.7,
    "fsae.dilation_kernel": 5, "fsae.loss_weight": 0.5, "lnl.seed_threshold": 0.6, "lnl.bank_momentum": 0.8,
    "lnl.temperature": 0.3, "lnl.contrast_weight": 0.2, "ocr.ic_threshold": 0.3, "ocr.margin": 1.0,
    "ocr.rectification_weight": 0.5,
}


def method_with(section: str) -> str:
    """A method spec that has config section `section`."""
    if section in METHODS:
        return section
    base = next(name for name, cls in sorted(METHODS.items()) if ADDONS[section].needs_outputs <= cls.network_outputs
                and "target" not in cls.inputs)
    return f"{base}+{section}"


def with_old_keys(values: dict) -> dict:
    """`TrainConfig.to_dict()` as a config from before RENAMED_KEYS were renamed holds it."""
    values = copy.deepcopy(values)
    for old, new in RENAMED_KEYS.items():
        old_section, _, old_name = old.rpartition(".")
        new_section, _, new_name = new.rpartition(".")
        holder = values["sections"].get(new_section) if new_section else values
        if old_section in values["sections"] and holder is not None and new_name in holder:
            values["sections"][old_section][old_name] = holder.pop(new_name)
    return values


def test_every_renamed_key_has_a_test_value():
    assert set(RENAMED_VALUES) == set(RENAMED_KEYS.values())


@pytest.mark.parametrize("old, new", sorted(RENAMED_KEYS.items()))
def test_an_old_key_is_an_error_naming_its_new_key(old, new, tmp_path):
    section, _, name = old.rpartition(".")
    config = TrainConfig(method=method_with(section), data="x")
    message = f"config key '{old}' is now '{new}'"
    with pytest.raises(ConfigError, match=message):
        config.with_overrides({old: "1"})
    path = tmp_path / "run.toml"
    path.write_text(f'method = "{config.method}"\n[{section}]\n{name} = 1\n')
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


@pytest.mark.parametrize("method", ["lnl+fsae", "csrm+ocr"])
def test_a_config_stored_with_old_keys_loads_under_the_new_ones(method):
    sections = set(method.split("+"))
    config = TrainConfig(method=method, data="x").with_overrides(
        {key: value for key, value in RENAMED_VALUES.items() if key.partition(".")[0] in sections | {"init_from"}})
    old = with_old_keys(config.to_dict())
    assert old != config.to_dict()
    with pytest.raises(ConfigError, match="is now"):
        TrainConfig.from_dict(old)
    assert TrainConfig.from_dict(stored_config(old)) == config


def test_a_checkpoint_written_with_old_keys_loads(tmp_path):
    config = TrainConfig(method="lnl+fsae", data="x", backbone="resnet18").with_overrides(
        {"lnl.seed_threshold": 0.6, "fsae.dilation_kernel": 5})
    method = build_method(config.method, 3, config.sections, BackboneConfig("resnet18", 16, "none"))
    save_checkpoint(tmp_path, method, torch.optim.SGD(method.parameters(), lr=0.1), epoch=1, step=2,
                    config=with_old_keys(config.to_dict()), dataset={"classes": ["background", "a", "b", "c"]})
    loaded, _ = load_method(str(tmp_path))
    assert loaded.config.seed_threshold == 0.6 and loaded.addons[0].config.dilation_kernel == 5



# ---- paper presets (configs/) ------------------------------------------------------------

CONFIGS = ROOT / "configs"
PRESETS = sorted(CONFIGS.glob("*/*.toml"))


def load_preset(path: Path) -> TrainConfig:
    """A stage-2 preset (a deeplab method) as `wsss segment --config` reads it, any other as `wsss train --config`."""
    if "deeplab" in tomllib.loads(path.read_text()).get("method", ""):
        return stage2_config("data", "pseudo-labels", config_file=str(path))
    return load_config(str(path))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_preset_loads_and_cites_its_paper(path):
    config = load_preset(path)
    assert path.parent.name in config.method.split("+"), f"{path} is under configs/{path.parent.name}/"
    assert "Sec." in path.read_text(), f"{path} must cite the paper's section"


# Values stated in the papers (lnl Sec. IV-B-1, csrm Sec. 4, fsae Sec. 4.1.3, ocr Sec. 4.1).
PAPER_VALUES = {
    "lnl/voc.toml": {"backbone": "resnet50", "output_stride": 16, "crop_size": 512, "batch_size": 32, "epochs": 10,
                     "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "poly", "poly_power": 0.9,
                     "lnl.warmup_epochs": 2, "lnl.num_prototypes": 500, "lnl.seed_threshold": 0.8,
                     "lnl.bank_momentum": 0.9, "lnl.temperature": 0.5, "lnl.contrast_weight": 0.1},
    "lnl/coco.toml": {"batch_size": 8, "epochs": 10, "lr": 0.01, "lnl.warmup_epochs": 2},
    "csrm/voc.toml": {"epochs": 15, "batch_size": 32, "lr": 0.007, "csrm.decoder_lr_mult": 10.0, "poly_power": 1.0,
                      "weight_decay": 1e-4, "crop_size": 512, "csrm.s2c_ramp": "threshold",
                      "csrm.s2c_start_threshold": 0.1, "csrm.s2c_end_threshold": 1.0},
    "csrm/coco.toml": {"epochs": 15, "lr": 0.004, "csrm.decoder_lr_mult": 10.0, "poly_power": 1.0, "crop_size": 640},
    "fsae/voc.toml": {"method": "cam+fsae", "batch_size": 16, "lr": 0.05, "epochs": 10, "fsae.loss_weight": 1.0,
                      "fsae.fae_threshold": 0.95, "fsae.sae_threshold": 0.8, "fsae.dilation_kernel": 3},
    "ocr/voc.toml": {"method": "deeplab+ocr", "crop_size": 321, "batch_size": 16, "lr": 1e-3, "epochs": 30,
                     "weight_decay": 5e-4, "momentum": 0.9, "output_stride": 8, "scale_min": 0.7, "scale_max": 1.3,
                     "lr_schedule": "exponential", "ocr.ic_threshold": 0.2, "ocr.margin": 2.0,
                     "ocr.rectification_weight": 1.0},
}


@pytest.mark.parametrize("name", sorted(PAPER_VALUES))
def test_presets_hold_the_papers_values(name):
    config = load_preset(CONFIGS / name)
    for key, wanted in PAPER_VALUES[name].items():
        section, _, sub = key.rpartition(".")
        value = getattr(config.sections[section], sub) if section else getattr(config, key)
        assert value == wanted, f"{name}: {key} = {value!r}, the paper's is {wanted!r}"


def test_stage2_takes_the_method_of_its_config_file_and_refuses_a_stage1_one(tmp_path):
    assert stage2_config("d", "p", config_file=str(CONFIGS / "ocr/voc.toml")).method == "deeplab+ocr"
    file = tmp_path / "run.toml"
    file.write_text('method = "deeplab"\n')
    assert stage2_config("d", "p", ocr=True, config_file=str(file)).method == "deeplab+ocr"
    file.write_text('method = "lnl"\n')
    with pytest.raises(ConfigError, match="method='lnl': `wsss segment` trains deeplab or deeplab\\+ocr"):
        stage2_config("d", "p", config_file=str(file))


# ---- the lr schedules ----------------------------------------------------------------------

def two_group_optimizer() -> torch.optim.SGD:
    backbone, head = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [backbone], "lr_mult": 1.0}, {"params": [head], "lr_mult": 10.0}], lr=1.0)


def test_poly_schedule_against_a_hand_computation():
    config = TrainConfig(lr=0.01, epochs=4, poly_power=0.9)
    optimizer = two_group_optimizer()
    # step 25 of 100: 0.01 · (1 − 0.25)^0.9 = 0.01 · 0.771890 = 0.00771890
    assert set_lr(optimizer, config, 25, 100) == pytest.approx(0.00771890, rel=1e-5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.00771890, 0.0771890], rel=1e-5)
    linear = TrainConfig(lr=0.007, epochs=15, poly_power=1.0)  # csrm's linear decay
    assert set_lr(optimizer, linear, 30, 40) == pytest.approx(0.007 * 0.25)
    assert set_lr(optimizer, config, 100, 100) == 0.0


def test_exponential_schedule_against_a_hand_computation():
    config = TrainConfig(lr=1e-3, epochs=30, lr_schedule="exponential", lr_decay_per_epoch=0.9)
    optimizer = two_group_optimizer()
    total = 10 * 30  # 10 steps per epoch
    assert set_lr(optimizer, config, 0, total) == pytest.approx(1e-3)
    # after 15 epochs: 1e-3 · 0.9^15 = 1e-3 · 0.205891 = 2.05891e-4
    assert set_lr(optimizer, config, 150, total) == pytest.approx(2.05891e-4, rel=1e-5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.05891e-4, 2.05891e-3], rel=1e-5)
    # halfway through epoch 1 (step 5): 0.9^0.5 = 0.948683
    assert set_lr(optimizer, config, 5, total) == pytest.approx(9.48683e-4, rel=1e-5)
    # the end of training: 0.9^30 = 0.0423912
    assert set_lr(optimizer, config, total, total) == pytest.approx(4.23912e-5, rel=1e-5)


@pytest.mark.parametrize("items, message", [
    (["lr_schedule=cosine"], "lr_schedule='cosine': must be one of poly, exponential"),
    (["lr_decay_per_epoch=0"], "lr_decay_per_epoch=0.0: must be in"),
    (["lr_decay_per_epoch=1.5"], "lr_decay_per_epoch=1.5: must be in"),
])
def test_bad_lr_schedules_are_named(items, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, items)
