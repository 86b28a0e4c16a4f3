"""Every registered method and composition, through the one contract, with no method-specific glue:
builds, trains steps in the plain loop, checkpoints, resumes bit-exactly, exports CAMs."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers.contract import (
    SIZE,
    TINY,
    K,
    check_bfloat16_epoch,
    check_exports_nonnegative_cams_of_every_class,
    check_trains_checkpoints_and_resumes_exactly,
    compositions,
    fake_batch,
    make,
    pipeline_batch,
    stats,
)
from wsss.methods.base import METHODS, BackboneConfig, build_method, split_views
from wsss.platform.checkpoints import save_checkpoint, start_fresh
from wsss.platform.config import ConfigError, TrainConfig


@pytest.mark.parametrize("spec", compositions())
def test_method_trains_checkpoints_and_resumes_exactly(spec, tmp_path):
    check_trains_checkpoints_and_resumes_exactly(spec, tmp_path)


@pytest.mark.parametrize("spec", compositions())
def test_method_exports_nonnegative_cams_of_every_class(spec):
    check_exports_nonnegative_cams_of_every_class(spec)


@pytest.mark.parametrize("spec", compositions())
def test_method_state_dict_holds_all_state_without_the_ddp_wrapper(spec):
    method, _, _ = make(spec)
    keys = set(method.state_dict())
    method.distribute(lambda net: copy.deepcopy(net))  # any wrapper: keys must not change
    assert set(method.state_dict()) == keys
    assert all(not key.startswith("_distributed") for key in keys)


def test_outputs_split_back_by_view_and_first_view_only_outputs_go_to_it():
    views = {"image": torch.zeros(2, 3, 4, 4), "mixed": torch.zeros(3, 3, 4, 4)}
    out = {"cam_logits": torch.arange(5.0), "representation": torch.arange(2.0)}
    split = split_views(out, views)
    assert split["image"]["cam_logits"].tolist() == [0, 1] and split["mixed"]["cam_logits"].tolist() == [2, 3, 4]
    assert split["image"]["representation"].tolist() == [0, 1] and "representation" not in split["mixed"]
    with pytest.raises(ValueError, match="'representation' has 4 rows"):
        split_views({"representation": torch.arange(4.0)}, views)


def test_unknown_parts_are_named():
    with pytest.raises(ValueError, match="unknown base method 'nope'"):
        build_method("nope", K)
    with pytest.raises(ValueError, match="unknown add-on 'nope'"):
        build_method("cam+nope", K)


def test_a_checkpoint_loads_with_other_inference_settings(tmp_path):
    """`wsss evaluate --set lnl.export=shrink`: same weights, another exported map;
    anything that is not a setting of the checkpoint's own method is refused by name."""
    from wsss.platform.checkpoints import load_method
    from wsss.platform.config import ConfigError

    method, optimizer, config = make("lnl+fsae")
    save_checkpoint(tmp_path, method, optimizer, epoch=1, step=2, config=config.to_dict(),
                    dataset={"classes": ["background", "a", "b", "c"]})
    images = torch.randn(1, 3, SIZE, SIZE)
    maps = {}
    for export in ("shrink", "expand", "fusion"):
        loaded, _ = load_method(str(tmp_path), method_overrides={"lnl.export": export})
        assert loaded.config.export == export
        with torch.no_grad():
            maps[export] = loaded.cam_maps(images)
    from wsss.methods.lnl import max_normalised
    want = (max_normalised(maps["shrink"]) + max_normalised(maps["expand"])) / 2
    assert torch.allclose(maps["fusion"], want, atol=1e-5)
    assert not torch.allclose(maps["shrink"], maps["expand"])
    for key, named in (("epochs", "epochs"), ("csrm.tau", "csrm.tau"), ("lnl.export", "export")):
        with pytest.raises(ConfigError, match=named):
            load_method(str(tmp_path), method_overrides={key: "bogus"})


def test_the_loop_logs_and_averages_the_parts_diagnostics():
    from wsss.platform.loop import train_epoch

    method, optimizer, config = make("lnl+fsae")
    generator = torch.Generator().manual_seed(0)
    batches = [pipeline_batch(fake_batch("lnl+fsae", generator)) for _ in range(2)]
    logged = []
    config = config.with_overrides({"log_every": 1})
    _, stats = train_epoch(method, optimizer, batches, config=config, epoch=0, step=0, steps_per_epoch=2,
                           device=torch.device("cpu"), log=lambda values, step: logged.append(values))
    expected = {"lnl/seeds", "lnl/seeds_fg", "lnl/anchors", "fsae/labelled", "fsae/labelled_fg"}
    assert expected <= set(stats.summary())
    assert len(logged) == 2 and all(f"train/{key}" in values for values in logged for key in expected)
    assert "loss/fsae/labelled" not in stats.summary() and stats.summary()["loss"] == pytest.approx(
        sum(v for k, v in stats.summary().items() if k.startswith("loss/")))


@pytest.mark.parametrize("spec", compositions())
def test_method_trains_in_the_loops_bfloat16_autocast(spec):
    """The AMP path GPU workers take (`amp`), run here through `cpu_amp`."""
    method, optimizer, config = make(spec)
    check_bfloat16_epoch(method, optimizer, config.with_overrides({"cpu_amp": True}), spec, torch.device("cpu"))


