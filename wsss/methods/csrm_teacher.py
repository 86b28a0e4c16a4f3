"""CSRM's EMA teacher (Sec. 3.2.6): the decay schedule, the update, and keeping replicas equal."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def ema_decay(step: int, warmup_steps: int, max_decay: float = 0.99) -> float:
    """0 during warm-up (the teacher is a plain copy of the student), then
    min(1 − 1/(1 + step − warmup_steps), max_decay): the average of every student since
    warm-up, until that would weigh the newest student less than 1 − max_decay."""
    if step < warmup_steps:
        return 0.0
    return min(1.0 - 1.0 / (1.0 + step - warmup_steps), max_decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student for parameters; buffers (BatchNorm
    statistics) are copied. Both modules must have the same architecture."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update: decay must be in [0, 1], got {decay}")
    teacher_params, student_params = list(teacher.parameters()), list(student.parameters())
    teacher_buffers, student_buffers = list(teacher.buffers()), list(student.buffers())
    if len(teacher_params) != len(student_params) or len(teacher_buffers) != len(student_buffers):
        raise ValueError("ema_update: teacher and student have different architectures")
    if teacher_params:
        torch._foreach_mul_(teacher_params, decay)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - decay)
    for target, source in zip(teacher_buffers, student_buffers, strict=True):
        target.copy_(source)


@torch.no_grad()
def broadcast_buffers(module: nn.Module, source_rank: int = 0) -> None:
    """Make every replica's buffers equal to `source_rank`'s (one broadcast per dtype).

    DDP re-broadcasts the student's BatchNorm statistics only at its next forward, so right
    after a step each replica's differ; the teacher copies them then and would drift apart.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, source_rank)
        torch._foreach_copy_(buffers, [part.view_as(b) for part, b in
                                       zip(flat.split([b.numel() for b in buffers]), buffers, strict=True)])
