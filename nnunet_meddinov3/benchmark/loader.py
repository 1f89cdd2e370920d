"""Can nnU-Net's data pipeline feed the GPU? Images/s of nnU-Net's own training loader and augmentation
for a preprocessed dataset, measured the way ``nnUNetv2_train`` runs them.

The trainer is built by nnU-Net (``get_trainer_from_args``) and its ``get_dataloaders`` makes the loader,
the transforms and the worker processes; nothing of the pipeline is re-implemented here. Two numbers:

- **one worker**: the training loader in this process, under the limits nnU-Net's worker processes set
  for themselves (one torch thread, ``threadpool_limits(1)``). Milliseconds per image, split into
  loading + cropping and each transform in pipeline order (a randomly applied transform counts with its
  probability, as in training). This is what one ``nnUNet_n_proc_DA`` process delivers.
- **N workers**: nnU-Net's ``NonDetMultiThreadedAugmenter`` with N processes, as training starts it (with
  its validation workers, and pinned memory on CUDA). Images/s reaching the main process, counted after
  a warm-up as long as the augmenter's caches plus one batch per worker, so it is the workers' sustained rate.

nnU-Net's trainer writes a log file when it is built: it goes to a temporary results folder, so the
user's ``nnUNet_results`` is left alone. Like ``nnUNetv2_train``, it writes ``splits_final.json`` into the
preprocessed dataset folder when there is none (the same deterministic split training would write).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from nnunet_meddinov3.benchmark.baseline import temporary_environment
from nnunet_meddinov3.data.preprocessed import PreprocessedNotFound, find_preprocessed

LOADING_STAGE = "loading and cropping"
MIN_POOL_SECONDS = 3.0  # the pool's rate is taken over at least this long


class LoaderBenchError(ValueError):
    """The dataset, plans or configuration cannot be loaded; the message says what to run."""


@dataclass
class LoaderThroughput:
    dataset: str
    configuration: str
    plans: str
    trainer: str
    fold: int
    batch_size: int
    patch_size: list
    crop_size: list  # what the loader cuts before the spatial transform (nnU-Net's initial patch)
    cpus: int
    nnunet_workers: int  # what nnU-Net would start here: nnUNet_n_proc_DA, else its own default
    images_one_worker: int
    ms_per_image_one_worker: float
    stages_ms: list = field(default_factory=list)  # [(stage, ms per image)], loading first, then transforms
    workers: int = 0
    images_workers: int = 0
    images_per_s_workers: float | None = None

    @property
    def images_per_s_one_worker(self) -> float:
        return 1000.0 / self.ms_per_image_one_worker

    def workers_needed(self, images_per_s: float) -> int:
        """Worker processes at the one-worker rate that deliver ``images_per_s`` (if they scale perfectly)."""
        return max(1, math.ceil(images_per_s / self.images_per_s_one_worker))

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_s_one_worker": self.images_per_s_one_worker}


class _TimedTransform:
    """A transform of the pipeline that adds its wall time to ``seconds[index]``."""

    def __init__(self, transform, seconds: list, index: int):
        self.transform, self.seconds, self.index = transform, seconds, index

    def __call__(self, **data_dict):
        start = time.perf_counter()
        out = self.transform(**data_dict)
        self.seconds[self.index] += time.perf_counter() - start
        return out


def transform_name(transform) -> str:
    """``SpatialTransform``; ``GaussianNoiseTransform (p=0.1)`` for nnU-Net's randomly applied ones."""
    inner = getattr(transform, "transform", None)
    if inner is not None and hasattr(transform, "apply_probability"):
        return f"{type(inner).__name__} (p={transform.apply_probability:g})"
    return type(transform).__name__


def _build_trainer(dataset: str, configuration: str, fold: int, trainer: str, plans: str, device: torch.device):
    from nnunetv2.run.run_training import get_trainer_from_args

    try:
        built = get_trainer_from_args(dataset, configuration, fold, trainer, plans, device=device)
    except RuntimeError as e:
        if "find" in str(e).lower() and trainer in str(e):
            raise LoaderBenchError(f"nnU-Net finds no trainer class '{trainer}' (the trainers of this plugin are "
                                   "nnUNetTrainerMedDINOv3*, found through nnUNet_extTrainer: see `meddinov3 env`; "
                                   "nnU-Net's own are nnUNetTrainer*)") from None
        raise
    # what nnUNetTrainer.initialize() does before get_dataloaders, without building the network
    built._set_batch_size_and_oversample()
    return built


