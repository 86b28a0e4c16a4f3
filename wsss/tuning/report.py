"""`wsss report`: the comparison table of methods for a paper, with plots, from sweeps and runs.

Reads directories, local or on cloud storage (s3://, gs://: what it reads is copied to a
temporary folder first, `mirror.py`): Tune sweeps made by `wsss tune` (trial_*/result.json
and params.json; best.json adds the full-protocol evaluation of the best trial) and Train
runs made by `wsss train` (checkpoint_*/checkpoint.json, the config there or in state.pt);
a directory holding either one level down (a storage_path of many runs) works too.

Table: one row per (method, dataset). Records whose configurations differ only in the
seed are one configuration; the row shows the configuration with the highest mean
objective (the single-scale CAM mIoU at the best threshold, final epoch) as mean ± std
over its seeds, the full-protocol mIoU where one was evaluated, and its hyperparameters.
Written as table.md, table.html and table.csv, all records as records.csv, plus PNG
plots: each sweep's optimisation history and objective against every hyperparameter,
each record's per-epoch curves (loss, `miou`, the label shares its method notes), and a
contact sheet of the CAM overlays (`wsss.platform.pictures`) its W&B run logged last
for each row's best record. With plotly installed, each sweep's Optuna study also as
interactive HTML (history, parameter importances, slices, contour). With W&B online,
the table also goes to W&B as a wandb.Table and a W&B Report page.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from PIL import Image

from wsss.io import write_text
from wsss.platform.config import ConfigError, stored_config
from wsss.platform.tracking import OVERLAY_KEY
from wsss.tuning.mirror import mirror
from wsss.tuning.plots import curves_png, scatter_png, tile_png

OBJECTIVE = "miou"
DIVERGED = "diverged"  # what `wsss tune` reports as a diverged trial's last result
TABLE_KEY = "comparison"  # the wandb.Table in the report run
MAX_OVERLAYS = 8
EPOCHS_FILE = "epochs.jsonl"  # wsss.platform.train.EPOCHS_FILE (that module starts Ray Train)
OVERLAY_FILE = re.compile(rf"{OVERLAY_KEY}_(\d+)_[0-9a-f]+\.png")  # W&B media: <key>_<step>_<hash>.png
# config keys that say where or how a run was logged, not what was trained
NOT_CONFIGURATION = {"seed", "name", "storage_path", "data", "wandb", "wandb_project", "wandb_group",
                     "log_every", "cam_images", "dataset"}


@dataclass
class Record:
    """One trained configuration: a sweep trial or a plain run."""

    method: str
    dataset: str
    seed: int
    params: dict  # what is shown as its hyperparameters
    configuration: str  # identity of the configuration, seed excluded
    miou: float  # final-epoch objective
    history: list[dict]  # metrics of every epoch, oldest first (loss, miou, the method's notes)
    source: str  # sweep name or run directory
    name: str  # trial id or run name
    started: float = 0.0  # orders a sweep's trials
    full_miou: float | None = None  # full-protocol evaluation, where one exists
    diverged: bool = False  # a sweep trial whose loss became NaN: listed, never ranked
    folders: list[Path] = field(default_factory=list)  # where its images may be


def collect(paths: list[str], scratch: Path | None = None) -> tuple[list[Record], dict[str, list[Record]]]:
    """Records from every directory, and the trials of each sweep by sweep name. Cloud
    URIs are copied under `scratch` first (a temporary folder when not given)."""
    records: list[Record] = []
    sweeps: dict[str, list[Record]] = {}
    for index, location in enumerate(paths):
        if "://" in location:
            scratch = scratch or Path(tempfile.mkdtemp(prefix="wsss-report-"))
            root = mirror(location, scratch / str(index) / location.rstrip("/").rsplit("/", 1)[-1])
        else:
            root = Path(location)
        if not root.is_dir():
            raise ConfigError(f"{location}: no such directory")
        first, found = len(records), 0
        for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
            if list(folder.glob("trial_*/result.json")):
                trials = read_sweep(folder)
                sweeps[folder.name] = trials
                records += trials
                found += len(trials)
            elif list(folder.glob("checkpoint_*/checkpoint.json")):
                records.append(read_run(folder))
                found += 1
            if found and folder == root:
                break  # a sweep or run itself: its subfolders are its own parts
        if not found:
            raise ConfigError(f"{location}: holds no sweep (trial_*/result.json) and no run "
                              f"(checkpoint_*/checkpoint.json), nor one a level down")
        if "://" in location:  # name runs by their URI, not the local copy
            for record in records[first:]:
                record.source = record.source.replace(str(root), location.rstrip("/"), 1)
    return records, sweeps


def read_sweep(folder: Path) -> list[Record]:
    best = _json(folder / "best.json") or {}
    trials = []
    for trial in sorted(folder.glob("trial_*")):
        results = [json.loads(line) for line in _text(trial / "result.json").splitlines() if line.strip()]
        if not any(OBJECTIVE in r for r in results):
            continue  # errored before its first epoch
        config = _json(trial / "params.json") or results[-1].get("config", {})
        run = config.get("run", {})
        params = {k: v for k, v in config.items() if k != "run"}
        trial_id = results[-1].get("trial_id", trial.name)
        first = results[0]
        checkpoint = results[-1].get("checkpoint_path")
        trials.append(Record(
            method=run.get("method", "?"), dataset=run.get("dataset", "?"), seed=run.get("seed", 0),
            params=params, configuration=_identity({**_configuration(run), **params}),
            miou=[r[OBJECTIVE] for r in results if OBJECTIVE in r][-1], history=results,
            source=folder.name, name=trial_id,
            started=first.get("timestamp", 0) - first.get("time_total_s", 0),
            full_miou=(best.get("evaluation") or {}).get(OBJECTIVE) if best.get("trial_id") == trial_id else None,
            diverged=bool(results[-1].get(DIVERGED)),
            folders=[trial] + ([Path(checkpoint).parent] if checkpoint else [])))
    return trials


def read_run(folder: Path) -> Record:
    from wsss.platform.checkpoints import load_state  # torch: only when a run is read

    checkpoints = sorted(p.parent for p in folder.glob("checkpoint_*/checkpoint.json"))
    infos = [_json(p / "checkpoint.json") for p in checkpoints]
    history = _epochs(folder) or [i["metrics"] for i in infos if "metrics" in i]
    scores = [m[OBJECTIVE] for m in history if OBJECTIVE in m]
    if not scores:
        raise ConfigError(f"{folder}: its checkpoints hold no {OBJECTIVE!r} (trained without val_split?)")
    if "config" in infos[-1]:
        config, dataset = infos[-1]["config"], infos[-1].get("dataset", "?")
    else:  # checkpoints from before checkpoint.json recorded the config; mmap: not the weights
        state = load_state(str(checkpoints[-1]), mmap=True)
        config, dataset = state["config"], state["dataset"].get("name", "?")
    config = stored_config(config)  # a run from before a key was renamed groups with the runs after
    evaluation = _json(folder / "results.json") or {}  # `wsss evaluate --out RUN_DIR`
    return Record(
        method=config["method"], dataset=dataset, seed=config.get("seed", 0),
        params=_shown_params(config), configuration=_identity(_configuration(config)),
        miou=scores[-1], history=history, source=str(folder), name=folder.name,
        full_miou=evaluation.get(OBJECTIVE), folders=[folder])


def _epochs(folder: Path) -> list[dict]:
    """The run's epoch metrics; an epoch trained again after a failure counts once, as last written."""
    by_epoch = {}
    for line in _text(folder / EPOCHS_FILE).splitlines():
        if line.strip():
            metrics = json.loads(line)
            by_epoch[metrics.get("epoch", len(by_epoch) + 1)] = metrics
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def comparison_rows(records: list[Record]) -> list[dict]:
    """One row per (method, dataset): its best configuration over seeds."""
    rows = []
    groups: dict[tuple, dict[str, list[Record]]] = {}
    for record in (r for r in records if not r.diverged):
        groups.setdefault((record.method, record.dataset), {}).setdefault(record.configuration, []).append(record)
    for (method, dataset), configurations in sorted(groups.items()):
        best = max(configurations.values(), key=lambda rs: statistics.fmean(r.miou for r in rs))
        values = [r.miou for r in best]
        full = [r.full_miou for r in best if r.full_miou is not None]
        rows.append({
            "method": method, "dataset": dataset, "miou_mean": statistics.fmean(values),
            "miou_std": statistics.stdev(values) if len(values) > 1 else None, "seeds": len(values),
            "full_miou": statistics.fmean(full) if full else None,
            "params": best[0].params, "sources": sorted({r.source for r in best}),
            "best": max(best, key=lambda r: r.miou)})
    return rows


