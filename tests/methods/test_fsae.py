"""`fsae`: each equation against a slow loop reference, edge cases, and composition."""

from __future__ import annotations

import math

import pytest
import torch

from wsss.methods import fsae
from wsss.methods.base import (
    ADDONS,
    BackboneConfig,
    DatasetStats,
    Progress,
    build_method,
    method_sections,
    required_inputs,
    valid_at,
)
from wsss.methods.fsae import class_scores, fsae_loss, online_pseudo_labels

# ---- slow references, written from the paper's equations ---------------------------


def reference_class_scores(cam_logits, background_logit, image_labels=None):
    b_n, k_n, h_n, w_n = cam_logits.shape
    out = torch.empty(b_n, k_n + 1, h_n, w_n, dtype=torch.float64)
    for b in range(b_n):
        for c in range(k_n + 1):
            present = c == 0 or image_labels is None or image_labels[b, c - 1] > 0
            for i in range(h_n):
                for j in range(w_n):
                    if not present:
                        out[b, c, i, j] = -math.inf
                    elif c == 0:
                        out[b, c, i, j] = background_logit
                    else:
                        out[b, c, i, j] = float(cam_logits[b, c - 1, i, j])
    return out


def reference_pseudo_labels(scores, tau_fae, tau_sae, kernel, valid=None):
    """Eqs. 5-8 pixel by pixel; dilation with a k×k window that ignores outside pixels."""
    b_n, c_n, h_n, w_n = scores.shape
    labels = torch.zeros(b_n, h_n, w_n, dtype=torch.long)
    confidence = torch.zeros(b_n, h_n, w_n, dtype=torch.float64)
    for b in range(b_n):
        for i in range(h_n):
            for j in range(w_n):
                values = [float(scores[b, c, i, j]) for c in range(c_n)]
                top = max(values)
                exps = [math.exp(v - top) for v in values]  # exp(-inf) = 0: absent class
                probs = [e / sum(exps) for e in exps]
                labels[b, i, j] = max(range(c_n), key=lambda c: probs[c])
                confidence[b, i, j] = max(probs)
    is_valid = (lambda b, i, j: True) if valid is None else (lambda b, i, j: bool(valid[b, i, j]))
    high = [[[confidence[b, i, j] >= tau_fae and is_valid(b, i, j) for j in range(w_n)]
             for i in range(h_n)] for b in range(b_n)]
    mask = torch.zeros(b_n, h_n, w_n, dtype=torch.bool)
    r = kernel // 2
    for b in range(b_n):
        for i in range(h_n):
            for j in range(w_n):
                dilated = any(high[b][y][x]
                              for y in range(max(0, i - r), min(h_n, i + r + 1))
                              for x in range(max(0, j - r), min(w_n, j + r + 1)))
                ring = dilated and not high[b][i][j]
                boundary = ring and confidence[b, i, j] >= tau_sae
                mask[b, i, j] = (high[b][i][j] or boundary) and is_valid(b, i, j)
    return labels, mask


def reference_fsae_loss(target_scores, labels, mask, lam):
    b_n, c_n, h_n, w_n = target_scores.shape
    total = 0.0
    for b in range(b_n):
        for i in range(h_n):
            for j in range(w_n):
                if not mask[b, i, j]:
                    continue
                values = [float(target_scores[b, c, i, j]) for c in range(c_n)]
                top = max(values)
                log_norm = top + math.log(sum(math.exp(v - top) for v in values))
                total += log_norm - values[int(labels[b, i, j])]
    return lam * total / (b_n * h_n * w_n)


# ---- class scores --------------------------------------------------------------------


def test_class_scores_match_reference_with_absent_classes():
    generator = torch.Generator().manual_seed(0)
    cam_logits = torch.randn(3, 4, 5, 6, generator=generator) * 3
    image_labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    got = class_scores(cam_logits, 0.5, image_labels)
    assert torch.equal(got.double(), reference_class_scores(cam_logits, 0.5, image_labels))
    assert torch.equal(class_scores(cam_logits, 0.0).double(), reference_class_scores(cam_logits, 0.0))


