"""Does each method do what its paper claims? The protocol on the synthetic benchmark.

    python benchmarks/claims.py --work DIR [--stage all|start|stage1|stage2|table] [--seeds 3]

Stages, each resumable (a finished run or evaluation is found and skipped, a cut run resumes):
  start   `cam` from scratch on the `claims` preset (1500 train / 300 dev / 300 val, 96 px),
          validated on dev; every epoch's checkpoint is then scored on dev, single scale
          (classification mAP, CAM mIoU, part and body recall), and the best is the start of
          everything else.
  stage1  each method from that start (`init_from`), E epochs, seeds 0..S-1; the baseline is
          `cam` continued from the same start for the same E epochs. The background threshold
          (and `lnl`'s export) are chosen on dev, then val is scored once with that choice.
          Ablations (ABLATIONS: a method with one part switched off) run the same way when
          named in --methods.
  stage2  pseudo-labels of the best stage-1 method (mean dev CAM mIoU) on train, threshold
          from dev; `deeplab` and `deeplab+ocr` on them, S seeds, scored on val.
  table   the claims table (mean ± std over seeds, Δ against `cam`) to DIR/claims.md.
Each stage's wall time goes to DIR/times.json. Everything runs on a local Ray.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from wsss.datasets.prepare import prepare
from wsss.datasets.reading import eval_rows
from wsss.datasets.shards import read_manifest
from wsss.methods.lnl import EXPORTS
from wsss.platform.cams import image_tensor
from wsss.platform.checkpoints import INFO_FILE, latest_checkpoint, load_method
from wsss.platform.config import TrainConfig
from wsss.platform.evaluate import evaluate_checkpoint
from wsss.platform.loop import EpochStats, epoch_metrics, evaluate_rows
from wsss.platform.pseudo_labels import generate_pseudo_labels
from wsss.platform.runtime import ensure_ray
from wsss.platform.segmentation import evaluate_segmentation, stage2_config
from wsss.platform.train import fit

from lnl_seeds import choose, reference_row, seed_counts, summarise, table  # benchmarks/, beside this script

START_EPOCHS = 8
COMMON = dict(backbone="resnet18", backbone_weights="none", output_stride=16, crop_size=96, batch_size=16,
              val_split="dev", wandb="offline")
START = dict(method="cam", name="start-cam", lr=0.05, epochs=START_EPOCHS, seed=0, keep_checkpoints=0)  # every epoch is scored
# From the trained start: lr 0.01 (new layers 10×). lnl's warm-up is the paper's 2 of 10
# epochs scaled to E; csrm's decoders train at 0.01, where a DeepLab head learns here
# (docs/results.md), not at the paper's 10×.
STAGE1_LR = 0.01
METHODS = ("cam", "lnl", "cam+fsae", "lnl+fsae", "csrm", "csrm+ocr")
# Runs that remove one part of a method, to find which part makes its gain: name → (method, overrides).
# `csrm-decoder-warmup` keeps L_s out of the backbone in the warm-up (docs/deviations.md).
ABLATIONS = {"lnl-no-contrast": ("lnl", {"lnl.contrast_weight": 0.0}),
             "csrm-decoder-warmup": ("csrm", {"csrm.warmup_decoder_only": True}),
             "csrm-decoder-warmup-no-contrast": ("csrm", {"csrm.warmup_decoder_only": True,
                                                          "csrm.contrast_weight": 0.0}),
             "csrm-decoder-warmup-no-s2c": ("csrm", {"csrm.warmup_decoder_only": True, "csrm.s2c_weight": 0.0}),
             "csrm-decoder-warmup-no-unsup": ("csrm", {"csrm.warmup_decoder_only": True,
                                                       "csrm.unsup_weight": 0.0}),
             "csrm-decoder-warmup-ls-only": ("csrm", {"csrm.warmup_decoder_only": True, "csrm.s2c_weight": 0.0,
                                                      "csrm.unsup_weight": 0.0, "csrm.contrast_weight": 0.0})}
METHOD_SETTINGS = {"lnl": {"lnl.warmup_epochs": 1}, "csrm": {"csrm.decoder_lr_mult": 1.0}}
EVAL_SCALES = (1.0, 0.5, 1.5)
STAGE2_METHODS = ("deeplab", "deeplab+ocr")


@contextmanager
def timed(work: Path, stage: str):
    """Adds the block's wall seconds to the stage's entry in work/times.json."""
    start = time.perf_counter()
    try:
        yield
    finally:
        path = work / "times.json"
        times = json.loads(path.read_text()) if path.exists() else {}
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - start
        path.write_text(json.dumps(times, indent=1))


def trained(run: Path, epochs: int) -> str | None:
    """The run's final checkpoint if it has trained all `epochs`, else None."""
    try:
        checkpoint = latest_checkpoint(str(run))
    except FileNotFoundError:
        return None
    info = json.loads((Path(checkpoint) / INFO_FILE).read_text())
    return checkpoint if info["epoch"] >= epochs else None


