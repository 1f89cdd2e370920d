"""The nnU-Net side of the benchmark, taken from nnU-Net itself so that it follows nnU-Net releases.

For a square 2D patch, :func:`plan_2d` writes a throwaway one-image dataset (a blank PNG,
its ``dataset.json`` and ``dataset_fingerprint.json``) to a temporary folder, points nnU-Net's paths
at it, plans it with nnU-Net's ``ExperimentPlanner`` and builds an ``nnUNetTrainer`` from those
plans (:class:`NNUNetParts`), as ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train`` would. Everything the benchmark
needs of nnU-Net then comes from that planner and trainer: the architecture (the plans'
``architecture``), the network (``build_network_architecture``, i.e. ``get_network_from_plans``),
the loss (``_build_loss``, with its deep-supervision weights), the optimiser
(``configure_optimizers``) and the deep-supervision targets (``_get_deep_supervision_scales`` and the
data loader's ``DownsampleSegForDSTransform``).

The planner is given an unbounded GPU memory target, so its VRAM loop never shrinks the patch: the
patch is the benchmark's. A patch nnU-Net's topology would change (e.g. 144 -> 160) is refused.
Nothing is read from or written to the user's nnU-Net folders.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerNoDeepSupervision import (
    nnUNetTrainerNoDeepSupervision,
)
from PIL import Image

DATASET_NAME = "Dataset999_MedDINOv3Bench"
CONFIGURATION = "2d"
UNBOUNDED_VRAM_GB = 1e9  # the planner's VRAM loop never shrinks the patch


@contextlib.contextmanager
def temporary_environment(**values: str):
    """Set environment variables for the block (nnU-Net 2.8 reads its paths from the environment on
    every use), then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _write_dataset(root: Path, patch_size: int, num_classes: int, input_channels: int) -> dict:
    """One blank ``patch_size`` x ``patch_size`` natural-image case and its fingerprint: the median
    shape, and so nnU-Net's initial 2D patch, is the benchmark's patch."""
    raw = root / "raw" / DATASET_NAME
    preprocessed = root / "preprocessed" / DATASET_NAME
    for folder in (raw / "imagesTr", raw / "labelsTr", preprocessed):
        folder.mkdir(parents=True)
    dataset_json = {
        "channel_names": {str(c): f"channel{c}" for c in range(input_channels)},
        "labels": {"background": 0, **{f"class{i}": i for i in range(1, num_classes)}},
        "numTraining": 1,
        "file_ending": ".png",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    blank = Image.fromarray(np.zeros((patch_size, patch_size), dtype=np.uint8))
    for c in range(input_channels):
        blank.save(raw / "imagesTr" / f"case_{c:04d}.png")
    blank.save(raw / "labelsTr" / "case.png")
    intensities = {"max": 0.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0,
                   "percentile_99_5": 0.0, "std": 0.0}
    fingerprint = {  # what nnUNetv2_extract_fingerprint writes for such a case (2D images get spacing 999 on z)
        "spacings": [[999.0, 1.0, 1.0]],
        "shapes_after_crop": [[1, patch_size, patch_size]],
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": {str(c): intensities for c in range(input_channels)},
    }
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return dataset_json


@functools.lru_cache(maxsize=None)
def _plan_2d(patch_size: int, num_classes: int, input_channels: int) -> str:
    with tempfile.TemporaryDirectory(prefix="meddinov3-bench-") as tmp:
        root = Path(tmp)
        dataset_json = _write_dataset(root, patch_size, num_classes, input_channels)
        with temporary_environment(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                          nnUNet_results=str(root / "results"), nnUNet_compile="false"), \
                contextlib.redirect_stdout(io.StringIO()):  # the planner's progress lines
            plans = ExperimentPlanner(DATASET_NAME, gpu_memory_target_in_gb=UNBOUNDED_VRAM_GB).plan_experiment()
    # as plans.json holds them (tuples become lists), so a plan is the same in every process
    return json.dumps({"plans": plans, "dataset_json": dataset_json})


def plan_2d(patch_size: int, num_classes: int = 16, input_channels: int = 1, *, require_patch: bool = True) -> dict:
    """``{"plans", "dataset_json"}`` of nnU-Net's ``ExperimentPlanner`` for the throwaway dataset
    (JSON data, as ``nnUNetPlans.json`` and ``dataset.json`` hold them). With ``require_patch``,
    a patch nnU-Net's topology would change is a ValueError."""
    plan = json.loads(_plan_2d(int(patch_size), int(num_classes), int(input_channels)))
    planned = tuple(plan["plans"]["configurations"][CONFIGURATION]["patch_size"])
    if require_patch and planned != (patch_size, patch_size):
        raise ValueError(f"nnU-Net would plan a {planned} patch, not {patch_size}x{patch_size}; pick a patch "
                         "size with more factors of 2")
    return plan


def nnunet_2d_arch_kwargs(patch_size: int) -> dict:
    """``architecture`` of nnU-Net's 2D plan for a ``patch_size`` patch (``network_class_name``,
    ``arch_kwargs``, ``_kw_requires_import``, as plans.json holds it)."""
    return plan_2d(patch_size)["plans"]["configurations"][CONFIGURATION]["architecture"]


@dataclass
class NNUNetParts:
    """What the benchmark takes from one nnU-Net trainer built from a :func:`plan_2d` plan."""

    trainer: nnUNetTrainer
    loss: torch.nn.Module

    @classmethod
    def build(cls, plan: dict, device: torch.device, deep_supervision: bool = True) -> "NNUNetParts":
        """An ``nnUNetTrainer`` (or nnU-Net's ``nnUNetTrainerNoDeepSupervision``) for the 2D
        configuration, built as ``nnUNetv2_train`` builds it, and its loss (``_build_loss``).
        torch.compile stays off, as the benchmark compiles only where ``--compile`` says."""
        trainer_class = nnUNetTrainer if deep_supervision else nnUNetTrainerNoDeepSupervision
        plans = {**plan["plans"], "continue_training": False}  # run_training adds this before building a trainer
        with tempfile.TemporaryDirectory(prefix="meddinov3-bench-") as tmp, \
                temporary_environment(nnUNet_results=tmp, nnUNet_compile="false"), \
                contextlib.redirect_stdout(io.StringIO()):  # "Using device: ..."
            trainer = trainer_class(plans, CONFIGURATION, 0, plan["dataset_json"], device)
            loss = trainer._build_loss()
        return cls(trainer, loss)

    def build_network(self, input_channels: int, num_classes: int) -> torch.nn.Module:
        """The network as nnU-Net builds it for training (``get_network_from_plans``, nnU-Net's init)."""
        trainer = self.trainer
        return trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                  input_channels, num_classes, trainer.enable_deep_supervision)

    def build_optimizer(self, network: torch.nn.Module) -> torch.optim.Optimizer:
        """nnU-Net's SGD (``configure_optimizers``; its LR scheduler is not stepped in a benchmark)."""
        self.trainer.network = network  # what nnUNetTrainer.initialize() sets before configure_optimizers
        return self.trainer.configure_optimizers()[0]

    def deep_supervision_targets(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """Targets at every output resolution of the deep-supervised network, full resolution first,
        downsampled as nnU-Net's data loader does (``DownsampleSegForDSTransform``), per sample."""
        transform = DownsampleSegForDSTransform(self.trainer._get_deep_supervision_scales())
        per_sample = [transform(segmentation=label)["segmentation"] for label in labels]
        return [torch.stack(scale) for scale in zip(*per_sample)]
