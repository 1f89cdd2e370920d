"""nnU-Net trainers for MedDINOv3Net: thin subclasses of ``nnUNetTrainer``.

What differs from the stock trainer, and nothing else:
- the network (``build_network_architecture``), from our plans or, on stock plans, from the
  trainer's class attributes, so training and prediction always build the same thing;
- the optimiser (AdamW, encoder/decoder LRs, optional layer-wise decay or frozen encoder) and a
  warm-up + linear-decay schedule;
- no deep supervision; bf16 inside the network on CUDA (so no fp16 grad scaler);
- pretrained encoder weights, loaded when a new training starts (never on ``--c`` or at inference);
- the recipe as data (:mod:`nnunet_meddinov3.training.recipe`): class defaults < the plans'
  ``meddinov3`` block < ``MEDDINOV3_RECIPE_OVERRIDE``; recorded in the checkpoint and the log,
  restored and checked by ``--c`` / ``--val``;
- crash safety (:mod:`nnunet_meddinov3.training.crash_safety`): atomic checkpoints, ``--c`` past an
  unreadable checkpoint, finished runs left alone, SIGTERM / SIGUSR1 save ``checkpoint_latest.pth``.

Environment variables are left for machine settings (MEDDINOV3_GRAD_CHECKPOINTING,
MEDDINOV3_CPU_BF16, MEDDINOV3_CACHE), for the weights file (MEDDINOV3_WEIGHTS; its name, path and
sha256 are recorded) and for the recorded recipe override.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from nnunet_meddinov3.checkpoints import load_encoder_weights, resolve_weights
from nnunet_meddinov3.checkpoints.conventions import recorded_intensity
from nnunet_meddinov3.checkpoints.format import METADATA_KEY, file_sha256, read_safetensors_header
from nnunet_meddinov3.checkpoints.registry import WEIGHTS_ENV
from nnunet_meddinov3.data.intensity import compare_with_nnunet
from nnunet_meddinov3.network import MedDINOv3Net
from nnunet_meddinov3.network.configs import PATCH_SIZE
from nnunet_meddinov3.network.volumetric import MedDINOv3Net3D
from nnunet_meddinov3.network.configs import MEDDINOV3_LAYOUT
from nnunet_meddinov3.network import lora
from nnunet_meddinov3.training.optim import WarmupLinearDecayLR, build_adamw, group_base_lr, parameter_groups
from nnunet_meddinov3.training import recipe
from nnunet_meddinov3.training.recipe import RecipeError
from nnunet_meddinov3.training.recipe_trainer import RecipeTrainerBase, read_recorded_recipe  # noqa: F401 (API)


def _env(name: str, cast, default):
    """A machine-setting variable (not a recipe value), cast; unset or empty gives ``default``."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not a valid {cast.__name__}") from e


_flag = recipe.parse_flag


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The MedDINOv3Net inside DDP and/or torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


