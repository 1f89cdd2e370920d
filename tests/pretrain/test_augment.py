"""Multi-crop augmentation, block masks and batch collation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pretrain_synthetic import ct_volume
from scipy import ndimage

from pretrain.data.augment import MultiCropAugmentation, random_crop_box
from pretrain.data.collate import collate
from pretrain.data.intensity import MEDDINOV3_CT
from pretrain.data.masking import BlockMaskGenerator

NO_PHOTOMETRY = dict(window_p=0.0, contrast_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


def ct_slice() -> np.ndarray:
    return MEDDINOV3_CT.apply(ct_volume(0)[3])


def test_default_recipe_shapes():
    out = MultiCropAugmentation()(ct_slice(), generator=torch.Generator().manual_seed(0))
    assert out["global_crops"].shape == (2, 1, 224, 224)
    assert out["local_crops"].shape == (8, 1, 96, 96)
    assert out["gram_teacher_crops"].shape == (2, 1, 448, 448)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out.values())


def test_configurable_sizes_and_no_gram_crops():
    augment = MultiCropAugmentation(global_size=32, local_size=16, n_local=3, gram_scale=1.5)
    out = augment(torch.from_numpy(ct_slice())[None])
    assert [tuple(out[k].shape) for k in ("global_crops", "local_crops", "gram_teacher_crops")] == [
        (2, 1, 32, 32),
        (3, 1, 16, 16),
        (2, 1, 48, 48),
    ]
    out = MultiCropAugmentation(global_size=32, local_size=16, n_local=0, gram_scale=None)(ct_slice())
    assert set(out) == {"global_crops", "local_crops"} and out["local_crops"].shape == (0, 1, 16, 16)


def test_crop_boxes_respect_scale():
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        top, left, h, w = random_crop_box(60, 80, (0.05, 0.32), generator)
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        assert 0.04 <= h * w / (60 * 80) <= 0.34  # up to rounding of the sides


def test_gram_crops_are_undistorted_views_of_the_global_crops():
    image = ct_slice()
    for seed in range(4):  # flips happen in some of these
        plain = MultiCropAugmentation(global_size=32, local_size=16, n_local=2, **NO_PHOTOMETRY)
        out = plain(image, generator=torch.Generator().manual_seed(seed))
        downsampled = F.avg_pool2d(out["gram_teacher_crops"], 2)
        # same region and flip at twice the resolution
        assert (downsampled - out["global_crops"]).abs().mean() < 0.05 * (image.max() - image.min())

        # photometric changes reach the global crops only
        distorted = MultiCropAugmentation(global_size=32, local_size=16, n_local=2, window_p=1.0, blur_p=(1, 1, 1))
        distorted_out = distorted(image, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(distorted_out["gram_teacher_crops"], out["gram_teacher_crops"])
        assert not torch.allclose(distorted_out["global_crops"], out["global_crops"])


def test_window_jitter_stays_in_the_value_range():
    low, high = MEDDINOV3_CT.output_range()
    augment = MultiCropAugmentation(global_size=32, local_size=16, n_local=4, window_p=1.0, contrast_p=0.0)
    out = augment(ct_slice(), generator=torch.Generator().manual_seed(2))
    crops = torch.cat([out["global_crops"].flatten(), out["local_crops"].flatten()])
    assert low - 1e-4 <= crops.min() and crops.max() <= high + 1e-4


def test_mri_without_fixed_range():
    image = np.random.default_rng(0).normal(size=(48, 40)).astype(np.float32)
    out = MultiCropAugmentation(global_size=32, local_size=16, n_local=2, value_range=None, solarize_p=1.0)(image)
    assert out["global_crops"].shape == (2, 1, 32, 32) and torch.isfinite(out["global_crops"]).all()


@pytest.mark.parametrize("n_masked", [0, 1, 5, 20, 98, 196])
def test_block_masks_have_the_exact_count(n_masked):
    mask = BlockMaskGenerator(14)(n_masked, np.random.default_rng(n_masked))
    assert mask.shape == (14, 14) and mask.dtype == bool and mask.sum() == n_masked


def test_block_masks_are_blocks():
    generator, rng = BlockMaskGenerator(14), np.random.default_rng(0)
    components = [ndimage.label(generator(40, rng))[1] for _ in range(50)]
    assert np.mean(components) < 4  # 40 random patches of 196 would make ~25 components


def collate_batch(batch_size, seed=0, **kwargs):
    augment = MultiCropAugmentation(global_size=32, local_size=16, n_local=3, **NO_PHOTOMETRY)
    generator = torch.Generator().manual_seed(seed)
    samples = [augment(ct_slice(), generator=generator) for _ in range(batch_size)]
    return samples, collate(samples, BlockMaskGenerator(2), rng=np.random.default_rng(seed), **kwargs)


def test_collate_layout():
    samples, batch = collate_batch(3)
    assert batch["global_crops"].shape == (6, 1, 32, 32)
    assert batch["local_crops"].shape == (9, 1, 16, 16)
    assert batch["gram_teacher_crops"].shape == (6, 1, 64, 64)
    assert batch["masks"].shape == (6, 4) and batch["masks"].dtype == torch.bool
    for name in ("global_crops", "gram_teacher_crops"):
        for crop in range(2):  # crop-major: row crop * B + sample
            for b in range(3):
                torch.testing.assert_close(batch[name][crop * 3 + b], samples[b][name][crop])
    torch.testing.assert_close(batch["local_crops"][2 * 3 + 1], samples[1]["local_crops"][2])


def test_masks_on_half_the_global_crops_with_stratified_ratios():
    grid = 14
    generator = BlockMaskGenerator(grid)
    samples = [{"global_crops": torch.zeros(2, 1, 4, 4), "local_crops": torch.zeros(1, 1, 2, 2)}] * 16
    for seed in range(5):
        batch = collate(samples, generator, rng=np.random.default_rng(seed))
        masks = batch["masks"]
        counts = masks.sum(dim=1)
        assert (counts > 0).sum() == 16  # half of the 32 global crops
        ratios = np.sort(counts[counts > 0].numpy() / grid**2)
        assert 0.1 - 1 / grid**2 <= ratios.min() and ratios.max() <= 0.5 + 1 / grid**2
        edges = np.linspace(0.1, 0.5, 17)  # one masked crop per stratum
        assert np.all(ratios >= edges[:-1] - 1 / grid**2) and np.all(ratios <= edges[1:] + 1 / grid**2)

        assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
        assert batch["n_masked_patches"].item() == masks.sum()
        weights_per_image = torch.zeros(32).index_add_(0, batch["mask_indices"] // grid**2, batch["masks_weight"])
        torch.testing.assert_close(weights_per_image, (counts > 0).float())


def test_masked_crops_are_chosen_at_random():
    samples = [{"global_crops": torch.zeros(2, 1, 4, 4), "local_crops": torch.zeros(1, 1, 2, 2)}] * 8
    masked = torch.stack(
        [collate(samples, BlockMaskGenerator(6), rng=np.random.default_rng(s))["masks"].any(1) for s in range(20)]
    )
    assert masked.float().mean(0).min() > 0  # every position got a mask at some point
