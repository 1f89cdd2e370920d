"""nnUNetPlannerMedDINOv3: plans for MedDINOv3Net (``2d``, ``2d_highres``) and MedDINOv3Net3D (``3d_fullres``).

nnU-Net's own planner decides spacing, normalisation, resampling and the CNN's 2D patch; we keep
all of that and change only what a ViT needs: the patch rounded up to a multiple of 16, a batch size
from a ViT memory model instead of the CNN's, the architecture entry, and a ``2d_highres``
configuration with the same field of view at a finer spacing (the paper's 896x896 setting). Its
``3d_fullres`` is nnU-Net's (spacing, normalisation, resampling) with the in-plane patch rounded up to
a multiple of 16 and the slices per patch and the batch from the same memory model, counted per slice.

Normalisation is nnU-Net's own, with the dataset's statistics, as in the MedDINOv3 paper's
fine-tuning. On request (``intensity_weights``) its numbers follow the weights instead: for CT
weights the plans' CTNormalization properties become the weights' HU window and statistics, so
fine-tuning sees the intensities the encoder was pretrained on. ``meddinov3_intensity`` in the
plans says which, per channel.
"""
from __future__ import annotations

import math
import os
from copy import deepcopy

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p, save_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from nnunet_meddinov3.checkpoints.conventions import recorded_intensity
from nnunet_meddinov3.data.intensity import nnunet_ct_properties, preset_from_dict
from nnunet_meddinov3.network.configs import PATCH_SIZE, default_feature_layers, resolve_encoder_config
from nnunet_meddinov3.network.meddinov3_net import NETWORK_CLASS_NAME
from nnunet_meddinov3.network.volumetric import NETWORK_3D_CLASS_NAME
from nnunet_meddinov3.training import recipe

PLANS_NAME = recipe.PLANS_NAME


def round_up(value: float, multiple: int = PATCH_SIZE) -> int:
    return int(math.ceil(value / multiple) * multiple)


def lora_adapter_parameters(encoder: str, lora_rank: int, lora_targets: str) -> int:
    """The parameters of rank-``lora_rank`` adapters on the ``lora_targets`` layers of every block: an
    adapter on a ``d_in`` -> ``d_out`` layer holds ``rank * (d_in + d_out)``."""
    cfg = resolve_encoder_config(encoder)
    width, hidden = cfg.embed_dim, cfg.ffn_hidden_features
    per_target = {"qkv": width + 3 * width, "proj": 2 * width,
                  # fc1 and fc2, or SwiGLU's two input projections (fc1_g, fc1_x) and fc2
                  "mlp": (3 if cfg.gated_ffn else 2) * (width + hidden)}
    targets = recipe.parse_value("lora_targets", lora_targets, "lora_targets").split(",")
    return cfg.depth * lora_rank * sum(per_target[t] for t in targets)


