"""`wsss segment`: stage 2, a DeepLab trained on pseudo-label shards, then its evaluation.

Training is an ordinary run of the platform (`train.fit`: checkpoints, resume by name,
W&B, failure handling) of method `deeplab` or `deeplab+ocr`, with stage-2 defaults below
the config file and the command line. Evaluation is a Ray Data job like `wsss evaluate`:
per image, the softmax of the segmentation logits averaged over scales (0.5-1.5) and
flips -> argmax (and, optionally, a dense CRF on the averaged probabilities), scored by
mIoU, per-class IoU, foreground FPR/FNR and the out-of-candidate rate (OCR paper, Fig. 6a:
images with any pixel of a class absent from the image labels, and such pixels, over all
pixels of the image). Works for any checkpoint whose method has a segmentation branch
(`method.segmentation_logits`), e.g. `csrm`.
"""

from __future__ import annotations

import json

import numpy as np
import ray
import ray.data
import torch
import torch.nn.functional as F

from wsss.datasets.reading import pseudo_label_files
from wsss.datasets.shards import read_manifest
from wsss.io import DataError, join, public_uri, write_text
from wsss.ops.crf import PRESETS, dense_crf
from wsss.platform.cams import image_tensor
from wsss.platform.checkpoints import load_method
from wsss.platform.config import ConfigError, TrainConfig, load_config, parse_overrides
from wsss.platform.data import eval_dataset
from wsss.platform.evaluate import cooccurrence_scores
from wsss.platform.metrics import confusion_matrix, foreground_error_rates, miou, out_of_candidate_counts
from wsss.platform.runtime import job_batches

SEG_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
# Below the config file and the command line. The papers' backbone is a ResNet-101 (output
# stride: STAGE2_OUTPUT_STRIDE by variant). DeepLab fine-tunes at a low lr (the head gets 10×); 0.01
# diverged with ResNets. ~20 epochs of train_aug ≈ DeepLabV2's 20k iterations.
STAGE2_DEFAULTS = {"method": "deeplab", "backbone": "resnet101", "lr": 1e-3, "weight_decay": 5e-4, "epochs": 20}
STAGE2_OUTPUT_STRIDE = {"v2": 8, "v3plus": 16}
OC_KEYS = ("images", "oc_images", "pixels", "oc_pixels")
STAGE2_METHODS = ("deeplab", "deeplab+ocr")


def stage2_config(data: str | None = None, pseudo_labels: str | None = None, *, ocr: bool = False,
                  variant: str | None = None, config_file: str | None = None,
                  overrides: list[str] | dict | None = None) -> TrainConfig:
    """TrainConfig of method deeplab (+ocr): deeplab+ocr with `ocr` or when the config file names
    it (configs/ocr/voc.toml). Precedence: TrainConfig defaults < STAGE2_DEFAULTS < config file
    < the arguments here < `key=value` overrides."""
    overrides = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    if variant is not None:
        overrides.setdefault("deeplab.variant", variant)
    values = dict(method="deeplab+ocr" if ocr else None, data=data, pseudo_labels=pseudo_labels)
    config = load_config(config_file, overrides, defaults=STAGE2_DEFAULTS, **values)
    if config.method not in STAGE2_METHODS:
        where = f"--config {config_file}: " if config_file else ""
        raise ConfigError(f"{where}method={config.method!r}: `wsss segment` trains {' or '.join(STAGE2_METHODS)}")
    # The default output stride is the variant's, and the variant is known only once loaded.
    stride = STAGE2_OUTPUT_STRIDE[config.sections["deeplab"].variant]
    return load_config(config_file, overrides, defaults={**STAGE2_DEFAULTS, "output_stride": stride}, **values)


@torch.no_grad()
def segmentation_probs(method, image: torch.Tensor, scales=SEG_SCALES, flip: bool = True) -> torch.Tensor:
    """Class probabilities [K+1,H,W]: the mean over scales (and flips) of the softmax of
    the segmentation logits, each upsampled to the image size. image [1,3,H,W]."""
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = F.interpolate(image, size=size, mode="bilinear", align_corners=False) if scale != 1.0 else image
        logits = method.segmentation_logits(torch.cat([x, x.flip(-1)]) if flip else x)
        if logits is None:
            raise ValueError(f"method {type(method).name!r} has no segmentation branch "
                             "(segmentation_logits is None): evaluate its CAMs with `wsss evaluate`")
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        probs = probs[0] + probs[1].flip(-1) if flip else probs[0]
        total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))


