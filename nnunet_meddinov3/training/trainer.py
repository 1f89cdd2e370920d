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
  restored and checked by ``--c`` / ``--val``.

Environment variables are left for machine settings (MEDDINOV3_GRAD_CHECKPOINTING,
MEDDINOV3_CPU_BF16, MEDDINOV3_CACHE), for the weights file (MEDDINOV3_WEIGHTS; its name, path and
sha256 are recorded) and for the recorded recipe override.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_meddinov3.checkpoints import load_encoder_weights, resolve_weights
from nnunet_meddinov3.checkpoints.conventions import recorded_intensity
from nnunet_meddinov3.checkpoints.format import METADATA_KEY, file_sha256, read_safetensors_header
from nnunet_meddinov3.checkpoints.registry import WEIGHTS_ENV
from nnunet_meddinov3.data.intensity import compare_with_nnunet
from nnunet_meddinov3.network import MedDINOv3Net
from nnunet_meddinov3.network.meddinov3_net import NETWORK_CLASS_NAME
from nnunet_meddinov3.network.encoder import MEDDINOV3_LAYOUT
from nnunet_meddinov3.training.optim import WarmupLinearDecayLR, build_adamw, group_base_lr, parameter_groups
from nnunet_meddinov3.training import recipe
from nnunet_meddinov3.training.recipe import RecipeError


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


def read_recorded_recipe(checkpoint_file: str) -> tuple[dict | None, int]:
    """(the recipe record, current_epoch) of an nnU-Net checkpoint, without reading its tensors
    (memory-mapped: nnU-Net's own ``load_checkpoint`` reads the file right after)."""
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip-format file: read it whole
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    return (checkpoint.get("init_args") or {}).get(recipe.CHECKPOINT_KEY), int(checkpoint.get("current_epoch", 0))


