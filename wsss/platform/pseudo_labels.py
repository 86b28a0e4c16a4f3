"""`wsss pseudo-labels`: stage-1 CAMs -> CRF-refined label shards for stage 2, on Ray Data.

Per image: multi-scale + flip CAMs of the checkpoint's method (`cams.normalized_cams`,
classes outside the image labels zeroed), then one of
  crf  dense CRF (PSA preset) on [background score = threshold | the present classes' CAMs];
  irn  IRN's double threshold: argmax of [δ_fg | CAMs] and of [δ_bg | CAMs], each refined by
       IRN's label CRF; a pixel is its class where the δ_fg map says foreground, background
       where both say background, 255 where only the δ_bg map says foreground;
or, for methods with a segmentation branch (`csrm`), instead of CAMs:
  segmentation  the argmax over background and the image's classes of the segmentation
       branch's softmax, averaged over scales and flips (`segmentation.segmentation_probs`);
       CSRM's pseudo-labels come from its segmentation branch directly;
  segmentation-crf  the same argmax refined by a dense CRF, as CSRM's Table 2 row "CSRM + dCRF"
       (the authors' code: IRN's label CRF on the argmax);
or, without a checkpoint:
  ground-truth  the split's own masks, copied: stage 2 trained on them is the fully
       supervised upper bound every WSSS table reports, and shows whether a stage-2 protocol
       can learn the data at all.
The job: one block per image shard file -> model actors (a GPU each when the cluster has
GPUs) read the file and emit its rows with their scores (CAMs or probabilities) -> label
actors on CPUs (add CPU nodes to go faster) -> the driver collects the label PNGs by (file,
row) and writes the mirror of each image shard as soon as all its rows are in. Rows are
keyed, not ordered, so the output mirrors the input file for file and row for row whatever
order the actors finish in.

Output: pseudo-label shards (`wsss.platform.label_shards`: `id` + mode-L PNG `mask` per row,
at the image shards' relative paths) and a manifest written last; its `source` holds the
settings and, where the split has ground truth, the pseudo-masks' mIoU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from wsss.datasets.augment import decode_image, decode_label_map, multi_hot
from wsss.datasets.base import IGNORE_INDEX
from wsss.datasets.reading import pseudo_label_files, read_shard, to_numpy
from wsss.datasets.shards import Manifest, check_writable, encode_mask, read_manifest, verify_checksums
from wsss.io import DataError, join, public_uri, read_json
from wsss.methods.csrm_pseudo import cam_pseudo_label
from wsss.ops.crf import dense_crf_labels
from wsss.platform.cams import FULL_SCALES, image_tensor, normalized_cams
from wsss.platform.checkpoints import INFO_FILE, latest_checkpoint, load_method
from wsss.platform.config import ConfigError
from wsss.platform.evaluate import crf_prediction
from wsss.platform.label_shards import LabelShardWriter, RowAssembler
from wsss.platform.metrics import confusion_matrix, foreground_error_rates, miou
from wsss.platform.pictures import picture_name, prediction_panel, save_png
from wsss.platform.runtime import ensure_ray, job_batches
from wsss.platform.segmentation import segmentation_probs

SEGMENTATION_MODES = ("segmentation", "segmentation-crf")  # labels from a segmentation branch, not CAMs
MODES = ("crf", "irn", *SEGMENTATION_MODES)  # from a checkpoint; and GROUND_TRUTH
GROUND_TRUTH = "ground-truth"
DEFAULT_THRESHOLD = 0.25  # crf background score when neither --threshold nor the checkpoint gives one
IMAGE_COLUMNS = ["id", "image", "labels", "height", "width", "mask"]
ROWS_PER_CALL = 8  # rows the CAM actor emits at a time: small blocks keep the CRF actors busy early
# Rows per CRF call. Between calls an actor waits for Ray Data (input fetch, output put,
# dispatch: 12-15 ms median, up to 150 ms); at one 256² image per call (~90 ms of CRF)
# that idled 2 actors 30% of the time (benchmarks/crf.py --batches 1,4).
CRF_BATCH_SIZE = 4


@dataclass(frozen=True)
class PseudoLabelSettings:
    mode: str = "crf"
    threshold: float = DEFAULT_THRESHOLD  # crf: constant background score beside the CAMs
    fg_threshold: float = 0.30  # irn: δ_fg
    bg_threshold: float = 0.05  # irn: δ_bg
    scales: tuple[float, ...] = FULL_SCALES
    flip: bool = True

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: must be one of {', '.join(MODES)}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold={self.threshold}: must be in (0, 1)")
        if not 0 <= self.bg_threshold < self.fg_threshold <= 1:
            raise ValueError(f"fg={self.fg_threshold}, bg={self.bg_threshold}: need 0 <= bg < fg <= 1")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales={self.scales}: need at least one scale, all > 0")


def pseudo_label(image: np.ndarray, scores: np.ndarray, class_ids: np.ndarray,
                 settings: PseudoLabelSettings) -> np.ndarray:
    """One image's pseudo-label uint8 [H,W] (0 = background, 1..K, 255 = ignore).

    image uint8 [H,W,3]; scores float32 [n,H,W], normalised CAMs of the image's n classes
    `class_ids` (1..K), or in segmentation mode [1+n,H,W], the segmentation probabilities
    of background and those classes. An image without classes is all background."""
    lookup = np.concatenate([[0], class_ids]).astype(np.uint8)
    if settings.mode in SEGMENTATION_MODES:
        best = scores.argmax(axis=0)
        if settings.mode == "segmentation-crf" and len(class_ids):
            best = dense_crf_labels(np.ascontiguousarray(image), best, len(scores)).argmax(axis=0)
        return lookup[best]
    if len(class_ids) == 0:
        return np.zeros(image.shape[:2], np.uint8)
    if settings.mode == "irn":
        everywhere = np.ones(image.shape[:2], bool)
        return cam_pseudo_label(image, scores, class_ids, everywhere, settings.fg_threshold,
                                settings.bg_threshold, preset="irn")
    return lookup[crf_prediction(image, scores, np.ones(len(class_ids)), settings.threshold, "psa")]


def checkpoint_threshold(checkpoint: str) -> float | None:
    """The background threshold recorded with a checkpoint (its last validation), if any."""
    try:
        info = read_json(join(latest_checkpoint(checkpoint), INFO_FILE)) or {}
    except (OSError, ValueError):
        return None
    threshold = info.get("metrics", {}).get("threshold")
    return float(threshold) if isinstance(threshold, (int, float)) else None


class CAMStage:
    """Ray Data actor: image-shard files -> their rows with the `pseudo_label` scores of
    the present classes (float32 bytes: CAMs [n,H,W], or in segmentation mode probabilities
    [1+n,H,W]); images stay encoded on the way to the CRF actors."""

    def __init__(self, checkpoint: str, num_classes: int, scales, flip: bool, mode: str):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method, _ = load_method(checkpoint, self.device)
        self.num_classes, self.scales, self.flip, self.mode = num_classes, tuple(scales), flip, mode

    def __call__(self, batch: dict):
        for file_index, uri in zip(batch["file"], batch["uri"], strict=True):
            table = read_shard(str(uri), IMAGE_COLUMNS)
            first_row = 0
            for chunk in table.to_batches(max_chunksize=ROWS_PER_CALL):
                rows = to_numpy(pa.Table.from_batches([chunk]))
                count = len(rows["id"])
                labels = np.stack([multi_hot(rows["labels"][i], self.num_classes, str(rows["id"][i]))
                                   for i in range(count)])
                scores = [self._scores(rows, i, labels[i]) for i in range(count)]
                yield {"file": np.full(count, int(file_index)), "row": np.arange(first_row, first_row + count),
                       "id": np.asarray([str(x) for x in rows["id"]], dtype=object), "image": rows["image"],
                       "height": rows["height"], "width": rows["width"], "labels": labels,
                       "mask": np.asarray([m if m is not None else b"" for m in rows["mask"]], dtype=object),
                       "scores": np.asarray(scores, dtype=object)}
                first_row += count

    def _scores(self, rows: dict, i: int, labels: np.ndarray) -> bytes:
        image = np.asarray(decode_image(rows["image"][i], str(rows["id"][i]), rows["height"][i], rows["width"][i]))
        present = torch.from_numpy(labels > 0.5).to(self.device)
        if self.mode in SEGMENTATION_MODES:
            probs = segmentation_probs(self.method, image_tensor(image, self.device), self.scales, self.flip)
            scores = probs[torch.cat([present.new_ones(1), present])]  # background and the image's classes
        else:
            cams = normalized_cams(self.method, image_tensor(image, self.device), torch.from_numpy(labels),
                                   self.scales, self.flip)
            scores = cams[present]
        return scores.cpu().numpy().astype(np.float32).tobytes()


class CRFStage:
    """Ray Data actor (one CPU): rows with CAMs -> label PNGs and ground-truth confusions."""

    def __init__(self, settings: dict, num_classes: int):
        self.settings = PseudoLabelSettings(**settings)
        self.num_classes = num_classes  # K

    def __call__(self, batch: dict) -> dict:
        pngs, confusions, has_mask, ignored = [], [], [], []
        classes = self.num_classes + 1
        for i, sample_id in enumerate(batch["id"]):
            sample_id = str(sample_id)
            # writable copies: pydensecrf refuses read-only buffers (PIL's and frombuffer's are)
            image = np.array(decode_image(batch["image"][i], sample_id, batch["height"][i], batch["width"][i]))
            class_ids = np.flatnonzero(batch["labels"][i] > 0.5) + 1
            channels = len(class_ids) + (self.settings.mode in SEGMENTATION_MODES)  # + background
            scores = np.frombuffer(batch["scores"][i], np.float32).reshape(channels, *image.shape[:2]).copy()
            label = pseudo_label(image, scores, class_ids, self.settings)
            pngs.append(encode_mask(label))
            ignored.append(int((label == IGNORE_INDEX).sum()))
            mask = batch["mask"][i]
            has_mask.append(len(mask) > 0)
            if has_mask[-1]:
                truth = decode_label_map(mask, sample_id, "mask", image.shape[:2])
                # ignored pseudo-label pixels count as predicted background: the mask's coverage matters too
                predicted = np.where(label == IGNORE_INDEX, 0, label)
                confusions.append(confusion_matrix(predicted, truth, classes).ravel())
            else:
                confusions.append(np.zeros(classes * classes, np.int64))
        return {"file": batch["file"], "row": batch["row"], "id": batch["id"],
                "mask": np.asarray(pngs, dtype=object), "confusion": np.stack(confusions),
                "has_mask": np.asarray(has_mask), "ignored": np.asarray(ignored),
                "pixels": batch["height"].astype(np.int64) * batch["width"]}


def _open_inputs(checkpoint: str, data: str, split: str, out: str, overwrite: bool, mode: str) -> Manifest:
    """Fail fast, before any Ray work: checkpoint (with a segmentation branch for that
    mode), data split, matching classes, writable out."""
    method, state = load_method(checkpoint)
    if mode in SEGMENTATION_MODES:
        with torch.no_grad():
            branch = method.segmentation_logits(torch.zeros(1, 3, 64, 64))
        if branch is None:
            raise ValueError(f"{checkpoint}: --mode {mode} needs a method with a segmentation branch "
                             f"(e.g. csrm); {state['config']['method']!r} has none: use crf or irn")
    images = read_manifest(data)
    images.rows(split)
    if list(state["dataset"]["classes"]) != list(images.classes):
        raise DataError(data, f"classes {images.classes} differ from the checkpoint's {state['dataset']['classes']}")
    check_writable(out, overwrite)
    return images


def generate_pseudo_labels(checkpoint: str, data: str, out: str, *, split: str = "train", mode: str = "crf",
                           threshold: float | None = None, fg_threshold: float = 0.30,
                           bg_threshold: float = 0.05, scales=FULL_SCALES, flip: bool = True,
                           cam_actors: int | None = None, crf_actors: int | None = None,
                           overwrite: bool = False) -> dict:
    """Check every input, then run the job (on the cluster Ray is connected to, else a local
    Ray); returns the manifest's `source` summary."""
    if threshold is None:
        threshold = checkpoint_threshold(checkpoint) or DEFAULT_THRESHOLD
    settings = PseudoLabelSettings(mode, threshold, fg_threshold, bg_threshold, tuple(scales), flip)
    images = _open_inputs(checkpoint, data, split, out, overwrite, mode)
    verify_checksums(images, split)  # a damaged shard fails here, not half way
    files = images.files(split)
    ensure_ray()  # only now: bad input fails before Ray starts
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    # Autoscaling pools from one actor each, so both stages always progress; Ray Data grows
    # whichever has work queued into the free CPUs (fixed pools would starve one another).
    cam_actors = cam_actors or gpus or max(1, cpus - 1)
    crf_actors = crf_actors or max(1, cpus - (gpus or 1))
    assembler = RowAssembler([entry["rows"] for entry in images.splits[split]["files"]])
    confusion = np.zeros((images.num_classes + 1) ** 2, np.int64)
    with_mask, ignored, pixels = 0, 0, 0
    with LabelShardWriter(out, images, split, overwrite) as writer:
        for batch in job_batches(_label_job(checkpoint, files, images.num_classes, settings, gpus, cam_actors,
                                            crf_actors), batch_size=None, batch_format="numpy"):
            for file_index, row, sample_id, png in zip(batch["file"], batch["row"], batch["id"], batch["mask"],
                                                       strict=True):
                complete = assembler.add(int(file_index), int(row), (str(sample_id), png))
                if complete:
                    ids, masks = zip(*complete, strict=True)
                    writer.write(int(file_index), list(ids), list(masks))
            confusion += batch["confusion"][batch["has_mask"]].sum(axis=0)
            with_mask += int(batch["has_mask"].sum())
            ignored, pixels = ignored + int(batch["ignored"].sum()), pixels + int(batch["pixels"].sum())
        source = {"kind": "pseudo-labels", "images": public_uri(images.location), "split": split,
                  "checkpoint": public_uri(checkpoint),
                  **asdict(settings), "scales": list(settings.scales), "ignored_fraction": ignored / max(1, pixels),
                  "quality": _quality(confusion, with_mask, images.num_classes + 1)}
        writer.publish(source)
    return source


