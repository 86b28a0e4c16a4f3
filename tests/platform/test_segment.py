"""Stage 2: config precedence, multi-scale segmentation probabilities against a loop, and
`wsss segment` end to end on a real local Ray (train, resume by name, evaluate with the
out-of-candidate rate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wsss.cli import build_parser
from wsss.datasets.reading import read_shard
from wsss.datasets.shards import read_manifest
from wsss.methods.base import BackboneConfig, build_method
from wsss.methods.deeplab import DeepLabConfig
from wsss.platform.config import ConfigError
from wsss.platform.segmentation import (
    STAGE2_DEFAULTS,
    evaluate_segmentation,
    main,
    segmentation_probs,
    segmentation_table,
    stage2_config,
)


def test_stage2_defaults_sit_below_the_config_file_and_overrides(tmp_path):
    config = stage2_config("data", "labels")
    assert config.method == "deeplab" and config.pseudo_labels == "labels"
    assert (config.lr, config.weight_decay, config.epochs) == tuple(STAGE2_DEFAULTS[k] for k in
                                                                    ("lr", "weight_decay", "epochs"))
    assert (config.backbone, config.output_stride) == ("resnet101", 8), "the papers' DeepLabV2"
    assert stage2_config("data", "labels", variant="v3plus").output_stride == 16
    file = tmp_path / "run.toml"
    file.write_text('lr = 0.0005\nbatch_size = 4\n[deeplab]\nvariant = "v3plus"\n[ocr]\nrectification_weight = 0.5\n')
    config = stage2_config("data", "labels", ocr=True, config_file=str(file), overrides=["epochs=3"])
    assert config.method == "deeplab+ocr" and config.lr == 0.0005 and config.batch_size == 4 and config.epochs == 3
    assert config.weight_decay == STAGE2_DEFAULTS["weight_decay"]
    assert config.sections["deeplab"].variant == "v3plus" and config.sections["ocr"].rectification_weight == 0.5
    config = stage2_config("data", "labels", variant="v3plus", overrides=["lr=0.002", "deeplab.variant=v2"])
    assert config.lr == 0.002 and config.sections["deeplab"].variant == "v2"  # overrides win over flags
    with pytest.raises(ConfigError, match="pseudo_labels=URI"):
        stage2_config("data", None)
    with pytest.raises(ConfigError, match="unknown config key 'deeplab.varient'"):
        stage2_config("data", "labels", overrides=["deeplab.varient=v2"])


def test_segmentation_probs_average_the_softmax_over_scales_and_flips():
    torch.manual_seed(0)
    method = build_method("deeplab", 3, {"deeplab": DeepLabConfig("v2")},
                          backbone=BackboneConfig("resnet18", 16, "none")).eval()
    image = torch.randn(1, 3, 36, 44)
    scales = (0.5, 1.0, 1.5)
    probs = segmentation_probs(method, image, scales=scales, flip=True)
    expected = torch.zeros(4, 36, 44)
    with torch.no_grad():
        for scale in scales:  # reference: one forward per (scale, flip), written out
            for flipped in (False, True):
                x = F.interpolate(image, size=(round(36 * scale), round(44 * scale)), mode="bilinear",
                                  align_corners=False) if scale != 1.0 else image
                x = x.flip(-1) if flipped else x
                logits = F.interpolate(method.network(x)["seg_logits"], size=(36, 44), mode="bilinear",
                                       align_corners=False)
                p = logits.softmax(dim=1)[0]
                expected += (p.flip(-1) if flipped else p) / (len(scales) * 2)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(0), torch.ones(36, 44))


def test_a_method_without_segmentation_branch_is_refused_by_name():
    method = build_method("cam", 3, backbone=BackboneConfig("resnet18", 16, "none")).eval()
    with pytest.raises(ValueError, match="'cam' has no segmentation branch"):
        segmentation_probs(method, torch.zeros(1, 3, 32, 32))


def test_table_lists_headline_numbers_and_classes():
    scores = {"miou": 0.5, "per_class_iou": [0.9, None, 0.1], "fg_fpr": 0.1, "fg_fnr": 0.2,
              "oc_image_rate": 0.25, "oc_pixel_rate": 0.01}
    results = {"method": "deeplab+ocr", "split": "val", "data": "d", "images": 4, "scales": [1.0], "flip": True,
               "classes": ["background", "a", "b"], **scores, "crf": {"preset": "psa", **scores}}
    table = segmentation_table(results)
    assert "| prediction | **50.00** | 0.100 | 0.200 | 25.0% | 1.00% |" in table
    assert "| a | — | — |" in table and "| prediction + CRF |" in table


# ---- end to end on Ray -------------------------------------------------------------------

@pytest.fixture(scope="module")
def pseudo_labels(shards, tmp_path_factory):
    """Label shards of the ground-truth masks (stage 2 does not care where labels come
    from; `test_pseudo_labels.py` covers the CAM job)."""
    from wsss.platform.pseudo_labels import ground_truth_labels

    out = str(tmp_path_factory.mktemp("labels") / "gt")
    ground_truth_labels(shards, out)
    return out


def tiny_overrides(tmp_path, name):
    return [f"name={name}", f"storage_path={tmp_path / 'runs'}", "batch_size=8", "crop_size=64",
            "backbone=resnet18", "output_stride=16", "backbone_weights=none", "eval_max_images=4",
            "wandb=disabled", "log_every=1"]


def run_segment(argv):
    return main(build_parser().parse_args(["segment", *argv]))


@pytest.mark.slow
def test_deeplab_trains_on_pseudo_labels_and_evaluates_with_crf_and_oc_rate(ray_local, shards, pseudo_labels,
                                                                            tmp_path):
    from wsss.platform.train import fit

    config = stage2_config(shards, pseudo_labels, overrides=tiny_overrides(tmp_path, "deeplab") + ["epochs=1"])
    result = fit(config)
    assert result.metrics["epoch"] == 1 and result.metrics["loss/seg"] > 0
    assert result.metrics["miou"] == result.metrics["seg_miou"] and "threshold" not in result.metrics
    results = evaluate_segmentation(result.checkpoint.path, shards, scales=(0.5, 1.0, 1.5), crf=True, max_images=6,
                                    out=str(tmp_path / "eval"))
    assert results["images"] == 6 and results["method"] == "deeplab"
    for scores in (results, results["crf"]):
        assert 0 <= scores["miou"] <= 1 and 0 <= scores["oc_image_rate"] <= 1 and 0 <= scores["oc_pixel_rate"] <= 1
        assert len(scores["per_class_iou"]) == 6
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["crf"]["preset"] == "psa"


@pytest.mark.slow
def test_segment_command_with_ocr_resumes_by_name_and_writes_results(ray_local, shards, pseudo_labels, tmp_path,
                                                                      capsys):
    from wsss.platform.checkpoints import latest_checkpoint
    from wsss.platform.train import fit

    overrides = tiny_overrides(tmp_path, "ocr")
    fit(stage2_config(shards, pseudo_labels, ocr=True, variant="v3plus", overrides=overrides + ["epochs=1"]))
    argv = ["--data", shards, "--pseudo-labels", pseudo_labels, "--ocr", "--variant", "v3plus",
            "--scales", "0.5,1.0", "--max-images", "4", "--out", str(tmp_path / "eval"), *overrides, "epochs=2"]
    assert run_segment(argv) == 0  # same name: continues from epoch 1, then evaluates
    info = json.loads((Path(latest_checkpoint(str(tmp_path / "runs" / "ocr"))) / "checkpoint.json").read_text())
    assert info["epoch"] == 2 and info["method"] == "deeplab+ocr"
    assert info["metrics"]["resumed_from_epoch"] == 1 and "loss/ocr" in info["metrics"]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["method"] == "deeplab+ocr" and results["epoch"] == 2 and results["images"] == 4
    assert {"oc_image_rate", "oc_pixel_rate", "fg_fpr", "fg_fnr", "cooccurrence_confusion"} <= set(results)
    assert "OC images" in capsys.readouterr().out


def test_segment_refuses_pseudo_labels_of_another_split_before_training(shards, tmp_path):
    from wsss.io import DataError
    from wsss.platform.label_shards import LabelShardWriter

    images = read_manifest(shards)
    out = str(tmp_path / "labels")
    with LabelShardWriter(out, images, "val") as writer:
        for index, uri in enumerate(images.files("val")):
            table = read_shard(uri, ["id", "mask"])
            writer.write(index, table.column("id").to_pylist(), table.column("mask").to_pylist())
        writer.publish({})
    with pytest.raises(DataError, match=f"{out}/manifest.json: unknown split: 'train'"):
        run_segment(["--data", shards, "--pseudo-labels", out, *tiny_overrides(tmp_path, "bad")])
