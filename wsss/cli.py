"""The `wsss` command: prepare, train, evaluate, demo, pseudo-labels, segment, tune, report.

Every command validates its arguments (config keys, data manifest, checkpoint) before
Ray starts, so a typo costs a second, not a cluster start-up. The whole command line is
declared here, importing nothing heavy: a command's module (torch, Ray) is imported only
when that command runs, so `wsss --help` and `wsss COMMAND --help` answer at once.
Settings of a run are `KEY=VALUE` positional arguments in every command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from importlib import metadata

# Defaults that the commands' modules also hold (tests/test_cli.py checks they agree):
# importing those modules here would import torch and Ray.
FULL_SCALES = "1.0,0.5,1.5,2.0"  # wsss.platform.cams.FULL_SCALES
SEG_SCALES = "0.5,0.75,1.0,1.25,1.5"  # wsss.platform.segmentation.SEG_SCALES
CRF_PRESETS = ("irn", "psa")  # wsss.ops.crf.PRESETS
PSEUDO_LABEL_MODES = ("crf", "irn", "segmentation", "segmentation-crf", "ground-truth")  # wsss.platform.pseudo_labels
PSEUDO_LABEL_THRESHOLD = 0.25  # wsss.platform.pseudo_labels.DEFAULT_THRESHOLD


def _prepare(args) -> int:
    from wsss.datasets.prepare import prepare

    options = {key: _literal(value) for key, value in _key_values(args.options).items()}
    manifest = prepare(args.dataset, args.root, args.out, sbd=args.sbd, skip_invalid=args.skip_invalid,
                       overwrite=args.overwrite, workers=args.workers, progress=_PrepareProgress(), **options)
    splits = ", ".join(f"{name}: {info['rows']}" for name, info in manifest.splits.items())
    skipped = manifest.skipped.get("count", 0) if isinstance(manifest.skipped, dict) else 0
    print(f"wrote {args.out} ({manifest.dataset}; {splits}; skipped {skipped})")
    return 0


class _PrepareProgress:
    """A line on stderr every few seconds while a split is written: images so far and rate."""

    EVERY_S = 5.0

    def __init__(self):
        self.split, self.started, self.shown = None, 0.0, 0.0

    def __call__(self, split: str, rows: int) -> None:
        now = time.monotonic()
        if split != self.split:
            self.split, self.started, self.shown = split, now, now
        elif now - self.shown >= self.EVERY_S:
            self.shown = now
            print(f"prepare: {split}: {rows} images, {rows / (now - self.started):.0f}/s", file=sys.stderr)


def _train(args) -> int:
    from wsss.io import public_uri
    from wsss.methods.base import method_sections
    from wsss.platform.config import ConfigError, TrainConfig, load_config
    from wsss.platform.config_text import help_config, to_toml

    if args.help_config:
        try:
            sections = method_sections(args.method) if args.method else {}
        except ValueError as error:
            raise ConfigError(f"--method: {error}") from None
        print(help_config(TrainConfig, sections))
        return 0
    config = load_config(args.config, args.overrides, method=args.method, data=args.data)
    if args.print_config:
        print(to_toml(config.to_dict()), end="")
        return 0
    if not config.data:
        raise ConfigError("--data is required: the URI of prepared shards (`wsss prepare`), "
                          "or `data` in the --config file")

    from wsss.datasets.shards import read_manifest
    from wsss.io import check_bucket
    from wsss.platform.console import run_summary
    from wsss.platform.runtime import ensure_ray
    from wsss.platform.train import check_start, fit, result_locations

    read_manifest(config.data)  # bad data fails here, before Ray starts
    check_bucket(config.storage_path)
    check_start(config)
    ensure_ray()
    started = time.perf_counter()
    result = fit(config)
    run, checkpoint = result_locations(config, result)
    run, checkpoint = public_uri(run), public_uri(checkpoint) if checkpoint else None
    if args.json:
        print(json.dumps({"run": run, "checkpoint": checkpoint, "metrics": _scalars(result.metrics)}, indent=2))
    else:
        print(run_summary(config.method, result.metrics or {}, time.perf_counter() - started, run, checkpoint))
    return 0


def _evaluate(args) -> int:
    from wsss.platform.evaluate import evaluate_checkpoint, results_table

    results = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, scales=args.scales,
                                  flip=not args.no_flip, crf=args.crf, max_images=args.max_images,
                                  out=args.out, method_overrides=_key_values(args.overrides),
                                  threshold=args.threshold, choice=args.checkpoint_choice,
                                  verify_data=not args.no_verify_data, show_dir=args.show_dir,
                                  show_images=args.show_images)
    print(results_table(results))
    if args.out:
        print(f"written to {args.out}/results.json and results.md")
    if args.show_dir:
        print(f"{len(results['pictures'])} pictures (image | ground truth | CAM per class | prediction) "
              f"in {args.show_dir}")
    if results.get("wandb"):
        print(f"W&B: the evaluation is in the run's summary ({results['wandb']})")
    return 0


def _demo(args) -> int:
    from wsss.platform.demo import run_demo

    run_demo(out=args.out, methods=args.methods.split(","), epochs=args.epochs, preset=args.preset,
             seeds=args.seeds, overrides=_key_values(args.overrides))
    return 0


def _literal(text: str):
    """'96' -> 96, '0.5' -> 0.5, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _scalars(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))}