class SegmentationScorer:
    """Ray Data actor: rows -> per-image confusion [C*C] and OC counts [4], with CRF too."""

    def __init__(self, checkpoint: str, scales, flip: bool, crf_preset: str | None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method, state = load_method(checkpoint, self.device)
        self.num_classes = len(state["dataset"]["classes"])  # K + 1
        self.scales, self.flip, self.crf_preset = tuple(scales), flip, crf_preset

    def __call__(self, batch: dict) -> dict:
        out = {"confusion": [], "oc": [], "confusion_crf": [], "oc_crf": []}
        for image, mask, labels in zip(batch["image"], batch["mask"], batch["labels"], strict=True):
            probs = segmentation_probs(self.method, image_tensor(image, self.device), self.scales, self.flip)
            candidates = np.concatenate([[True], np.asarray(labels) > 0.5])[None]
            predictions = {"": probs.argmax(dim=0).cpu().numpy()}
            if self.crf_preset:
                # a writable copy: pydensecrf refuses the read-only arrays Ray Data batches may hold
                refined = dense_crf(np.array(image, np.uint8), probs.cpu().numpy(), self.crf_preset)
                predictions["_crf"] = refined.argmax(axis=0)
            for suffix, prediction in predictions.items():
                out["confusion" + suffix].append(confusion_matrix(prediction, np.asarray(mask), self.num_classes).ravel())
                counts = out_of_candidate_counts(prediction[None], candidates)
                out["oc" + suffix].append(np.asarray([counts[k] for k in OC_KEYS], np.int64))
        return {key: np.stack(values) for key, values in out.items() if values}


def _scores(confusion: np.ndarray, oc: np.ndarray) -> dict:
    per_class, mean = miou(confusion)
    fpr, fnr = foreground_error_rates(confusion)
    counts = dict(zip(OC_KEYS, oc.tolist(), strict=True))
    return {"miou": mean, "per_class_iou": [None if np.isnan(v) else float(v) for v in per_class],
            "fg_fpr": fpr, "fg_fnr": fnr,
            "oc_image_rate": counts["oc_images"] / max(1, counts["images"]),
            "oc_pixel_rate": counts["oc_pixels"] / max(1, counts["pixels"])}


def evaluate_segmentation(checkpoint: str, data: str, *, split: str = "val", scales=SEG_SCALES,
                          flip: bool = True, crf: bool = False, crf_preset: str = "psa", max_images: int = 0,
                          num_actors: int | None = None, out: str | None = None) -> dict:
    """Multi-scale + flip evaluation of a segmentation checkpoint (Ray must be initialised)."""
    method, state = load_method(checkpoint)  # fail fast, before Ray work
    classes = state["dataset"]["classes"]
    segmentation_probs(method, torch.zeros(1, 3, 32, 32), scales=(1.0,), flip=False)  # has a segmentation branch?
    if crf and crf_preset not in PRESETS:
        raise ValueError(f"crf_preset={crf_preset!r}: known presets {sorted(PRESETS)}")
    manifest = read_manifest(data)
    if list(manifest.classes) != list(classes):
        raise DataError(data, f"classes {manifest.classes} differ from the checkpoint's {classes}")
    dataset = eval_dataset(data, split)
    if max_images:
        dataset = dataset.limit(max_images)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0
    num_actors = num_actors or int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)) // 2)
    # An autoscaling pool: a fixed-size pool that took every CPU would starve the read tasks.
    scorer_args = dict(compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors), batch_size=1,
                       num_gpus=1 if use_gpu else 0, num_cpus=1,
                       fn_constructor_kwargs=dict(checkpoint=checkpoint, scales=scales, flip=flip,
                                                  crf_preset=crf_preset if crf else None))
    totals: dict[str, np.ndarray] = {}
    for batch in job_batches(dataset.map_batches(SegmentationScorer, **scorer_args),
                             batch_size=64, batch_format="numpy"):
        for key, value in batch.items():
            totals[key] = totals.get(key, 0) + value.sum(axis=0)
    if not totals:
        raise ValueError(f"{data}: split {split!r} has no images to evaluate")
    size = len(classes)
    results = {"checkpoint": public_uri(checkpoint), "data": public_uri(data), "split": split,
               "method": state["config"]["method"], "epoch": state["epoch"], "scales": list(scales), "flip": flip,
               "classes": classes, "images": int(totals["oc"][0]),
               **_scores(totals["confusion"].reshape(size, size), totals["oc"]),
               **cooccurrence_scores(totals["confusion"].reshape(size, size), manifest, state["config"]["train_split"])}
    if crf:
        results["crf"] = {"preset": crf_preset,
                          **_scores(totals["confusion_crf"].reshape(size, size), totals["oc_crf"])}
    if out:
        write_text(join(out, "results.json"), json.dumps(results, indent=2))  # a directory or a URI
        write_text(join(out, "results.md"), segmentation_table(results))
    return results


