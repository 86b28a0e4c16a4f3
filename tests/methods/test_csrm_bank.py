"""`csrm`'s negative bank (`wsss/methods/csrm_bank.py`): a fixed-size FIFO per class."""

from __future__ import annotations

import pytest
import torch

from wsss.methods.csrm_bank import NegativeBank

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_negative_bank_is_a_fixed_size_fifo_per_class():
    bank = NegativeBank(num_rows=3, size=4, dim=2)
    pushed = {0: [], 1: [], 2: []}
    counter = 0
    for classes in ([0, 1, 0], [1, 1, 1, 1, 1, 1, 0], [], [0, 0, 0, 1]):
        items = []
        for c in classes:
            counter += 1
            items.append([float(counter), float(c)])
            pushed[c].append([float(counter), float(c)])
        bank.push(torch.tensor(items).reshape(-1, 2), torch.tensor(classes, dtype=torch.long))
        for c in range(3):
            expected = pushed[c][-4:]  # the newest `size`, oldest first
            assert bank.ordered(c).tolist() == expected
            assert int(bank.count[c]) == len(expected)
    drawn = bank.sample(torch.tensor([0, 1, 1]), 50, torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 50, 2)
    assert set(map(tuple, drawn[0].tolist())) <= set(map(tuple, pushed[0][-4:]))
    assert set(map(tuple, drawn[1].tolist())) <= set(map(tuple, pushed[1][-4:]))
    with pytest.raises(ValueError, match="no entries"):
        bank.sample(torch.tensor([2]), 3)
