"""`lnl`: every equation against a slow loop written from the paper, the bank under DDP, training.

References use Python floats and explicit loops over pixels, classes and prototypes; the
library code must agree with them on random inputs and on the edge cases of each equation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wsss.methods.base import BackboneConfig, Progress, build_method
from wsss.methods.lnl import (
    DFSM,
    LNLConfig,
    PrototypeBank,
    class_maps_with_background,
    consistency_scores,
    contrastive_loss,
    feature_similarity,
    fscm_seeds,
    location_map,
    seed_labels,
)
from wsss.methods.lnl_bank import kmeans_plus_plus, lloyd, subsample_per_class

KINDS = ["cosine", "softmax", "sigmoid"]


def pixel_vectors(features: torch.Tensor, b: int) -> list[list[float]]:
    """Row-major list of the C-vectors of image b of features [B,C,H,W]."""
    _, _, height, width = features.shape
    return [features[b, :, y, x].tolist() for y in range(height) for x in range(width)]


def dot(u, v) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


# ---- Eq. 1: feature similarity -------------------------------------------------------------

def reference_similarity(features: torch.Tensor, kind: str) -> torch.Tensor:
    batch, _, height, width = features.shape
    hw = height * width
    out = torch.zeros(batch, hw, hw, dtype=torch.float64)
    for b in range(batch):
        x = pixel_vectors(features, b)
        for i in range(hw):
            if kind == "softmax":
                logits = [dot(x[i], x[j]) for j in range(hw)]
                top = max(logits)
                total = sum(math.exp(v - top) for v in logits)
                for j in range(hw):
                    out[b, i, j] = math.exp(logits[j] - top) / total
            else:
                for j in range(hw):
                    norms = max(math.sqrt(dot(x[i], x[i])), 1e-12) * max(math.sqrt(dot(x[j], x[j])), 1e-12)
                    cosine = dot(x[i], x[j]) / norms
                    out[b, i, j] = 1 / (1 + math.exp(-cosine)) if kind == "sigmoid" else max(0.0, cosine)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_feature_similarity_matches_loop_reference(kind):
    features = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(1)) * 0.5
    result = feature_similarity(features, kind)
    assert result.shape == (2, 12, 12)
    torch.testing.assert_close(result.double(), reference_similarity(features, kind), atol=1e-5, rtol=1e-5)


def test_feature_similarity_ranges_and_unknown_kind():
    features = torch.rand(1, 4, 3, 3) * 3
    soft = feature_similarity(features, "softmax")
    torch.testing.assert_close(soft.sum(-1), torch.ones(1, 9))
    cos = feature_similarity(torch.randn(1, 4, 3, 3), "cosine")
    assert cos.min() >= 0 and cos.max() <= 1 + 1e-6
    torch.testing.assert_close(cos.diagonal(dim1=1, dim2=2), torch.ones(1, 9))
    with pytest.raises(ValueError, match="'dot'"):
        feature_similarity(features, "dot")


# ---- Eq. 2: consistency scores ---------------------------------------------------------------

def reference_scores(similarity: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = cams.shape
    hw = height * width
    out = torch.zeros(batch, channels, hw, dtype=torch.float64)
    for b in range(batch):
        for k in range(channels):
            m = cams[b, k].flatten().tolist()
            for i in range(hw):
                t = similarity[b, i].tolist()
                numerator = sum(m[j] * t[j] for j in range(hw))
                denominator = sum(m[j] + t[j] - m[j] * t[j] for j in range(hw))
                out[b, k, i] = numerator / denominator if denominator > 0 else 0.0
    return out.view(batch, channels, height, width)


@pytest.mark.parametrize("kind", KINDS)
def test_consistency_scores_matches_loop_reference(kind):
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 6, 3, 4, generator=generator) * 0.4
    features[0, :, 1, 1] = 0  # a pixel with no feature: an all-zero cosine similarity row
    similarity = feature_similarity(features, kind)
    cams = torch.rand(2, 4, 3, 4, generator=generator)
    cams[1, 2] = 0  # an absent class
    result = consistency_scores(similarity, cams)
    torch.testing.assert_close(result.double(), reference_scores(similarity, cams), atol=1e-5, rtol=1e-5)
    assert (result[1, 2] == 0).all()
    if kind == "cosine":  # empty class map and empty similarity row: 0/0 scores 0, not NaN
        assert result[1, 2, 1, 1] == 0 and torch.isfinite(result).all()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_consistency_scores_never_forms_a_class_by_pixel_by_pixel_tensor():
    batch, channels, side = 2, 5, 8
    similarity = torch.rand(batch, side * side, side * side)
    cams = torch.rand(batch, channels, side, side)
    with LargestTensor() as record:
        consistency_scores(similarity, cams)
    assert record.largest <= batch * side**4 < batch * channels * side**4


def test_consistency_scores_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="similarity must be"):
        consistency_scores(torch.rand(1, 9, 9), torch.rand(1, 3, 4, 4))


def test_softmax_similarity_caps_scores_below_eta_while_cosine_reaches_it():
    """Issue 4: with a perfect CAM of a 16-pixel object, softmax scores stay near 1/16."""
    side, features = 8, torch.zeros(1, 4, 8, 8)
    obj = torch.zeros(side, side, dtype=torch.bool)
    obj[2:6, 2:6] = True
    features[0, 0][~obj] = 3.0
    features[0, 1][obj] = 3.0
    features += 0.1 * torch.rand(features.shape, generator=torch.Generator().manual_seed(0))
    cams = torch.stack([(~obj).float(), obj.float()])[None]
    soft = consistency_scores(feature_similarity(features, "softmax"), cams)
    cos = consistency_scores(feature_similarity(features, "cosine"), cams)
    assert soft[0, 1][obj].max() < 0.1 and soft.max() < 0.8
    assert cos[0, 1][obj].min() > 0.8 and cos[0, 0][~obj].min() > 0.8


# ---- Eq. 3 + erosion: seed labels ------------------------------------------------------------

def reference_seeds(scores: torch.Tensor, eta: float, erosion: int) -> torch.Tensor:
    batch, channels, height, width = scores.shape
    labels = torch.full((batch, height, width), 255, dtype=torch.long)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                values = scores[b, :, y, x].tolist()
                best = max(range(channels), key=lambda k: (values[k], -k))  # first maximum
                if values[best] >= eta:
                    labels[b, y, x] = best
    eroded = labels.clone()
    r = erosion // 2
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                window = [labels[b, yy, xx].item() for yy in range(max(0, y - r), min(height, y + r + 1))
                          for xx in range(max(0, x - r), min(width, x + r + 1))]
                if any(v != labels[b, y, x].item() for v in window):
                    eroded[b, y, x] = 255
    return eroded


@pytest.mark.parametrize("erosion", [1, 3, 5])
def test_seed_labels_matches_loop_reference(erosion):
    scores = torch.rand(2, 3, 7, 6, generator=torch.Generator().manual_seed(3))
    scores[:, 0, :4] += 0.6  # large regions of one class so that erosion has something to keep
    for eta in (0.3, 0.7):
        result = seed_labels(scores, eta, erosion)
        assert result.dtype == torch.long
        assert torch.equal(result, reference_seeds(scores, eta, erosion))


def test_seed_labels_edge_cases():
    scores = torch.rand(1, 3, 5, 5) * 0.5
    assert (seed_labels(scores, 0.9, 3) == 255).all()  # no seed at all stays empty
    uniform = torch.zeros(1, 3, 4, 4)
    uniform[:, 2] = 1.0
    assert (seed_labels(uniform, 0.8, 3) == 2).all()  # image borders do not erode
    assert (seed_labels(uniform, 0.8, 9) == 2).all()  # a window larger than the image
    for bad in (0, 2, -1):
        with pytest.raises(ValueError, match="erosion"):
            seed_labels(uniform, 0.8, bad)


# ---- Eqs. 6-8, 10: location map --------------------------------------------------------------

@pytest.mark.parametrize("size", [(3, 4), (1, 5), (1, 1), (4, 4)])
def test_location_map_matches_loop_reference(size):
    h, w = size
    points = [(y, x) for y in range(h) for x in range(w)]
    d = [[math.exp(-math.hypot(p[0] - q[0], p[1] - q[1]) / math.hypot(h, w)) for q in points] for p in points]
    low, high = min(map(min, d)), max(map(max, d))
    expected = [[(v - low) / (high - low) if high > low else 1.0 for v in row] for row in d]
    result = location_map(h, w)
    assert result.shape == (h * w, h * w)
    torch.testing.assert_close(result.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


# ---- Eqs. 4-12: DFSM -------------------------------------------------------------------------

def test_dfsm_matches_loop_reference():
    torch.manual_seed(4)
    channels, height, width = 4, 2, 3
    module = DFSM(channels)
    for layer in (module.query, module.key, module.value):
        assert isinstance(layer, torch.nn.Linear) and layer.bias is None
        assert layer.weight.shape == (channels, channels)
        torch.nn.init.normal_(layer.weight)
    features = torch.randn(2, channels, height, width)
    d_tilde = location_map(height, width).tolist()
    project = {name: getattr(module, name).weight.tolist() for name in ("query", "key", "value")}
    hw = height * width
    expected = torch.zeros(2, channels, height, width, dtype=torch.float64)
    for b in range(2):
        x = pixel_vectors(features, b)
        q, k, v = ([[dot(row, xi) for row in project[name]] for xi in x] for name in ("query", "key", "value"))
        for i in range(hw):
            logits = [dot(q[i], k[j]) / math.sqrt(channels) for j in range(hw)]
            top = max(logits)
            total = sum(math.exp(a - top) for a in logits)
            s = [math.exp(logits[j] - top) / total * d_tilde[i][j] for j in range(hw)]
            for c in range(channels):
                expected[b, c, i // width, i % width] = sum(s[j] * v[j][c] for j in range(hw))
    torch.testing.assert_close(module(features).double(), expected, atol=1e-5, rtol=1e-5)


# ---- Memory bank: K-means initialisation, Eqs. 13-14 -----------------------------------------

def test_lloyd_matches_loop_reference():
    generator = torch.Generator().manual_seed(5)
    points = torch.randn(40, 3, generator=generator)
    start = points[:4].clone() + 0.01
    centers = start.tolist()
    data = points.tolist()
    for _ in range(3):
        groups = [[] for _ in centers]
        for p in data:
            nearest = min(range(len(centers)),
                          key=lambda j: sum((a - b) ** 2 for a, b in zip(p, centers[j], strict=True)))
            groups[nearest].append(p)
        centers = [[sum(col) / len(g) for col in zip(*g, strict=True)] if g else c
                   for g, c in zip(groups, centers, strict=True)]
    torch.testing.assert_close(lloyd(points, start, 3), torch.tensor(centers), atol=1e-5, rtol=1e-5)


def test_kmeans_initialisation_finds_separated_clusters_deterministically():
    generator = torch.Generator().manual_seed(6)
    truth = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(30, 3, generator=generator) for c in truth])
    seeds = kmeans_plus_plus(points, 3, torch.Generator().manual_seed(0))
    assert sorted((torch.cdist(seeds, truth).argmin(1)).tolist()) == [0, 1, 2]  # one seed per cluster
    banks = []
    for _ in range(2):
        bank = PrototypeBank(num_classes=1, num_prototypes=3, dim=3, momentum=0.9, seed=7)
        bank.update(points, torch.ones(90, dtype=torch.long))
        banks.append(bank.prototypes.clone())
    assert torch.equal(banks[0], banks[1])
    found = banks[0][1]
    means = torch.stack([points[30 * i:30 * (i + 1)].mean(0) for i in range(3)])
    torch.testing.assert_close(found[torch.cdist(means, found).argmin(1)], means, atol=1e-5, rtol=0)


def reference_bank_update(prototypes, initialized, features, labels, gamma):
    """Eq. 13 (nearest prototype by Euclidean distance), then Eq. 14 with the mean of the
    features each prototype received; classes seen for the first time are left to the caller."""
    new = prototypes.clone()
    for k in sorted(set(labels.tolist())):
        if not initialized[k]:
            continue
        bank = prototypes[k].tolist()
        received = [[] for _ in bank]
        for f, label in zip(features.tolist(), labels.tolist(), strict=True):
            if label == k:
                nearest = min(range(len(bank)),
                              key=lambda j: sum((a - b) ** 2 for a, b in zip(f, bank[j], strict=True)))
                received[nearest].append(f)
        for j, group in enumerate(received):
            if group:
                mean = [sum(col) / len(group) for col in zip(*group, strict=True)]
                new[k, j] = torch.tensor([gamma * b + (1 - gamma) * m for b, m in zip(bank[j], mean, strict=True)])
    return new


def test_bank_update_matches_loop_reference_and_initialises_new_classes():
    generator = torch.Generator().manual_seed(8)
    bank = PrototypeBank(num_classes=3, num_prototypes=5, dim=4, momentum=0.9)
    assert bank.prototypes.shape == (4, 5, 4) and not bank.initialized.any()
    bank.prototypes.copy_(torch.randn(4, 5, 4, generator=generator))
    bank.initialized[:2] = True  # classes 0, 1 initialised; 2 will be initialised; 3 stays absent
    before = bank.prototypes.clone()
    features = torch.randn(30, 4, generator=generator)
    labels = torch.tensor([0] * 12 + [1] * 15 + [2] * 3)
    bank.update(features, labels)
    expected = reference_bank_update(before, [True, True, False, False], features, labels, 0.9)
    torch.testing.assert_close(bank.prototypes[:2], expected[:2], atol=1e-5, rtol=1e-5)
    # Class 2 had 3 < N = 5 features: they are its prototypes, repeated.
    assert torch.equal(bank.prototypes[2], features[27:][torch.tensor([0, 1, 2, 0, 1])])
    assert torch.equal(bank.prototypes[3], before[3])  # absent class untouched
    assert bank.initialized.tolist() == [True, True, True, False]
    after = bank.prototypes.clone()
    bank.update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))  # no seeds: no change
    assert torch.equal(bank.prototypes, after)
    with pytest.raises(ValueError, match="0..3"):
        bank.update(features[:2], torch.tensor([1, 255]))


def test_bank_state_dict_round_trip():
    bank = PrototypeBank(num_classes=2, num_prototypes=4, dim=3, momentum=0.5)
    bank.update(torch.randn(20, 3), torch.randint(0, 3, (20,)))
    state = bank.state_dict()
    assert set(state) == {"prototypes", "initialized"}
    restored = PrototypeBank(num_classes=2, num_prototypes=4, dim=3, momentum=0.5)
    restored.load_state_dict(state)
    assert torch.equal(restored.prototypes, bank.prototypes)
    assert torch.equal(restored.initialized, bank.initialized)


def local_bank_data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data on each replica; replica 1 has no seeds at step 2."""
    generator = torch.Generator().manual_seed(100 * rank + step)
    count = 0 if (rank, step) == (1, 2) else 6 + 5 * rank + step
    labels = torch.randint(0, 3, (count,), generator=generator) if step else torch.full((count,), rank + 1)
    return torch.randn(count, 3, generator=generator) + labels[:, None], labels