class RecipeTrainerBase(nnUNetTrainer):
    """The recipe as data, for any nnUNetTrainer subclass: resolved in ``__init__``, recorded in the
    checkpoint (``init_args["meddinov3_recipe"]``: nnU-Net saves and restores ``init_args`` itself,
    so ``save_checkpoint`` needs no override and no second write), printed at the start of training,
    restored and checked by ``load_checkpoint`` (``--c``, ``--val``)."""

    # the recipe keys this trainer takes, and their class defaults (attribute names)
    recipe_keys: tuple = ("epochs", "iterations", "val_iterations")
    num_epochs_default = 1000
    iterations_default = 250
    val_iterations_default = 50
    # what a variant's name promises: key -> (test of the value, the promise, what to use instead)
    defining_recipe: dict = {}
    # keys that shape the optimizer's parameter groups: a resumed run cannot change them
    structural_keys: frozenset = frozenset()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.recipe_override = recipe.EnvironmentOverride(keys=self.recipe_keys)
        self.recipe_plans_where = f"{self.plans_manager.plans_name}/{configuration}"
        block = recipe.parse_plans_block(self.configuration_manager.configuration.get(recipe.PLANS_KEY),
                                         f"the '{recipe.PLANS_KEY}' block of plans {self.recipe_plans_where}",
                                         self.recipe_keys)
        # plans + class defaults alone: what --c compares a checkpoint's recipe against
        self.recipe_base = recipe.resolve(self.recipe_defaults(), block, {}, self.recipe_plans_where,
                                          self.__class__.__name__)
        override = self.recipe_override.values()
        values, sources = recipe.resolve(self.recipe_defaults(), block, override, self.recipe_plans_where,
                                         self.__class__.__name__,
                                         {k: self.recipe_override.source(k) for k in override})
        self.check_defining_recipe(values, sources)
        self.recipe_history: list = []
        self.weights_record: dict | None = None
        self.recipe_notices = [n for n in (self.recipe_override.legacy_notice(),) if n]
        for notice in self.recipe_notices:
            if self.local_rank == 0:
                print(notice)
        self.set_recipe(values, sources)

    # --- what the recipe is and does -------------------------------------------------------------

    def recipe_defaults(self) -> dict:
        """The class's values of ``recipe_keys`` (class attributes: instance ones hold the resolved recipe)."""
        cls = type(self)
        return {"epochs": cls.num_epochs_default, "iterations": cls.iterations_default,
                "val_iterations": cls.val_iterations_default}

    def apply_recipe(self, values: dict) -> None:
        self.num_epochs = values["epochs"]
        self.num_iterations_per_epoch = values["iterations"]
        self.num_val_iterations_per_epoch = values["val_iterations"]

    def set_recipe(self, values: dict, sources: dict) -> None:
        self.recipe_values, self.recipe_sources = dict(values), dict(sources)
        self.apply_recipe(self.recipe_values)
        self.store_recipe_record()

    def recipe_record(self) -> dict:
        return {"trainer": self.__class__.__name__, "plans": self.recipe_plans_where,
                "values": dict(self.recipe_values), "sources": dict(self.recipe_sources),
                "history": list(self.recipe_history), "weights": self.weights_record}

    def store_recipe_record(self) -> None:
        # saved by nnU-Net's save_checkpoint as checkpoint["init_args"][...]
        self.my_init_kwargs[recipe.CHECKPOINT_KEY] = self.recipe_record()

    def check_defining_recipe(self, values: dict, sources: dict) -> None:
        for key, (test, promise, instead) in self.defining_recipe.items():
            if not test(values[key]):
                raise RecipeError(
                    f"{self.__class__.__name__} is defined by {promise}; {recipe.format_assignments({key: values[key]})} "
                    f"from {sources[key]} would make it the opposite, under a folder name that says otherwise. "
                    f"Remove {key} from {sources[key]}, or train {instead}.")

    def log_recipe(self) -> None:
        for notice in self.recipe_notices:
            self.print_to_log_file(notice, also_print_to_console=False)
        self.print_to_log_file(f"Recipe ({self.__class__.__name__}, plans {self.recipe_plans_where}; "
                               f"class defaults < plans '{recipe.PLANS_KEY}' block < {recipe.OVERRIDE_ENV}):\n"
                               + recipe.describe(self.recipe_values, self.recipe_sources))
        for change in self.recipe_history:
            self.print_to_log_file(f"Recipe changed at epoch {change['epoch']} by {change['by']}: " + ", ".join(
                f"{k} {old} -> {new}" for k, (old, new) in change["changed"].items()))

    def on_train_start(self):
        self.log_recipe()
        super().on_train_start()

    # --- --c and --val ---------------------------------------------------------------------------

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, dict):
            stored = (filename_or_checkpoint.get("init_args") or {}).get(recipe.CHECKPOINT_KEY)
            epoch, where = int(filename_or_checkpoint.get("current_epoch", 0)), "the given checkpoint"
        else:
            (stored, epoch), where = read_recorded_recipe(filename_or_checkpoint), filename_or_checkpoint
        changed = self.restore_recipe(stored, epoch, where)
        if changed and self.was_initialized:  # the optimizer and schedule were built from the old values
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
        super().load_checkpoint(filename_or_checkpoint)
        self.after_checkpoint_loaded()
        self.store_recipe_record()  # nnU-Net replaced init_args with the checkpoint's

    def after_checkpoint_loaded(self) -> None:
        """Hook: re-apply the recipe to restored optimizer state where it keeps its own copy."""

    def restore_recipe(self, stored: dict | None, epoch: int, where: str) -> bool:
        """Adopt the checkpoint's recipe; refuse if the plans or the environment now disagree, unless
        MEDDINOV3_RECIPE_OVERRIDE names the change. Returns whether the values changed."""
        if stored is None:
            self.print_to_log_file(f"{where} records no recipe (written before recipes were recorded); going on with "
                                   f"the current one:\n" + recipe.describe(self.recipe_values, self.recipe_sources))
            return False
        old_values, old_sources = stored.get("values", {}), stored.get("sources", {})
        base_values, base_sources = self.recipe_base
        conflicts, forced = [], {}
        for key in self.recipe_keys:
            if key not in old_values:
                continue  # a key newer than the checkpoint: the current value holds
            old, old_source = old_values[key], old_sources.get(key, "?")
            if key in self.recipe_override.explicit:
                if self.recipe_override.explicit[key] != old:
                    forced[key] = (old, self.recipe_override.explicit[key])
            elif key in self.recipe_override.legacy:
                variable, value = self.recipe_override.legacy[key]
                if value != old:
                    conflicts.append((key, old, old_source, value, f"{variable} (legacy)"))
            elif not recipe.is_override_source(old_source) and base_values[key] != old:
                conflicts.append((key, old, old_source, base_values[key], base_sources[key]))
        if conflicts:
            keep = recipe.format_assignments({k: old for k, old, *_ in conflicts})
            change = recipe.format_assignments({k: new for k, _, _, new, _ in conflicts})
            lines = "\n".join(f"  {k}: checkpoint {recipe.format_assignments({k: old})} ({old_source}), now "
                              f"{recipe.format_assignments({k: new})} ({new_source})"
                              for k, old, old_source, new, new_source in conflicts)
            raise RecipeError(
                f"{self.__class__.__name__}: the recipe recorded in {where} differs from what the plans and the "
                f"environment say now:\n{lines}\nA resumed run keeps its recipe. To resume it unchanged, restore the "
                f"plans / unset the variables (or set {recipe.OVERRIDE_ENV}='{keep}'); to change it on purpose "
                f"(recorded in the checkpoint and the log), set {recipe.OVERRIDE_ENV}='{change}'; or start a new "
                f"training under a plans name of its own (meddinov3 plan_and_preprocess --plans-name ... --recipe ...).")
        structural = sorted(set(forced) & self.structural_keys)
        if structural:
            raise RecipeError(
                f"{self.__class__.__name__}: {', '.join(structural)} cannot change in a resumed run ({where}): it "
                f"decides which parameters the optimizer trains. Drop it from {recipe.OVERRIDE_ENV}, or start a new "
                f"training under a plans name of its own (meddinov3 plan_and_preprocess --plans-name ... --recipe ...).")
        values = {k: old_values.get(k, self.recipe_values[k]) for k in self.recipe_keys}
        sources = {k: old_sources.get(k, self.recipe_sources[k]) if k in old_values else self.recipe_sources[k]
                   for k in self.recipe_keys}
        for key, (_, new) in forced.items():
            values[key], sources[key] = new, recipe.OVERRIDE_ENV
        self.check_defining_recipe(values, sources)
        self.recipe_history = list(stored.get("history") or [])
        if forced:
            self.recipe_history.append({"epoch": epoch, "by": recipe.OVERRIDE_ENV,
                                        "changed": {k: [old, new] for k, (old, new) in forced.items()}})
        self.weights_record = stored.get("weights")
        changed = values != self.recipe_values
        self.set_recipe(values, sources)
        self.print_to_log_file(f"Recipe restored from {where}" + (
            f"; changed by {recipe.OVERRIDE_ENV}: " + ", ".join(f"{k} {o} -> {n}" for k, (o, n) in forced.items())
            if forced else ""))
        return changed


