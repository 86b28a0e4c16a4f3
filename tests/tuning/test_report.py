"""`wsss report` (`wsss/tuning/report.py`): tables, plots and curves from a real sweep and from
run directories, the W&B Report page, errors naming the directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.runs import write_run
from wsss.platform.config import ConfigError


@pytest.mark.slow
def test_report_of_a_real_sweep(tiny_sweep, tmp_path):
    from PIL import Image

    from wsss.tuning.report import make_report

    summary, sweep_dir = tiny_sweep
    result = make_report([str(sweep_dir)], str(tmp_path / "report"))
    table = (tmp_path / "report" / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| cam+fsae"))
    assert f"{100 * summary['miou']:.2f}" in row and f"{100 * summary['evaluation']['miou']:.2f}" in row
    assert "| 1 |" in row  # one seed
    trials = {json.loads(p.read_text().splitlines()[-1])["trial_id"] for p in sweep_dir.glob("trial_*/result.json")}
    expected = {"tiny-history.png"} | {f"tiny-{name}.png" for name in summary["params"]}
    curves = {f"tiny-{trial}.png" for trial in trials}
    assert {Path(p).name for p in result["plots"]} == expected | curves | {"cam-fsae-synthetic.png"}
    for plot in result["plots"]:
        if Path(plot).name in expected:
            assert Image.open(plot).size == (640, 420)
    curve = Image.open(tmp_path / "report" / "curves" / f"tiny-{summary['trial_id']}.png")
    epochs = [json.loads(line) for path in sweep_dir.glob("trial_*/result.json")
              for line in path.read_text().splitlines() if json.loads(line)["trial_id"] == summary["trial_id"]]
    noted = any(key.startswith("fsae/") for epoch in epochs for key in epoch)  # not while fsae warms up
    assert curve.height == 30 + (3 if noted else 2) * 260  # loss, mIoU and fsae's label shares
    html = (tmp_path / "report" / "table.html").read_text()
    assert "<td>cam+fsae</td>" in html
    records = (tmp_path / "report" / "records.csv").read_text().splitlines()
    assert len(records) == 3  # header + two trials


@pytest.mark.slow
def test_report_of_a_real_sweep_writes_its_optuna_plots_as_html(tiny_sweep, tmp_path):
    pytest.importorskip("plotly")
    from wsss.tuning.report import STUDY_PLOTS, make_report

    _, sweep_dir = tiny_sweep
    result = make_report([str(sweep_dir)], str(tmp_path / "report"))
    plots = tmp_path / "report" / "plots"
    written = {Path(p).name for p in result["html"]}
    assert {"tiny-history.html", "tiny-slices.html"} <= written, result["notes"]
    for kind in STUDY_PLOTS:  # each written, or left out with the reason named
        assert f"tiny-{kind}.html" in written or any(note.startswith(f"tiny-{kind}:") for note in result["notes"])
    for page in written:
        assert 'src="plotly.min.js"' in (plots / page).read_text()  # one shared copy, opens offline
    assert (plots / "plotly.min.js").stat().st_size > 1_000_000


def test_report_table_over_seeds_from_run_directories(tmp_path):
    from wsss.tuning.report import make_report

    runs = tmp_path / "runs"
    write_run(runs, "cam-s0", [0.20, 0.30], seed=0, lr=0.02, full=0.36)
    write_run(runs, "cam-s1", [0.25, 0.34], seed=1, lr=0.02, full=0.38)  # the best seed
    write_run(runs, "cam-other", [0.31], seed=0, lr=0.05)  # one seed of a worse configuration
    write_run(runs, "fsae-s0", [0.40], method="cam+fsae", seed=0, **{"sections": {}})
    result = make_report([str(runs)], str(tmp_path / "out"))
    assert result["rows"] == 2 and result["records"] == 4
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    cam = next(line for line in table if line.startswith("| cam |"))
    # best configuration (lr 0.02, mean 0.32 over 2 seeds) beats the single 0.31 run
    assert "| 32.00 ± 2.83 | 2 | 37.00 |" in cam and "lr=0.02" in cam
    fsae = next(line for line in table if line.startswith("| cam+fsae |"))
    assert "| 40.00 | 1 | — |" in fsae and "fsae.dilation_kernel=3" in fsae
    rows = (tmp_path / "out" / "table.csv").read_text().splitlines()
    assert rows[0].startswith("method,dataset,miou_mean,miou_std,seeds") and len(rows) == 3
    curves = sorted(p.name for p in (tmp_path / "out" / "curves").glob("*.png"))
    assert curves == ["cam-other.png", "cam-s0.png", "cam-s1.png", "fsae-s0.png"]  # every record's
    assert "W&B is offline" in result["wandb"]


def test_wandb_report_page_shows_the_same_table(tmp_path):
    """The W&B Report is built from table.md and the logged wandb.Table. Saving it needs
    W&B online, which the tests never are: this checks the page `wsss report` would save."""
    import wandb_workspaces.reports.v2 as wr

    from wsss.tuning.report import TABLE_KEY, comparison_report

    markdown = "| method | CAM mIoU |\n|---|---|\n| cam | 32.00 ± 2.83 |\n"
    page = comparison_report(markdown, project="wsss", entity="lab", run_name="comparison-1")
    assert (page.project, page.entity) == ("wsss", "lab")
    assert markdown in [block.text for block in page.blocks if isinstance(block, wr.MarkdownBlock)]
    grid = next(block for block in page.blocks if isinstance(block, wr.PanelGrid))
    assert [(r.entity, r.project, r.query) for r in grid.runsets] == [("lab", "wsss", "comparison-1")]
    assert [p.table_name for p in grid.panels] == [TABLE_KEY]


def test_report_errors_name_the_directory(tmp_path):
    from wsss.tuning.report import make_report

    (tmp_path / "empty").mkdir()
    for location, message in [(tmp_path / "absent", "no such directory"),
                              (tmp_path / "empty", "holds no sweep")]:
        with pytest.raises(ConfigError, match=message) as error:
            make_report([str(location)], str(tmp_path / "out"))
        assert str(location) in str(error.value)