def ddp_bank_worker(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    bank = PrototypeBank(num_classes=2, num_prototypes=4, dim=3, momentum=0.9)
    for step in range(4):
        bank.update(*local_bank_data(rank, step))
    torch.save(bank.state_dict(), f"{folder}/bank{rank}.pt")
    dist.destroy_process_group()


def test_bank_replicas_agree_under_two_gloo_workers(tmp_path):
    # fork: the workers inherit the imported modules instead of importing torch again.
    mp.start_processes(ddp_bank_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    banks = [torch.load(tmp_path / f"bank{rank}.pt") for rank in range(2)]
    assert torch.equal(banks[0]["prototypes"], banks[1]["prototypes"])
    assert banks[0]["initialized"].tolist() == [True, True, True]
    # The same as one process seeing both replicas' data in rank order.
    single = PrototypeBank(num_classes=2, num_prototypes=4, dim=3, momentum=0.9)
    for step in range(4):
        parts = [local_bank_data(rank, step) for rank in range(2)]
        single.update(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    torch.testing.assert_close(banks[0]["prototypes"], single.prototypes)


# ---- Eqs. 15-18: contrastive loss ------------------------------------------------------------

def reference_contrastive(features, labels, prototypes, tau, initialized):
    def unit(v):
        n = math.sqrt(dot(v, v))
        return [a / n for a in v]

    z = [unit(f) for f in features.tolist()]
    b = [[unit(p) for p in row] for row in prototypes.tolist()]
    per_class = []
    for k in range(len(b)):
        anchors = [z[i] for i in range(len(z)) if labels[i] == k]
        if not anchors or not initialized[k]:
            continue
        negatives = [p for m in range(len(b)) if m != k and initialized[m] for p in b[m]]
        q = sum(math.exp(dot(zi, p) / tau) for zi in anchors for p in negatives)
        terms = []
        for bj in b[k]:
            p_j = sum(math.exp(dot(zi, bj) / tau) for zi in anchors)
            terms.append(math.log(p_j / (p_j + q)))
        per_class.append(-sum(terms) / len(terms))
    return sum(per_class) / len(per_class)


def test_contrastive_loss_matches_loop_reference():
    generator = torch.Generator().manual_seed(9)
    prototypes = torch.randn(5, 3, 6, generator=generator)
    features = torch.randn(20, 6, generator=generator, requires_grad=True)
    labels = torch.tensor([0] * 5 + [1] * 6 + [2] * 4 + [4] * 5)  # class 3 absent
    initialized = torch.tensor([True, True, True, True, False])  # 3: negatives only; 4: skipped
    loss = contrastive_loss(features, labels, prototypes, 0.5, initialized)
    expected = reference_contrastive(features.detach(), labels.tolist(), prototypes, 0.5, initialized.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert features.grad[15:].abs().sum() == 0 and features.grad[:15].abs().sum() > 0


def test_contrastive_loss_edge_cases():
    prototypes = torch.randn(3, 4, 5)
    features = torch.randn(6, 5, requires_grad=True)
    only_one = torch.tensor([True, False, False])
    alone = contrastive_loss(features, torch.zeros(6, dtype=torch.long), prototypes, 0.5, only_one)
    assert alone.item() == 0.0  # no negatives: P/(P+Q) = 1
    nothing = contrastive_loss(features, torch.full((6,), 2), prototypes, 0.5, only_one)
    assert nothing.item() == 0.0 and nothing.requires_grad  # no qualifying class
    nothing.backward()
    cold = contrastive_loss(features, torch.tensor([0, 0, 1, 1, 2, 2]), prototypes, 1e-3)
    assert torch.isfinite(cold)  # log-sum-exp: exp(1000) would overflow
    with pytest.raises(ValueError, match="tau"):
        contrastive_loss(features, torch.zeros(6, dtype=torch.long), prototypes, 0.0)


def test_contrastive_loss_subsamples_large_classes():
    prototypes = torch.randn(3, 4, 5)
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 8)
    features = torch.randn(3, 5)[labels].clone().requires_grad_(True)  # identical within a class
    full = contrastive_loss(features, labels, prototypes, 0.5)
    sub = contrastive_loss(features, labels, prototypes, 0.5, max_pixels_per_class=4,
                           generator=torch.Generator().manual_seed(0))
    # With identical anchors P_j and Q both scale with the anchor count: the loss does not change.
    assert sub.item() == pytest.approx(full.item(), rel=1e-5)
    sub.backward()
    used = features.grad.abs().sum(1) > 0
    assert [int(used[labels == k].sum()) for k in range(3)] == [4, 3, 4]


def test_subsample_per_class_keeps_at_most_limit_of_each():
    labels = torch.tensor([2, 0, 2, 2, 1, 2, 0, 2])
    keep = subsample_per_class(labels, 2, torch.Generator().manual_seed(1))
    assert keep.unique().numel() == keep.numel()
    assert torch.bincount(labels[keep], minlength=3).tolist() == [2, 1, 2]
    assert subsample_per_class(labels, None).tolist() == list(range(8))


# ---- FSCM inputs, config, training -----------------------------------------------------------

def test_class_maps_background_and_absent_classes_get_no_seeds():
    generator = torch.Generator().manual_seed(10)
    logits = torch.randn(2, 3, 5, 5, generator=generator) * 3
    image_labels = torch.tensor([[1.0, 0, 1], [0, 0, 0]])
    maps = class_maps_with_background(logits, image_labels)
    assert maps.shape == (2, 4, 5, 5)
    assert (maps[0, 2] == 0).all() and (maps[1, 1:] == 0).all() and (maps[1, 0] == 1).all()
    fg = torch.relu(logits[0, [0, 2]])
    fg = fg / (fg.amax(dim=(1, 2), keepdim=True) + 1e-5)
    torch.testing.assert_close(maps[0, 0], 1 - fg.max(0).values)
    valid = torch.ones(2, 5, 5, dtype=torch.bool)
    valid[:, :, 4] = False  # a padded column
    features = torch.rand(2, 8, 5, 5, generator=generator)
    for kind in KINDS:
        seeds = fscm_seeds(features, logits, image_labels, valid, kind, 0.01, 1)
        assert set(seeds[0].unique().tolist()) <= {0, 1, 3, 255}  # class 2 is not in image 0
        assert set(seeds[1].unique().tolist()) <= {0, 255}  # image 1 has background only
        assert (seeds[:, :, 4] == 255).all()
        assert (seeds != 255).any()


def test_config_rejects_bad_values_by_name():
    for key, value in [("seed_threshold", 0.0), ("bank_momentum", 1.5), ("temperature", 0), ("erosion", 2),
                       ("contrast_weight", -1), ("similarity", "dot"),
                       ("export", "both"), ("num_prototypes", 0), ("warmup_epochs", -1)]:
        with pytest.raises(ValueError, match=key):
            LNLConfig(**{key: value})
    # chosen on a dev split (docs/results.md)
    assert (LNLConfig().similarity, LNLConfig().seed_threshold) == ("sigmoid", 0.3)


def tiny_lnl(**overrides):
    torch.manual_seed(0)
    config = LNLConfig(**{"seed_threshold": 0.3, "num_prototypes": 8, "warmup_epochs": 1, **overrides})
    return build_method("lnl", 3, {"lnl": config}, BackboneConfig("resnet18", 16, "none"))


def fixed_batch():
    generator = torch.Generator().manual_seed(11)
    valid = torch.ones(4, 64, 64, dtype=torch.bool)
    valid[0, :, 48:] = False
    return {"image": torch.randn(4, 3, 64, 64, generator=generator), "valid": valid,
            "labels": torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]])}


