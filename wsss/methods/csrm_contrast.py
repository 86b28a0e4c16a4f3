"""Which pixels CSRM contrasts (Sec. 3.2.5): queries with their positive anchors, and the
hard negatives pushed into the bank. The loss itself is `csrm_losses.info_nce` (Eq. 13).

All inputs are at the representation's resolution [B,·,h,w]; class indices run over the
K+1 segmentation classes (0 = background).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss.datasets.base import IGNORE_INDEX
from wsss.methods.lnl_bank import subsample_per_class


def class_ranks(probs: torch.Tensor) -> torch.Tensor:
    """Rank of every class at every pixel, 1 = most probable: long [B,C,h,w]."""
    return probs.argsort(dim=1, descending=True).argsort(dim=1) + 1


def select_queries(student_rep: torch.Tensor, teacher_rep: torch.Tensor, teacher_probs: torch.Tensor,
                   pseudo_labels: torch.Tensor, low_entropy: torch.Tensor, confidence: float,
                   per_class: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, their positive anchors and classes.

    A pixel is a query candidate of class c when its label is confidently known: the CAM
    pseudo-label (`pseudo_labels` long [B,h,w], 255 = uncertain) is c, it is in the low-
    entropy group (`low_entropy` bool [B,h,w]) and the teacher gives c probability >
    `confidence`. For every class with candidates: `per_class` student representations of
    candidates drawn with replacement (the queries, with gradient) and, for each, the mean
    teacher representation of all the class's candidates (the positive anchor).
    Returns queries [Q,D], positives [Q,D] (no gradient), classes long [Q].
    """
    classes = teacher_probs.shape[1]
    labels = pseudo_labels.long()
    known = labels != IGNORE_INDEX
    label_prob = teacher_probs.gather(1, labels.masked_fill(~known, 0)[:, None])[:, 0]
    candidate = known & low_entropy & (label_prob > confidence)
    candidate_labels = labels[candidate]  # [M]
    student = student_rep.permute(0, 2, 3, 1)[candidate]  # [M,D]
    teacher = teacher_rep.detach().float().permute(0, 2, 3, 1)[candidate]
    membership = F.one_hot(candidate_labels, classes).T.float()  # [C,M]
    counts = membership.sum(dim=1)
    present = (counts > 0).nonzero()[:, 0]
    if present.numel() == 0:
        empty = student_rep.new_zeros(0, student_rep.shape[1])
        return empty, empty.detach(), present
    prototypes = (membership[present] @ teacher) / counts[present, None]  # [C',D]
    drawn = torch.multinomial(membership[present], per_class, replacement=True, generator=generator)
    query_classes = present.repeat_interleave(per_class)
    return student[drawn.reshape(-1)], prototypes.repeat_interleave(per_class, dim=0), query_classes


def negative_candidates(teacher_rep: torch.Tensor, teacher_probs: torch.Tensor, high_entropy: torch.Tensor,
                        image_classes: torch.Tensor, rank_low: int, rank_high: int, per_class: int,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negative anchors of this batch for the bank: teacher representations [M,D] and
    the classes [M] they are negatives of.

    A high-entropy pixel (`high_entropy` bool [B,h,w]) is a negative of class c when c
    ranks ≤ γ_l (`rank_low`) in the teacher's prediction and is absent from the image's
    labels (`image_classes` bool [B,C], background always present), or when c ranks in
    (γ_l, γ_h] (`rank_high`). At most `per_class` random ones per class are kept (drawn
    with `generator`, a CPU generator).
    """
    ranks = class_ranks(teacher_probs)
    absent = ~image_classes[:, :, None, None]
    hard = ((ranks <= rank_low) & absent) | ((ranks > rank_low) & (ranks <= rank_high))
    image, cls, row, col = (hard & high_entropy[:, None]).nonzero(as_tuple=True)
    keep = subsample_per_class(cls, per_class, generator)
    image, cls, row, col = image[keep], cls[keep], row[keep], col[keep]
    items = teacher_rep.detach().float().permute(0, 2, 3, 1)[image, row, col]
    return F.normalize(items, dim=1), cls
