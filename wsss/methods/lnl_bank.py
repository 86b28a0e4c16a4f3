"""`lnl` memory bank and contrastive loss (Learning From Pixel-Level Noisy Labels, Sec. III-C).

`PrototypeBank` keeps N prototypes per class (background = row 0), initialised by K-means
from a class's first seed features and moved towards new seed features by momentum
(Eqs. 13-14). `contrastive_loss` pulls anchor features towards their class's prototypes and
away from every other class's (Eqs. 15-18). Both are used by `wsss.methods.lnl`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def kmeans_plus_plus(features: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: n rows of `features` [M,D], each next one drawn with probability
    proportional to its squared distance to the nearest row already drawn.

    The draws use `generator` (a CPU generator) so that the result does not depend on the
    device or on the global random state.
    """
    first = int(torch.randint(features.shape[0], (1,), generator=generator))
    chosen = [first]
    nearest = (features - features[first]).pow(2).sum(dim=1)
    for _ in range(n - 1):
        weights = nearest.double().cpu()
        if weights.sum() <= 0:  # every point coincides with a chosen one: draw uniformly
            weights = torch.ones_like(weights)
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, (features - features[index]).pow(2).sum(dim=1))
    return features[chosen].clone()


def lloyd(features: torch.Tensor, centers: torch.Tensor, iterations: int) -> torch.Tensor:
    """Lloyd's K-means iterations from `centers` [N,D]; a centre that gets no point stays put."""
    for _ in range(iterations):
        assignment = torch.cdist(features, centers).argmin(dim=1)
        sums, counts = _sum_by_index(features, assignment, centers.shape[0])
        moved = counts > 0
        centers = torch.where(moved[:, None], sums / counts.clamp_min(1)[:, None], centers)
    return centers


def _sum_by_index(features: torch.Tensor, index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-index sums [n,D] and counts [n] of `features` [M,D].

    A one-hot matrix product instead of `index_add_`: CUDA `index_add_` sums in a
    nondeterministic order, and DDP replicas must compute bit-identical banks.
    """
    one_hot = F.one_hot(index, n).to(features.dtype)  # [M,n]
    return one_hot.T @ features, one_hot.sum(dim=0)


def subsample_per_class(labels: torch.Tensor, limit: int | None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (sorted) of at most `limit` random elements of each class in `labels` [M].

    Vectorised: sort by (label, random key), then keep each element whose rank within its
    class is below `limit`. `limit=None` keeps everything.
    """
    if limit is None or labels.numel() == 0 or int(torch.bincount(labels).max()) <= limit:
        return torch.arange(labels.numel(), device=labels.device)
    keys = torch.rand(labels.numel(), generator=generator, dtype=torch.float64).to(labels.device)
    order = torch.argsort(labels.double() * 2.0 + keys)  # keys < 1 < gap between labels
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel(), device=labels.device) - starts[sorted_labels]
    return order[rank < limit].sort().values