def test_lnl_trains_in_a_plain_loop_and_losses_decrease(one_torch_thread):
    method = tiny_lnl()
    batch = fixed_batch()
    optimizer = torch.optim.SGD([{"params": g["params"], "lr": 0.01 * g["lr_mult"]}
                                 for g in method.param_groups(0.01)], momentum=0.9)
    totals = []
    for step in range(6):
        progress = Progress(epoch=step // 3, step=step, steps_per_epoch=3, epochs=2)
        losses = method.training_step(batch, progress)
        assert set(losses) == {"cls", "cls_expanded", "con"}
        assert all(torch.isfinite(v) for v in losses.values())
        if progress.epoch < 1:
            assert losses["con"].item() == 0.0  # warm-up: λ = 0
        else:
            assert losses["con"].item() > 0.0
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
        # the bank is fed from the warm-up's last step (step 2) on, never from untrained features
        assert method.prototype_bank.initialized.any() == (step >= 2), step
    assert totals[-1] < totals[0] and totals[2] < totals[0]


def test_only_the_expansion_branchs_classification_loss_trains_dfsm(one_torch_thread):
    """Eq. 19 as written (L_cls + λ·L_con) gives DFSM no gradient: E_e only selects pixels (no
    gradient) and L_con's anchors are F_s features. L_cls(M_e) is its only training signal."""
    method = tiny_lnl(warmup_epochs=0, seed_threshold=0.1, similarity="cosine")  # seeds of two classes: L_con has negatives
    batch = fixed_batch()
    method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=2, epochs=1))  # fills the bank
    losses = method.training_step(batch, Progress(epoch=0, step=1, steps_per_epoch=2, epochs=1))
    assert losses["con"].item() > 0
    dfsm = list(method.network.dfsm.parameters())
    grads = torch.autograd.grad(losses["cls"] + losses["con"], dfsm, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads)
    grads = torch.autograd.grad(losses["cls_expanded"], dfsm, allow_unused=True)
    assert all(g is not None and g.any() for g in grads)