# ---- online pseudo-labels (Eqs. 5-8) ---------------------------------------------------


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_online_pseudo_labels_match_reference(kernel, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 4, 7, 9, generator=generator) * 3
    labels, mask = online_pseudo_labels(scores, 0.9, 0.6, kernel)
    ref_labels, ref_mask = reference_pseudo_labels(scores, 0.9, 0.6, kernel)
    assert labels.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(labels, ref_labels)
    assert torch.equal(mask, ref_mask)
    assert 0 < mask.sum() < mask.numel()  # the random case exercises both sides


def test_online_pseudo_labels_with_valid_match_reference():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 3, 6, 6, generator=generator) * 4
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    valid[0, :, 4:] = False
    valid[1, 5:, :] = False
    labels, mask = online_pseudo_labels(scores, 0.9, 0.5, 3, valid)
    ref_labels, ref_mask = reference_pseudo_labels(scores, 0.9, 0.5, 3, valid)
    assert torch.equal(labels, ref_labels) and torch.equal(mask, ref_mask)
    assert not mask[~valid].any()


def test_padding_does_not_seed_the_dilation():
    # one confident pixel, in padding; its neighbours pass τ_SAE but must not be labelled
    scores = torch.zeros(1, 2, 3, 3)
    scores[0, 1] = 1.5  # softmax ≈ 0.82: in [τ_SAE, τ_FAE)
    scores[0, 1, 0, 0] = 10.0
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    valid[0, 0, 0] = False
    _, mask = online_pseudo_labels(scores, 0.95, 0.8, 3, valid)
    assert not mask.any()
    _, mask = online_pseudo_labels(scores, 0.95, 0.8, 3)
    assert mask[0, :2, :2].all() and mask.sum() == 4


def test_absent_classes_are_excluded_from_the_softmax():
    generator = torch.Generator().manual_seed(3)
    cam_logits = torch.randn(2, 5, 6, 6, generator=generator) * 3
    image_labels = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    scores = class_scores(cam_logits, 0.0, image_labels)
    labels, mask = online_pseudo_labels(scores, 0.95, 0.8, 3)
    assert set(labels[0].unique().tolist()) <= {0, 2, 5}
    # an image without foreground labels is all background, with full confidence
    assert (labels[1] == 0).all() and mask[1].all()
    # confidence is renormalised over present classes: here a pixel with an absent strong
    # class and a weak present one is confident for the present one
    one = torch.full((1, 2, 1, 1), -5.0)
    one[0, 0] = 20.0  # absent class, would dominate
    one[0, 1] = 4.0  # present: p = sigmoid(4) ≈ 0.982 over {background, class 2}
    labels, mask = online_pseudo_labels(class_scores(one, 0.0, torch.tensor([[0.0, 1.0]])), 0.95, 0.8, 1)
    assert labels.item() == 2 and mask.item()


def test_empty_mask_when_nothing_is_confident():
    scores = torch.zeros(2, 4, 5, 5)  # uniform: confidence 0.25 everywhere
    labels, mask = online_pseudo_labels(scores, 0.95, 0.8, 3)
    assert not mask.any()
    target = torch.randn(2, 4, 5, 5, requires_grad=True)
    loss = fsae_loss(target, labels, mask, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(target.grad).all() and not target.grad.any()


def test_kernel_one_means_no_spatial_expansion():
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 3, 8, 8, generator=generator) * 3
    confidence = torch.softmax(scores, dim=1).amax(dim=1)
    _, mask = online_pseudo_labels(scores, 0.9, 0.0, 1)  # even τ_SAE = 0 adds nothing
    assert torch.equal(mask, confidence >= 0.9)


def test_kernel_five_at_the_image_border():
    # a single confident pixel in the corner; everything else passes τ_SAE only
    scores = torch.zeros(1, 2, 6, 7)
    scores[0, 1] = 2.0  # softmax ≈ 0.88
    scores[0, 1, 0, 0] = 10.0
    labels, mask = online_pseudo_labels(scores, 0.95, 0.8, 5)
    expected = torch.zeros(1, 6, 7, dtype=torch.bool)
    expected[0, :3, :3] = True  # the 5×5 window clipped by the border
    assert torch.equal(mask, expected)
    assert torch.equal(mask, reference_pseudo_labels(scores, 0.95, 0.8, 5)[1])
    assert (labels == 1).all()
    # the ring also respects τ_SAE: below it, only the seed stays
    _, mask = online_pseudo_labels(scores, 0.95, 0.9, 5)
    assert mask.sum() == 1 and mask[0, 0, 0]


