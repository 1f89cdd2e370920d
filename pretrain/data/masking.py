"""Block-wise iBOT masks (BEiT / DINOv2 style)."""

from __future__ import annotations

import math

import numpy as np


class BlockMaskGenerator:
    """Masks of exactly ``n`` patches on an (h, w) patch grid, made of random rectangles.

    Rectangles of ``min_block_patches`` to ``max_block_patches`` patches (default: half the grid,
    as DINOv2) and aspect ratio in [min_aspect, max_aspect] (default max: 1 / min_aspect) are
    added while they fit the remaining budget; after 10 failed tries for a rectangle, the rest
    of the budget is filled with single random patches so the count is exact.
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        min_block_patches: int = 4,
        max_block_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.height, self.width = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.min_block_patches = min_block_patches
        self.max_block_patches = max_block_patches or self.num_patches // 2
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def __call__(self, n_masked: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """(h, w) bool mask with ``n_masked`` True patches."""
        rng = rng or np.random.default_rng()
        n_masked = min(max(int(n_masked), 0), self.num_patches)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_masked:
            added = self._add_block(mask, min(n_masked - count, self.max_block_patches), rng)
            if added == 0:
                break
            count += added
        free = np.flatnonzero(~mask)
        mask.flat[rng.choice(free, n_masked - count, replace=False)] = True
        return mask

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Mask one rectangle adding between 1 and ``budget`` new patches; returns how many."""
        for _ in range(10):
            area = rng.uniform(min(self.min_block_patches, budget), budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if 0 < h < self.height and 0 < w < self.width:
                top = rng.integers(0, self.height - h + 1)
                left = rng.integers(0, self.width - w + 1)
                block = mask[top : top + h, left : left + w]
                added = h * w - int(block.sum())
                if 0 < added <= budget:
                    block[...] = True
                    return added
        return 0