class nnUNetTrainerMedDINOv3(RecipeTrainerBase):
    """MedDINOv3 ViT-B/16 CT weights, multi-scale aggregation decoder (the paper's recipe)."""

    # The network for each dimensionality of patch: like nnU-Net's own trainer, the 2d configurations and
    # 3d_fullres (MedDINOv3Net3D: the same 2D encoder on every slice, with cross-slice ``context``; on
    # stock plans this class attribute names it, ours name it in the plans). trainer_3d.py: 3D only.
    network_classes = {2: MedDINOv3Net, 3: MedDINOv3Net3D}
    context = "slice_attention"
    # Architecture used when the plans are stock nnU-Net plans (their 2d network is a CNN).
    encoder_size = recipe.ENCODER
    decoder = recipe.DECODER
    drop_path_rate = recipe.DROP_PATH_RATE
    # Fixed by the weights this trainer fine-tunes: overrides whatever the plans say.
    encoder_layout = MEDDINOV3_LAYOUT
    # Network arguments a variant fixes whatever the plans say (e.g. the tiny encoder).
    network_overrides: dict = {}
    # Registry name or path; None trains from random initialisation.
    default_weights: str | None = "meddinov3-vitb16-ct3m"
    # Whether MEDDINOV3_WEIGHTS may name the weights (the scratch baseline refuses it).
    weights_from_environment = True
    # Every key of the recipe table (a new row joins by itself): the schedule as RecipeTrainerBase has it,
    # the rest at its base default. With lora_rank > 0 the base encoder is frozen and adapters train at
    # encoder_lr (see network/lora.py).
    default_recipe = {**recipe.defaults(), **RecipeTrainerBase.default_recipe}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.check_configuration(self.configuration_manager, configuration)
        self.enable_deep_supervision = False
        # The network casts itself to bf16 on CUDA; an fp16 grad scaler would only get in the way.
        self.grad_scaler = None

    def apply_recipe(self, values: dict) -> None:
        super().apply_recipe(values)
        if self.lora_rank and self.freeze_encoder:  # a check across keys, which no row of the table can make
            raise RecipeError(f"{self.__class__.__name__}: freeze_encoder=true trains the decoder only, lora_rank="
                              f"{self.lora_rank} trains encoder adapters too; set one of them (freeze_encoder=false "
                              f"or lora_rank=0)")
        self.initial_lr = self.decoder_lr  # what nnU-Net logs

    def after_checkpoint_loaded(self) -> None:
        # torch's Optimizer.load_state_dict restores each group's base_lr / weight_decay as saved; a change
        # forced by MEDDINOV3_RECIPE_OVERRIDE must win over them.
        depth = unwrap(self.network).encoder.depth
        for group in self.optimizer.param_groups:
            group["base_lr"] = group_base_lr(group["name"], depth, encoder_lr=self.encoder_lr,
                                             decoder_lr=self.decoder_lr, layer_decay=self.layer_decay)
            group["weight_decay"] = self.weight_decay
        self.lr_scheduler.total_epochs, self.lr_scheduler.warmup_epochs = self.num_epochs, self.warmup_epochs
        self.lr_scheduler.step(self.current_epoch)
        requested = os.environ.get(WEIGHTS_ENV)
        started = (self.weights_record or {}).get("requested")
        if requested and requested != started:
            self.print_to_log_file(f"Note: {WEIGHTS_ENV}={requested} is not read by --c / --val: the network comes "
                                   f"from the checkpoint (this run started from {started or 'random initialisation'})")

    def weights_source(self) -> tuple[str | None, str]:
        """(the weights to start from, where that came from)."""
        requested = os.environ.get(WEIGHTS_ENV) or None
        if requested is not None:
            if not self.weights_from_environment:
                raise RecipeError(
                    f"{self.__class__.__name__} trains from random initialisation, but {WEIGHTS_ENV}={requested} "
                    f"asks for pretrained weights, under a folder name that says otherwise. Unset {WEIGHTS_ENV}, "
                    f"or train -tr nnUNetTrainerMedDINOv3 (or _Tiny) to fine-tune those weights.")
            return requested, WEIGHTS_ENV
        return self.default_weights, f"trainer {self.__class__.__name__}"

    @classmethod
    def network_class(cls, configuration_manager) -> type:
        return cls.network_classes[len(configuration_manager.patch_size)]

    @classmethod
    def plans_are_ours(cls, configuration_manager) -> bool:
        """Whether the configuration's architecture is the network this trainer builds (our planner's plans)."""
        network = cls.network_class(configuration_manager)
        return configuration_manager.network_arch_class_name == f"{network.__module__}.{network.__qualname__}"

    @classmethod
    def check_configuration(cls, configuration_manager, configuration: str = "this configuration") -> None:
        """One line that says what to do, for a configuration this trainer's network cannot take."""
        patch = list(configuration_manager.patch_size)
        if len(patch) not in cls.network_classes:
            kinds = {2: "2D configurations (2d, 2d_highres)", 3: "3D configurations (3d_fullres)"}
            raise ValueError(f"{cls.__name__} trains {' and '.join(kinds[d] for d in cls.network_classes)}, but "
                             f"{configuration} has a {len(patch)}D patch {patch}: train it with -tr "
                             f"{cls.__name__.replace('_3D', '', 1)}")
        if len(patch) == 3:
            context = cls.network_kwargs(configuration_manager)["context"]
            if patch[0] < 2 and context != "none":
                raise ValueError(
                    f"{cls.__name__}: {configuration}'s patch {patch} has {patch[0]} slice, too few for the cross-slice "
                    f"context '{context}' (a 2D dataset?): train its 2d configuration, or plan at least 2 slices "
                    f"per patch")
            if cls.plans_are_ours(configuration_manager) and any(side % PATCH_SIZE for side in patch[1:]):
                raise ValueError(
                    f"{cls.__name__}: the in-plane patch {patch[1:]} of {configuration} in these MedDINOv3 plans is "
                    f"not a multiple of {PATCH_SIZE}, which the ViT needs: plan again with `meddinov3 "
                    f"plan_and_preprocess`, or set patch_size's last two entries to multiples of {PATCH_SIZE}")

    @classmethod
    def network_kwargs(cls, configuration_manager) -> dict:
        """Network hyperparameters: from our plans if they are ours, else the class defaults."""
        if cls.plans_are_ours(configuration_manager):
            kwargs = dict(configuration_manager.network_arch_init_kwargs)
        else:
            kwargs = dict(encoder=cls.encoder_size, decoder=cls.decoder, drop_path_rate=cls.drop_path_rate)
        if len(configuration_manager.patch_size) == 3:
            kwargs.setdefault("context", cls.context)
        kwargs.update(cls.network_overrides)
        kwargs["encoder_overrides"] = {**kwargs.get("encoder_overrides", {}), **cls.encoder_layout}
        # Machine settings, never the parameters: safe to differ between training and prediction.
        checkpointing = _env("MEDDINOV3_GRAD_CHECKPOINTING", _flag, None)
        if checkpointing is not None:
            kwargs["grad_checkpointing"] = checkpointing
        kwargs["cpu_autocast"] = _env("MEDDINOV3_CPU_BF16", _flag, False)
        return kwargs

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # Called on the class by the predictor too: everything comes from the plans and the class.
        cls.check_configuration(configuration_manager)
        network = cls.network_class(configuration_manager)(num_input_channels, num_output_channels,
                                                           **cls.network_kwargs(configuration_manager))
        # the predictor builds it without adapters: a LoRA checkpoint's adapters are merged as it loads
        return lora.merge_adapters_on_load(network)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # MedDINOv3Net has a single full-resolution output

    def configure_optimizers(self):
        if self.lora_rank:  # before the groups (only adapters train) and before DDP wraps the network
            encoder = unwrap(self.network).encoder
            lora.add_lora(encoder, self.lora_rank, self.lora_alpha, self.lora_targets)
            counts = lora.parameter_counts(encoder)
            self.print_to_log_file(f"LoRA: {encoder.lora.extra_repr()}; base encoder frozen, {counts['trainable']:,} of "
                                   f"{counts['total']:,} encoder parameters train (the adapters)")
        groups = parameter_groups(unwrap(self.network), encoder_lr=self.encoder_lr, decoder_lr=self.decoder_lr,
                                  weight_decay=self.weight_decay, layer_decay=self.layer_decay,
                                  freeze_encoder=self.freeze_encoder)
        optimizer = build_adamw(groups)
        return optimizer, WarmupLinearDecayLR(optimizer, self.num_epochs, self.warmup_epochs)

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0:  # a new training; --c has restored current_epoch > 0 by now
            self.load_pretrained_encoder()
        super().on_train_start()  # logs the recipe, weights included

    def load_pretrained_encoder(self) -> None:
        requested, origin = self.weights_source()
        if requested is None:
            self.weights_record = {"requested": None, "from": origin, "note": "random initialisation"}
            self.store_recipe_record()
            self.print_to_log_file("Encoder: random initialisation (no pretrained weights for this trainer)")
            return
        try:
            path = resolve_weights(requested)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{self.__class__.__name__} fine-tunes pretrained weights, but they were not found.\n{e}\n"
                f"Set {WEIGHTS_ENV} to a checkpoint path or registry name (`meddinov3 weights list`), or "
                f"train from scratch with -tr nnUNetTrainerMedDINOv3_Scratch.") from None
        with lora.plain_view(unwrap(self.network).encoder) as encoder:  # into the base layers of adapters
            layout = load_encoder_weights(encoder, path)
        self.weights_record = describe_weights(requested, origin, path, layout)
        self.store_recipe_record()
        self.print_to_log_file(f"Encoder weights: {path} (layout {layout})")
        self.print_to_log_file("Encoder weights source: " + ", ".join(
            f"{k} {v}" for k, v in self.weights_record.items() if k != "provenance"))
        if self.weights_record.get("provenance"):
            self.print_to_log_file(f"Encoder weights provenance (format header): {self.weights_record['provenance']}")
        self.log_intensity_match(requested, path)

    def log_intensity_match(self, requested: str, path: Path) -> None:
        """Say, per channel, whether the plans normalise as the weights were pretrained: a silent
        mismatch is how an encoder ends up seeing other intensities than it learned on."""
        convention, where = recorded_intensity(path)
        if convention is None and not Path(str(requested)).exists():
            convention, where = recorded_intensity(requested)  # a registry entry records it without a file header
        cm, properties = self.configuration_manager, self.plans_manager.foreground_intensity_properties_per_channel
        record = {"weights": convention, "recorded_in": where, "channels": {}}
        for c, name in self.dataset_json["channel_names"].items():
            same, text = compare_with_nnunet(convention, cm.normalization_schemes[int(c)],
                                             cm.use_mask_for_norm[int(c)], properties.get(str(c), {}))
            record["channels"][name] = {"same": same, "plans": text}
            self.print_to_log_file(f"Intensity of channel '{name}': {text}" + ("" if same else (
                ". To match, plan with `meddinov3 plan_and_preprocess --intensity-from WEIGHTS`, or pretrain with "
                "data.intensity.kind=nnunet (pretrain/README.md, 'Intensities')")))
        self.weights_record["intensity"] = record
        self.store_recipe_record()


