"""`ocr` against loop references written from the OCR paper's equations (Eqs. 5, 7-10, 19)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.methods.base import BackboneConfig, DatasetStats, Progress, build_method
from wsss.methods.ocr import OCRConfig, cooccurrence, rectification_loss
from wsss.platform.metrics import out_of_candidate_rate

TINY = BackboneConfig(arch="resnet18", output_stride=16, weights="none")


# ---- references: one image / one pixel at a time ---------------------------------------

def reference_cooccurrence(image_labels: torch.Tensor) -> torch.Tensor:
    """Eq. 7 as a conditional frequency; background in every image; unseen class: identity row."""
    sets = [{0} | {k for k in range(image_labels.shape[1]) if image_labels[i, k]}
            for i in range(image_labels.shape[0])]
    size = image_labels.shape[1]
    matrix = torch.zeros(size, size)
    for k in range(size):
        with_k = [s for s in sets if k in s]
        if not with_k:
            matrix[k, k] = 1.0
            continue
        for j in range(size):
            matrix[k, j] = sum(1 for s in with_k if j in s) / len(with_k)
    return matrix


def reference_pixel_loss(z: list[float], candidates: set[int], cooc, t: float, delta: float) -> float:
    """Eq. 19 for one pixel, with plain sums of exponentials."""
    classes = range(len(z))
    if max(classes, key=lambda k: z[k]) in candidates:  # Eq. 5: m_oc = 0
        return 0.0
    anchor = max(candidates, key=lambda j: z[j])  # Eq. 8
    total = sum(math.exp(v) for v in z)
    p = [math.exp(v) / total for v in z]
    ic = [k for k in candidates if p[anchor] - p[k] * float(cooc[anchor][k]) < t]  # Eq. 9
    oc = [j for j in classes if j not in candidates]  # Eq. 10 (the paper's l)
    return math.log(1 + sum(math.exp(-z[k]) for k in ic) * sum(math.exp(z[j] + delta) for j in oc))


def reference_loss(logits, image_labels, cooc, t, delta) -> torch.Tensor:
    batch, classes, height, width = logits.shape
    out = torch.zeros(batch, height, width, dtype=torch.float64)
    for b in range(batch):
        candidates = {0} | {k for k in range(classes) if image_labels[b, k]}
        for y in range(height):
            for x in range(width):
                z = [float(logits[b, k, y, x]) for k in range(classes)]
                out[b, y, x] = reference_pixel_loss(z, candidates, cooc.tolist(), t, delta)
    return out


def random_case(seed: int, batch=3, classes=6, size=5):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, size, size, generator=generator) * 2
    image_labels = torch.rand(batch, classes, generator=generator) < 0.4
    dataset_labels = torch.rand(20, classes, generator=generator) < 0.3
    return logits, image_labels, cooccurrence(dataset_labels)


# ---- cooccurrence ----------------------------------------------------------------------

def test_cooccurrence_matches_loop_reference():
    labels = torch.rand(30, 7, generator=torch.Generator().manual_seed(0)) < 0.3
    labels[:, 5] = False  # a class never seen
    labels[:4, 0] = False  # background counts as present whatever column 0 says
    matrix = cooccurrence(labels)
    torch.testing.assert_close(matrix, reference_cooccurrence(labels))
    assert matrix[5].tolist() == [0, 0, 0, 0, 0, 1, 0]
    seen = [k for k in range(7) if k != 5]
    assert torch.all(matrix.diagonal() == 1) and torch.all(matrix[seen, 0] == 1)


def test_cooccurrence_hand_computed():
    labels = torch.tensor([[True, True, False], [True, True, True], [True, False, True]])
    expected = torch.tensor([[1, 2 / 3, 2 / 3], [1, 1, 1 / 2], [1, 1 / 2, 1]])
    torch.testing.assert_close(cooccurrence(labels), expected)


@pytest.mark.parametrize("bad", [torch.ones(4, 3), torch.ones(4, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool)])
def test_cooccurrence_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="bool tensor"):
        cooccurrence(bad)


# ---- rectification_loss ----------------------------------------------------------------

@pytest.mark.parametrize("seed, t, delta", [(0, 0.2, 2.0), (1, 0.2, 0.0), (2, 0.5, 1.0), (3, 1.0, 2.0), (4, 0.05, 3.0)])
def test_rectification_loss_matches_loop_reference(seed, t, delta):
    logits, image_labels, cooc = random_case(seed)
    loss = rectification_loss(logits, image_labels, cooc, t, delta)
    expected = reference_loss(logits, image_labels, cooc, t, delta)
    assert loss.shape == (3, 5, 5)
    assert (expected > 0).any() and (expected == 0).any()  # both OC and non-OC pixels present
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_zero_delta_is_the_plain_smooth_ranking():
    logits = torch.tensor([1.0, 3.0, 0.5]).reshape(1, 3, 1, 1)  # class 1 wins, but only {0, 2} in S'
    labels = torch.tensor([[True, False, True]])
    cooc = torch.ones(3, 3)
    # IC = {0, 2} (P^0 - P^2 < 0.2 fails? P0=.11, P2=.07: yes within 0.2), OC = {1}
    expected = math.log(1 + (math.exp(-1.0) + math.exp(-0.5)) * math.exp(3.0))
    assert rectification_loss(logits, labels, cooc, 0.2, 0.0).item() == pytest.approx(expected, rel=1e-6)


def test_no_loss_where_the_prediction_is_a_candidate():
    logits = torch.tensor([0.0, 4.0, 1.0]).reshape(1, 3, 1, 1)
    labels = torch.tensor([[True, True, False]])  # argmax 1 is a label: m_oc = 0
    assert rectification_loss(logits, labels, torch.ones(3, 3), 0.2, 2.0).item() == 0.0


def test_image_with_all_classes_has_zero_loss_and_finite_zero_gradient():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.ones(2, 4, dtype=torch.bool)  # no OC class at all: G_oc empty
    loss = rectification_loss(logits, labels, cooccurrence(labels), 0.2, 2.0)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(logits.grad == 0)


def test_empty_ic_group_gives_zero_loss_and_finite_gradient():
    # t = 0: P^A - P^k·M[A,k] >= 0 for every candidate k, so G_ic is empty.
    logits = torch.tensor([0.0, 5.0, 1.0]).reshape(1, 3, 1, 1).requires_grad_()
    labels = torch.tensor([[True, False, True]])
    loss = rectification_loss(logits, labels, torch.ones(3, 3), 0.0, 2.0)
    loss.sum().backward()
    assert loss.item() == 0.0 and torch.all(torch.isfinite(logits.grad))


def test_gradient_pushes_oc_logits_down_and_ic_logits_up():
    # S' = {0, 2}; class 1 (OC) wins. Class 3 (OC) too; class 2 has a low prior with anchor 0.
    logits = torch.tensor([2.0, 3.0, -2.0, 1.0]).reshape(1, 4, 1, 1).requires_grad_()
    labels = torch.tensor([[True, False, True, False]])
    cooc = torch.eye(4)
    cooc[0] = torch.tensor([1.0, 0.5, 0.1, 0.5])
    loss = rectification_loss(logits, labels, cooc, 0.2, 2.0)
    loss.sum().backward()
    grad = logits.grad.flatten()
    # Descent moves against the gradient: OC logits (1, 3) have grad > 0 and go down,
    # the IC anchor (0) grad < 0 goes up; class 2 is filtered from G_ic (P^0 - P^2·0.1 >= t).
    assert grad[1] > 0 and grad[3] > 0 and grad[0] < 0 and grad[2] == 0
    stepped = (logits - 0.1 * logits.grad).detach()
    assert rectification_loss(stepped, labels, cooc, 0.2, 2.0).item() < loss.item()


def test_minimising_the_loss_removes_out_of_candidate_predictions():
    logits, image_labels, cooc = random_case(5, batch=4, size=8)
    logits.requires_grad_()
    optimizer = torch.optim.SGD([logits], lr=1.0)
    before = out_of_candidate_rate(logits.argmax(1), image_labels)
    for _ in range(50):
        optimizer.zero_grad()
        rectification_loss(logits, image_labels, cooc, 0.2, 2.0).sum().backward()
        optimizer.step()
    after = out_of_candidate_rate(logits.argmax(1), image_labels)
    assert before[1] > 0.3 and after == (0.0, 0.0)


def test_rectification_loss_rejects_mismatched_shapes():
    logits = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="image_labels must be bool"):
        rectification_loss(logits, torch.ones(2, 3, dtype=torch.bool), torch.eye(4), 0.2, 2.0)
    with pytest.raises(ValueError, match="cooc must be"):
        rectification_loss(logits, torch.ones(2, 4, dtype=torch.bool), torch.eye(3), 0.2, 2.0)


# ---- the add-on on deeplab -------------------------------------------------------------

def tiny_batch(num_classes=3, batch=2, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, num_classes)
    labels[0, 0] = 1
    labels[1, 1:] = 1
    target = torch.randint(0, num_classes + 1, (batch, size, size), generator=generator)
    target[:, :8] = 255
    return {"image": torch.randn(batch, 3, size, size, generator=generator), "labels": labels, "target": target}


def deeplab_ocr(config: OCRConfig | None = None, num_classes=3):
    method = build_method("deeplab+ocr", num_classes, {"ocr": config or OCRConfig()}, backbone=TINY)
    labels = torch.rand(12, num_classes + 1, generator=torch.Generator().manual_seed(1)) < 0.5
    method.on_dataset(DatasetStats(num_images=12, image_labels=labels))
    return method, labels


def test_addon_builds_prior_from_dataset_and_checkpoints_it():
    method, labels = deeplab_ocr()
    torch.testing.assert_close(method.addons[0].cooc, cooccurrence(labels))
    fresh = build_method("deeplab+ocr", 3, backbone=TINY)
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(fresh.addons[0].cooc, cooccurrence(labels))
    fresh.training_step(tiny_batch(), Progress(0, 0, 1, 1))  # usable after a restore


def test_addon_loss_is_alpha_times_mean_over_valid_pixels_with_or_without_a_pseudo_label():
    """Eq. 19 reads the prediction and the image labels only: pixels whose pseudo-label is 255
    are rectified too (the paper's m_oc is the only mask); padding is not."""
    method, _ = deeplab_ocr(OCRConfig(ic_threshold=0.3, margin=1.0, rectification_weight=0.5))
    method.eval()  # fixed batch-norm statistics: two forwards give the same logits
    batch = tiny_batch()
    batch["target"][1, :, :24] = 255
    batch["valid"] = torch.ones(2, 64, 64, dtype=torch.bool)
    batch["valid"][0, 40:] = False
    losses = method.training_step(batch, Progress(0, 0, 1, 1))
    logits = method.segmentation_logits(batch["image"])
    image_labels = torch.cat([torch.ones(2, 1, dtype=torch.bool), batch["labels"] > 0.5], dim=1)
    per_pixel = reference_loss(logits.detach(), image_labels, method.addons[0].cooc, 0.3, 1.0)
    counted = batch["valid"][:, ::16, ::16]  # nearest downsampling to the 4×4 logits
    unlabelled = (batch["target"] == 255)[:, ::16, ::16] & counted
    assert (per_pixel[unlabelled] > 0).any(), "the batch must have OC pixels without a pseudo-label"
    expected = 0.5 * per_pixel[counted].mean()
    assert losses["ocr"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_addon_loss_is_zero_when_every_pixel_is_padding():
    method, _ = deeplab_ocr()
    batch = tiny_batch()
    batch["valid"] = torch.zeros(2, 64, 64, dtype=torch.bool)
    loss = method.training_step(batch, Progress(0, 0, 1, 1))["ocr"]
    assert loss.item() == 0.0 and loss.requires_grad


def test_addon_refuses_to_train_without_dataset_statistics():
    method = build_method("deeplab+ocr", 3, backbone=TINY)
    with pytest.raises(RuntimeError, match="on_dataset"):
        method.training_step(tiny_batch(), Progress(0, 0, 1, 1))


def test_addon_needs_a_segmentation_branch():
    with pytest.raises(ValueError, match="seg_logits"):
        build_method("cam+ocr", 3, backbone=TINY)


def test_deeplab_with_ocr_trains_in_a_plain_loop():
    torch.manual_seed(0)
    method, _ = deeplab_ocr()
    # A learnable batch: smooth images, each image's object where channel 0 is positive.
    images = F.interpolate(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)), size=32)
    target = (images[:, 0] > 0).long() * torch.tensor([1, 2]).view(2, 1, 1)
    target[:, :4] = 255
    batch = {"image": images, "labels": tiny_batch()["labels"], "target": target}
    # Stage-2 learning rate (DeepLab's 2.5e-4 range): a random backbone diverges at 1e-2.
    optimizer = torch.optim.SGD(method.param_groups(3e-4), lr=3e-4, momentum=0.9)
    totals = []
    for step in range(6):
        losses = method.training_step(batch, Progress(0, step, 6, 1))
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        method.after_step(Progress(0, step + 1, 6, 1))
        totals.append(total.item())
    assert set(losses) == {"seg", "ocr"}
    assert all(math.isfinite(v) for v in totals) and totals[-1] < 0.5 * totals[0]
