"""The `wsss` command: prepare, train, evaluate, demo, pseudo-labels, segment, tune, report.

Every command validates its arguments (config keys, data manifest, checkpoint) before
Ray starts, so a typo costs a second, not a cluster start-up.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys


def _prepare(args) -> int:
    from wsss.datasets.prepare import prepare

    options = {key: _literal(value) for key, _, value in (kv.partition("=") for kv in args.option)}
    manifest = prepare(args.dataset, args.root, args.out, sbd=args.sbd, skip_invalid=args.skip_invalid,
                       overwrite=args.overwrite, **options)
    splits = ", ".join(f"{name}: {info['rows']}" for name, info in manifest.splits.items())
    skipped = manifest.skipped.get("count", 0) if isinstance(manifest.skipped, dict) else 0
    print(f"wrote {args.out} ({manifest.dataset}; {splits}; skipped {skipped})")
    return 0


def _train(args) -> int:
    from wsss.datasets.credentials import public_uri
    from wsss.datasets.shards import read_manifest
    from wsss.datasets.storage import check_bucket
    from wsss.platform.config import load_config
    from wsss.platform.runtime import ensure_ray
    from wsss.platform.train import check_start, fit, result_locations

    config = load_config(args.config, args.overrides, method=args.method, data=args.data)
    read_manifest(config.data)  # bad data fails here, before Ray starts
    check_bucket(config.storage_path)
    check_start(config)
    ensure_ray()
    result = fit(config)
    run, checkpoint = result_locations(config, result)
    print(json.dumps({"run": public_uri(run), "checkpoint": public_uri(checkpoint or "") or None,
                      "metrics": _scalars(result.metrics)}, indent=2))
    return 0


def _evaluate(args) -> int:
    from wsss.platform.config import parse_overrides
    from wsss.platform.evaluate import evaluate_checkpoint, results_table

    scales = tuple(float(s) for s in args.scales.split(","))
    results = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, scales=scales,
                                  flip=not args.no_flip, crf=args.crf, max_images=args.max_images,
                                  out=args.out, method_overrides=parse_overrides(args.set))
    print(results_table(results))
    if args.out:
        print(f"written to {args.out}/results.json and results.md")
    return 0


def _demo(args) -> int:
    from wsss.platform.config import parse_overrides
    from wsss.platform.demo import run_demo

    run_demo(out=args.out, methods=args.methods.split(","), epochs=args.epochs, preset=args.preset,
             seeds=args.seeds, overrides=parse_overrides(args.overrides))
    return 0


def _literal(text: str):
    """'96' -> 96, '0.5' -> 0.5, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _scalars(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="write a dataset as Parquet shards + manifest")
    p.add_argument("dataset", help="voc | coco | cityscapes | synthetic")
    p.add_argument("--root", required=True, help="dataset directory")
    p.add_argument("--sbd", help="SBD benchmark_RELEASE directory (voc: builds train_aug)")
    p.add_argument("--out", required=True, help="output directory or URI (s3://, gs://)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad samples, counted in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, e.g. --option preset=demo for synthetic")
    p.set_defaults(run=_prepare)

    p = commands.add_parser("train", help="train a method on Ray Train")
    p.add_argument("--method", help="e.g. cam, lnl, lnl+fsae")
    p.add_argument("--data", help="URI of prepared shards")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. epochs=10 lnl.eta=0.7")
    p.set_defaults(run=_train)

    p = commands.add_parser("evaluate", help="full-protocol CAM evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory, or URI")
    p.add_argument("--data", required=True, help="URI of prepared shards")
    p.add_argument("--split", default="val")
    p.add_argument("--scales", default="1.0,0.5,1.5,2.0")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--crf", action="store_true", help="also score dense-CRF-refined CAMs")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--out", help="directory for results.json and results.md")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="inference setting of the checkpoint's method, e.g. lnl.export=shrink (repeatable)")
    p.set_defaults(run=_evaluate)

    p = commands.add_parser("demo", help="everything on a synthetic dataset with a local Ray")
    p.add_argument("--out", default="wsss-demo", help="working directory")
    p.add_argument("--methods", default="cam", help="comma-separated methods to train and compare")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--preset", default="demo", choices=["demo", "test"])
    p.add_argument("--seeds", type=int, default=1, help="seeds per method (table shows mean ± std)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="for every run, e.g. output_stride=8")
    p.set_defaults(run=_demo)

    # Commands whose arguments live beside their implementation.
    for name, module_name in (("pseudo-labels", "wsss.platform.pseudo_labels"),
                              ("segment", "wsss.platform.segmentation"),
                              ("tune", "wsss.tuning.tune"), ("report", "wsss.tuning.report")):
        module = importlib.import_module(module_name)
        p = commands.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from wsss.datasets.base import DataError
    from wsss.datasets.credentials import public_uri
    from wsss.platform.config import ConfigError

    try:
        return args.run(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        print(f"wsss {args.command}: error: {public_uri(str(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
