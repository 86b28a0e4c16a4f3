"""Pictures: overlays composed from the data, on a real training run's W&B offline run,
`wsss evaluate --show-dir`, `wsss pseudo-labels --show-dir` and `wsss report`'s plots."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import wandb_records
from wsss.platform.pictures import (
    IGNORE_COLOUR,
    cam_panel,
    colorize,
    jet,
    label_overlay,
    picture_name,
    prediction_panel,
    save_png,
)

PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
CLASSES = ["background", "boat", "horse"]


def image_and_labels():
    image = np.full((32, 48, 3), 200, np.uint8)
    labels = np.zeros((32, 48), np.uint8)
    labels[4:12, 4:20] = 1
    labels[20:30, 10:40] = 2
    labels[0, :] = 255
    return image, labels


def test_label_maps_take_the_dataset_palette_and_ignored_pixels_are_white():
    _, labels = image_and_labels()
    colours = colorize(labels, PALETTE)
    assert tuple(colours[5, 5]) == PALETTE[1] and tuple(colours[25, 20]) == PALETTE[2]
    assert tuple(colours[0, 0]) == IGNORE_COLOUR and tuple(colours[15, 45]) == PALETTE[0]


def test_an_overlay_shows_the_class_colour_over_the_image_not_a_near_black_mask():
    image, labels = image_and_labels()
    overlay = label_overlay(image, labels, PALETTE)
    red, green = overlay[5, 5].astype(int), overlay[25, 20].astype(int)
    assert red[0] > red[1] + 50 and green[1] > green[0] + 50  # the class shows in its colour
    assert overlay.mean() > 60  # the image shows through: not a mask of class ids


def test_heatmap_runs_from_blue_to_red():
    colours = jet(np.array([[0.0, 0.5, 1.0]]))[0].astype(int)
    assert colours[0][2] > colours[0][0] and colours[2][0] > colours[2][2]  # low blue, high red
    assert colours[1][1] == 255  # the middle is green


def test_cam_panel_has_a_tile_for_each_class_present_and_a_legend():
    image, labels = image_and_labels()
    cams = np.stack([(labels == 1).astype(np.float32), (labels == 2).astype(np.float32)])
    one = cam_panel(image, cams, np.array([1.0, 0.0]), labels, labels, CLASSES, PALETTE, title="x")
    both = cam_panel(image, cams, np.array([1.0, 1.0]), labels, labels, CLASSES, PALETTE, title="x")
    tile = one.height  # tiles are scaled to at least 192 px high, widths in proportion
    assert one.width < both.width and (both.width - one.width) > 192 * 48 / 32 - 1
    assert one.height == both.height == tile
    without_truth = prediction_panel(image, labels, None, CLASSES, PALETTE)
    assert without_truth.width < prediction_panel(image, labels, labels, CLASSES, PALETTE).width


def test_pictures_are_written_whole_and_named_by_the_image(tmp_path):
    assert picture_name("2008_000123") == "2008_000123"
    assert picture_name("frankfurt/frankfurt_000000_000294") == "frankfurt_frankfurt_000000_000294"
    image, labels = image_and_labels()
    path = save_png(prediction_panel(image, labels, labels, CLASSES, PALETTE), tmp_path / "a" / "x.png")
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left beside it
    assert Image.open(path).format == "PNG"


def test_report_without_plotly_says_how_to_get_the_html(tmp_path, monkeypatch):
    from wsss.tuning.report import PLOTLY_MISSING, write_study_html

    monkeypatch.setitem(sys.modules, "plotly", None)  # what `import plotly` meets where it is not installed
    monkeypatch.setitem(sys.modules, "plotly.offline", None)
    assert write_study_html({"sweep": []}, tmp_path, tmp_path / "scratch") == ([], [PLOTLY_MISSING])
    assert "pip install 'wsss[plots]'" in PLOTLY_MISSING


# ---- a real run on a real local Ray ------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(ray_local, shards, tmp_path_factory) -> Path:
    """cam, 2 epochs, W&B offline beside the checkpoints, checkpoints logged as artifacts."""
    from wsss.platform.config import TrainConfig
    from wsss.platform.train import fit

    storage = tmp_path_factory.mktemp("runs")
    fit(TrainConfig(method="cam", data=shards, name="run", storage_path=str(storage), epochs=2, batch_size=8,
                    crop_size=64, backbone="resnet18", backbone_weights="none", lr=0.02, eval_max_images=4,
                    cam_images=2, wandb="offline", wandb_checkpoints=True, log_every=1))
    return storage / "run"


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*"))


def run_id(offline_run: Path) -> str:
    return offline_run.name.split("-", 3)[-1]  # offline-run-<date>_<time>-<id>


def tile_row_width(tiles: int) -> int:
    """Width of a panel of the 64 px synthetic images: tiles scaled to 192 px, 4 px apart."""
    return tiles * 192 + (tiles - 1) * 4


@pytest.mark.slow
def test_a_run_logs_composed_overlays_and_its_checkpoints_to_wandb(trained_run):
    training = offline_runs(trained_run)[0]
    overlays = sorted((training / "files" / "media" / "images").glob("cam_overlays_*.png"))
    assert len(overlays) == 2 * 2  # cam_images per evaluation, two epochs
    picture = np.asarray(Image.open(overlays[0]).convert("RGB"))
    assert picture.shape[1] > 3 * picture.shape[0] / 2  # image | ground truth | CAM(s) | prediction
    assert picture.mean() > 60  # a picture, not a mask of class ids
    logged = wandb_records.artifacts(training)
    assert [a.type for a in logged] == ["model", "model"]  # one per epoch
    assert {json.loads(a.metadata)["epoch"] for a in logged} == {1, 2}
    epochs = [json.loads(line) for line in (trained_run / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("loss" in e and "miou" in e for e in epochs)


@pytest.mark.slow
def test_report_of_a_real_run_shows_its_overlays_and_curves(trained_run, tmp_path):
    from wsss.tuning.report import collect, make_report, overlay_images

    result = make_report([str(trained_run)], str(tmp_path / "report"))
    sheet = tmp_path / "report" / "overlays" / "cam-synthetic.png"
    curves = tmp_path / "report" / "curves" / "run.png"
    assert {str(sheet), str(curves)} <= set(result["plots"])
    (record,), _ = collect([str(trained_run)])
    shown = overlay_images(record)
    assert [p.name.split("_")[2] for p in shown] == [shown[0].name.split("_")[2]] * 2  # the last step's two
    last_step = max(int(p.name.split("_")[2]) for p in trained_run.rglob("cam_overlays_*.png"))
    assert int(shown[0].name.split("_")[2]) == last_step
    sheet_pixels = np.asarray(Image.open(sheet).convert("RGB"))
    assert sheet_pixels.shape[0] > 2 * 192 and sheet_pixels.mean() > 60
    assert Image.open(curves).size[1] > 2 * 260  # loss and mIoU panels (cam notes no label shares)
    assert [m["epoch"] for m in record.history] == [1, 2]


@pytest.mark.slow
def test_evaluate_shows_cams_and_goes_into_the_run_s_wandb_summary(trained_run, shards, tmp_path, capsys):
    from wsss.cli import main
    from wsss.datasets.reading import eval_rows

    show = tmp_path / "show"
    assert main(["evaluate", "--checkpoint", str(trained_run), "--data", shards, "--scales", "1.0",
                 "--max-images", "4", "--out", str(tmp_path / "eval"), "--show-dir", str(show),
                 "--show-images", "3"]) == 0
    assert "3 pictures" in capsys.readouterr().out
    rows = list(itertools.islice(eval_rows(shards, "val"), 3))
    assert sorted(p.name for p in show.iterdir()) == sorted(f"{row['id']}.png" for row in rows)
    for row in rows:
        tiles = 3 + int(row["labels"].sum())  # image | ground truth | a CAM per class | prediction
        assert Image.open(show / f"{row['id']}.png").width == tile_row_width(tiles)

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    training, evaluated = offline_runs(trained_run)  # the training run's id, resumed offline
    assert run_id(evaluated) == run_id(training)
    summary = wandb_records.summary(evaluated)
    assert summary["evaluation/miou"] == pytest.approx(results["miou"])
    assert summary["evaluation/threshold"] == results["threshold"]
    assert summary["evaluation/per_class_iou"]["_type"] == "table-file"
    (table,) = (evaluated / "files" / "media" / "table" / "evaluation").glob("per_class_iou_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["class", "IoU", "IoU + CRF"]
    assert [row[0] for row in table["data"]] == results["classes"]
    assert [row[1] for row in table["data"]] == results["per_class_iou"]


def test_pseudo_labels_show_dir_shows_image_truth_and_label(shards, tmp_path, capsys):
    from wsss.cli import main
    from wsss.datasets.reading import eval_rows

    show = tmp_path / "show"
    assert main(["pseudo-labels", "--mode", "ground-truth", "--data", shards, "--split", "val",
                 "--out", str(tmp_path / "labels"), "--show-dir", str(show), "--show-images", "2"]) == 0
    assert "2 pictures" in capsys.readouterr().out
    first = [row["id"] for row in itertools.islice(eval_rows(shards, "val"), 2)]
    assert sorted(p.name for p in show.iterdir()) == sorted(f"{sample_id}.png" for sample_id in first)
    for sample_id in first:  # image | ground truth | pseudo-label
        assert Image.open(show / f"{sample_id}.png").width == tile_row_width(3)