@contextlib.contextmanager
def _nnunet_trainer(dataset, configuration, fold, trainer, plans, device, workers: int, quiet: bool):
    """nnU-Net's trainer and its (train, val) augmenters with ``workers`` processes (0: in this process),
    started as ``get_dataloaders`` starts them; the workers are shut down on exit."""
    with tempfile.TemporaryDirectory(prefix="meddinov3-loader-") as tmp, \
            temporary_environment(nnUNet_results=tmp, nnUNet_n_proc_DA=str(workers)), \
            (contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()):
        built = _build_trainer(dataset, configuration, fold, trainer, plans, device)
        train, val = built.get_dataloaders()
        try:
            yield built, train, val
        finally:
            for augmenter in (train, val):
                finish = getattr(augmenter, "_finish", None)
                if finish is not None:
                    finish()


def _one_worker(dataset, configuration, fold, trainer, plans, device, batches: int, quiet: bool):
    from threadpoolctl import threadpool_limits

    with _nnunet_trainer(dataset, configuration, fold, trainer, plans, device, 0, quiet) as (built, train, _):
        loader = train.data_loader
        pipeline = loader.transforms
        steps = list(pipeline.transforms)
        seconds = [0.0] * len(steps)
        pipeline.transforms = [_TimedTransform(t, seconds, i) for i, t in enumerate(steps)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what nnU-Net's worker processes set for themselves
        try:
            with threadpool_limits(1):
                next(train)  # one more warm-up batch, with the timers in place
                seconds[:] = [0.0] * len(steps)
                start = time.perf_counter()
                for _ in range(batches):
                    next(train)
                total = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
            pipeline.transforms = steps
        images = batches * loader.batch_size
        stages = [(LOADING_STAGE, 1000 * (total - sum(seconds)) / images)]
        stages += [(transform_name(t), 1000 * s / images) for t, s in zip(steps, seconds)]
        return built, loader, images, 1000 * total / images, stages


def _n_workers(dataset, configuration, fold, trainer, plans, device, workers: int, batches: int, quiet: bool):
    """(images, images/s) from ``workers`` processes, timed over at least ``batches`` batches and
    MIN_POOL_SECONDS after a warm-up of as many batches as the augmenter's two caches (the process queue
    and the pinning thread's) hold, plus one per worker: the rate the workers sustain, not the caches'."""
    with _nnunet_trainer(dataset, configuration, fold, trainer, plans, device, workers, quiet) as (_, train, __):
        for _ in range(2 * train.num_cached + workers):
            next(train)
        start = time.perf_counter()
        images = timed = 0
        while timed < batches or time.perf_counter() - start < MIN_POOL_SECONDS:
            images += len(next(train)["data"])
            timed += 1
        return images, images / (time.perf_counter() - start)


def measure_loader(dataset: str, configuration: str = "2d_highres", *, plans: str = "nnUNetPlansMedDINOv3",
                   trainer: str = "nnUNetTrainerMedDINOv3", fold: int = 0, batches: int = 10,
                   workers: int | None = None, device: str = "cpu", quiet: bool = True) -> LoaderThroughput:
    """Measure nnU-Net's training pipeline for ``dataset``/``configuration``: one worker in this process
    (``batches`` batches), then ``workers`` processes (default: the number nnU-Net would start here; 0
    skips it) for ``max(batches, 2 * workers)`` batches and at least MIN_POOL_SECONDS."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    if batches < 1:
        raise LoaderBenchError(f"--batches must be at least 1, got {batches}")
    try:
        name = find_preprocessed(dataset, configuration, plans).name
    except PreprocessedNotFound as e:
        raise LoaderBenchError(str(e)) from None
    nnunet_workers = get_allowed_n_proc_DA()
    workers = nnunet_workers if workers is None else workers
    if workers < 0:
        raise LoaderBenchError(f"--workers must be 0 or more, got {workers}")
    torch_device = torch.device(device)
    built, loader, images, ms, stages = _one_worker(name, configuration, fold, trainer, plans, torch_device,
                                                    batches, quiet)
    result = LoaderThroughput(
        dataset=name, configuration=configuration, plans=plans, trainer=trainer, fold=fold,
        batch_size=int(loader.batch_size), patch_size=[int(p) for p in built.configuration_manager.patch_size],
        crop_size=[int(p) for p in loader.patch_size][-len(built.configuration_manager.patch_size):],
        cpus=os.cpu_count() or 1, nnunet_workers=nnunet_workers, images_one_worker=images,
        ms_per_image_one_worker=ms, stages_ms=stages)
    if workers > 0:
        result.workers = workers
        result.images_workers, result.images_per_s_workers = _n_workers(
            name, configuration, fold, trainer, plans, torch_device, workers, max(batches, 2 * workers), quiet)
    return result