def _fmt(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


HEADER = ["method", "dataset", "CAM mIoU (%)", "seeds", "full-protocol mIoU (%)", "hyperparameters", "source"]


def table_cells(row: dict) -> list[str]:
    return [row["method"], row["dataset"], _fmt(row["miou_mean"], row["miou_std"]), str(row["seeds"]),
            _fmt(row["full_miou"]), _params_text(row["params"]), ", ".join(row["sources"])]


def write_tables(rows: list[dict], records: list[Record], out: Path) -> None:
    cells = [table_cells(row) for row in rows]
    note = ("CAM mIoU: single-scale, best background threshold, final epoch, mean ± std over seeds; "
            "full protocol: multi-scale + flip.")
    diverged = [f"{r.source}/{r.name}" for r in records if r.diverged]
    if diverged:
        note += f" Diverged (loss NaN or infinite; not ranked): {', '.join(diverged)}."
    markdown = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    markdown += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    write_text(str(out / "table.md"), "\n".join(markdown) + f"\n\n{note}\n")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    write_text(str(out / "table.html"), f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n"
                                        f"</table>\n<p>{html.escape(note)}</p>\n")
    write_text(str(out / "table.csv"), csv_text(
        ["method", "dataset", "miou_mean", "miou_std", "seeds", "full_miou", "params", "sources"],
        [[row["method"], row["dataset"], row["miou_mean"], row["miou_std"] or "", row["seeds"],
          row["full_miou"] if row["full_miou"] is not None else "", json.dumps(row["params"], sort_keys=True),
          ";".join(row["sources"])] for row in rows]))
    write_text(str(out / "records.csv"), csv_text(
        ["source", "name", "method", "dataset", "seed", "miou", "epochs", "full_miou", "params", "diverged"],
        [[r.source, r.name, r.method, r.dataset, r.seed, r.miou, len(r.history),
          "" if r.full_miou is None else r.full_miou, json.dumps(r.params, sort_keys=True), r.diverged]
         for r in records]))


def csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_plots(records: list[Record], sweeps: dict[str, list[Record]], rows: list[dict], out: Path) -> list[Path]:
    """Each sweep: history and objective vs each hyperparameter; each record: its curves;
    each row: its overlays."""
    written = []
    for name, trials in sorted(sweeps.items()):
        trials = sorted(trials, key=lambda r: r.started)
        values = [t.miou for t in trials]
        running = [max(values[:i + 1]) for i in range(len(values))]
        written.append(scatter_png(out / "plots" / f"{name}-history.png", list(range(1, len(trials) + 1)),
                                   values, title=f"{name}: optimisation history", xlabel="trial",
                                   ylabel="CAM mIoU", step_line=running))
        for param in sorted({k for t in trials for k in t.params}):
            points = [(t.params[param], t.miou) for t in trials if param in t.params]
            xs = [x if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x) for x, _ in points]
            log_x = all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) >= 20
            written.append(scatter_png(out / "plots" / f"{name}-{param}.png", xs, [y for _, y in points],
                                       title=f"{name}: objective vs {param}", xlabel=param,
                                       ylabel="CAM mIoU", log_x=log_x))
    for record in records:
        written.append(write_curves(record, out / "curves"))
    for row in rows:
        images = overlay_images(row["best"])
        if images:
            written.append(tile_png(out / "overlays" / f"{row['method']}-{row['dataset']}.png".replace("+", "-"),
                                    images, title=f"{row['method']} on {row['dataset']}: {row['best'].name}",
                                    width=min(1200, max(Image.open(p).width for p in images)), columns=1))
    return written