def test_a_run_continues_only_with_the_model_it_was_trained_with(tmp_path):
    import json

    from wsss.platform.checkpoints import INFO_FILE, check_resumable
    from wsss.platform.config import ConfigError

    method, optimizer, config = make("cam")
    run = tmp_path / "run"
    assert not check_resumable(str(run), config.to_dict())  # nothing trained yet: a new run
    for name in ("checkpoint_2026-01-01_00-00-01", "checkpoint_2026-01-01_00-00-02"):
        (run / name).mkdir(parents=True)
        save_checkpoint(run / name, method, optimizer, epoch=1, step=2, config=config.to_dict(), dataset={})
    (run / "checkpoint_2026-01-01_00-00-03").mkdir()  # an upload cut short: no checkpoint.json
    assert check_resumable(str(run), config.with_overrides({"epochs": "9", "lr": "0.5"}).to_dict())
    assert check_resumable(f"file://{run}", config.to_dict())
    for key, value in (("output_stride", "8"), ("backbone", "resnet50"), ("method", "lnl")):
        recorded = config.to_dict()[key]
        with pytest.raises(ConfigError, match=f"{key}='?{value}'?: run .* was trained with {key}='?{recorded}'?"):
            check_resumable(str(run), config.with_overrides({key: value}).to_dict())

    newest = run / "checkpoint_2026-01-01_00-00-02" / INFO_FILE
    info = json.loads(newest.read_text())
    del info["output_stride"], info["backbone"]  # written before they were recorded
    newest.write_text(json.dumps(info))
    check_resumable(str(run), config.with_overrides({"output_stride": "8"}).to_dict())


@pytest.mark.parametrize("spec", sorted(METHODS))
def test_backbone_weights_are_loaded_when_a_run_starts_fresh_only(spec, tmp_path):
    """Not at construction: a resumed run, or a checkpoint loaded for inference, must not
    need (or download) the weights its run started from."""
    import torchvision

    torch.manual_seed(123)
    reference = torchvision.models.resnet18().state_dict()  # torchvision's layout, as users save it
    torch.save(reference, tmp_path / "resnet18.pth")
    method = build_method(spec, K, backbone=BackboneConfig("resnet18", 16, str(tmp_path / "resnet18.pth")))
    backbone = method.network.backbone
    assert not torch.equal(backbone.stem[0].weight, reference["conv1.weight"]), "loaded at construction"
    method.on_fresh_start()
    trunk = {"stem.0.weight": "conv1.weight", "stem.1.running_var": "bn1.running_var",
             "layer1.0.conv1.weight": "layer1.0.conv1.weight", "layer4.1.bn2.bias": "layer4.1.bn2.bias"}
    for ours, theirs in trunk.items():
        assert torch.equal(backbone.state_dict()[ours], reference[theirs]), ours
    assert len(backbone.state_dict()) == len(reference) - 2, "every tensor but fc's"
    if hasattr(method, "teacher"):  # csrm's EMA teacher starts as a copy of the started student
        for name, value in method.network.state_dict().items():
            assert torch.equal(method.teacher.state_dict()[name], value), name


def test_bad_backbone_weights_are_named(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    torch.save(build_method("cam", K, backbone=TINY).state_dict(), tmp_path / "wsss-cam.pth")
    for weights, error in ((tmp_path / "gone.pth", "backbone_weights='.*gone.pth': not 'none', 'imagenet' or an "
                                                   "existing file"),
                           (tmp_path / "resnet50.pth", "backbone_weights='.*resnet50.pth': does not fit resnet18"),
                           (tmp_path / "wsss-cam.pth", "backbone_weights='.*wsss-cam.pth': not resnet18 weights in "
                                                       "torchvision's layout")):
        method = build_method("cam", K, backbone=BackboneConfig("resnet18", 16, str(weights)))
        with pytest.raises((FileNotFoundError, ValueError), match=error):
            method.on_fresh_start()


@pytest.mark.parametrize("spec", compositions())
def test_init_from_a_cam_run_loads_matching_network_weights_and_leaves_the_rest_fresh(spec, tmp_path):
    """Any method starts from a stage-1 `cam` run: backbone and classifier (where it has
    them) come from the run, new heads and method state (banks, teachers) start as built."""
    torch.manual_seed(7)
    cam = build_method("cam", K, backbone=TINY)
    run = tmp_path / "cam-run" / "checkpoint_000002"
    run.mkdir(parents=True)
    torch.save({"method": cam.state_dict()}, run / "state.pt")
    (run / "checkpoint.json").write_text("{}")  # written last: the checkpoint is complete
    start = BackboneConfig("resnet18", 16, "/never/read.pth", init_from=str(tmp_path / "cam-run"))
    method = build_method(spec, K, TrainConfig(method=spec, data="unused", pseudo_labels="unused").sections, start)
    method.on_dataset(stats())
    built = copy.deepcopy(method.state_dict())
    report = start_fresh(method, start.init_from)
    shared = {name for name, value in cam.network.state_dict().items()
              if name in method.network.state_dict() and method.network.state_dict()[name].shape == value.shape}
    assert set(report["loaded"]) == shared and any(name.startswith("backbone.") for name in shared)
    for name in shared:
        assert torch.equal(method.network.state_dict()[name], cam.network.state_dict()[name]), name
    for name in report["fresh"]:
        assert torch.equal(method.network.state_dict()[name], built[f"network.{name}"]), name
    for name, value in method.state_dict().items():
        if not name.startswith(("network.", "teacher.")):
            assert torch.equal(value, built[name]), f"method state {name} is not the start's"


def test_init_from_a_checkpoint_of_another_network_is_an_error(tmp_path):
    other = build_method("cam", K, backbone=BackboneConfig("resnet50", 16, "none"))
    torch.save({"method": {f"network.{k}.x": v for k, v in other.network.state_dict().items()}},
               tmp_path / "state.pt")
    method = build_method("cam", K, backbone=BackboneConfig("resnet18", 16, "none", init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match="init_from=.*no network weight of .* matches"):
        start_fresh(method, str(tmp_path))