def segmentation_table(results: dict) -> str:
    """Markdown: headline numbers, then per-class IoU (and with CRF)."""
    columns = [("", results)] + ([(" + CRF", results["crf"])] if "crf" in results else [])
    lines = [f"# {results['method']} segmentation on {results['split']} ({results['data']})", "",
             f"{results['images']} images, scales {results['scales']}, flip {results['flip']}", "",
             "| | mIoU | fg FPR | fg FNR | OC images | OC pixels |", "|---|---|---|---|---|---|"]
    for name, scores in columns:
        lines.append(f"| prediction{name} | **{100 * scores['miou']:.2f}** | {scores['fg_fpr']:.3f} | "
                     f"{scores['fg_fnr']:.3f} | {100 * scores['oc_image_rate']:.1f}% | "
                     f"{100 * scores['oc_pixel_rate']:.2f}% |")
    lines += ["", "| class | IoU |" + "".join(f" IoU{name} |" for name, _ in columns[1:]),
              "|---|---|" + "---|" * (len(columns) - 1)]
    for index, name in enumerate(results["classes"]):
        values = [scores["per_class_iou"][index] for _, scores in columns]
        lines.append(f"| {name} |" + "".join(" — |" if v is None else f" {100 * v:.2f} |" for v in values))
    return "\n".join(lines) + "\n"


def main(args) -> int:
    from wsss.platform.runtime import ensure_ray

    scales = args.scales  # a tuple: `wsss.cli` parses them
    if args.checkpoint:
        if not args.data:
            raise ConfigError("--data is required")
        load_method(args.checkpoint)
        read_manifest(args.data)
        checkpoint, data, split, out = args.checkpoint, args.data, args.split or "val", args.out
        ensure_ray()
    else:
        config = stage2_config(args.data, args.pseudo_labels, ocr=args.ocr, variant=args.variant,
                               config_file=args.config, overrides=args.overrides)
        if not config.data:
            raise ConfigError("data: the URI of prepared shards is required (--data)")
        images = read_manifest(config.data)  # bad data fails here, before Ray starts
        pseudo_label_files(images, read_manifest(config.pseudo_labels), config.train_split)
        split = args.split or config.val_split
        if not split:
            raise ConfigError("no evaluation split: set --split or val_split")
        images.rows(split)
        from wsss.platform.train import check_start, fit, result_locations

        check_start(config)
        ensure_ray()

        run, checkpoint = result_locations(config, fit(config))
        data = config.data
        out = args.out or join(run, "segmentation")
        print(public_uri(f"trained {config.method}: run {run}, checkpoint {checkpoint}"))
    results = evaluate_segmentation(checkpoint, data, split=split, scales=scales, flip=not args.no_flip,
                                    crf=args.crf, crf_preset=args.crf_preset, max_images=args.max_images, out=out)
    print(segmentation_table(results))
    if out:
        print(f"written to {out}/results.json and results.md")
    return 0