def _key_value(text: str) -> str:
    """argparse type of KEY=VALUE arguments: checked when the command line is parsed."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _key_values(items: list[str]) -> dict[str, str]:
    return {key.strip(): value.strip() for key, _, value in (item.partition("=") for item in items)}


def _scales(text: str) -> tuple[float, ...]:
    """argparse type of --scales: '1.0,0.5' -> (1.0, 0.5)."""
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        scales = ()
    if not scales or any(not s > 0 for s in scales):
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers > 0 separated by commas, e.g. 1.0,0.5,1.5")
    return scales


class _Moved(argparse.Action):
    """An option that became a KEY=VALUE argument: an error that shows the new form."""

    def __init__(self, option_strings, dest, new_form: str, **kwargs):
        self.new_form = new_form
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is gone: write {self.new_form} as a positional argument")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show (not None, False or [])."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _command(commands, name: str, run, help: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)
    parser.set_defaults(run=run)
    return parser


def _overrides(parser, example: str, what: str = "run settings") -> None:
    parser.add_argument("overrides", nargs="*", type=_key_value, default=[], metavar="KEY=VALUE",
                        help=f"{what}, e.g. {example}")


def _count(text: str) -> int:
    """argparse type of counts that must be >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


def _show(parser, what: str) -> None:
    parser.add_argument("--show-dir", help=f"local directory for one PNG per image, named by its id: {what}")
    parser.add_argument("--show-images", type=_count, default=8, help="how many images --show-dir shows")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('wsss')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(commands, "prepare", _prepare, "write a dataset as Parquet shards + manifest")
    p.add_argument("dataset", choices=("voc", "coco", "cityscapes", "synthetic"), help="dataset reader")
    p.add_argument("--root", required=True, help="dataset directory")
    p.add_argument("--sbd", help="SBD benchmark_RELEASE directory (voc: builds train_aug)")
    p.add_argument("--out", required=True, help="output directory or URI (s3://, gs://)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad samples, counted in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    p.add_argument("--workers", type=_positive_int, help="processes that read the images (default: one per CPU)")
    p.add_argument("--option", action=_Moved, new_form="KEY=VALUE (e.g. preset=demo)")
    p.add_argument("options", nargs="*", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="reader options, e.g. preset=demo num_val=50 for synthetic")

    p = _command(commands, "train", _train, "train a method on Ray Train",
                 "Train a method on Ray Train. Settings: defaults < --config file < --method/--data < KEY=VALUE; "
                 "--help-config lists every key.")
    p.add_argument("--method", help="base method plus add-ons, e.g. cam, lnl, lnl+fsae (default: cam)")
    p.add_argument("--data", help="URI of prepared shards (`wsss prepare`)")
    p.add_argument("--config", help="TOML config file, e.g. a run's config.toml")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key (type, default, meaning), with --method its sections' keys too")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--json", action="store_true",
                   help="end with the run, its last checkpoint and final metrics as one JSON object (for scripts) "
                        "instead of the summary")
    _overrides(p, "epochs=10 lnl.seed_threshold=0.7")

    p = _command(commands, "evaluate", _evaluate, "full-protocol CAM evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory, or URI")
    p.add_argument("--checkpoint-choice", choices=["best", "latest"], default="best",
                   help="of a run directory: the checkpoint with the best val miou, or the newest")
    p.add_argument("--data", required=True, help="URI of prepared shards")
    p.add_argument("--split", default="val", help="split to evaluate")
    p.add_argument("--scales", type=_scales, default=FULL_SCALES, help="CAM scales, comma-separated")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip CAMs")
    p.add_argument("--crf", action="store_true", help="also score dense-CRF-refined CAMs")
    p.add_argument("--max-images", type=int, default=0, help="evaluate at most this many images (0 = all)")
    p.add_argument("--threshold", type=float, default=None,
                   help="score at this background threshold, chosen on another split (default: this split's best)")
    p.add_argument("--no-verify-data", action="store_true",
                   help="skip the shards' sha256 check (otherwise done until one full pass has recorded it)")
    p.add_argument("--out", help="directory for results.json and results.md")
    _show(p, "image | ground truth | CAM heatmap of each class present | prediction")
    p.add_argument("--set", action=_Moved, new_form="SECTION.KEY=VALUE (e.g. lnl.export=shrink)")
    _overrides(p, "lnl.export=shrink", "inference settings of the checkpoint's method")

    p = _command(commands, "demo", _demo, "everything on a synthetic dataset with a local Ray")
    p.add_argument("--out", default="wsss-demo", help="working directory")
    p.add_argument("--methods", default="cam", help="comma-separated methods to train and compare")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    p.add_argument("--preset", default="demo", choices=["demo", "test"], help="dataset and run size")
    p.add_argument("--seeds", type=int, default=1, help="seeds per method (table shows mean ± std)")
    _overrides(p, "output_stride=8", "run settings of every run")

    p = _command(commands, "pseudo-labels", "wsss.platform.pseudo_labels:main",
                 "stage-1 CAMs -> CRF-refined label shards for stage 2, on Ray Data")
    p.add_argument("--checkpoint", help="stage-1 checkpoint or run directory, or URI (every mode but ground-truth)")
    p.add_argument("--data", required=True, help="URI of the prepared image shards")
    p.add_argument("--out", required=True, help="directory or URI for the pseudo-label shards")
    p.add_argument("--split", default="train", help="split to label")
    p.add_argument("--mode", default="crf", choices=PSEUDO_LABEL_MODES,
                   help="crf: dense CRF on the CAMs; irn: IRN double threshold (255 between); "
                        "segmentation: argmax of the segmentation branch (e.g. csrm) over "
                        "background and the image's classes; segmentation-crf: that argmax refined by "
                        "a dense CRF (CSRM's dCRF); ground-truth: the split's own masks "
                        "(no checkpoint), for the fully supervised upper bound")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"crf background score (default: the checkpoint's, else {PSEUDO_LABEL_THRESHOLD})")
    p.add_argument("--fg", type=float, default=0.30, help="irn foreground threshold δ_fg")
    p.add_argument("--bg", type=float, default=0.05, help="irn background threshold δ_bg")
    p.add_argument("--scales", type=_scales, default=FULL_SCALES, help="CAM scales, comma-separated")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip CAMs")
    p.add_argument("--cam-actors", type=int, default=None, help="most CAM actors (default: GPUs, else CPUs - 1)")
    p.add_argument("--crf-actors", type=int, default=None,
                   help="most CRF actors (default: CPUs - GPUs, as each GPU's CAM actor holds a CPU; else CPUs - 1)")
    p.add_argument("--overwrite", action="store_true", help="replace pseudo-labels already at --out")
    _show(p, "image | ground truth (where there is one) | pseudo-label")

    p = _command(commands, "segment", "wsss.platform.segmentation:main",
                 "stage 2, a DeepLab trained on pseudo-label shards, then its evaluation")
    p.add_argument("--data", help="URI of the prepared image shards")
    p.add_argument("--pseudo-labels", help="URI of the pseudo-label shards (`wsss pseudo-labels`)")
    p.add_argument("--ocr", action="store_true", help="add the ocr rectification loss (deeplab+ocr)")
    p.add_argument("--variant", choices=("v2", "v3plus"), help="DeepLab variant (default: v2)")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--checkpoint", help="skip training: evaluate this checkpoint (any method with a "
                                        "segmentation branch, e.g. csrm)")
    p.add_argument("--split", default=None, help="evaluation split (default: the config's val_split)")
    p.add_argument("--scales", type=_scales, default=SEG_SCALES, help="evaluation scales, comma-separated")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip predictions")
    p.add_argument("--crf", action="store_true", help="also score dense-CRF-refined predictions")
    p.add_argument("--crf-preset", default="psa", choices=CRF_PRESETS, help="dense-CRF parameters")
    p.add_argument("--max-images", type=int, default=0, help="evaluate at most this many images (0 = all)")
    p.add_argument("--out", help="directory for results.json and results.md (default: in the run directory)")
    _overrides(p, "epochs=10 ocr.rectification_weight=0.5")

    p = _command(commands, "tune", "wsss.tuning.tune:main",
                 "a Ray Tune sweep of a method's hyperparameters (Optuna TPE, ASHA, W&B)")
    p.add_argument("--method", help="e.g. lnl, lnl+fsae (not needed with --resume)")
    p.add_argument("--data", help="URI of prepared shards (not needed with --resume)")
    p.add_argument("--trials", type=int, help="number of trials (not needed with --resume)")
    p.add_argument("--config", help="TOML config file for the base run")
    p.add_argument("--space", help="TOML or JSON file narrowing or replacing parameters")
    p.add_argument("--scheduler", default="asha", choices=("asha", "none"), help="trial scheduler")
    p.add_argument("--concurrency", type=int, help="max trials at once (default: what fits)")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name (under storage_path=...; unpickles its Ray/Optuna "
                        "state: trusted storage only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--name", help="sweep name (default: tune-METHOD-TIME)")
    p.add_argument("--study-storage", help="Optuna storage URL (default: SQLite in the sweep)")
    p.add_argument("--no-eval", action="store_true", help="skip the full evaluation of the best trial")
    p.add_argument("--storage-path", action=_Moved, new_form="storage_path=URI")
    _overrides(p, "epochs=10 backbone=resnet18 storage_path=s3://bucket/sweeps", "base config of every trial")

    p = _command(commands, "report", "wsss.tuning.report:main",
                 "the comparison table of methods, with plots, from sweeps and runs")
    p.add_argument("dirs", nargs="+", metavar="SWEEP_OR_RUN_DIR", help="sweep or run directories")
    p.add_argument("--out", required=True, help="directory for tables and plots")
    p.add_argument("--wandb-project", default="wsss", help="W&B project when W&B is online")
    return parser