@pytest.mark.parametrize("kernel", [0, 2, -1, 4, 3.0, True])
def test_invalid_kernel_is_an_error_naming_it(kernel):
    with pytest.raises(ValueError, match=repr(kernel).replace(".", r"\.")):
        online_pseudo_labels(torch.zeros(1, 2, 3, 3), 0.95, 0.8, kernel)
    with pytest.raises(ValueError, match="dilation_kernel"):
        fsae.FSAEConfig(dilation_kernel=kernel)


@pytest.mark.parametrize("field,value", [("fae_threshold", 1.5), ("sae_threshold", -0.1), ("loss_weight", -1.0),
                                         ("warmup_epochs", -1)])
def test_bad_config_values_are_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        fsae.FSAEConfig(**{field: value})


def test_pseudo_labels_carry_no_gradient():
    scores = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels, mask = online_pseudo_labels(scores * 5, 0.5, 0.3, 3)
    assert not labels.requires_grad and not mask.requires_grad


# ---- the loss (Eq. 9) ----------------------------------------------------------------


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_fsae_loss_matches_reference(lam):
    generator = torch.Generator().manual_seed(5)
    target = torch.randn(3, 4, 5, 6, generator=generator) * 2
    labels = torch.randint(0, 4, (3, 5, 6), generator=generator)
    mask = torch.rand(3, 5, 6, generator=generator) > 0.4
    got = fsae_loss(target, labels, mask, lam)
    assert got.shape == ()
    assert got.item() == pytest.approx(reference_fsae_loss(target, labels, mask, lam), rel=1e-5)


def test_fsae_loss_ignores_labels_outside_the_mask():
    target = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[1, 255], [2, 255]]])
    mask = labels != 255
    got = fsae_loss(target, labels, mask, 1.0)
    assert got.item() == pytest.approx(reference_fsae_loss(target, labels, mask, 1.0), rel=1e-5)


def test_fsae_loss_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="mask"):
        fsae_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long),
                  torch.zeros(1, 4, 5, dtype=torch.bool), 1.0)


# ---- the add-on through the method contract ------------------------------------------


def test_valid_at_feature_resolution_is_a_majority_vote():
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[0, :, :5] = True  # column block 0 all image, block 1 a quarter image
    assert valid_at(valid, (2, 2)).tolist() == [[[True, False], [True, False]]]


def _progress(epoch=0):
    return Progress(epoch=epoch, step=0, steps_per_epoch=2, epochs=3)


def test_addon_losses_use_source_without_gradient_and_exclude_padding():
    addon = fsae.FSAE(fsae.FSAEConfig(fae_threshold=0.6, sae_threshold=0.5), num_classes=3)
    generator = torch.Generator().manual_seed(6)
    source = (torch.randn(2, 3, 4, 4, generator=generator) * 4).requires_grad_()
    target = torch.randn(2, 3, 4, 4, generator=generator).requires_grad_()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[1, :, 8:] = False  # right half of image 1 is padding
    batch = {"labels": labels, "valid": valid}
    losses = addon.losses(batch, {"image": {"cam_logits": source}, "strong": {"cam_logits": target}},
                          _progress())
    losses["fsae"].backward()
    assert source.grad is None
    assert target.grad.abs().sum() > 0
    assert not target.grad[1, :, :, 2:].any()  # padding cells get no supervision
    # the value is Eq. 9 on the reference pseudo-labels
    src_scores = reference_class_scores(source.detach(), 0.0, labels)
    ref_labels, ref_mask = reference_pseudo_labels(src_scores, 0.6, 0.5, 3, valid_at(valid, (4, 4)))
    expected = reference_fsae_loss(reference_class_scores(target.detach(), 0.0), ref_labels, ref_mask, 1.0)
    assert losses["fsae"].item() == pytest.approx(expected, rel=1e-5)
    # the logged diagnostics: share of image cells labelled, share of those that are foreground
    cells = int(valid_at(valid, (4, 4)).sum())
    labelled = sum(bool(ref_mask[b, i, j]) for b in range(2) for i in range(4) for j in range(4))
    foreground = sum(bool(ref_mask[b, i, j]) and int(ref_labels[b, i, j]) > 0
                     for b in range(2) for i in range(4) for j in range(4))
    assert addon.notes["fsae/labelled"].item() == pytest.approx(labelled / cells)
    assert addon.notes["fsae/labelled_fg"].item() == pytest.approx(foreground / max(labelled, 1))