def describe_weights(requested: str, origin: str, path: Path, layout: str) -> dict:
    """What a run's encoder started from: the name as given, where it came from, the resolved file,
    its sha256 (a DCP folder has none), and for this project's format the header's provenance."""
    path = Path(path).resolve()
    record = {"requested": str(requested), "from": origin, "path": str(path), "layout": layout,
              "sha256": file_sha256(path) if path.is_file() else None}
    if path.is_dir() and (path / ".metadata").is_file():  # a dinov3 DCP folder: its index names every shard
        record["metadata_file_sha256"] = file_sha256(path / ".metadata")
    if path.suffix == ".safetensors":
        header, _ = read_safetensors_header(path)
        if METADATA_KEY in header:
            meta = json.loads(header[METADATA_KEY])
            record["provenance"] = {k: meta.get(k) for k in ("source", "stages", "licence", "tensor_sha256",
                                                             "metadata_sha256")}
    return record


class nnUNetTrainerMedDINOv3_DINOv3(nnUNetTrainerMedDINOv3):
    """Official natural-image DINOv3 ViT-B/16 (LVD-1689M) weights: qkv bias, LayerNorm eps 1e-5."""

    encoder_layout = {}
    default_weights = "dinov3-vitb16-lvd1689m"
    default_recipe = {**nnUNetTrainerMedDINOv3.default_recipe, "encoder_lr": 1e-4}


