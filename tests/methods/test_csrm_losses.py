"""`csrm`'s losses (`wsss/methods/csrm_losses.py`), each against a loop-based reference written
from the paper: the reliable mask (Eqs. 10-11), activation consistency (Eqs. 8-9), InfoNCE
(Eq. 13), and ClassMix that really mixes."""

from __future__ import annotations

import math

import pytest
import torch

from wsss.methods.csrm_losses import classmix, info_nce, mix_like, reliable_mask, resize_labels, s2c_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- Eqs. 10-11: entropy and the reliable mask ---------------------------------------------

def reference_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def reference_reliable(probs: torch.Tensor, keep: float, valid: torch.Tensor):
    batch, classes, height, width = probs.shape
    entropy = {}
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                if valid[b, y, x]:
                    ps = [float(probs[b, c, y, x]) for c in range(classes)]
                    entropy[b, y, x] = -sum(p * math.log(p) for p in ps if p > 0)  # 0·log 0 = 0
    threshold = reference_quantile(list(entropy.values()), keep) if entropy else None
    return entropy, threshold


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.8, 1.0])
def test_reliable_mask_matches_loop_reference(keep):
    generator = torch.Generator().manual_seed(3)
    probs = torch.softmax(3 * torch.randn(2, 4, 5, 6, generator=generator), dim=1)
    probs[0, :, 0, :] = torch.tensor([1.0, 0.0, 0.0, 0.0])[:, None]  # exact zeros: 0·log 0
    probs[1, :, 1, 1] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    valid = torch.rand(2, 5, 6, generator=generator) > 0.3
    mask = reliable_mask(probs, keep, valid)
    entropy, threshold = reference_reliable(probs, keep, valid)
    assert mask.dtype == torch.bool and mask.shape == valid.shape
    assert not mask[~valid].any()
    for (b, y, x), h in entropy.items():
        if abs(h - threshold) > 1e-5:  # exactly at the threshold: float32 vs float64
            assert bool(mask[b, y, x]) == (h <= threshold), (b, y, x, h, threshold)
    if keep == 1.0:
        assert torch.equal(mask, valid)


def test_reliable_mask_edge_cases():
    probs = torch.zeros(1, 3, 2, 2)
    probs[:, 0] = 1.0  # one-hot everywhere: entropy 0, not NaN
    assert reliable_mask(probs, 0.5).all()
    assert not reliable_mask(probs, 0.5, torch.zeros(1, 2, 2, dtype=torch.bool)).any()
    with pytest.raises(ValueError, match="keep_fraction"):
        reliable_mask(probs, 1.5)


# ---- Eqs. 8-9: activation consistency --------------------------------------------------------

def reference_s2c(cams, bg, teacher, sigma):
    batch, classes, height, width = cams.shape
    total, count = 0.0, 0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                t = [float(teacher[b, c, y, x]) for c in range(classes + 1)]
                if max(t) <= sigma:
                    continue
                star = t.index(max(t))
                logits = [float(bg[b, 0, y, x])] + [float(cams[b, c, y, x]) for c in range(classes)]
                log_q = logits[star] - math.log(sum(math.exp(v) for v in logits))
                total -= log_q
                count += 1
    return total / count


def test_s2c_loss_matches_loop_reference_and_leaves_the_background_alone():
    generator = torch.Generator().manual_seed(4)
    cams = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    bg = torch.randn(2, 1, 4, 5, generator=generator, requires_grad=True)
    teacher = torch.softmax(2 * torch.randn(2, 4, 4, 5, generator=generator), dim=1)
    loss = s2c_loss(cams, bg, teacher, 0.4)
    assert loss.item() == pytest.approx(reference_s2c(cams.detach(), bg.detach(), teacher, 0.4), rel=1e-5)
    loss.backward()
    assert bg.grad is None, "the background logit is a constant in Eq. 9"
    assert cams.grad.abs().sum() > 0
    nobody = s2c_loss(cams, bg, teacher, 1.0)  # σ = 1: no pixel is confident enough
    assert nobody.item() == 0.0 and nobody.requires_grad


