"""The training data stream: which slice, crop sizes and random numbers every sample gets.

Everything is a pure function of (seed, position in the stream), so a resumed run reads
exactly the batches the uninterrupted run would have read, whatever the number of loader
workers, and the sampler position is just the iteration number. Sample number ``p`` of the
global stream (counted over iterations, accumulation micro-steps, ranks and batch rows, in that
order) is slice ``permutation_e[p mod n]`` of epoch ``e = p // n``, augmented with a generator
seeded from (seed, p).
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..configs.schema import ConfigError, PretrainConfig
from ..data import BlockMaskGenerator, Exclusion, MultiCropAugmentation, SliceDataset, collate, preset_from_dict

_TRIPLE_STREAM, _MASK_STREAM, _AUGMENT_STREAM, _EPOCH_STREAM = 1, 2, 3, 4  # independent seed streams


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, dtype=np.uint64)[0] >> 1)


def crop_triple(seed: int, iteration: int, probabilities: list[float]) -> int:
    """Index of the (global, local, Gram teacher) crop sizes of ``iteration``, shared by all ranks."""
    if len(probabilities) == 1:
        return 0
    rng = np.random.default_rng(_seed(seed, _TRIPLE_STREAM, iteration))
    return int(rng.choice(len(probabilities), p=np.asarray(probabilities) / sum(probabilities)))


def build_exclusion(config: PretrainConfig) -> Exclusion:
    """The leakage guard from ``data.exclude_*``."""
    exclusion = Exclusion.from_case_ids(config.data.exclude_case_ids, "data.exclude_case_ids")
    for folder in config.data.exclude_test_images_of:
        exclusion = exclusion | Exclusion.from_nnunet_test_images(folder)
    for item in config.data.exclude_validation_of:
        splits, sep, fold = item.rpartition(":")
        if not sep or not fold.isdigit():
            raise ValueError(f"data.exclude_validation_of entry '{item}' must be 'path/splits_final.json:FOLD'")
        exclusion = exclusion | Exclusion.from_nnunet_split(splits, int(fold))
    return exclusion


def build_slice_dataset(config: PretrainConfig, cache_dir: Path, rank: int = 0, world_size: int = 1,
                        workers: int | None = None, verify: bool = False) -> SliceDataset:
    """Build or complete the slice cache and open it. Under torchrun every rank calls this with its
    rank: each builds a share of the missing volumes (``workers`` processes, by default
    ``data.num_workers``: the CPUs set aside for loading) and waits for the others' shares."""
    if not config.data.roots:
        raise ConfigError("no data: give --data ROOT [ROOT ...] or data.roots=[...]")
    return SliceDataset(
        config.data.roots,
        cache_dir,
        preset=preset_from_dict(config.data.intensity),
        target_spacing=tuple(config.data.target_spacing) if config.data.target_spacing else None,
        body_threshold=config.data.body_threshold,
        min_body_fraction=config.data.min_body_fraction,
        exclude=build_exclusion(config),
        workers=max(1, config.data.num_workers) if workers is None else workers,
        rank=rank,
        world_size=world_size,
        verify=verify,
        build_delay_s=config.debug.cache_build_delay_s,
    )


def build_augmentations(config: PretrainConfig) -> list[MultiCropAugmentation]:
    """One augmentation per crop triple."""
    preset = preset_from_dict(config.data.intensity)
    c = config.crops
    gram_sizes = config.gram_sizes
    return [
        MultiCropAugmentation(
            global_size=g,
            local_size=loc,
            n_local=c.n_local,
            global_scale=tuple(c.global_scale),
            local_scale=tuple(c.local_scale),
            gram_scale=None if gram_sizes is None else gram_sizes[i] / g,
            value_range=preset.output_range(),
            **dataclasses.asdict(config.augment),
        )
        for i, (g, loc) in enumerate(zip(c.global_sizes, c.local_sizes))
    ]