def write_curves(record: Record, folder: Path) -> Path:
    """The record's per-epoch curves: losses, mIoU, and the shares its method notes
    (`<part>/<key>` metrics such as `fsae/labelled`)."""
    def series(keys) -> dict:  # a diverged epoch's NaN loss is left out, not drawn
        points = {key: [(m.get("epoch", i + 1), m[key]) for i, m in enumerate(record.history)
                        if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])] for key in keys}
        return {key: ([x for x, _ in p], [y for _, y in p]) for key, p in points.items()}

    keys = sorted({k for m in record.history for k in m})
    losses = ["loss"] + [k for k in keys if k.startswith("loss/")]
    # the notes of a method part (`<part>/<key>`), less its timings (`csrm/crf_wait_s`)
    notes = [k for k in keys if "/" in k and not k.startswith("loss/") and not k.endswith("_s")]
    # a run is named by its folder; a trial by its sweep and id
    stem = record.name if Path(record.source).name == record.name else f"{record.source}-{record.name}"
    return curves_png(folder / f"{stem}.png", [("loss", series(losses)), ("mIoU (val)", series(["miou", "seg_miou"])),
                                              ("label shares", series(notes))],
                      title=f"{record.method} on {record.dataset}: {stem}")


STUDY_PLOTS = ("history", "importances", "slices", "contour")
PLOTLY_MISSING = ("plotly is not installed, so the sweeps' interactive Optuna plots (HTML) were not written: "
                  "`pip install 'wsss[plots]'` adds it")