class nnUNetTrainerMedDINOv3_Scratch(nnUNetTrainerMedDINOv3):
    """Same network, random initialisation (the paper's scratch baseline LR)."""

    default_weights = None
    weights_from_environment = False
    default_recipe = {**nnUNetTrainerMedDINOv3.default_recipe, "encoder_lr": 3e-4}


class nnUNetTrainerMedDINOv3_FrozenEncoder(nnUNetTrainerMedDINOv3):
    """Linear-probe style: only the decoder trains."""

    default_recipe = {**nnUNetTrainerMedDINOv3.default_recipe, "freeze_encoder": True}
    defining_recipe = {"freeze_encoder": (lambda frozen: frozen is True, "a frozen encoder (freeze_encoder=true)",
                                         "-tr nnUNetTrainerMedDINOv3 for a fine-tuned encoder")}


class nnUNetTrainerMedDINOv3_LoRA(nnUNetTrainerMedDINOv3):
    """LoRA fine-tuning: the pretrained encoder frozen, rank-8 adapters on its attention layers
    (``lora_targets``, scaled by lora_alpha / lora_rank) trained at encoder_lr, and the decoder. Needs
    peft (``pip install 'nnunet-meddinov3[lora]'``). The checkpoint holds the base weights unchanged
    and the adapters apart; ``meddinov3 weights merge-lora`` writes the merged encoder."""

    # encoder_lr: adapters start at B = 0 and, like the decoder, learn from scratch
    default_recipe = {**nnUNetTrainerMedDINOv3.default_recipe, "lora_rank": 8, "encoder_lr": 3e-4}
    defining_recipe = {"lora_rank": (lambda rank: rank > 0, "LoRA adapters (lora_rank > 0)",
                                     "-tr nnUNetTrainerMedDINOv3 to fine-tune the whole encoder")}


