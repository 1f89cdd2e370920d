"""Batch collation of multi-crop samples with iBOT masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..losses.ibot import masks_weight
from .masking import BlockMaskGenerator


def collate(
    samples: Sequence[dict[str, torch.Tensor]],
    mask_generator: BlockMaskGenerator,
    mask_probability: float = 0.5,
    mask_ratio_range: tuple[float, float] = (0.1, 0.5),
    rng: np.random.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Stack the crops of :class:`MultiCropAugmentation` samples and draw the iBOT masks.

    Crops are stacked crop-major: row ``c * B + b`` is crop ``c`` of sample ``b``, so
    ``x.unflatten(0, (n_crops, B))`` gives (n_crops, B, ...), the layout of the losses.

    Masks: ``int(mask_probability * n_global * B)`` of the global crops, chosen at random, get a
    block mask (``mask_generator`` must be built on the global crops' patch grid); their mask
    ratios are stratified across the batch: the i-th of n masked crops draws its ratio uniformly
    in the i-th of n equal sub-intervals of ``mask_ratio_range``.

    Returns ``global_crops`` (n_global*B, 1, S, S), ``local_crops`` (n_local*B, 1, s, s),
    ``gram_teacher_crops`` (n_global*B, 1, G, G) when the samples have them, ``masks``
    (n_global*B, P) bool, ``mask_indices`` (M,) flat indices of the masked patches into
    ``masks.flatten()``, ``masks_weight`` (M,) 1/(masked patches of the image) and
    ``n_masked_patches`` (M as a 0-dim long tensor).
    """
    rng = rng or np.random.default_rng()
    batch = {
        name: torch.stack([s[name] for s in samples], dim=1).flatten(0, 1)
        for name in ("global_crops", "local_crops", "gram_teacher_crops")
        if name in samples[0]
    }

    n_images = batch["global_crops"].shape[0]
    n_patches = mask_generator.num_patches
    n_masked_images = int(mask_probability * n_images)
    edges = np.linspace(*mask_ratio_range, n_masked_images + 1)
    ratios = rng.uniform(edges[:-1], edges[1:])
    masks = np.zeros((n_images, n_patches), dtype=bool)
    for image, ratio in zip(rng.permutation(n_images)[:n_masked_images], ratios):
        masks[image] = mask_generator(int(round(ratio * n_patches)), rng).ravel()

    masks = torch.from_numpy(masks)
    mask_indices = masks.flatten().nonzero().flatten()
    batch.update(
        masks=masks,
        mask_indices=mask_indices,
        masks_weight=masks_weight(masks),
        n_masked_patches=torch.tensor(mask_indices.numel(), dtype=torch.long),
    )
    return batch
