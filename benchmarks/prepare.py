"""`wsss prepare` in worker processes against one process, side by side, on a VOC-like tree.

    python benchmarks/prepare.py [--images 3000] [--workers N] [--rounds 3]

Writes a VOC-format tree (smooth random JPEGs at VOC's 500x375, palette PNG masks, XML
labels), then prepares it with 1 process and with N (default: one per CPU), interleaved
--rounds times so that load from other processes hits both alike; the best round of each
counts. Prints images/s of each, their ratio (goal on 2 cores: ≥ 1.7), and whether the
shards are byte for byte the same.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.datasets.parallel import default_workers
from wsss.datasets.prepare import prepare
from wsss.datasets.voc import VOC_CLASSES, voc_colormap

HEIGHT, WIDTH = 375, 500


def write_tree(root: Path, images: int, seed: int = 0) -> Path:
    """A VOC2012-format tree of `images` images, all in split train; returns the devkit."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    palette = [value for colour in voc_colormap(256) for value in colour]
    ids = [f"2012_{index:06d}" for index in range(images)]
    for image_id in ids:
        coarse = rng.integers(0, 256, (HEIGHT // 25, WIDTH // 25, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BILINEAR).save(
            voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        cls = int(rng.integers(1, len(VOC_CLASSES)))
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        top, left = rng.integers(0, HEIGHT // 2), rng.integers(0, WIDTH // 2)
        mask[top:top + HEIGHT // 3, left:left + WIDTH // 3] = cls
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{WIDTH}</width><height>{HEIGHT}"
            f"</height><depth>3</depth></size><object><name>{VOC_CLASSES[cls]}</name></object></annotation>")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    return root / "VOCdevkit"


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*.parquet"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wsss-prepare-bench-"))
    try:
        devkit = write_tree(work / "tree", args.images)
        best: dict[int, float] = {}
        outputs: dict[int, dict[str, bytes]] = {}
        for round_index in range(args.rounds):
            for workers in (1, args.workers):
                out = work / f"out-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                prepare("voc", devkit, out, workers=workers)
                rate = args.images / (time.perf_counter() - started)
                best[workers] = max(best.get(workers, 0.0), rate)
                outputs[workers] = shard_bytes(out)
                print(f"round {round_index + 1}: {workers} process(es): {rate:.1f} images/s", flush=True)
        print(f"\n| processes | images/s (best of {args.rounds}) |\n|---|---|")
        for workers, rate in best.items():
            print(f"| {workers} | {rate:.1f} |")
        print(f"\n{args.workers} processes / 1: {best[args.workers] / best[1]:.2f}× (goal on 2 cores: ≥ 1.7)")
        same = outputs[1] == outputs[args.workers]
        print(f"shards byte for byte the same: {'yes' if same else 'NO'} ({len(outputs[1])} files)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
