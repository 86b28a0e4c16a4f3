"""`csrm`'s EMA teacher (`wsss/methods/csrm_teacher.py`): the decay schedule and the
update, element by element."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsss.methods.csrm_teacher import ema_decay, ema_update

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("warmup", [0, 5])
def test_ema_decay_copies_during_warmup_then_follows_the_formula(warmup):
    for step in range(60):
        expected = 0.0 if step < warmup else min(1.0 - 1.0 / (1.0 + step - warmup), 0.99)
        assert ema_decay(step, warmup) == pytest.approx(expected, abs=1e-12)
    assert ema_decay(warmup, warmup) == 0.0  # first step after warm-up: still a copy
    assert ema_decay(warmup + 1, warmup) == pytest.approx(0.5)
    assert ema_decay(10_000, warmup, max_decay=0.9) == pytest.approx(0.9)


def small_network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    net(torch.randn(2, 3, 5, 5))  # train mode: moves the BatchNorm statistics
    return net


@pytest.mark.parametrize("decay", [0.0, 0.3, 0.99])
def test_ema_update_averages_parameters_and_copies_buffers(decay):
    teacher, student = small_network(0), small_network(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, decay)
    params = dict(teacher.named_parameters())
    student_state = student.state_dict()
    for name, value in teacher.state_dict().items():
        if name in params:  # element by element: decay·teacher + (1 − decay)·student
            old, new = before[name].flatten().tolist(), student_state[name].flatten().tolist()
            expected = [decay * t + (1 - decay) * s for t, s in zip(old, new, strict=True)]
            assert value.flatten().tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
        else:
            assert torch.equal(value, student_state[name]), f"buffer {name} must be copied"
    if decay == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters(), strict=True))