# ---- Eq. 13: InfoNCE --------------------------------------------------------------------------

def reference_info_nce(queries, positives, negatives, tau):
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    losses = []
    for q, p, ns in zip(queries.tolist(), positives.tolist(), negatives.tolist(), strict=True):
        positive = math.exp(cos(q, p) / tau)
        negative = sum(math.exp(cos(q, n) / tau) for n in ns)
        losses.append(-math.log(positive / (positive + negative)))
    return sum(losses) / len(losses)


def test_info_nce_matches_loop_reference():
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(6, 4, generator=generator, requires_grad=True)
    positives = torch.randn(6, 4, generator=generator)
    negatives = torch.randn(6, 7, 4, generator=generator)
    loss = info_nce(queries, positives, negatives, 0.5)
    assert loss.item() == pytest.approx(reference_info_nce(queries.detach(), positives, negatives, 0.5), rel=1e-5)
    loss.backward()
    assert queries.grad.abs().sum() > 0
    assert info_nce(queries[:0], positives[:0], negatives[:0], 0.5).item() == 0.0


# ---- ClassMix ----------------------------------------------------------------------------------

def blocky_labels(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Label maps of 4×4 blocks of classes 0..5, with some ignore (255) blocks."""
    blocks = torch.randint(0, 7, (batch, size // 4, size // 4), generator=generator)
    blocks[blocks == 6] = 255
    return blocks.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)


def test_classmix_pastes_half_of_each_partners_foreground_classes():
    generator = torch.Generator().manual_seed(6)
    images = torch.randn(4, 3, 16, 16, generator=generator)
    labels = blocky_labels(4, 16, generator)
    mixed, mixed_labels, masks = classmix(images, labels, torch.Generator().manual_seed(0))
    for i in range(4):
        partner = (i + 1) % 4
        foreground = set(labels[partner].unique().tolist()) - {0, 255}
        pasted = set(labels[partner][masks[i]].unique().tolist())
        assert pasted <= foreground and len(pasted) == math.ceil(len(foreground) / 2), (i, foreground, pasted)
        assert torch.equal(masks[i], torch.isin(labels[partner], torch.tensor(sorted(pasted))))
        assert torch.equal(mixed_labels[i], torch.where(masks[i], labels[partner], labels[i]))
        assert torch.equal(mixed[i], torch.where(masks[i], images[partner], images[i]))
    assert masks.flatten(1).any(dim=1).all(), "every image must receive pixels: ClassMix has to mix"
    assert not torch.equal(mixed, images)
    again = classmix(images, labels, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(again, (mixed, mixed_labels, masks), strict=True))


def test_classmix_probability_and_mix_like():
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(3, 3, 16, 16, generator=generator)
    labels = blocky_labels(3, 16, generator)
    mixed, mixed_labels, masks = classmix(images, labels, generator, probability=0.0)
    assert not masks.any() and torch.equal(mixed, images) and torch.equal(mixed_labels, labels)
    _, _, masks = classmix(images, labels, generator)
    probs = torch.rand(3, 5, 4, 4, generator=generator)  # a quarter of the resolution
    small_masks = masks[:, 2::4, 2::4]  # each 4×4 cell's centre
    expected = torch.where(small_masks[:, None], probs.roll(-1, 0), probs)
    assert torch.equal(mix_like(probs, masks), expected)


@pytest.mark.parametrize("size", [320, 321])
def test_teacher_targets_mix_where_the_image_mixes_at_any_crop_size(size):
    """The teacher's quarter-resolution labels go up to the crop for ClassMix and its masks
    come back down to mix the teacher's targets: the round trip must not shift them."""
    generator = torch.Generator().manual_seed(3)
    small = (size + 3) // 4
    labels = torch.randint(0, 4, (2, small, small), generator=generator)
    masks = resize_labels(labels, (size, size)) == 2
    targets = torch.rand(2, 4, small, small, generator=generator)
    expected = torch.where((labels == 2)[:, None], targets.roll(-1, 0), targets)
    assert torch.equal(mix_like(targets, masks), expected)