def estimate_training_memory_gb(encoder: str, decoder: str, patch_size, batch_size: int, num_classes: int,
                                in_channels: int = 1, grad_checkpointing: bool = False, lora_rank: int = 0,
                                lora_targets: str = recipe.LORA_TARGETS) -> float:
    """Rough peak GPU memory of one bf16 training step with AdamW (fp32 master weights + 2 moments;
    with ``lora_rank`` the frozen encoder keeps only its fp32 weights, the adapters on ``lora_targets``
    train).

    Activations saved for backward, per image: per transformer block 15 tensors of N x D (norms,
    qkv, attention output with a fused kernel, residuals, stochastic-depth scaling) plus 2 (GELU MLP)
    or 4 (SwiGLU) of N x hidden (counted with autograd's saved-tensor hooks: 23.4 N x D for ViT-B,
    23.2 for L, 31.4 for S+; benchmark/RESULTS.md, "Memory per image"), and ~3 per decoder stage (transposed conv output, its
    LayerNorm, GELU), all bf16; logits and loss in fp32. With activation checkpointing the blocks keep
    only their fp32 inputs, plus one block's activations while it is recomputed. The planner only needs
    the right order of magnitude.
    """
    cfg = resolve_encoder_config(encoder)
    h, w = (round_up(s) for s in patch_size)
    tokens = (h // PATCH_SIZE) * (w // PATCH_SIZE) + 1 + cfg.n_storage_tokens
    n_layers = 1 if decoder == "single" else len(default_feature_layers(cfg.depth))
    bytes_bf16 = 2
    per_block = 15 + (4 if cfg.gated_ffn else 2) * cfg.ffn_hidden_features / cfg.embed_dim  # of N x D each
    saved_tensors = cfg.depth * 2 + per_block if grad_checkpointing else cfg.depth * per_block
    encoder_act = saved_tensors * tokens * cfg.embed_dim * bytes_bf16
    channels = cfg.embed_dim * (n_layers if decoder == "multiscale" else 1)
    decoder_act, size = 0, (h // PATCH_SIZE) * (w // PATCH_SIZE)
    for _ in range(4):
        channels, size = max(channels // 2, 1), size * 4
        decoder_act += 3 * channels * size * bytes_bf16
    head_act = 4 * num_classes * h * w * 4 + in_channels * h * w * 4
    per_image = encoder_act + decoder_act + head_act
    # per block: qkv + proj (4 D^2) and the feed-forward (2 or, gated, 3 matrices of D x hidden)
    enc_params = cfg.depth * (4 * cfg.embed_dim + (3 if cfg.gated_ffn else 2) * cfg.ffn_hidden_features) * cfg.embed_dim
    dec_in = cfg.embed_dim * (n_layers if decoder == "multiscale" else 1)
    dec_params = sum((dec_in >> i) * (dec_in >> (i + 1)) * 4 for i in range(4))
    if lora_rank:  # frozen fp32 weights; the adapters train
        adapters = lora_adapter_parameters(encoder, lora_rank, lora_targets)
        state = enc_params * 4 + (adapters + dec_params) * 16
    else:
        state = (enc_params + dec_params) * 16  # fp32 weights, grads, two AdamW moments
    return (state + batch_size * per_image) / 1024 ** 3 + 0.5  # + CUDA context / allocator slack


class nnUNetPlannerMedDINOv3(ExperimentPlanner):
    """Options are class attributes (the constructor keeps ``ExperimentPlanner``'s signature,
    which ``plan_experiment_dataset`` relies on); ``meddinov3 plan_and_preprocess`` sets them."""

    encoder = recipe.ENCODER
    decoder = recipe.DECODER
    drop_path_rate = recipe.DROP_PATH_RATE
    highres_patch = recipe.HIGHRES_PATCH
    grad_checkpointing = False  # recompute encoder blocks in backward: less memory, bigger batches
    # None: nnU-Net's dataset statistics (the paper's fine-tuning); a weights source: its convention
    intensity_weights: str | None = None
    fine_tuning_recipe: dict = {}  # recipe values, written as each configuration's 'meddinov3' block
    min_batch_size = 2
    max_batch_size = 64
    context = "slice_attention"  # 3d_fullres: MedDINOv3Net3D's cross-slice context
    min_slices = 8  # 3d_fullres gives up slices for memory down to this (or nnU-Net's own count, if fewer)

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = PLANS_NAME,
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)

    def architecture(self, grad_checkpointing: bool | None = None, volumetric: bool = False) -> dict:
        kwargs = {"encoder": self.encoder, "decoder": self.decoder, "feature_layers": None,
                  "drop_path_rate": self.drop_path_rate, "autocast_dtype": "bf16",
                  "grad_checkpointing": self.grad_checkpointing if grad_checkpointing is None else grad_checkpointing}
        if volumetric:
            kwargs["context"] = self.context
        return {"network_class_name": NETWORK_3D_CLASS_NAME if volumetric else NETWORK_CLASS_NAME,
                "arch_kwargs": kwargs, "_kw_requires_import": []}

    def lora_recipe(self) -> tuple[int, str]:
        """(lora_rank, lora_targets) of the recipe written into the plans, base defaults where it names
        none (as a trainer without LoRA defaults of its own reads these plans)."""
        values = {**recipe.defaults("lora_rank", "lora_targets"), **self.fine_tuning_recipe}
        return int(values["lora_rank"]), values["lora_targets"]

    def _memory_gb(self, patch_size, batch: int, grad_checkpointing: bool, lora_rank: int | None = None) -> float:
        """A 3D patch counts as its slices, each a 2D image (the slice context's own share, ~9% of ViT-B's
        parameters and less of its activations, is left to the model's slack)."""
        rank, targets = self.lora_recipe()
        *slices, height, width = patch_size
        return estimate_training_memory_gb(
            self.encoder, self.decoder, (height, width), batch * int(np.prod(slices)), len(self.dataset_json["labels"]),
            len(self.dataset_json["channel_names"]), grad_checkpointing, rank if lora_rank is None else lora_rank,
            targets)

    def vit_batch_size(self, patch_size, n_voxels_dataset: float, grad_checkpointing: bool | None = None) -> int:
        checkpointing = self.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
        batch = self.min_batch_size
        while (batch < self.max_batch_size and
               self._memory_gb(patch_size, batch + 1, checkpointing) <= self.UNet_vram_target_GB):
            batch += 1
        # nnU-Net's overfitting guard: a batch covers at most 5% of the dataset
        cap = round(n_voxels_dataset * self.max_dataset_covered / np.prod(patch_size, dtype=np.float64))
        return int(max(min(batch, cap), self.min_batch_size))

    def fit_memory(self, name: str, patch_size, n_voxels_dataset: float) -> tuple[int, bool]:
        """Batch size and activation checkpointing for one configuration. Checkpointing is switched on
        when the smallest batch does not fit the memory target without it (it changes compute, not
        results); if even that does not fit, the plan keeps the smallest batch and says what would."""
        checkpointing = self.grad_checkpointing
        if not checkpointing and self._memory_gb(patch_size, self.min_batch_size, False) > self.UNet_vram_target_GB:
            checkpointing = True
            print(f"{name}: activation checkpointing on, since batch {self.min_batch_size} of {self.encoder} at "
                  f"{list(patch_size)} needs ~{self._memory_gb(patch_size, self.min_batch_size, False):.1f} GB "
                  f"without it (target {self.UNet_vram_target_GB:g} GB)")
        need = self._memory_gb(patch_size, self.min_batch_size, checkpointing)
        if need > self.UNet_vram_target_GB:
            levers = ["--gpu-memory-gb with your GPU's memory"]
            if not self.lora_recipe()[0]:
                lora_need = self._memory_gb(patch_size, self.min_batch_size, True, lora_rank=8)
                levers.append(f"--recipe lora_rank=8 (frozen encoder: ~{lora_need:.1f} GB)")
            levers.append("a smaller --target-patch or --vit")
            print(f"WARNING: {name}: batch {self.min_batch_size} of {self.encoder} at {list(patch_size)} needs "
                  f"~{need:.1f} GB of GPU memory, above the target of {self.UNet_vram_target_GB:g} GB; levers: "
                  f"{'; '.join(levers)}")
        return self.vit_batch_size(patch_size, n_voxels_dataset, checkpointing), checkpointing

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if len(spacing) != 2:
            return plan  # 3D configurations are computed by the parent and then dropped in save_plans
        if min(median_shape) < 2 * PATCH_SIZE:
            raise ValueError(
                f"median 2D image size {tuple(int(s) for s in median_shape)} is too small for a ViT with "
                f"{PATCH_SIZE}-pixel patches (need at least {2 * PATCH_SIZE} per side). Use the stock nnU-Net "
                f"configurations for this dataset (nnUNetv2_plan_and_preprocess).")
        plan["patch_size"] = [round_up(s) for s in plan["patch_size"]]
        plan["batch_size"], checkpointing = self.fit_memory("2d", plan["patch_size"], approximate_n_voxels_dataset)
        plan["architecture"] = self.architecture(checkpointing)
        plan["batch_dice"] = True
        self._n_voxels_dataset = approximate_n_voxels_dataset
        return plan

    def highres_configuration(self, plan_2d: dict) -> dict:
        """Same field of view as ``2d``, longest side ``highres_patch``: spacing * old / new patch."""
        scale = self.highres_patch / max(plan_2d["patch_size"])
        patch = [round_up(p * scale) for p in plan_2d["patch_size"]]
        spacing = [s * p_old / p_new for s, p_old, p_new in zip(plan_2d["spacing"], plan_2d["patch_size"], patch)]
        plan = deepcopy(plan_2d)
        plan.update({
            "data_identifier": self.generate_data_identifier("2d_highres"),
            "patch_size": patch,
            "spacing": spacing,
            "median_image_size_in_voxels": [m * s_old / s_new for m, s_old, s_new in
                                            zip(plan_2d["median_image_size_in_voxels"], plan_2d["spacing"], spacing)],
        })
        n_voxels = self._n_voxels_dataset * float(np.prod(np.array(plan_2d["spacing"]) / np.array(spacing)))
        plan["batch_size"], checkpointing = self.fit_memory("2d_highres", patch, n_voxels)
        plan["architecture"] = self.architecture(checkpointing)
        return plan

    def fullres_configuration(self, plan_3d: dict) -> dict:
        """nnU-Net's ``3d_fullres`` (spacing, normalisation, resampling, data) for MedDINOv3Net3D: the
        in-plane patch rounded up to multiples of 16; slices given up while even the smallest batch
        with checkpointing does not fit the memory target, then the batch from the memory model."""
        plan = deepcopy(plan_3d)
        slices, *plane = plan["patch_size"]
        plane = [round_up(s) for s in plane]
        floor = min(slices, self.min_slices)
        while slices > floor and self._memory_gb([slices, *plane], self.min_batch_size, True) > self.UNet_vram_target_GB:
            slices -= 1
        plan["patch_size"] = [slices, *plane]
        plan["batch_size"], checkpointing = self.fit_memory("3d_fullres", plan["patch_size"], self._n_voxels_dataset)
        plan["architecture"] = self.architecture(checkpointing, volumetric=True)
        return plan

    def match_intensity(self, plans: dict) -> dict:
        """Set the plans' normalisation numbers to the weights' convention where nnU-Net's class can
        express it; returns the record of what was done per channel (written into the plans)."""
        record = {"weights": self.intensity_weights, "convention": None, "channels": {}}
        if self.intensity_weights is None:
            record["channels"] = {name: "nnU-Net's own (dataset statistics)"
                                  for name in self.dataset_json["channel_names"].values()}
            return record
        convention, where = recorded_intensity(self.intensity_weights)
        record.update(convention=convention, recorded_in=where)
        properties = plans["foreground_intensity_properties_per_channel"]
        for c, name in self.dataset_json["channel_names"].items():
            scheme = plans["configurations"]["2d"]["normalization_schemes"][int(c)]
            kind = (convention or {}).get("kind")
            if kind == "ct" and scheme == "CTNormalization":
                record.setdefault("dataset_properties", {})[c] = properties[c]
                properties[c] = nnunet_ct_properties(preset_from_dict(convention))
                status = "matched: CTNormalization with the weights' HU window, mean and std"
            elif kind == "mri" and scheme == "ZScoreNormalization":
                plans["configurations"]["2d"]["use_mask_for_norm"][int(c)] = False
                exact = tuple(convention["percentiles"]) == (0.0, 100.0)
                status = ("matched: ZScoreNormalization of the whole image" if exact else
                          "approximated: ZScoreNormalization of the whole image, without the weights' "
                          f"{convention['percentiles']} percentile clip")
            else:
                status = (f"not matched: channel '{name}' is normalised by nnU-Net's {scheme} (dataset statistics), "
                          f"the weights expect {kind or 'an unrecorded convention'} ({where})")
                print(f"WARNING: intensity {status}")
            record["channels"][name] = status
        return record

    def save_plans(self, plans):
        # The parent merges with an existing plans file (resurrecting other configurations); ours holds
        # exactly the ViT configurations, written from scratch (no 3d_lowres: the ViT sees each slice
        # at full resolution anyway).
        plan_2d, plan_3d = plans["configurations"]["2d"], plans["configurations"].get("3d_fullres")
        plans["configurations"] = {"2d": plan_2d}
        plans["meddinov3_intensity"] = self.match_intensity(plans)
        if self.highres_patch and self.highres_patch > max(plan_2d["patch_size"]):
            plans["configurations"]["2d_highres"] = self.highres_configuration(plan_2d)
        else:
            print(f"2d_highres skipped: target patch {self.highres_patch} is not larger than the 2d patch "
                  f"{plan_2d['patch_size']}")
        if plan_3d is not None:  # nnU-Net plans 3d_fullres for 3D datasets only
            plans["configurations"]["3d_fullres"] = plan = self.fullres_configuration(plan_3d)
            plan["use_mask_for_norm"] = list(plan_2d["use_mask_for_norm"])  # as match_intensity set it
        if self.fine_tuning_recipe:
            for configuration in plans["configurations"].values():
                configuration[recipe.PLANS_KEY] = dict(self.fine_tuning_recipe)
        recursive_fix_for_json_export(plans)
        folder = os.path.join(nnUNet_preprocessed, self.dataset_name)
        maybe_mkdir_p(folder)
        plans_file = os.path.join(folder, self.plans_identifier + ".json")
        save_json(plans, plans_file, sort_keys=False)
        print(f"MedDINOv3 plans were saved to {plans_file}")
