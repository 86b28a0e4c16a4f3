"""Dataset readers, shard writing and numpy transforms. Importing registers every reader."""

from wsss.datasets import cityscapes, coco, synthetic, voc  # noqa: F401
from wsss.datasets.base import READERS, DatasetInfo, Sample, build_reader  # noqa: F401