def write_study_html(sweeps: dict[str, list[Record]], out: Path, scratch: Path) -> tuple[list[Path], list[str]]:
    """Each sweep's Optuna study as interactive HTML (optuna.visualization: optimisation
    history, parameter importances, slices, contour), beside the PNGs in `out/plots`, with
    one copy of plotly.js they share (they open offline); and what was left out, and why."""
    if not sweeps:
        return [], []
    try:
        import plotly.offline
    except ImportError:
        return [], [PLOTLY_MISSING]
    import optuna
    from optuna import visualization

    plots = dict(zip(STUDY_PLOTS, (visualization.plot_optimization_history, visualization.plot_param_importances,
                                   visualization.plot_slice, visualization.plot_contour), strict=True))
    written, notes = [], []
    for name, trials in sorted(sweeps.items()):
        storage = study_storage(trials[0].folders[0].parent, scratch / name)
        if storage is None:
            notes.append(f"{name}: no Optuna study found (optuna.db, or sweep.json's study_storage)")
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        for kind, plot in plots.items():
            try:
                figure = plot(study)
            except (ValueError, RuntimeError) as error:  # e.g. importances of a study with one finished trial
                notes.append(f"{name}-{kind}: {error}")
                continue
            path = out / "plots" / f"{name}-{kind}.html"
            write_text(str(path), figure.to_html(include_plotlyjs="directory"))
            written.append(path)
    if written:
        write_text(str(out / "plots" / "plotly.min.js"), plotly.offline.get_plotlyjs())
    return written, notes


def study_storage(sweep_folder: Path, scratch: Path) -> str | None:
    """A copy of the sweep's SQLite study (beside it, or where sweep.json says; a cloud
    sweep keeps it on its driver's disk), so a running sweep's file is only read."""
    import shutil

    recorded = (_json(sweep_folder / "sweep.json") or {}).get("study_storage", "")
    candidates = [sweep_folder / "optuna.db"]
    if recorded.startswith("sqlite:///"):
        candidates.append(Path(recorded[len("sqlite:///"):]))
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        return None
    scratch.mkdir(parents=True, exist_ok=True)
    copy = shutil.copyfile(found, scratch / "optuna.db")
    return f"sqlite:///{copy}"