def _label_job(checkpoint: str, files: list[str], num_classes: int, settings: PseudoLabelSettings, gpus: int,
               cam_actors: int, crf_actors: int) -> ray.data.Dataset:
    return (ray.data.from_items([{"file": i, "uri": uri} for i, uri in enumerate(files)],
                                override_num_blocks=len(files))
            .map_batches(CAMStage, batch_size=1, num_cpus=1, num_gpus=1 if gpus else 0,
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cam_actors),
                         fn_constructor_kwargs=dict(checkpoint=checkpoint, num_classes=num_classes,
                                                    scales=settings.scales, flip=settings.flip,
                                                    mode=settings.mode))
            .map_batches(CRFStage, batch_size=CRF_BATCH_SIZE, num_cpus=1,
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=crf_actors),
                         fn_constructor_kwargs=dict(settings=asdict(settings), num_classes=num_classes)))


def ground_truth_labels(data: str, out: str, *, split: str = "train", overwrite: bool = False) -> dict:
    """Label shards holding the split's ground-truth masks (`--mode ground-truth`); no Ray.
    Every row must have a mask: the first one without fails the job, naming its shard and id,
    and nothing is left at `out`."""
    images = read_manifest(data)
    images.rows(split)
    check_writable(out, overwrite)
    verify_checksums(images, split)
    with LabelShardWriter(out, images, split, overwrite) as writer:
        for index, uri in enumerate(images.files(split)):
            table = read_shard(uri, ["id", "mask"])
            ids, masks = table.column("id").to_pylist(), table.column("mask").to_pylist()
            missing = next((sample_id for sample_id, mask in zip(ids, masks, strict=True) if mask is None), None)
            if missing is not None:
                raise DataError(uri, f"image {missing!r} has no mask: --mode {GROUND_TRUTH} needs one for every "
                                     f"image of split {split!r}")
            writer.write(index, ids, masks)  # the shards' masks are already mode-L PNGs
        source = {"kind": "pseudo-labels", "images": public_uri(images.location), "split": split, "mode": GROUND_TRUTH,
                  "ignored_fraction": None, "quality": None}
        writer.publish(source)
    return source


