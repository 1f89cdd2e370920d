"""nnU-Net trainers for MedDINOv3Net: thin subclasses of ``nnUNetTrainer``.

What differs from the stock trainer, and nothing else:
- the network (``build_network_architecture``), from our plans or, on stock plans, from the
  trainer's class attributes, so training and prediction always build the same thing;
- the optimiser (AdamW, encoder/decoder LRs, optional layer-wise decay or frozen encoder) and a
  warm-up + linear-decay schedule;
- no deep supervision; bf16 inside the network on CUDA (so no fp16 grad scaler);
- pretrained encoder weights, loaded when a new training starts (never on ``--c`` or at inference).

Run-time knobs (nnU-Net's command line cannot pass trainer arguments) are environment variables,
documented in the README: MEDDINOV3_WEIGHTS, MEDDINOV3_EPOCHS, MEDDINOV3_ITERATIONS,
MEDDINOV3_VAL_ITERATIONS, MEDDINOV3_ENCODER_LR, MEDDINOV3_DECODER_LR, MEDDINOV3_LAYER_DECAY,
MEDDINOV3_FREEZE_ENCODER, MEDDINOV3_WARMUP_EPOCHS, MEDDINOV3_GRAD_CHECKPOINTING, MEDDINOV3_CPU_BF16.
"""
from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_meddinov3.checkpoints import load_encoder_weights, resolve_weights
from nnunet_meddinov3.checkpoints.registry import WEIGHTS_ENV
from nnunet_meddinov3.network import MedDINOv3Net
from nnunet_meddinov3.network.meddinov3_net import NETWORK_CLASS_NAME
from nnunet_meddinov3.network.encoder import MEDDINOV3_LAYOUT
from nnunet_meddinov3.training.optim import WarmupLinearDecayLR, build_adamw, parameter_groups
from nnunet_meddinov3.training import recipe



def _env(name: str, cast, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not a valid {cast.__name__}") from e


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


_flag.__name__ = "boolean (1/0, true/false)"


def apply_schedule_from_env(trainer: nnUNetTrainer, epochs: int, iterations: int, val_iterations: int) -> None:
    """Schedule length from MEDDINOV3_EPOCHS / _ITERATIONS / _VAL_ITERATIONS, else the defaults given."""
    trainer.num_epochs = _env("MEDDINOV3_EPOCHS", int, epochs)
    trainer.num_iterations_per_epoch = _env("MEDDINOV3_ITERATIONS", int, iterations)
    trainer.num_val_iterations_per_epoch = _env("MEDDINOV3_VAL_ITERATIONS", int, val_iterations)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The MedDINOv3Net inside DDP and/or torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


class nnUNetTrainerMedDINOv3(nnUNetTrainer):
    """MedDINOv3 ViT-B/16 CT weights, multi-scale aggregation decoder (the paper's recipe)."""

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
    encoder_lr = recipe.ENCODER_LR
    decoder_lr = recipe.DECODER_LR
    layer_decay = 1.0
    freeze_encoder = False
    warmup_epochs = 0
    num_epochs_default = 1000
    iterations_default = 250
    val_iterations_default = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.weight_decay = recipe.WEIGHT_DECAY
        apply_schedule_from_env(self, self.num_epochs_default, self.iterations_default, self.val_iterations_default)
        self.decoder_lr = _env("MEDDINOV3_DECODER_LR", float, self.decoder_lr)
        self.encoder_lr = _env("MEDDINOV3_ENCODER_LR", float, self.encoder_lr)
        self.layer_decay = _env("MEDDINOV3_LAYER_DECAY", float, self.layer_decay)
        self.freeze_encoder = _env("MEDDINOV3_FREEZE_ENCODER", _flag, self.freeze_encoder)
        self.warmup_epochs = _env("MEDDINOV3_WARMUP_EPOCHS", int, self.warmup_epochs)
        self.initial_lr = self.decoder_lr
        self.pretrained_weights = self._weights_source()
        # The network casts itself to bf16 on CUDA; an fp16 grad scaler would only get in the way.
        self.grad_scaler = None

    def _weights_source(self) -> str | None:
        if self.default_weights is None:
            return None  # random-init variants ignore MEDDINOV3_WEIGHTS on purpose
        return os.environ.get(WEIGHTS_ENV) or self.default_weights

    @classmethod
    def network_kwargs(cls, configuration_manager) -> dict:
        """Network hyperparameters: from our plans if they are ours, else the class defaults."""
        if configuration_manager.network_arch_class_name == NETWORK_CLASS_NAME:
            kwargs = dict(configuration_manager.network_arch_init_kwargs)
        else:
            kwargs = dict(encoder=cls.encoder_size, decoder=cls.decoder, drop_path_rate=cls.drop_path_rate)
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
        return MedDINOv3Net(num_input_channels, num_output_channels, **cls.network_kwargs(configuration_manager))

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # MedDINOv3Net has a single full-resolution output

    def configure_optimizers(self):
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
        super().on_train_start()

    def load_pretrained_encoder(self) -> None:
        if self.pretrained_weights is None:
            self.print_to_log_file("Encoder: random initialisation (no pretrained weights for this trainer)")
            return
        try:
            path = resolve_weights(self.pretrained_weights)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{self.__class__.__name__} fine-tunes pretrained weights, but they were not found.\n{e}\n"
                f"Set {WEIGHTS_ENV} to a checkpoint path or registry name (`meddinov3 weights list`), or "
                f"train from scratch with -tr nnUNetTrainerMedDINOv3_Scratch.") from None
        layout = load_encoder_weights(unwrap(self.network).encoder, path)
        self.print_to_log_file(f"Encoder weights: {path} (layout {layout})")
        self.print_to_log_file(f"LRs: decoder {self.decoder_lr}, encoder {self.encoder_lr}, layer decay "
                               f"{self.layer_decay}, encoder frozen: {self.freeze_encoder}")