def overlay_images(record: Record) -> list[Path]:
    """The composed CAM overlays (`cam_overlays` in W&B's media folder) that the record's
    W&B run logged last, at its highest step."""
    found = [(int(match.group(1)), p) for folder in record.folders if folder.is_dir()
             for p in folder.rglob(f"{OVERLAY_KEY}_*.png") if (match := OVERLAY_FILE.fullmatch(p.name))]
    if not found:
        return []
    last = max(step for step, _ in found)
    return sorted(p for step, p in found if step == last)[:MAX_OVERLAYS]


def log_to_wandb(rows: list[dict], plots: list[Path], project: str, markdown: str) -> str:
    """Online W&B only: the table as a wandb.Table and the plots in one `report` run, and a
    W&B Report page showing the same comparison. W&B failing never fails the command."""
    from wsss.platform.tracking import resolve_mode

    if resolve_mode("auto") != "online":
        return "W&B is offline: nothing uploaded"
    import wandb

    run = wandb.init(project=project, job_type="report", name=f"comparison-{datetime.now():%Y%m%d-%H%M%S}")
    table = wandb.Table(columns=HEADER, data=[table_cells(row) for row in rows])
    run.log({TABLE_KEY: table, **{p.stem: wandb.Image(str(p)) for p in plots}})
    url, entity, name = run.url, run.entity, run.name
    run.finish()
    try:
        page = comparison_report(markdown, project=project, entity=entity, run_name=name)
        page.save()
        return f"logged the comparison table to {url}; W&B Report: {page.url}"
    except Exception as error:  # the files on disk are the product; the page is extra
        return f"logged the comparison table to {url}; the W&B Report failed: {error}"


def comparison_report(markdown: str, *, project: str, entity: str, run_name: str):
    """A W&B Report (not yet saved): the Markdown table of table.md and the wandb.Table
    logged by the run `run_name`, whose runs the page links."""
    import wandb_workspaces.reports.v2 as wr

    return wr.Report(
        project=project, entity=entity, title="WSSS method comparison",
        description="Written by `wsss report`: the same table as table.md, table.html and table.csv.",
        blocks=[wr.H1("Methods compared"), wr.MarkdownBlock(text=markdown),
                wr.PanelGrid(runsets=[wr.Runset(entity=entity, project=project, name="report run", query=run_name)],
                             panels=[wr.WeavePanelSummaryTable(table_name=TABLE_KEY)])])


def make_report(paths: list[str], out: str, wandb_project: str = "wsss") -> dict:
    with tempfile.TemporaryDirectory(prefix="wsss-report-") as scratch:  # copies of cloud folders
        records, sweeps = collect(paths, Path(scratch))
        rows = comparison_rows(records)
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        write_tables(rows, records, directory)
        plots = write_plots(records, sweeps, rows, directory)
        pages, notes = write_study_html(sweeps, directory, Path(scratch) / "studies")
    return {"rows": len(rows), "records": len(records), "out": str(directory),
            "plots": [str(p) for p in plots], "html": [str(p) for p in pages], "notes": notes,
            "wandb": log_to_wandb(rows, plots, wandb_project, (directory / "table.md").read_text())}


def _configuration(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_CONFIGURATION}


def _identity(values: dict) -> str:
    return json.dumps(values, sort_keys=True, default=str)


def _shown_params(config: dict) -> dict:
    """lr, epochs and every method setting, flattened to override keys."""
    shown = {"lr": config["lr"], "epochs": config["epochs"]}
    for section, values in config.get("sections", {}).items():
        shown.update({f"{section}.{k}": v for k, v in values.items()})
    return shown


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---- command line ------------------------------------------------------------------

def main(args) -> int:
    summary = make_report(args.dirs, args.out, args.wandb_project)
    print((Path(args.out) / "table.md").read_text())
    print(json.dumps({k: v for k, v in summary.items() if k not in ("plots", "html")}, indent=2))
    return 0
