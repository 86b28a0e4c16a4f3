"""What every dataset reader yields, and the registry the CLI looks readers up in.

A reader walks one on-disk dataset tree and yields `Sample`s for a split. Images stay
in their original encoding (they are written to shards byte for byte); masks are
decoded to class-index arrays so that every reader hands the shard writer the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from wsss.io import DataError

# The label of pixels that no loss or metric counts: void in ground truth, padding, and
# pixels a pseudo-label leaves undecided. Every layer imports it from here.
IGNORE_INDEX = 255
# Values of a region map (`Sample.region`): plain background, an object's discriminative
# part, the rest of its body, and a context region that is labelled background (the
# synthetic benchmark's water under its boats).
REGION_BACKGROUND, REGION_PART, REGION_BODY, REGION_CONTEXT = 0, 1, 2, 3


@dataclass(frozen=True)
class Sample:
    id: str
    image: bytes  # original encoded bytes (JPEG/PNG), never re-encoded
    mask: np.ndarray | None  # uint8 [H, W] class indices, IGNORE_INDEX = void; None if unlabelled
    labels: tuple[int, ...]  # sorted foreground class indices 1..K present in the image
    height: int
    width: int
    # uint8 [H, W] REGION_* of each pixel, for evaluation only; None for real datasets
    region: np.ndarray | None = None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]  # index 0 is "background"
    palette: tuple[tuple[int, int, int], ...]  # one RGB colour per class
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        """Foreground classes K; channel 0 of K+1-channel maps is background."""
        return len(self.classes) - 1


class DatasetReader(Protocol):
    info: DatasetInfo

    def splits(self) -> list[str]: ...

    def samples(self, split: str) -> Iterator[Sample]:
        """Yield the split's samples; raise DataError on bad input, or, if the reader was
        built with skip_invalid=True, skip it and record it in `self.skipped`."""
        ...


class ItemReader:
    """A reader whose split is a list of independent items (ids, paths, records), each read
    into a sample on its own: `wsss prepare` reads those in worker processes. A subclass
    gives `items` and `read_item`, and sets `skip_invalid` and `skipped`."""

    skip_invalid: bool
    skipped: SkipLog

    def items(self, split: str) -> list:
        """The split's items, in the order its samples are written; each one picklable."""
        raise NotImplementedError

    def read_item(self, split: str, item) -> Sample:
        """One validated sample; DataError on bad input."""
        raise NotImplementedError

    def samples(self, split: str) -> Iterator[Sample]:
        for item in self.items(split):
            try:
                yield self.read_item(split, item)
            except DataError as error:
                if not self.skip_invalid:
                    raise
                self.skipped.add(error)


@dataclass
class SkipLog:
    """Invalid inputs skipped under --skip-invalid, counted per problem in the manifest."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        self.entries.append((error.path, error.problem))


READERS: dict[str, Callable[..., DatasetReader]] = {}


def register_reader(name: str):
    def decorate(factory):
        READERS[name] = factory
        return factory

    return decorate


def build_reader(name: str, root: str, **options) -> DatasetReader:
    import wsss.datasets  # noqa: F401  (registers the readers)

    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(READERS))}")
    return READERS[name](root, **options)