class nnUNetTrainerMedDINOv3_DINOv3(nnUNetTrainerMedDINOv3):
    """Official natural-image DINOv3 ViT-B/16 (LVD-1689M) weights: qkv bias, LayerNorm eps 1e-5."""

    encoder_layout = {}
    default_weights = "dinov3-vitb16-lvd1689m"
    encoder_lr = 1e-4


class nnUNetTrainerMedDINOv3_Scratch(nnUNetTrainerMedDINOv3):
    """Same network, random initialisation (the paper's scratch baseline LR)."""

    default_weights = None
    encoder_lr = 3e-4


class nnUNetTrainerMedDINOv3_FrozenEncoder(nnUNetTrainerMedDINOv3):
    """Linear-probe style: only the decoder trains."""

    freeze_encoder = True


class nnUNetTrainerMedDINOv3_LLRD(nnUNetTrainerMedDINOv3):
    """Layer-wise LR decay 0.75 over the encoder blocks and a 10-epoch warm-up."""

    layer_decay = 0.75
    warmup_epochs = 10


class nnUNetTrainerMedDINOv3_Bottleneck(nnUNetTrainerMedDINOv3):
    """Cheaper decoder: 1x1 projection of the concatenated features to the embedding width
    (whatever decoder the plans name: the trainer's name says which network it trains)."""

    network_overrides = {"decoder": "bottleneck"}


class nnUNetTrainerMedDINOv3_Tiny(nnUNetTrainerMedDINOv3):
    """A 4-block, 64-wide encoder for CPUs: the demo and the tests. Random init unless
    MEDDINOV3_WEIGHTS points at a tiny checkpoint."""

    network_overrides = {"encoder": "meddinov3_tiny"}
    default_weights = None
    encoder_lr = 3e-4
    decoder_lr = 1e-3
    drop_path_rate = 0.0
    num_epochs_default = 20
    iterations_default = 25
    val_iterations_default = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1  # short CPU runs: every epoch is worth resuming from with --c

    def _weights_source(self) -> str | None:
        return os.environ.get(WEIGHTS_ENV) or None


class nnUNetTrainerShortSchedule(nnUNetTrainer):
    """Stock nnU-Net (network, loss, SGD/poly recipe), only shorter: epochs and iterations from
    MEDDINOV3_EPOCHS / MEDDINOV3_ITERATIONS / MEDDINOV3_VAL_ITERATIONS, so a baseline can get the
    same budget as a MedDINOv3 run (used by the demo)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule_from_env(self, epochs=20, iterations=25, val_iterations=5)


class nnUNetTrainerMedDINOv3_TinyBottleneck(nnUNetTrainerMedDINOv3_Tiny):
    """The tiny CPU model with the bottleneck decoder, to compare decoders on the demo dataset."""

    network_overrides = {**nnUNetTrainerMedDINOv3_Tiny.network_overrides, "decoder": "bottleneck"}
