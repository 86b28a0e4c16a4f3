"""CSRM's segmentation pseudo-labels (Eqs. 2 and 6): the teacher's CAMs, CRF-refined, with
IRN's double threshold, computed on CPU worker processes.

The CRF is the slow part (two refinements per image). `CRFPseudoLabeler.submit` is called
right after the teacher's backbone has produced the CAMs and returns at once; the method
collects the labels (`PendingPseudoLabels.result`) only after the rest of its forward pass
and its other losses. When an accelerator computes the network, the images go to the pool
at submit, so the CRF runs on the spare cores meanwhile. When the CPU computes it, they go
at `result`, onto every core: a CRF beside the step would take a core from torch's threads,
which then wait on the slowest (9% slower steps on 2 cores, docs/benchmarks.md).
The pool is shared by every labeler with the same worker count in a process and started on
first use (spawned processes: safe beside CUDA and Ray threads).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from wsss.datasets.base import IGNORE_INDEX
from wsss.ops.crf import dense_crf_labels

_POOLS: dict[int, ProcessPoolExecutor] = {}


def cam_pseudo_label(image: np.ndarray, cam_logits: np.ndarray, class_ids: np.ndarray, valid: np.ndarray,
                     fg_threshold: float, bg_threshold: float, preset: str = "irn") -> np.ndarray:
    """One image's pseudo-label, uint8 [H,W]: class index, 0 = background, 255 = uncertain.

    image uint8 [H,W,3]; cam_logits float [n,h,w] of the image's n classes (`class_ids`,
    1..K); valid bool [H,W] (padding gets 255).
    ψ (Eq. 2): ReLU of the CAMs upscaled to H×W, each divided by its maximum.
    Eq. 6 as IRN's double threshold: the argmax of [δ | ψ] is CRF-refined once with δ =
    δ_fg and once with δ = δ_bg; a pixel is its class where the δ_fg map says foreground,
    background where both maps say background, and uncertain (255) where only the δ_bg map
    says foreground, i.e. where the CAM lies in (δ_bg, δ_fg] after refinement.
    """
    valid = valid.astype(bool)
    labels = np.zeros(image.shape[:2], np.uint8)
    if len(class_ids):
        cams = F.interpolate(torch.from_numpy(np.asarray(cam_logits, np.float32))[None], size=image.shape[:2],
                             mode="bilinear", align_corners=False)[0]
        cams = cams.relu() * torch.from_numpy(valid)
        cams = (cams / cams.flatten(1).amax(dim=1).clamp(min=1e-5)[:, None, None]).numpy()
        lookup = np.concatenate([[0], class_ids]).astype(np.uint8)
        foreground, background = _refined_argmax(image, cams, (fg_threshold, bg_threshold), preset)
        labels = np.where(foreground > 0, lookup[foreground], np.where(background == 0, 0, IGNORE_INDEX))
    labels[~valid] = IGNORE_INDEX
    return labels.astype(np.uint8)


def _refined_argmax(image: np.ndarray, cams: np.ndarray, thresholds: tuple[float, ...],
                    preset: str) -> np.ndarray:
    """The CRF-refined argmax of [δ | ψ] for each δ in `thresholds`: int [len(thresholds),H,W]."""
    seeds = np.stack([np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams]).argmax(axis=0)
                      for threshold in thresholds])
    return dense_crf_labels(image, seeds, cams.shape[0] + 1, preset=preset).argmax(axis=1)


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)  # one CRF per process; torch threads would only oversubscribe


def default_workers(overlap: bool) -> int:
    """CPU cores of this process's share of the node (cores / local replicas), minus one for
    the training process itself when the CRF overlaps its step; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    replicas = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // replicas - int(overlap))


def _pool(workers: int) -> ProcessPoolExecutor:
    if workers not in _POOLS:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_single_threaded_worker)
        # Shut down before multiprocessing joins child processes at exit (inside a
        # multiprocessing.Process that join comes before the executor's own exit hook and
        # would wait forever on the idle workers), and before the queues' feeder threads
        # close (priority 10), which carry the workers' stop signals.
        multiprocessing.util.Finalize(pool, pool.shutdown, kwargs={"cancel_futures": True}, exitpriority=100)
        _POOLS[workers] = pool
    return _POOLS[workers]


class PendingPseudoLabels:
    """A batch's pseudo-labels: being computed (`parts`), or still to compute (`jobs`, the
    arguments of `cam_pseudo_label` per image). `result` waits for them or computes them."""

    def __init__(self, labeler: CRFPseudoLabeler, parts: list[Future] | None = None,
                 jobs: list[tuple] | None = None):
        self._labeler = labeler
        self._parts = parts
        self._jobs = jobs

    def result(self, device: torch.device | str) -> torch.Tensor:
        """long [B,H,W] on `device`; the time spent here counts as CRF waiting."""
        start = time.perf_counter()
        if self._parts is not None:
            labels = [part.result() for part in self._parts]
        elif self._labeler.workers:
            labels = [part.result() for part in self._labeler.start(self._jobs)]
        else:
            labels = [cam_pseudo_label(*job) for job in self._jobs]
        self._labeler.wait_seconds += time.perf_counter() - start
        return torch.from_numpy(np.stack(labels)).to(device).long()


class CRFPseudoLabeler:
    """Computes `cam_pseudo_label` for batches on `workers` processes (-1: `default_workers`;
    0: in this process). `overlap`: send a batch to the pool at `submit` (true) or at
    `result` (false); None: when the CAMs come from an accelerator. `wait_seconds` sums the
    time training waited for labels."""

    def __init__(self, workers: int, fg_threshold: float, bg_threshold: float, preset: str = "irn",
                 overlap: bool | None = None):
        self.workers: int | None = None if workers < 0 else workers  # resolved at the first submit
        self.fg_threshold = fg_threshold
        self.bg_threshold = bg_threshold
        self.preset = preset
        self.overlap = overlap
        self.wait_seconds = 0.0

    def start(self, jobs: list[tuple]) -> list[Future]:
        return [_pool(self.workers).submit(cam_pseudo_label, *job) for job in jobs]

    def submit(self, raw: torch.Tensor, cam_logits: torch.Tensor, image_labels: torch.Tensor,
               valid: torch.Tensor) -> PendingPseudoLabels:
        """raw uint8 [B,H,W,3], cam_logits [B,K,h,w], image_labels multi-hot [B,K], valid bool [B,H,W]."""
        if raw.dtype != torch.uint8 or raw.ndim != 4 or raw.shape[3] != 3 or raw.shape[:3] != valid.shape:
            raise ValueError(f"csrm pseudo-labels: batch['raw'] must be uint8 [B,H,W,3] matching valid "
                             f"{tuple(valid.shape)}, got {raw.dtype} {tuple(raw.shape)}")
        overlap = cam_logits.device.type != "cpu" if self.overlap is None else self.overlap
        if self.workers is None:
            self.workers = default_workers(overlap)
        images = raw.cpu().numpy()
        cams = cam_logits.detach().float().cpu().numpy()
        present = (image_labels > 0.5).cpu().numpy()
        valid = valid.cpu().numpy()
        jobs = []
        for i in range(images.shape[0]):
            ids = np.flatnonzero(present[i])
            jobs.append((images[i], cams[i, ids], ids + 1, valid[i], self.fg_threshold, self.bg_threshold,
                         self.preset))
        if overlap and self.workers:
            return PendingPseudoLabels(self, parts=self.start(jobs))
        return PendingPseudoLabels(self, jobs=jobs)