def write_pseudo_label_pictures(data: str, labels: str, split: str, show_dir: str, count: int) -> list[Path]:
    """`show_dir/<image id>.png` for the split's first `count` images, read back from the
    written label shards: image | ground truth (where the image has one) | pseudo-label."""
    images, written_labels = read_manifest(data), read_manifest(labels)
    mode = written_labels.source.get("mode")
    written = []
    label_files = pseudo_label_files(images, written_labels, split)
    for image_file, label_file in zip(images.files(split), label_files, strict=True):
        table = read_shard(image_file, ["id", "image", "height", "width", "mask"], label_uri=label_file)
        for row in table.slice(0, count - len(written)).to_pylist():
            sample_id = str(row["id"])
            image = np.asarray(decode_image(row["image"], sample_id, row["height"], row["width"]))
            label = decode_label_map(row["target"], sample_id, "pseudo-label", image.shape[:2])
            truth = decode_label_map(row["mask"], sample_id, "mask", image.shape[:2]) if row["mask"] else None
            picture = prediction_panel(image, label, truth, images.classes, images.palette,
                                       title=f"{sample_id}: pseudo-label of {split}",
                                       prediction_caption=f"pseudo-label ({mode})" if mode else "pseudo-label")
            written.append(save_png(picture, Path(show_dir) / f"{picture_name(sample_id)}.png"))
        if len(written) >= count:
            break
    return written