def gather_from_replicas(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All replicas' (features [M,D], labels [M]) concatenated in rank order.

    Identity when torch.distributed is not initialised. Replicas may hold different M, so
    rows are padded to the largest M for `all_gather` and trimmed afterwards.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    world = dist.get_world_size()
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    most = max(counts)
    padded_features = features.new_zeros(most, features.shape[1])
    padded_features[: features.shape[0]] = features
    padded_labels = labels.new_zeros(most)
    padded_labels[: labels.shape[0]] = labels
    gathered_features = [torch.empty_like(padded_features) for _ in range(world)]
    gathered_labels = [torch.empty_like(padded_labels) for _ in range(world)]
    dist.all_gather(gathered_features, padded_features)
    dist.all_gather(gathered_labels, padded_labels)
    return (torch.cat([f[:c] for f, c in zip(gathered_features, counts, strict=True)]),
            torch.cat([lab[:c] for lab, c in zip(gathered_labels, counts, strict=True)]))


def _check_labels(labels: torch.Tensor, num_rows: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_rows):
        raise ValueError(f"labels must be class indices in 0..{num_rows - 1} (255 = ignore is not "
                         f"allowed here), got {int(labels.min())}..{int(labels.max())}")


class PrototypeBank(nn.Module):
    """N prototypes per class for K foreground classes plus background (row 0).

    `num_classes` is K, as everywhere in `wsss.methods`; the bank has K+1 rows.
    Buffers (so in `state_dict` and moved by `.to()`): `prototypes` float [K+1,N,dim],
    `initialized` bool [K+1]. The bank is not part of the trained network: a method keeps it
    beside `network`, so DDP never wraps (or drops) it.
    """

    def __init__(self, num_classes: int, num_prototypes: int, dim: int, momentum: float,
                 kmeans_iterations: int = 10, seed: int = 0):
        super().__init__()
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum (gamma) must be in [0, 1], got {momentum}")
        self.num_prototypes = num_prototypes
        self.momentum = momentum
        self.kmeans_iterations = kmeans_iterations
        self.seed = seed
        self.register_buffer("prototypes", torch.zeros(num_classes + 1, num_prototypes, dim))
        self.register_buffer("initialized", torch.zeros(num_classes + 1, dtype=torch.bool))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds seed features [M,dim] with class labels [M] in 0..K (M may be 0).

        Gathers every DDP replica's features first, so all replicas apply the same update.
        An uninitialised class is initialised from its features (`initialize_class`); an
        initialised one gets Eq. 13 (nearest prototype by Euclidean distance) and the batched
        Eq. 14: each prototype that got features moves to γ·b + (1−γ)·mean(its features).
        Every replica must call this at every step (it is a collective when distributed).
        """
        if features.ndim != 2 or features.shape[1] != self.prototypes.shape[2]:
            raise ValueError(f"features must be [M,{self.prototypes.shape[2]}], got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must be [{features.shape[0]}], got {tuple(labels.shape)}")
        _check_labels(labels, self.prototypes.shape[0])
        features, labels = gather_from_replicas(features.float(), labels.long())
        with torch.autocast(features.device.type, enabled=False):  # the bank accumulates in float32
            for k in labels.unique().tolist():
                class_features = features[labels == k]
                if not self.initialized[k]:
                    self.initialize_class(k, class_features)
                    continue
                bank = self.prototypes[k]
                nearest = torch.cdist(class_features, bank).argmin(dim=1)  # Eq. 13
                sums, counts = _sum_by_index(class_features, nearest, self.num_prototypes)
                means = sums / counts.clamp_min(1)[:, None]
                blended = self.momentum * bank + (1.0 - self.momentum) * means  # Eq. 14, batched
                self.prototypes[k] = torch.where((counts > 0)[:, None], blended, bank)

    @torch.no_grad()
    def initialize_class(self, k: int, features: torch.Tensor) -> None:
        """K-means (k-means++ seeding, Lloyd) of class k's features into N prototypes.

        With at most N features the features themselves, repeated cyclically, are the
        prototypes. The seed depends only on `seed` and k, so replicas agree.
        """
        n = self.num_prototypes
        if features.shape[0] <= n:
            repeat = torch.arange(n, device=features.device) % features.shape[0]
            self.prototypes[k] = features[repeat]
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            centers = kmeans_plus_plus(features, n, generator)
            self.prototypes[k] = lloyd(features, centers, self.kmeans_iterations)
        self.initialized[k] = True


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, tau: float,
                     initialized: torch.Tensor | None = None, max_pixels_per_class: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Eqs. 15-18: anchor features [M,C] with labels [M] in 0..K against prototypes [K+1,N,C].

    z and b are L2-normalised (Eqs. 15-16). For each class k with >= 1 anchor and
    initialised prototypes (`initialized` bool [K+1]; None = all):
        L^k = -(1/N) Σ_j log( P_j / (P_j + Q) ),  P_j = Σ_{i∈k} exp(z_i·b_j^k/τ),
        Q = Σ_{i∈k} Σ_{m∉k} exp(z_i·b_m/τ) over the other initialised classes' prototypes (Eq. 17),
    and the loss is the mean of L^k over those classes (Eq. 18), all in log-sum-exp form.
    A class with more than `max_pixels_per_class` anchors uses a random subset of that size
    (drawn with `generator` if given). No qualifying class: a zero that keeps the graph.
    """
    if features.ndim != 2 or prototypes.ndim != 3 or features.shape[1] != prototypes.shape[2]:
        raise ValueError(f"features [M,C] and prototypes [K+1,N,C] disagree: "
                         f"{tuple(features.shape)} vs {tuple(prototypes.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    num_rows = prototypes.shape[0]
    if initialized is None:
        initialized = torch.ones(num_rows, dtype=torch.bool, device=prototypes.device)
    _check_labels(labels, num_rows)
    keep = subsample_per_class(labels, max_pixels_per_class, generator)
    z = F.normalize(features[keep].float(), dim=1)
    labels = labels[keep]
    # A fresh tensor: the caller may update the bank in place before backward.
    b = F.normalize(prototypes.float(), dim=2)
    per_class = []
    for k in labels.unique().tolist():
        if not initialized[k]:
            continue
        anchors = z[labels == k]
        log_p = torch.logsumexp(anchors @ b[k].T / tau, dim=0)  # [N]: log P_j
        others = initialized.clone()
        others[k] = False
        negatives = b[others].reshape(-1, b.shape[2])
        if negatives.shape[0] == 0:  # no other class yet: P/(P+Q) = 1
            per_class.append(log_p.sum() * 0.0)
            continue
        log_q = torch.logsumexp((anchors @ negatives.T / tau).flatten(), dim=0)
        per_class.append(-(log_p - torch.logaddexp(log_p, log_q)).mean())
    if not per_class:
        return features.sum() * 0.0
    return torch.stack(per_class).mean()