def test_lnl_exports_and_checkpoints_its_bank(one_torch_thread):
    method = tiny_lnl(warmup_epochs=0)
    batch = fixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # seeds and bank stay float32
        losses = method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, epochs=1))
    assert all(torch.isfinite(v) for v in losses.values())
    assert method.prototype_bank.prototypes.dtype == torch.float32 and method.prototype_bank.initialized.any()
    state = method.state_dict()
    assert "prototype_bank.prototypes" in state and "prototype_bank.initialized" in state
    assert not any(key.startswith("network.") and "prototype" in key for key in state)
    restored = tiny_lnl(warmup_epochs=0)
    restored.load_state_dict(state)
    assert torch.equal(restored.prototype_bank.prototypes, method.prototype_bank.prototypes)
    method.eval()
    with torch.no_grad():
        outputs = method.network(batch["image"])
        assert {"features", "cam_logits", "cam_logits_expanded"} <= set(outputs)
        maps = {}
        for export in ("shrink", "expand", "fusion"):
            method.config = LNLConfig(export=export)
            maps[export] = method.cam_maps(batch["image"])
            assert maps[export].shape == (4, 3, 4, 4) and maps[export].min() >= 0
    torch.testing.assert_close(maps["shrink"], torch.relu(outputs["cam_logits"]))
    torch.testing.assert_close(maps["expand"], torch.relu(outputs["cam_logits_expanded"]))
    peak = [m / (m.amax(dim=(2, 3), keepdim=True) + 1e-5) for m in (maps["shrink"], maps["expand"])]
    torch.testing.assert_close(maps["fusion"], (peak[0] + peak[1]) / 2)