def _quality(confusion: np.ndarray, images: int, classes: int) -> dict | None:
    """Pseudo-mask mIoU against the ground truth of the `images` rows that have one
    (ignored pseudo-label pixels count as background)."""
    if not images:
        return None
    conf = confusion.reshape(classes, classes)
    per_class, mean = miou(conf)
    fpr, fnr = foreground_error_rates(conf)
    return {"images_with_mask": images, "miou": mean, "fg_fpr": fpr, "fg_fnr": fnr,
            "per_class_iou": [None if np.isnan(v) else float(v) for v in per_class]}


def main(args) -> int:
    if args.mode == GROUND_TRUTH:
        if args.checkpoint:
            raise ConfigError(f"--mode {GROUND_TRUTH} copies the masks; it takes no --checkpoint")
        ground_truth_labels(args.data, args.out, split=args.split, overwrite=args.overwrite)
        print(f"wrote the {read_manifest(args.out).rows(args.split)} ground-truth masks of split "
              f"{args.split!r} as label shards to {args.out}")
        _show(args)
        return 0
    if not args.checkpoint:
        raise ConfigError(f"--mode {args.mode} needs --checkpoint")
    scales = args.scales  # a tuple: `wsss.cli` parses them
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    try:  # bad values fail before the checkpoint loads
        PseudoLabelSettings(args.mode, threshold, args.fg, args.bg, scales)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    source = generate_pseudo_labels(args.checkpoint, args.data, args.out, split=args.split, mode=args.mode,
                                    threshold=args.threshold, fg_threshold=args.fg, bg_threshold=args.bg,
                                    scales=scales, flip=not args.no_flip, cam_actors=args.cam_actors,
                                    crf_actors=args.crf_actors, overwrite=args.overwrite)
    quality = source["quality"]
    rows = read_manifest(args.out).rows(args.split)
    print(f"wrote {rows} pseudo-labels ({args.mode}) to {args.out}"
          + (f"; pseudo-mask mIoU {100 * quality['miou']:.2f} on {quality['images_with_mask']} images with masks"
             if quality else "; the split has no ground truth to score them"))
    _show(args)
    return 0


def _show(args) -> None:
    if args.show_dir:
        pictures = write_pseudo_label_pictures(args.data, args.out, args.split, args.show_dir, args.show_images)
        print(f"{len(pictures)} pictures (image | ground truth | pseudo-label) in {args.show_dir}")
