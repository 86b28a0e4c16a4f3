"""Which pixels `csrm` contrasts (`wsss/methods/csrm_contrast.py`, Sec. 3.2.5), against
loop-based references."""

from __future__ import annotations

import pytest
import torch

from wsss.methods.csrm_contrast import negative_candidates, select_queries

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_negative_candidates_match_loop_reference():
    generator = torch.Generator().manual_seed(8)
    probs = torch.softmax(2 * torch.randn(2, 8, 3, 4, generator=generator), dim=1)
    rep = torch.randn(2, 5, 3, 4, generator=generator)
    high = torch.rand(2, 3, 4, generator=generator) > 0.4
    image_classes = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    items, classes = negative_candidates(rep, probs, high, image_classes, 2, 5, per_class=10_000)
    expected = []
    for b in range(2):
        for y in range(3):
            for x in range(4):
                if not high[b, y, x]:
                    continue
                for c in range(8):
                    rank = 1 + sum(float(probs[b, o, y, x]) > float(probs[b, c, y, x]) for o in range(8))
                    if (rank <= 2 and not image_classes[b, c]) or 2 < rank <= 5:
                        unit = rep[b, :, y, x] / rep[b, :, y, x].norm()
                        expected.append((c, tuple(round(v, 5) for v in unit.tolist())))
    got = [(c, tuple(round(v, 5) for v in item)) for c, item in zip(classes.tolist(), items.tolist(), strict=True)]
    assert sorted(got) == sorted(expected)
    few_items, few_classes = negative_candidates(rep, probs, high, image_classes, 2, 5, per_class=1)
    assert few_classes.bincount().max() == 1


def test_queries_are_confident_low_entropy_pixels_and_positives_their_class_mean():
    generator = torch.Generator().manual_seed(9)
    probs = torch.softmax(2 * torch.randn(2, 4, 3, 3, generator=generator), dim=1)
    student = torch.randn(2, 6, 3, 3, generator=generator)
    teacher = torch.randn(2, 6, 3, 3, generator=generator)
    pseudo = torch.randint(0, 4, (2, 3, 3), generator=generator)
    pseudo[0, 0] = 255
    low = torch.rand(2, 3, 3, generator=generator) > 0.3
    queries, positives, classes = select_queries(student, teacher, probs, pseudo, low, 0.2, 7,
                                                 torch.Generator().manual_seed(0))
    candidates = {}
    for b in range(2):
        for y in range(3):
            for x in range(3):
                c = int(pseudo[b, y, x])
                if c != 255 and low[b, y, x] and probs[b, c, y, x] > 0.2:
                    candidates.setdefault(c, []).append((b, y, x))
    assert sorted(set(classes.tolist())) == sorted(candidates)
    assert classes.bincount(minlength=4)[sorted(candidates)].tolist() == [7] * len(candidates)
    for query, positive, c in zip(queries, positives, classes.tolist(), strict=True):
        pixels = candidates[c]
        assert any(torch.equal(query, student[b, :, y, x]) for b, y, x in pixels)
        mean = torch.stack([teacher[b, :, y, x] for b, y, x in pixels]).mean(dim=0)
        torch.testing.assert_close(positive, mean)
