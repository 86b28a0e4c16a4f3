"""CSRM's memory bank of negative anchors (Sec. 3.2.5 and 4): one FIFO list per class."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from wsss.methods.lnl_bank import gather_from_replicas


class NegativeBank(nn.Module):
    """`size` negative anchors [dim] for each of `num_rows` classes, oldest overwritten first.

    Buffers (so in `state_dict` and moved by `.to()`): `items` float [rows,size,dim],
    `count` long [rows] (filled slots; slots 0..count−1 while not full) and `head` long
    [rows] (the next slot written, i.e. the oldest entry once full). The bank sits beside
    the trained network, so DDP never wraps or drops it; `push_from_replicas` keeps the
    replicas' banks identical.
    """

    def __init__(self, num_rows: int, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"negative bank size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("items", torch.zeros(num_rows, size, dim))
        self.register_buffer("count", torch.zeros(num_rows, dtype=torch.long))
        self.register_buffer("head", torch.zeros(num_rows, dtype=torch.long))

    @torch.no_grad()
    def push(self, items: torch.Tensor, classes: torch.Tensor) -> None:
        """Appends items [M,dim] to the lists of their classes [M], in the given order.

        Vectorised: a stable sort by class gives each item its position within its class;
        of more than `size` new items of a class only the newest `size` are written, so
        every written slot is distinct.
        """
        rows, _, dim = self.items.shape
        if items.ndim != 2 or items.shape[1] != dim or classes.shape != items.shape[:1]:
            raise ValueError(f"bank push: need items [M,{dim}] and classes [M], got "
                             f"{tuple(items.shape)} and {tuple(classes.shape)}")
        if classes.numel() == 0:
            return
        if classes.min() < 0 or classes.max() >= rows:
            raise ValueError(f"bank push: classes must be in 0..{rows - 1}, got "
                             f"{int(classes.min())}..{int(classes.max())}")
        order = torch.sort(classes, stable=True).indices
        items, classes = items[order], classes[order]
        added = torch.bincount(classes, minlength=rows)
        starts = torch.cumsum(added, 0) - added
        position = torch.arange(classes.numel(), device=classes.device) - starts[classes]
        newest = position >= added[classes] - self.size
        slot = (self.head[classes] + position) % self.size
        self.items[classes[newest], slot[newest]] = items[newest].to(self.items.dtype)
        self.head.copy_((self.head + added) % self.size)
        self.count.copy_(torch.clamp(self.count + added, max=self.size))

    def per_replica_quota(self) -> int:
        """How many new items per class one replica may push per step: ⌈size/replicas⌉, so
        that one step's items from all replicas fit in the bank together."""
        replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return math.ceil(self.size / replicas)

    @torch.no_grad()
    def push_from_replicas(self, items: torch.Tensor, classes: torch.Tensor) -> None:
        """Every replica's new items pushed in rank order on every replica, so the banks stay
        identical. A collective when torch.distributed is initialised: every replica must
        call it at every step (with M = 0 if need be)."""
        items, classes = gather_from_replicas(items.float(), classes.long())
        self.push(items, classes)

    def ordered(self, row: int) -> torch.Tensor:
        """The list of class `row`, oldest first: [count,dim]."""
        count, head = int(self.count[row]), int(self.head[row])
        if count < self.size:
            return self.items[row, :count]
        return self.items[row].roll(-head, dims=0)

    def sample(self, classes: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n entries drawn uniformly with replacement from the list of each class [Q]: [Q,n,dim].
        Every class asked for must hold at least one entry."""
        counts = self.count[classes]
        if classes.numel() and counts.min() < 1:
            raise ValueError("bank sample: a class asked for has no entries yet")
        uniform = torch.rand(classes.shape[0], n, generator=generator, device=self.items.device)
        index = torch.minimum((uniform * counts[:, None]).long(), counts[:, None] - 1)
        return self.items[classes[:, None], index]
