"""The nnU-Net side of the benchmark, taken from nnU-Net itself so that it follows nnU-Net releases.

For a square 2D patch, :func:`plan_2d` writes a throwaway one-image dataset (a blank PNG,
its ``dataset.json`` and ``dataset_fingerprint.json``) to a temporary folder, points nnU-Net's paths
at it, plans it with nnU-Net's ``ExperimentPlanner`` and builds an ``nnUNetTrainer`` from those
plans (:class:`NNUNetParts`), as ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train`` would.
For a 3D patch (S, H, W), :func:`plan_3d` does the same with a one-volume NIfTI dataset whose shape is the
patch and whose spacing is CT-like (:data:`CT_LIKE_SPACING`, the slice axis the coarsest, so nnU-Net's
transpose leaves the slice axis first), and the trainer is built for its ``3d_fullres`` configuration.
The volume being exactly one patch, nnU-Net plans no ``3d_lowres`` and so sets ``batch_dice`` false for
``3d_fullres``, as it would for such a dataset (on real CT, larger than the patch, it would be true: the
cost is the same). Everything the benchmark
needs of nnU-Net then comes from that planner and trainer: the architecture (the plans'
``architecture``), the network (``build_network_architecture``, i.e. ``get_network_from_plans``),
the loss (``_build_loss``, with its deep-supervision weights), the optimiser
(``configure_optimizers``) and the deep-supervision targets (``_get_deep_supervision_scales`` and the
data loader's ``DownsampleSegForDSTransform``).

The planner is given an unbounded GPU memory target, so its VRAM loop never shrinks the patch: the
patch is the benchmark's. A patch nnU-Net's topology would change (e.g. 144 -> 160, or 8 x 144 x 144 ->
8 x 160 x 160) is refused.
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

# the synthetic-CT writer's NIfTI output, for nnU-Net's NibabelIO: SimpleITK does not travel to the GPU machine
# (scripts/gpu_env.sh puts a placeholder there)
from nnunet_meddinov3.data.synthetic_ct import write_image as write_nifti

DATASET_NAME = "Dataset999_MedDINOv3Bench"
CONFIGURATION_2D = "2d"
CONFIGURATION_3D = "3d_fullres"
# mm, (slice, row, column): thick CT slices, fine in-plane; anisotropic enough (> nnU-Net's factor 3) that the
# planner keeps the slice axis unpooled at first, with (1, 3, 3) kernels, as on real CT
CT_LIKE_SPACING = (2.5, 0.8, 0.8)
# what nnUNetv2_extract_fingerprint gives a 2D image: spacing 999 on the added z axis
PLANAR_SPACING = (999.0, 1.0, 1.0)
NIFTI_IO = "NibabelIO"
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


def _write_blank(path: Path, shape: tuple[int, ...], spacing: tuple[float, float, float]) -> None:
    """A zero image: a PNG for a 2D shape, else a NIfTI volume of ``spacing`` (numpy's axis order) for
    nnU-Net's NibabelIO."""
    blank = np.zeros(shape, dtype=np.uint8)
    if len(shape) == 2:
        Image.fromarray(blank).save(path)
    else:
        write_nifti(blank, path, spacing_xyz=tuple(reversed(spacing)), image_io=NIFTI_IO)


def _write_dataset(root: Path, shape: tuple[int, ...], spacing: tuple[float, float, float], num_classes: int,
                   input_channels: int) -> dict:
    """One blank case of ``shape`` (2D: a natural-image PNG; 3D: a NIfTI volume of ``spacing``, slice axis
    first) and its fingerprint: the median shape, and so nnU-Net's initial patch, is the benchmark's patch."""
    raw = root / "raw" / DATASET_NAME
    preprocessed = root / "preprocessed" / DATASET_NAME
    for folder in (raw / "imagesTr", raw / "labelsTr", preprocessed):
        folder.mkdir(parents=True)
    file_ending = ".png" if len(shape) == 2 else ".nii.gz"
    dataset_json = {
        "channel_names": {str(c): f"channel{c}" for c in range(input_channels)},
        "labels": {"background": 0, **{f"class{i}": i for i in range(1, num_classes)}},
        "numTraining": 1,
        "file_ending": file_ending,
        **({} if len(shape) == 2 else {"overwrite_image_reader_writer": NIFTI_IO}),
    }
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    for c in range(input_channels):
        _write_blank(raw / "imagesTr" / f"case_{c:04d}{file_ending}", shape, spacing)
    _write_blank(raw / "labelsTr" / f"case{file_ending}", shape, spacing)
    intensities = {"max": 0.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0,
                   "percentile_99_5": 0.0, "std": 0.0}
    fingerprint = {  # what nnUNetv2_extract_fingerprint writes for such a case
        "spacings": [list(spacing)],
        "shapes_after_crop": [[1, *shape] if len(shape) == 2 else list(shape)],
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": {str(c): intensities for c in range(input_channels)},
    }
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return dataset_json


@functools.lru_cache(maxsize=None)
def _plan(shape: tuple[int, ...], spacing: tuple[float, float, float], num_classes: int, input_channels: int) -> str:
    with tempfile.TemporaryDirectory(prefix="meddinov3-bench-") as tmp:
        root = Path(tmp)
        dataset_json = _write_dataset(root, shape, spacing, num_classes, input_channels)
        with temporary_environment(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                          nnUNet_results=str(root / "results"), nnUNet_compile="false"), \
                contextlib.redirect_stdout(io.StringIO()):  # the planner's progress lines
            plans = ExperimentPlanner(DATASET_NAME, gpu_memory_target_in_gb=UNBOUNDED_VRAM_GB).plan_experiment()
    # as plans.json holds them (tuples become lists), so a plan is the same in every process
    return json.dumps({"plans": plans, "dataset_json": dataset_json})


def plan_2d(patch_size: int, num_classes: int = 16, input_channels: int = 1, *, require_patch: bool = True) -> dict:
    """``{"plans", "dataset_json", "configuration"}`` of nnU-Net's ``ExperimentPlanner`` for the throwaway
    dataset (JSON data, as ``nnUNetPlans.json`` and ``dataset.json`` hold them; ``configuration``: "2d").
    With ``require_patch``, a patch nnU-Net's topology would change is a ValueError."""
    plan = json.loads(_plan((int(patch_size),) * 2, PLANAR_SPACING, int(num_classes), int(input_channels)))
    planned = tuple(plan["plans"]["configurations"][CONFIGURATION_2D]["patch_size"])
    if require_patch and planned != (patch_size, patch_size):
        raise ValueError(f"nnU-Net would plan a {planned} patch, not {patch_size}x{patch_size}; pick a patch "
                         "size with more factors of 2")
    return {**plan, "configuration": CONFIGURATION_2D}


def plan_3d(patch: tuple[int, int, int], num_classes: int = 16, input_channels: int = 1, *,
            spacing: tuple[float, float, float] = CT_LIKE_SPACING, require_patch: bool = True) -> dict:
    """:func:`plan_2d` for a 3D patch (S, H, W), slice axis first: nnU-Net's plan of a one-volume dataset of
    that shape and ``spacing``, ``configuration`` "3d_fullres". The slice axis must have the coarsest
    spacing (nnU-Net transposes the coarsest axis first). With ``require_patch``, a patch nnU-Net would
    change (its topology pads every axis to a multiple of 2 per pooling; its initial patch holds at most
    about 256^3 voxels at this spacing's aspect) is a ValueError."""
    patch = tuple(int(side) for side in patch)
    spacing = tuple(float(s) for s in spacing)
    if len(patch) != 3 or len(spacing) != 3:
        raise ValueError(f"a 3D patch and its spacing have 3 entries (S, H, W); got {patch} and {spacing}")
    if spacing[0] < max(spacing):
        raise ValueError(f"spacing {spacing}: nnU-Net puts the axis of the coarsest spacing first, so the slice "
                         "axis (first) must have the largest spacing")
    plan = json.loads(_plan(patch, spacing, int(num_classes), int(input_channels)))
    configuration = plan["plans"]["configurations"].get(CONFIGURATION_3D)
    if configuration is None:
        raise ValueError(f"nnU-Net plans no {CONFIGURATION_3D} configuration for a {patch[0]}-slice patch "
                         f"{'x'.join(map(str, patch))}: a 3D patch needs at least 2 slices")
    planned = tuple(configuration["patch_size"])
    if require_patch and planned != patch:
        raise ValueError(f"nnU-Net would plan a {planned} {CONFIGURATION_3D} patch at spacing {spacing} mm, not "
                         f"{'x'.join(map(str, patch))}; pick sides with more factors of 2 (in-plane at most about "
                         f"{round(256 * float(np.prod(spacing)) ** (1 / 3) / max(spacing[1:]))} at this spacing)")
    return {**plan, "configuration": CONFIGURATION_3D}


def nnunet_2d_arch_kwargs(patch_size: int) -> dict:
    """``architecture`` of nnU-Net's 2D plan for a ``patch_size`` patch (``network_class_name``,
    ``arch_kwargs``, ``_kw_requires_import``, as plans.json holds it)."""
    return plan_2d(patch_size)["plans"]["configurations"][CONFIGURATION_2D]["architecture"]


@dataclass
class NNUNetParts:
    """What the benchmark takes from one nnU-Net trainer built from a :func:`plan_2d` or :func:`plan_3d` plan."""

    trainer: nnUNetTrainer
    loss: torch.nn.Module

    @classmethod
    def build(cls, plan: dict, device: torch.device, deep_supervision: bool = True) -> "NNUNetParts":
        """An ``nnUNetTrainer`` (or nnU-Net's ``nnUNetTrainerNoDeepSupervision``) for the plan's
        configuration (2d or 3d_fullres), built as ``nnUNetv2_train`` builds it, and its loss (``_build_loss``).
        torch.compile stays off, as the benchmark compiles only where ``--compile`` says."""
        trainer_class = nnUNetTrainer if deep_supervision else nnUNetTrainerNoDeepSupervision
        plans = {**plan["plans"], "continue_training": False}  # run_training adds this before building a trainer
        with tempfile.TemporaryDirectory(prefix="meddinov3-bench-") as tmp, \
                temporary_environment(nnUNet_results=tmp, nnUNet_compile="false"), \
                contextlib.redirect_stdout(io.StringIO()):  # "Using device: ..."
            trainer = trainer_class(plans, plan["configuration"], 0, plan["dataset_json"], device)
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