class nnUNetTrainerMedDINOv3_LLRD(nnUNetTrainerMedDINOv3):
    """Layer-wise LR decay 0.75 over the encoder blocks and a 10-epoch warm-up."""

    default_recipe = {**nnUNetTrainerMedDINOv3.default_recipe, "layer_decay": 0.75, "warmup_epochs": 10}
    defining_recipe = {"layer_decay": (lambda decay: decay < 1, "layer-wise LR decay (layer_decay < 1)",
                                       "-tr nnUNetTrainerMedDINOv3 for one encoder LR")}


class nnUNetTrainerMedDINOv3_Bottleneck(nnUNetTrainerMedDINOv3):
    """Cheaper decoder: 1x1 projection of the concatenated features to the embedding width
    (whatever decoder the plans name: the trainer's name says which network it trains)."""

    network_overrides = {"decoder": "bottleneck"}


class nnUNetTrainerMedDINOv3_Tiny(nnUNetTrainerMedDINOv3):
    """A 4-block, 64-wide encoder for CPUs: the demo and the tests. Random init unless
    MEDDINOV3_WEIGHTS points at a tiny checkpoint."""

    network_overrides = {"encoder": "meddinov3_tiny"}
    default_weights = None
    drop_path_rate = 0.0
    default_recipe = {**nnUNetTrainerMedDINOv3.default_recipe, "encoder_lr": 3e-4, "decoder_lr": 1e-3,
                      "epochs": 20, "iterations": 25, "val_iterations": 5}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1  # short CPU runs: every epoch is worth resuming from with --c


class nnUNetTrainerShortSchedule(RecipeTrainerBase):
    """Stock nnU-Net (network, loss, SGD/poly recipe), only shorter: 20 epochs x 25 iterations by
    default; its recipe takes epochs, iterations and val_iterations the same way as the MedDINOv3
    trainers, so a baseline can get the same budget as a MedDINOv3 run (used by the demo)."""

    default_recipe = {**RecipeTrainerBase.default_recipe, "epochs": 20, "iterations": 25, "val_iterations": 5}


class nnUNetTrainerMedDINOv3_TinyBottleneck(nnUNetTrainerMedDINOv3_Tiny):
    """The tiny CPU model with the bottleneck decoder, to compare decoders on the demo dataset."""

    network_overrides = {**nnUNetTrainerMedDINOv3_Tiny.network_overrides, "decoder": "bottleneck"}


# What nnunet_ext/ re-exports for nnU-Net's trainer lookup: every trainer class defined here.
__all__ = [name for name, value in list(globals().items())
           if name.startswith("nnUNetTrainer") and getattr(value, "__module__", None) == __name__]
