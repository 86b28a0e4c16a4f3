"""Config: defaults, files, overrides; unknown keys and bad values are named before Ray starts."""

import os

import pytest

from wsss.platform.config import ConfigError, TrainConfig, load_config


def test_overrides_parse_types_and_method_sections(tmp_path):
    config = load_config(None, ["epochs=3", "lr=0.5", "amp=false", "fsae.kernel=5"], method="cam+fsae")
    assert (config.epochs, config.lr, config.amp) == (3, 0.5, False)
    assert config.sections["fsae"].kernel == 5


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "cam+fsae"\nepochs = 7\n[fsae]\nkernel = 7\n')
    config = load_config(str(path), ["epochs=2"])
    assert config.epochs == 2 and config.sections["fsae"].kernel == 7


def test_round_trip_through_dict():
    config = load_config(None, ["fsae.kernel=1"], method="cam+fsae")
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("items, message", [
    (["epoch=3"], "unknown config key 'epoch'"),
    (["epochs=three"], "epochs='three': expected an integer"),
    (["epochs=0"], "epochs=0: must be >= 1"),
    (["lr=fast"], "lr='fast': expected a number"),
    (["amp=maybe"], "amp='maybe': expected true or false"),
    (["fsae.nope=1"], "unknown config key 'fsae.nope'"),
    (["lnl.eta=0.5"], r"\[lnl\] is not a part of method 'cam\+fsae'"),
    (["fsae.kernel=4"], "4"),
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

    subnormal = torch.tensor([1e-39])
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


def test_a_renamed_key_names_its_new_name():
    with pytest.raises(ConfigError, match="'csrm.init_checkpoint' is now 'init_from'"):
        TrainConfig(method="csrm", data="x").with_overrides({"csrm.init_checkpoint": "runs/cam"})