def _input_error(error: BaseException, argv: list[str]) -> bool:
    """The project's own errors about what the user gave (config keys, data, a file the
    user named): one line. Anything else is a bug and keeps its traceback."""
    kinds = []
    for module, name in (("wsss.platform.config", "ConfigError"), ("wsss.io", "DataError"),
                         ("wsss.datasets.lease", "FolderInUseError")):
        if module in sys.modules:  # an error of a module not imported yet cannot have been raised
            kinds.append(getattr(sys.modules[module], name))
    if isinstance(error, tuple(kinds)):
        return True
    if isinstance(error, FileNotFoundError):  # about a path the user named, or a file inside it
        named = {value for item in argv for value in (item, item.partition("=")[2]) if value and value[0] != "-"}
        where = str(error.filename) if error.filename is not None else str(error)
        return any(where.startswith(value) for value in named)
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as exit:  # argparse's errors (code 2), --help and --version (0)
        return exit.code
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return _run_guarded(args, argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argparse takes a positional list in one piece: KEY=VALUE arguments after a later
    option (`--trials 1 epochs=2 --name x lr=0.1`) come back unparsed; they join the list."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    listed = "options" if args.command == "prepare" else "overrides"
    if extra and hasattr(args, listed) and not any(item.startswith("-") for item in extra):
        try:
            setattr(args, listed, [*getattr(args, listed), *map(_key_value, extra)])
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _run_guarded(args, argv: list[str]) -> int:
    """Runs the command; an input error is one line and exit code 2, storage that stopped
    answering one line and exit code 1."""
    try:
        if callable(args.run):
            return args.run(args)
        module, function = args.run.split(":")
        return getattr(importlib.import_module(module), function)(args)
    except Exception as error:
        from wsss.io import StorageUnavailableError, public_uri

        unavailable = isinstance(error, StorageUnavailableError)
        if not (unavailable or _input_error(error, argv)):
            raise
        print(f"wsss {args.command}: error: {public_uri(str(error))}", file=sys.stderr)
        return 1 if unavailable else 2


if __name__ == "__main__":
    sys.exit(main())
