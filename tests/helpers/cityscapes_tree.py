"""A tiny real Cityscapes tree for tests: noise leftImg8bit PNGs and blocky gtFine labelIds
PNGs using every label id 0..33 plus 255 (how license plates are stored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 32, 64
BLOCK = 8
CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt",)}


def write_cityscapes_tree(root: str | Path, images_per_city: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the tree; returns each sample id's labelIds array (the source the reader maps)."""
    root, rng = Path(root), np.random.default_rng(seed)
    label_ids = {}
    for split, cities in CITIES.items():
        for city in cities:
            for number in range(images_per_city):
                name = f"{city}_{number:06d}_{19 + number:06d}"
                blocks = rng.choice([*range(34), 255], size=(HEIGHT // BLOCK, WIDTH // BLOCK))
                blocks[0, 0] = 7  # at least one evaluated class (road)
                ids = np.kron(blocks, np.ones((BLOCK, BLOCK), dtype=np.int64)).astype(np.uint8)
                image_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
                image_dir.mkdir(parents=True, exist_ok=True)
                gt_dir.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(image_dir / f"{name}_leftImg8bit.png")
                Image.fromarray(ids).save(gt_dir / f"{name}_gtFine_labelIds.png")
                label_ids[name] = ids
    return label_ids