def test_warmup_skips_the_strong_view():
    addon = fsae.FSAE(fsae.FSAEConfig(warmup_epochs=1), num_classes=2)
    batch = {"image": torch.zeros(1, 3, 8, 8), "strong": torch.ones(1, 3, 8, 8),
             "labels": torch.ones(1, 2), "valid": torch.ones(1, 8, 8, dtype=torch.bool)}
    assert addon.views(batch, _progress(0)) == {}
    outputs = {"image": {"cam_logits": torch.zeros(1, 2, 2, 2)}}
    assert addon.losses(batch, outputs, _progress(0))["fsae"].item() == 0.0
    assert torch.equal(addon.views(batch, _progress(1))["strong"], batch["strong"])


def test_registry_and_config_section():
    assert ADDONS["fsae"] is fsae.FSAE
    assert fsae.FSAE.inputs == frozenset({"strong"})
    assert method_sections("cam+fsae")["fsae"] is fsae.FSAEConfig
    defaults = fsae.FSAEConfig()
    assert (defaults.fae_threshold, defaults.sae_threshold, defaults.dilation_kernel, defaults.loss_weight) == \
        (0.95, 0.8, 3, 1.0)


def _random_batch(generator, batch_size=2, size=64, num_classes=3):
    image = torch.randn(batch_size, 3, size, size, generator=generator)
    # crude strong view: per-channel colour shift and a 3×3 box blur, same geometry
    shift = torch.randn(batch_size, 3, 1, 1, generator=generator) * 0.3
    strong = torch.nn.functional.avg_pool2d(image * 1.2 + shift, 3, stride=1, padding=1)
    labels = (torch.rand(batch_size, num_classes, generator=generator) > 0.5).float()
    labels[:, 0] = 1.0  # at least one foreground class
    valid = torch.ones(batch_size, size, size, dtype=torch.bool)
    valid[0, :, size - 16:] = False
    return {"image": image, "strong": strong, "labels": labels, "valid": valid}


@pytest.mark.parametrize("base", ["cam", "lnl"])
def test_fsae_composes_with_a_base_method_and_trains(base):
    import wsss.methods  # noqa: F401  (registers every method)
    torch.manual_seed(0)
    num_classes = 3
    # a low τ_FAE so the untrained network already yields pseudo-labels to learn from
    method = build_method(f"{base}+fsae", num_classes,
                          configs={"fsae": fsae.FSAEConfig(fae_threshold=0.6, sae_threshold=0.4)},
                          backbone=BackboneConfig("resnet18", 16, "none"))
    assert "strong" in required_inputs(f"{base}+fsae")
    generator = torch.Generator().manual_seed(7)
    image_labels = torch.ones(8, num_classes + 1, dtype=torch.bool)
    method.on_dataset(DatasetStats(num_images=8, image_labels=image_labels))
    optimizer = torch.optim.SGD(method.param_groups(0.01), lr=0.01, momentum=0.9)
    method.train()
    steps = 2
    for step in range(steps):
        progress = Progress(epoch=step, step=step, steps_per_epoch=1, epochs=steps)
        losses = method.training_step(_random_batch(generator, num_classes=num_classes), progress)
        assert "fsae" in losses and len(losses) >= 2
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert losses["fsae"].item() > 0
        optimizer.zero_grad()
        sum(losses.values()).backward()
        classifier_grad = [p.grad for p in method.network.parameters() if p.grad is not None]
        assert classifier_grad and all(torch.isfinite(g).all() for g in classifier_grad)
        optimizer.step()
        method.after_step(progress)
