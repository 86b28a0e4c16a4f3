"""CSRM's segmentation pseudo-labels (Eqs. 2 and 6): the teacher's CAMs, CRF-refined, with
IRN's double threshold, computed on CPU worker processes while the GPU trains.

The CRF is the slow part (two dense CRFs per image). `CRFPseudoLabeler.submit` hands each
image of a batch to a process pool right after the teacher's backbone has produced the
CAMs and returns at once; the method collects the labels (`PendingPseudoLabels.result`)
only after the rest of its forward pass and its other losses, so the CRF runs meanwhile.
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
        foreground = _refined_argmax(image, cams, fg_threshold, preset)
        background = _refined_argmax(image, cams, bg_threshold, preset)
        labels = np.where(foreground > 0, lookup[foreground], np.where(background == 0, 0, IGNORE_INDEX))
    labels[~valid] = IGNORE_INDEX
    return labels.astype(np.uint8)


def _refined_argmax(image: np.ndarray, cams: np.ndarray, threshold: float, preset: str) -> np.ndarray:
    seeds = np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams]).argmax(axis=0)
    return dense_crf_labels(image, seeds, cams.shape[0] + 1, preset=preset).argmax(axis=0)


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)  # one CRF per process; torch threads would only oversubscribe


def default_workers() -> int:
    """CPU cores of this process's share of the node (cores / local replicas), minus one for
    the training process itself; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    replicas = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // replicas - 1)


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
    """A batch's pseudo-labels being computed; `result` waits for them."""

    def __init__(self, labeler: CRFPseudoLabeler, parts: list[Future | np.ndarray]):
        self._labeler = labeler
        self._parts = parts

    def result(self, device: torch.device | str) -> torch.Tensor:
        """long [B,H,W] on `device`; the time spent blocked here counts as CRF waiting."""
        start = time.perf_counter()
        labels = np.stack([p.result() if isinstance(p, Future) else p for p in self._parts])
        self._labeler.wait_seconds += time.perf_counter() - start
        return torch.from_numpy(labels).to(device).long()


class CRFPseudoLabeler:
    """Computes `cam_pseudo_label` for batches, on `workers` processes (0: in this process,
    synchronously). `wait_seconds` sums the time training waited for labels."""

    def __init__(self, workers: int, fg_threshold: float, bg_threshold: float, preset: str = "irn"):
        self.workers = default_workers() if workers < 0 else workers
        self.fg_threshold = fg_threshold
        self.bg_threshold = bg_threshold
        self.preset = preset
        self.wait_seconds = 0.0

    def submit(self, raw: torch.Tensor, cam_logits: torch.Tensor, image_labels: torch.Tensor,
               valid: torch.Tensor) -> PendingPseudoLabels:
        """raw uint8 [B,H,W,3], cam_logits [B,K,h,w], image_labels multi-hot [B,K], valid bool [B,H,W]."""
        if raw.dtype != torch.uint8 or raw.ndim != 4 or raw.shape[3] != 3 or raw.shape[:3] != valid.shape:
            raise ValueError(f"csrm pseudo-labels: batch['raw'] must be uint8 [B,H,W,3] matching valid "
                             f"{tuple(valid.shape)}, got {raw.dtype} {tuple(raw.shape)}")
        images = raw.cpu().numpy()
        cams = cam_logits.detach().float().cpu().numpy()
        present = (image_labels > 0.5).cpu().numpy()
        valid = valid.cpu().numpy()
        start = time.perf_counter()
        parts = []
        for i in range(images.shape[0]):
            ids = np.flatnonzero(present[i])
            args = (images[i], cams[i, ids], ids + 1, valid[i], self.fg_threshold, self.bg_threshold, self.preset)
            parts.append(_pool(self.workers).submit(cam_pseudo_label, *args) if self.workers
                         else cam_pseudo_label(*args))
        if not self.workers:  # computed right here: all of it is waiting
            self.wait_seconds += time.perf_counter() - start
        return PendingPseudoLabels(self, parts)