class AugmentedSlices(Dataset):
    """Indexed by (stream position, slice index, crop triple): one augmented multi-crop sample."""

    def __init__(self, slices: SliceDataset, augmentations: list[MultiCropAugmentation], seed: int):
        self.slices = slices
        self.augmentations = augmentations
        self.seed = seed

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        position, index, triple = key
        generator = torch.Generator().manual_seed(_seed(self.seed, _AUGMENT_STREAM, position))
        sample = self.augmentations[triple](self.slices[index], generator=generator)
        sample["position"] = position
        sample["triple"] = triple
        return sample


class StreamBatchSampler(Sampler):
    """This rank's micro-batches from iteration ``start`` on: lists of (position, slice, triple)."""

    def __init__(self, n_slices: int, batch_size: int, accumulation: int, rank: int, world_size: int,
                 seed: int, probabilities: list[float], start_iteration: int, stop_iteration: int):
        if n_slices == 0:
            raise ValueError("the slice dataset is empty (all volumes excluded, or no body slices found)")
        self.n, self.batch_size, self.accumulation = n_slices, batch_size, accumulation
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.probabilities = probabilities
        self.start, self.stop = start_iteration, stop_iteration
        self._epoch, self._permutation = -1, None

    def _slice_at(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            rng = np.random.default_rng(_seed(self.seed, _EPOCH_STREAM, epoch))
            self._epoch, self._permutation = epoch, rng.permutation(self.n)
        return int(self._permutation[position % self.n])

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accumulation

    def __iter__(self):
        for iteration in range(self.start, self.stop):
            triple = crop_triple(self.seed, iteration, self.probabilities)
            for micro in range(self.accumulation):
                first = ((iteration * self.accumulation + micro) * self.world_size + self.rank) * self.batch_size
                yield [(p, self._slice_at(p), triple) for p in range(first, first + self.batch_size)]


class MaskingCollator:
    """Stacks the samples (see :func:`pretrain.data.collate`) and draws iBOT masks from a generator
    seeded by the batch's first stream position."""

    def __init__(self, config: PretrainConfig, seed: int, patch_size: int):
        self.config, self.seed = config, seed
        self.generators = [
            BlockMaskGenerator(size // patch_size, min_block_patches=config.masking.min_block_patches)
            for size in config.crops.global_sizes
        ]

    def __call__(self, samples: list[dict]) -> dict:
        triple = samples[0]["triple"]
        rng = np.random.default_rng(_seed(self.seed, _MASK_STREAM, samples[0]["position"]))
        return collate(samples, self.generators[triple], self.config.masking.probability,
                       tuple(self.config.masking.ratio), rng=rng)


def _loader_worker_init(worker_id: int) -> None:
    # Many threads per worker on small tensors are several times slower than one (5-7 vs ~100 samples/s).
    # Signals are the main process's: Ctrl-C reaches the whole process group, SLURM signals every process.
    torch.set_num_threads(1)
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class _Loader(DataLoader):
    """With ``num_workers: 0`` the samples are made in this process: one torch thread while they are,
    the process's own setting for everything else."""

    def __iter__(self):
        iterator = super().__iter__()
        if self.num_workers:
            return iterator
        return _OneThreadIterator(iterator)


class _OneThreadIterator:
    def __init__(self, iterator):
        self.iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return next(self.iterator)
        finally:
            torch.set_num_threads(threads)


def build_loader(config: PretrainConfig, slices: SliceDataset, rank: int, world_size: int, accumulation: int,
                 start_iteration: int, stop_iteration: int, pin_memory: bool, patch_size: int) -> DataLoader:
    """The loader of iterations [start, stop): ``accumulation`` micro-batches per iteration."""
    seed = config.train.seed
    sampler = StreamBatchSampler(len(slices), config.data.batch_size, accumulation, rank, world_size, seed,
                                 config.crops.probabilities, start_iteration, stop_iteration)
    workers = config.data.num_workers
    return _Loader(
        AugmentedSlices(slices, build_augmentations(config), seed),
        batch_sampler=sampler,
        collate_fn=MaskingCollator(config, seed, patch_size),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_loader_worker_init,
        # the loader's own base-seed draw must not consume the global RNG (drop path uses it)
        generator=torch.Generator().manual_seed(_seed(seed, rank, start_iteration)),
    )