class nnUNetTrainerMedDINOv3(RecipeTrainerBase):
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
    # Whether MEDDINOV3_WEIGHTS may name the weights (the scratch baseline refuses it).
    weights_from_environment = True
    # The recipe's class defaults (see recipe.py for the keys).
    recipe_keys = tuple(recipe.KEYS)
    structural_keys = frozenset({"freeze_encoder", "layer_decay"})
    encoder_lr = recipe.ENCODER_LR
    decoder_lr = recipe.DECODER_LR
    weight_decay_default = recipe.WEIGHT_DECAY
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
        # The network casts itself to bf16 on CUDA; an fp16 grad scaler would only get in the way.
        self.grad_scaler = None

    def recipe_defaults(self) -> dict:
        cls = type(self)
        return {**super().recipe_defaults(), "encoder_lr": cls.encoder_lr,
                "decoder_lr": cls.decoder_lr, "weight_decay": cls.weight_decay_default,
                "layer_decay": cls.layer_decay, "warmup_epochs": cls.warmup_epochs,
                "freeze_encoder": cls.freeze_encoder}

    def apply_recipe(self, values: dict) -> None:
        super().apply_recipe(values)
        self.encoder_lr, self.decoder_lr = values["encoder_lr"], values["decoder_lr"]
        self.weight_decay, self.layer_decay = values["weight_decay"], values["layer_decay"]
        self.warmup_epochs, self.freeze_encoder = values["warmup_epochs"], values["freeze_encoder"]
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
        layout = load_encoder_weights(unwrap(self.network).encoder, path)
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
    encoder_lr = 1e-4


class nnUNetTrainerMedDINOv3_Scratch(nnUNetTrainerMedDINOv3):
    """Same network, random initialisation (the paper's scratch baseline LR)."""

    default_weights = None
    weights_from_environment = False
    encoder_lr = 3e-4


class nnUNetTrainerMedDINOv3_FrozenEncoder(nnUNetTrainerMedDINOv3):
    """Linear-probe style: only the decoder trains."""

    freeze_encoder = True
    defining_recipe = {"freeze_encoder": (lambda frozen: frozen is True, "a frozen encoder (freeze_encoder=true)",
                                         "-tr nnUNetTrainerMedDINOv3 for a fine-tuned encoder")}


class nnUNetTrainerMedDINOv3_LLRD(nnUNetTrainerMedDINOv3):
    """Layer-wise LR decay 0.75 over the encoder blocks and a 10-epoch warm-up."""

    layer_decay = 0.75
    warmup_epochs = 10
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


class nnUNetTrainerShortSchedule(RecipeTrainerBase):
    """Stock nnU-Net (network, loss, SGD/poly recipe), only shorter: 20 epochs x 25 iterations by
    default; its recipe takes epochs, iterations and val_iterations the same way as the MedDINOv3
    trainers, so a baseline can get the same budget as a MedDINOv3 run (used by the demo)."""

    num_epochs_default = 20
    iterations_default = 25
    val_iterations_default = 5


class nnUNetTrainerMedDINOv3_TinyBottleneck(nnUNetTrainerMedDINOv3_Tiny):
    """The tiny CPU model with the bottleneck decoder, to compare decoders on the demo dataset."""

    network_overrides = {**nnUNetTrainerMedDINOv3_Tiny.network_overrides, "decoder": "bottleneck"}