def train(work: Path, values: dict, overrides: dict | None = None) -> str:
    run = work / "runs" / values["name"]
    checkpoint = trained(run, values["epochs"])
    if checkpoint is None:
        config = TrainConfig(data=str(work / "shards"), storage_path=str(work / "runs"), **values)
        checkpoint = fit(config.with_overrides(overrides or {})).checkpoint.path
    return checkpoint


def cached(path: Path, compute) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    return result


# ---- start ---------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    order = np.argsort(-scores)
    hits = positive[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


@torch.no_grad()
def classification_map(checkpoint: str, data: str, split: str) -> float:
    """Mean over classes of the average precision of the CAM head's pooled scores."""
    method, _ = load_method(checkpoint)
    scores, labels = [], []
    for row in eval_rows(data, split):
        logits = method.network(image_tensor(row["image"], torch.device("cpu")))["cam_logits"]
        scores.append(logits.float().mean(dim=(2, 3))[0].numpy())
        labels.append(np.asarray(row["labels"]) > 0.5)
    scores, labels = np.stack(scores), np.stack(labels)
    return float(np.nanmean([average_precision(scores[:, k], labels[:, k]) for k in range(labels.shape[1])]))


def checkpoints(run: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (names are timestamps)."""
    return sorted(path for path in run.glob("checkpoint_*") if path.is_dir())


def run_start(work: Path) -> None:
    data = str(work / "shards")
    with timed(work, "start: train"):
        train(work, {**COMMON, **START})
    curve = []
    with timed(work, "start: score every epoch"):
        for checkpoint in checkpoints(work / "runs" / START["name"]):

            def score(checkpoint=str(checkpoint)):
                method, state = load_method(checkpoint)
                validation = evaluate_rows(method, eval_rows(data, "dev"), num_classes=method.num_classes,
                                           device=torch.device("cpu"))
                scores = epoch_metrics(EpochStats(), validation, state["epoch"] - 1)
                keep = ("epoch", "miou", "threshold", "part_recall", "body_recall", "context_fpr")
                return {**{k: scores[k] for k in keep}, "map": classification_map(checkpoint, data, "dev")}

            curve.append(cached(checkpoint / "dev-scores.json", score))
    best = max(curve, key=lambda row: row["miou"])
    (work / "start.json").write_text(json.dumps({"curve": curve, "best_epoch": best["epoch"]}, indent=1))


def start_checkpoint(work: Path) -> str:
    """The start's checkpoint with the best dev CAM mIoU (`run_start`)."""
    best_epoch = json.loads((work / "start.json").read_text())["best_epoch"]
    for checkpoint in checkpoints(work / "runs" / START["name"]):
        if json.loads((checkpoint / INFO_FILE).read_text())["epoch"] == best_epoch:
            return str(checkpoint)
    raise FileNotFoundError(f"{work / 'runs' / START['name']}: no checkpoint of epoch {best_epoch}")


# ---- stage 1 -------------------------------------------------------------------------------
def inference_variants(method: str) -> list[dict]:
    """Inference settings chosen on dev besides the threshold."""
    return [{"lnl.export": export} for export in EXPORTS] if method.startswith("lnl") else [{}]


def run_name(method: str, seed: int) -> str:
    return f"{method.replace('+', '-')}-seed{seed}"


def stage1_run(work: Path, name: str, seed: int, epochs: int) -> dict:
    """One stage-1 run of a method (or of an ablation named in ABLATIONS), scored on dev and val."""
    method, ablated = ABLATIONS.get(name, (name, {}))
    data, start = str(work / "shards"), start_checkpoint(work)
    overrides = {k: v for part in method.split("+") for k, v in METHOD_SETTINGS.get(part, {}).items()}
    if method.startswith("lnl"):
        overrides.update(seed_setting(work))
    overrides.update(ablated)
    values = {**COMMON, "method": method, "name": run_name(name, seed), "lr": STAGE1_LR, "epochs": epochs,
              "seed": seed, "init_from": start, "eval_max_images": 100}
    checkpoint = train(work, values, overrides)
    run = work / "runs" / values["name"]
    dev = [cached(run / f"dev-{index}.json", lambda v=variant: evaluate_checkpoint(
        checkpoint, data, split="dev", scales=EVAL_SCALES, method_overrides=v))
        for index, variant in enumerate(inference_variants(method))]
    chosen = max(dev, key=lambda r: r["miou"])
    val = cached(run / "results.json", lambda: evaluate_checkpoint(
        checkpoint, data, split="val", scales=EVAL_SCALES, threshold=chosen["threshold"],
        method_overrides=chosen["method_overrides"]))
    row = {"method": name, "seed": seed, "dev_miou": chosen["miou"], "choice": chosen["method_overrides"],
           **{k: val[k] for k in ("miou", "threshold", "part_recall", "body_recall", "context_fpr",
                                  "cooccurrence_confusion", "fg_fpr", "fg_fnr")}}
    if method.startswith("csrm"):
        seg = cached(run / "segmentation.json", lambda: evaluate_segmentation(checkpoint, data, split="val"))
        row.update(seg_miou=seg["miou"], seg_cooccurrence_confusion=seg.get("cooccurrence_confusion"),
                   seg_oc_pixel_rate=seg["oc_pixel_rate"])
    if method.startswith("lnl"):
        row.update(cached(run / "seeds.json", lambda: seed_quality(checkpoint, data, "dev")))
        row.update(export_scores(run, checkpoint, data, dev))
    return row


def export_scores(run: Path, checkpoint: str, data: str, dev: list[dict]) -> dict:
    """`lnl`'s CAM M_s and DFSM's expansion M_e, each on val at its own dev threshold, so
    what DFSM adds is measured whichever export the dev choice took."""
    scores = {}
    for export in ("shrink", "expand"):
        on_dev = next(r for r in dev if r["method_overrides"] == {"lnl.export": export})
        val = cached(run / f"val-{export}.json", lambda on_dev=on_dev: evaluate_checkpoint(
            checkpoint, data, split="val", scales=EVAL_SCALES, threshold=on_dev["threshold"],
            method_overrides=on_dev["method_overrides"]))
        scores |= {f"{export}_{key}": val[key] for key in ("miou", "part_recall", "body_recall")}
    return scores


def seed_quality(checkpoint: str, data: str, split: str) -> dict:
    """E_s of a trained `lnl` run with its own similarity and η, and which classes its
    prototype bank initialised (a class never seeded has no prototypes to contrast with)."""
    method, _ = load_method(checkpoint)
    kind, eta = method.config.similarity, method.config.seed_threshold
    row = summarise(seed_counts(checkpoint, data, split, kinds=(kind,), etas=(eta,)))[0]
    initialised = method.prototype_bank.initialized.tolist()
    return {f"seed_{key}": row[key] for key in ("bg_coverage", "bg_precision", "fg_coverage", "fg_precision")} | {
        "bank_classes_initialised": int(sum(initialised[1:])), "bank_background_initialised": bool(initialised[0])}


def seed_setting(work: Path) -> dict:
    """FSCM's similarity and η for every `lnl` run, chosen on dev from the start's features
    (benchmarks/lnl_seeds.py)."""
    def study():
        measured = seed_counts(start_checkpoint(work), str(work / "shards"), "dev")
        rows = summarise(measured)
        return {"rows": rows, "chosen": choose(rows), "reference": reference_row(measured)}

    with timed(work, "seeds: study on the start"):
        chosen = cached(work / "seeds.json", study)["chosen"]
    return {"lnl.similarity": chosen["kind"], "lnl.seed_threshold": chosen["eta"]}


# ---- stage 2 -------------------------------------------------------------------------------
def run_stage2(work: Path, rows: list[dict], seeds: int, epochs: int) -> list[dict]:
    """Stage 2 from the pseudo-labels of the stage-1 method with the best mean dev CAM mIoU
    (its seed 0), each DeepLab started from the same `cam` start."""
    data = str(work / "shards")
    dev_miou: dict[str, list[float]] = {}
    for row in rows:
        if row["method"] not in ABLATIONS:
            dev_miou.setdefault(row["method"], []).append(row["dev_miou"])
    source = max(dev_miou, key=lambda method: np.mean(dev_miou[method]))
    run = work / "runs" / run_name(source, 0)
    threshold = json.loads((run / "results.json").read_text())["threshold"]  # chosen on dev
    labels = work / "pseudo-labels"
    if not (labels / "manifest.json").exists():
        with timed(work, "stage2: pseudo-labels"):
            generate_pseudo_labels(latest_checkpoint(str(run)), data, str(labels), threshold=threshold,
                                   scales=EVAL_SCALES)
    out = []
    for method in STAGE2_METHODS:
        for seed in range(seeds):
            name = f"stage2-{method.replace('+', '-')}-seed{seed}"
            overrides = {**COMMON, "name": name, "seed": seed, "epochs": epochs, "storage_path": str(work / "runs"),
                         "init_from": start_checkpoint(work)}
            config = stage2_config(data, str(labels), ocr=method.endswith("+ocr"), overrides=overrides)
            with timed(work, f"stage2: {method}"):
                checkpoint = trained(work / "runs" / name, epochs) or fit(config).checkpoint.path
                seg = cached(work / "runs" / name / "results.json",
                             lambda checkpoint=checkpoint: evaluate_segmentation(checkpoint, data, split="val"))
            out.append({"method": method, "seed": seed, "source": source, "miou": seg["miou"],
                        "cooccurrence_confusion": seg.get("cooccurrence_confusion"),
                        "oc_pixel_rate": seg["oc_pixel_rate"], "oc_image_rate": seg["oc_image_rate"]})
    return out


# ---- table ---------------------------------------------------------------------------------
def spread(values: list[float], scale: float = 100) -> str:
    """mean ± std (ddof 1) of the values times `scale` (100: shares as percentages)."""
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "—"
    mean = scale * np.mean(values)
    return f"{mean:.2f} ± {scale * np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{mean:.2f}"


def delta(method_values: list[float], base_values: list[float]) -> tuple[str, float, float]:
    method_values, base_values = np.array(method_values, float), np.array(base_values, float)
    paired = min(len(method_values), len(base_values))
    diff = 100 * (method_values[:paired] - base_values[:paired])
    std = diff.std(ddof=1) if paired > 1 else float("nan")
    return (f"{diff.mean():+.2f} ± {std:.2f}" if paired > 1 else f"{diff.mean():+.2f}"), diff.mean(), std


# paper claim, stage, method, its metric, the baseline (method, metric) it is compared with,
# and the claim's direction (+1: higher, -1: lower, 0: kept)
CLAIMS = [
    ("LNL expands activation from part to object", 1, "lnl", "body_recall", ("cam", "body_recall"), +1),
    ("LNL raises CAM mIoU", 1, "lnl", "miou", ("cam", "miou"), +1),
    ("LNL keeps the discriminative part", 1, "lnl", "part_recall", ("cam", "part_recall"), 0),
    ("LNL's gain comes from its contrastive loss", 1, "lnl", "miou", ("lnl-no-contrast", "miou"), +1),
    ("LNL's contrastive loss expands activation", 1, "lnl", "body_recall", ("lnl-no-contrast", "body_recall"), +1),
    ("DFSM's classification loss alone raises CAM mIoU", 1, "lnl-no-contrast", "miou", ("cam", "miou"), +1),
    ("DFSM's classification loss alone expands activation", 1, "lnl-no-contrast", "body_recall",
     ("cam", "body_recall"), +1),
    ("DFSM's expansion M_e raises mIoU over M_s", 1, "lnl", "expand_miou", ("lnl", "shrink_miou"), +1),
    ("DFSM's expansion M_e expands activation", 1, "lnl", "expand_body_recall", ("lnl", "shrink_body_recall"), +1),
    ("FSAE expands activation from part to object", 1, "cam+fsae", "body_recall", ("cam", "body_recall"), +1),
    ("FSAE raises CAM mIoU", 1, "cam+fsae", "miou", ("cam", "miou"), +1),
    ("FSAE keeps the discriminative part", 1, "cam+fsae", "part_recall", ("cam", "part_recall"), 0),
    ("LNL+FSAE raises CAM mIoU", 1, "lnl+fsae", "miou", ("cam", "miou"), +1),
    ("CSRM raises CAM mIoU", 1, "csrm", "miou", ("cam", "miou"), +1),
    ("CSRM's segmentation branch beats its own CAMs", 1, "csrm", "seg_miou", ("csrm", "miou"), +1),
    ("CSRM's CAMs gain when the warm-up trains only the decoders", 1, "csrm-decoder-warmup", "miou",
     ("csrm", "miou"), +1),
    ("CSRM's CAMs kept when the warm-up trains only the decoders", 1, "csrm-decoder-warmup", "miou",
     ("cam", "miou"), 0),
    ("CSRM's segmentation branch beats its own CAMs (decoder-only warm-up)", 1, "csrm-decoder-warmup", "seg_miou",
     ("csrm-decoder-warmup", "miou"), +1),
    ("CSRM's contrast L_m improves its CAMs (decoder-only warm-up, λ_m 1 against 0)", 1, "csrm-decoder-warmup",
     "miou", ("csrm-decoder-warmup-no-contrast", "miou"), +1),
    ("CSRM's contrast L_m improves its segmentation branch (decoder-only warm-up)", 1, "csrm-decoder-warmup",
     "seg_miou", ("csrm-decoder-warmup-no-contrast", "seg_miou"), +1),
    ("CSRM's cross supervision L_s2c improves its CAMs (decoder-only warm-up, λ_s2c 1 against 0)", 1,
     "csrm-decoder-warmup", "miou", ("csrm-decoder-warmup-no-s2c", "miou"), +1),
    ("CSRM's cross supervision L_s2c improves its segmentation branch (decoder-only warm-up)", 1,
     "csrm-decoder-warmup", "seg_miou", ("csrm-decoder-warmup-no-s2c", "seg_miou"), +1),
    ("CSRM's weak-to-strong L_u improves its CAMs (decoder-only warm-up, λ_u 1 against 0)", 1,
     "csrm-decoder-warmup", "miou", ("csrm-decoder-warmup-no-unsup", "miou"), +1),
    ("CSRM's weak-to-strong L_u improves its segmentation branch (decoder-only warm-up)", 1,
     "csrm-decoder-warmup", "seg_miou", ("csrm-decoder-warmup-no-unsup", "seg_miou"), +1),
    ("CSRM's CAMs kept with L_s alone after the warm-up (decoder-only warm-up)", 1,
     "csrm-decoder-warmup-ls-only", "miou", ("cam", "miou"), 0),
    ("CSRM's L_u and L_m improve its CAMs without L_s2c (decoder-only warm-up)", 1,
     "csrm-decoder-warmup-no-s2c", "miou", ("csrm-decoder-warmup-ls-only", "miou"), +1),
    ("OCR lowers co-occurrence confusion (CSRM's CAMs)", 1, "csrm+ocr", "cooccurrence_confusion",
     ("csrm", "cooccurrence_confusion"), -1),
    ("OCR lowers co-occurrence confusion at stage 2", 2, "deeplab+ocr", "cooccurrence_confusion",
     ("deeplab", "cooccurrence_confusion"), -1),
    ("OCR lowers the out-of-candidate rate at stage 2", 2, "deeplab+ocr", "oc_pixel_rate",
     ("deeplab", "oc_pixel_rate"), -1),
    ("OCR raises stage-2 mIoU", 2, "deeplab+ocr", "miou", ("deeplab", "miou"), +1),
]


def verdict(mean: float, std: float, direction: int, seeds: int) -> str:
    if seeds < 3 or np.isnan(std):
        return "inconclusive (fewer than 3 seeds)"
    if direction == 0:  # "kept": a drop within a point holds, one beyond its spread does not
        return "holds" if mean > -1.0 else "does not" if mean < -std else "inconclusive"
    if direction * mean > std:
        return "holds"
    return "does not" if direction * mean < 0 else "inconclusive"


def claims_table(rows: list[dict], stage2: list[dict]) -> str:
    def values(source: list[dict], method: str, metric: str) -> list[float]:
        return [row[metric] for row in sorted(source, key=lambda r: r["seed"])
                if row["method"] == method and row.get(metric) is not None]

    lines = ["| paper claim | metric | baseline | method | Δ mean ± std | seeds | verdict |",
             "|---|---|---|---|---|---|---|"]
    for claim, stage, method, metric, (base_method, base_metric), direction in CLAIMS:
        source = rows if stage == 1 else stage2
        base, mine = values(source, base_method, base_metric), values(source, method, metric)
        compared = f"`{base_method}` {base_metric}" if base_metric != metric else f"`{base_method}`"
        if not mine or not base:
            lines.append(f"| {claim} | {metric} | {compared} {spread(base)} | {spread(mine)} | — | 0 | not run yet |")
            continue
        text, mean, std = delta(mine, base)
        seeds = min(len(mine), len(base))
        lines.append(f"| {claim} | {metric} | {compared} {spread(base)} | `{method}` {spread(mine)} | {text} | "
                     f"{seeds} | {verdict(mean, std, direction, seeds)} |")
    return "\n".join(lines) + "\n"


def results_table(rows: list[dict]) -> str:
    keys = ("miou", "part_recall", "body_recall", "context_fpr", "cooccurrence_confusion", "seg_miou",
            "seed_fg_coverage", "seed_fg_precision", "seed_bg_coverage", "seed_bg_precision",
            "bank_classes_initialised")
    lines = ["Shares in %; `bank_classes_initialised`: foreground classes with prototypes at the end.\n",
             "| method | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        cells = [spread([row.get(key) for row in mine], scale=1 if key == "bank_classes_initialised" else 100)
                 for key in keys]
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def start_table(work: Path) -> str:
    start = json.loads((work / "start.json").read_text())
    lines = ["| epoch | classification mAP | CAM mIoU | threshold | part recall | body recall | context FPR |",
             "|---|---|---|---|---|---|---|"]
    for row in start["curve"]:
        mark = " (the start)" if row["epoch"] == start["best_epoch"] else ""
        lines.append(f"| {row['epoch']}{mark} | {100 * row['map']:.2f} | {100 * row['miou']:.2f} | "
                     f"{row['threshold']:.2f} | {row['part_recall']:.3f} | {row['body_recall']:.3f} | "
                     f"{row['context_fpr']:.3f} |")
    return "\n".join(lines) + "\n"


def seeds_table(work: Path) -> str:
    """E_s on the start by similarity at the η that each similarity does best with, and the choice."""
    study = json.loads((work / "seeds.json").read_text())
    reference = [study["reference"]] if "reference" in study else []  # the CAMs themselves, for comparison
    lines = [table([row for row in study["rows"] if row["eta"] in (0.3, 0.5, 0.8)] + reference)]
    chosen = study["chosen"]
    lines.append(f"Chosen for every `lnl` run (`lnl_seeds.choose`, over η 0.3–0.9): similarity `{chosen['kind']}`, "
                 f"η {chosen['eta']}: foreground seeds on {100 * chosen['fg_coverage']:.1f}% of the cells, "
                 f"{100 * chosen['fg_precision']:.1f}% of them right; background seeds "
                 f"{100 * chosen['bg_precision']:.1f}% right.\n")
    return "\n".join(lines)


def times_table(work: Path) -> str:
    times = json.loads((work / "times.json").read_text())
    lines = ["| stage | wall time (min) |", "|---|---|"]
    lines += [f"| {stage} | {seconds / 60:.1f} |" for stage, seconds in times.items() if seconds >= 6]
    return "\n".join(lines) + "\n"


def report(work: Path, rows: list[dict], stage2: list[dict]) -> str:
    parts = ["### Claims\n", claims_table(rows, stage2), "### Stage 1 on val (mean ± std over seeds)\n",
             results_table(rows)]
    if (work / "start.json").exists():
        parts += ["### The start: `cam` from scratch, scored on dev after each epoch\n", start_table(work)]
    if (work / "seeds.json").exists():
        parts += ["### `lnl`'s seeds E_s on the start (dev)\n", seeds_table(work)]
    if (work / "times.json").exists():
        parts += ["### Wall time of each stage\n", times_table(work)]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for shards, runs and results (resumable)")
    parser.add_argument("--stage", default="all", choices=["all", "start", "stage1", "stage2", "table"])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"methods and ablations ({', '.join(ABLATIONS)}) to run in stage 1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="stage-1 epochs from the start")
    parser.add_argument("--stage2-epochs", type=int, default=8)
    parser.add_argument("--preset", default="claims", help="synthetic preset (test: a quick check of the script)")
    parser.add_argument("--dev-images", type=int, help="dev split size (default: the preset's)")
    parser.add_argument("--start-epochs", type=int, default=START_EPOCHS)
    args = parser.parse_args()
    work = Path(args.work).absolute()
    START["epochs"] = args.start_epochs
    if not (work / "shards" / "manifest.json").exists():
        dev = {"num_dev": args.dev_images} if args.dev_images is not None else {}
        prepare("synthetic", str(work / "synthetic"), str(work / "shards"), preset=args.preset, **dev)
    read_manifest(str(work / "shards")).rows("dev")  # the protocol needs a dev split
    if args.stage != "table":
        ensure_ray()
    if args.stage in ("all", "start"):
        run_start(work)
    rows_path = work / "stage1.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    if args.stage in ("all", "stage1"):
        for method in args.methods.split(","):  # method-major: what is done has all its seeds
            for seed in range(args.seeds):
                if any(r["method"] == method and r["seed"] == seed for r in rows):
                    continue
                with timed(work, f"stage1: {method}"):
                    rows.append(stage1_run(work, method, seed, args.epochs))
                rows_path.write_text(json.dumps(rows, indent=1))
    stage2_path = work / "stage2.json"
    stage2 = json.loads(stage2_path.read_text()) if stage2_path.exists() else []
    if args.stage in ("all", "stage2"):
        stage2 = run_stage2(work, rows, args.seeds, args.stage2_epochs)
        stage2_path.write_text(json.dumps(stage2, indent=1))
    text = report(work, rows, stage2)
    (work / "claims.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
