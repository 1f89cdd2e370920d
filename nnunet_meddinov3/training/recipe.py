"""The MedDINOv3 fine-tuning recipe: its default numbers, and the recipe as data.

A run's recipe (schedule, learning rates, layer decay, freezing, warm-up, weight decay, LoRA) comes from,
in order, each level overriding the one before:

1. the trainer class's defaults (its name says what it is: ``_FrozenEncoder``, ``_LLRD``, ...);
2. the ``meddinov3`` block of the plans configuration (``meddinov3 plan_and_preprocess --recipe
   epochs=300 ...``, under a plans name of its own so the results folder ``Trainer__Plans__config``
   says it); stock ``nnUNetPlans`` have none, so the class defaults hold there;
3. an explicit environment override, ``MEDDINOV3_RECIPE_OVERRIDE="epochs=3 encoder_lr=1e-4"``,
   recorded with the run.

The effective recipe and where each value came from is stored in the nnU-Net checkpoint and printed
to the training log; ``--c`` / ``--val`` restore it from there and refuse to resume if the plans or
the environment now say otherwise, unless ``MEDDINOV3_RECIPE_OVERRIDE`` names the change.

This module imports nothing heavy: the trainer, the planner, the benchmark and the command line all
read it.
"""
from __future__ import annotations

import os
import shlex

ENCODER = "vitb16"
DECODER = "multiscale"
DROP_PATH_RATE = 0.2
ENCODER_LR = 3e-5
DECODER_LR = 3e-4
WEIGHT_DECAY = 0.05
HIGHRES_PATCH = 896  # longest side of the 2d_highres patch
PLANS_NAME = "nnUNetPlansMedDINOv3"
# LoRA (nnunet_meddinov3/network/lora.py): adapters' output scaled by alpha / rank; attention layers by default
LORA_ALPHA = 16.0
LORA_TARGET_NAMES = ("qkv", "proj", "mlp")  # = nnunet_meddinov3.network.lora.TARGETS (no torch import here)
LORA_TARGETS = "qkv,proj"

PLANS_KEY = "meddinov3"  # the block in a plans configuration
OVERRIDE_ENV = "MEDDINOV3_RECIPE_OVERRIDE"
CHECKPOINT_KEY = "meddinov3_recipe"  # in the checkpoint's init_args (see trainer.py)


def parse_flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


parse_flag.__name__ = "boolean (true/false, 1/0)"


def _at_least(cast, low, name: str):
    """A parser of ``cast`` values >= ``low`` (``not >=`` also refuses nan), named for error messages."""
    def parse(text: str):
        value = cast(text)
        if not value >= low:
            raise ValueError(text)
        return value

    parse.__name__ = name
    return parse


_positive_int = _at_least(int, 1, "integer >= 1")
_non_negative_int = _at_least(int, 0, "integer >= 0")
_non_negative_float = _at_least(float, 0, "number >= 0")


def _decay(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(text)
    return value


_decay.__name__ = "number in (0, 1] (1 = off)"


def _lora_targets(text: str) -> str:
    names = [t.strip() for t in text.split(",")]
    if not any(names) or any(t not in LORA_TARGET_NAMES for t in names):
        raise ValueError(text)
    return ",".join(t for t in LORA_TARGET_NAMES if t in names)  # one spelling per choice, for the recipe lock


_lora_targets.__name__ = f"comma-separated subset of {','.join(LORA_TARGET_NAMES)}"
_positive_float = _at_least(float, 1e-12, "number > 0")

# key -> (parser of its text form, meaning)
KEYS = {
    "epochs": (_positive_int, "number of epochs"),
    "iterations": (_positive_int, "training iterations per epoch"),
    "val_iterations": (_positive_int, "validation iterations per epoch"),
    "encoder_lr": (_non_negative_float, "peak learning rate of the encoder"),
    "decoder_lr": (_non_negative_float, "peak learning rate of the decoder"),
    "weight_decay": (_non_negative_float, "AdamW weight decay"),
    "layer_decay": (_decay, "layer-wise LR decay over the encoder blocks"),
    "warmup_epochs": (_non_negative_int, "linear warm-up epochs"),
    "freeze_encoder": (parse_flag, "train the decoder only"),
    "lora_rank": (_non_negative_int, "LoRA rank of the encoder adapters; 0 = off (the whole encoder trains)"),
    "lora_alpha": (_positive_float, "LoRA alpha: the adapters' output is scaled by lora_alpha / lora_rank"),
    "lora_targets": (_lora_targets, "encoder layers with adapters: qkv, proj (attention), mlp"),
}

# The variables that carried the recipe before it was data. Still read (documented commands keep
# working), as part of the recorded override, with one notice saying what replaces them.
LEGACY_ENV = {
    "MEDDINOV3_EPOCHS": "epochs",
    "MEDDINOV3_ITERATIONS": "iterations",
    "MEDDINOV3_VAL_ITERATIONS": "val_iterations",
    "MEDDINOV3_ENCODER_LR": "encoder_lr",
    "MEDDINOV3_DECODER_LR": "decoder_lr",
    "MEDDINOV3_LAYER_DECAY": "layer_decay",
    "MEDDINOV3_FREEZE_ENCODER": "freeze_encoder",
    "MEDDINOV3_WARMUP_EPOCHS": "warmup_epochs",
}


class RecipeError(ValueError):
    """A recipe that cannot be used as given; the message says what to do."""


def parse_value(key: str, value, where: str, keys=None):
    """``value`` (text, or a JSON value from a plans file) as the type ``key`` takes."""
    keys = KEYS if keys is None else keys
    if key not in keys:
        raise RecipeError(f"{where}: unknown recipe key '{key}'. Known keys: {', '.join(keys)}.")
    parser, _ = KEYS[key]
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        return parser(text)
    except ValueError:
        raise RecipeError(f"{where}: {key}={value!r} is not a valid {parser.__name__}.") from None


def parse_assignments(items, where: str, keys=None) -> dict:
    """``["epochs=300", "encoder_lr=5e-5"]`` -> ``{"epochs": 300, "encoder_lr": 5e-05}``."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise RecipeError(f"{where}: '{item}' is not KEY=VALUE (e.g. epochs=300). "
                              f"Known keys: {', '.join(KEYS if keys is None else keys)}.")
        values[key.strip()] = parse_value(key.strip(), value.strip(), where, keys)
    return values


def parse_plans_block(block, where: str, keys=None) -> dict:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise RecipeError(f"{where}: the '{PLANS_KEY}' block must be a JSON object of recipe keys, got {block!r}.")
    return {k: parse_value(k, v, where, keys) for k, v in block.items()}


def format_assignments(values: dict) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())


class EnvironmentOverride:
    """What the environment says about the recipe: ``MEDDINOV3_RECIPE_OVERRIDE`` and, mapped onto it,
    the legacy per-key variables (``legacy`` names the ones found, for the notice)."""

    def __init__(self, environ=None, keys=None):
        environ = os.environ if environ is None else environ
        keys = KEYS if keys is None else keys
        self.explicit: dict = {}
        self.legacy: dict = {}  # key -> (variable, value)
        text = environ.get(OVERRIDE_ENV, "")
        if text.strip():
            try:
                items = shlex.split(text)
            except ValueError as e:
                raise RecipeError(f"{OVERRIDE_ENV}={text!r} cannot be split into KEY=VALUE items ({e}).") from None
            self.explicit = parse_assignments(items, OVERRIDE_ENV, keys)
        for variable, key in LEGACY_ENV.items():
            value = environ.get(variable, "")
            if value.strip():
                if key not in keys:
                    raise RecipeError(f"{variable}={value!r} is set, but '{key}' is not part of this trainer's "
                                      f"recipe (it takes {', '.join(keys)}). Unset {variable}.")
                self.legacy[key] = (variable, parse_value(key, value.strip(), variable, keys))

    def values(self) -> dict:
        """The override in effect: the explicit one wins over a legacy variable of the same key."""
        return {**{k: v for k, (_, v) in self.legacy.items()}, **self.explicit}

    def source(self, key: str) -> str:
        if key in self.explicit:
            return OVERRIDE_ENV
        return f"{self.legacy[key][0]} (legacy)"

    def legacy_notice(self) -> str | None:
        if not self.legacy:
            return None
        found = " ".join(f"{var}={value}" for var, value in
                         ((var, format_assignments({k: v})) for k, (var, v) in self.legacy.items()))
        as_override = format_assignments({k: v for k, (_, v) in self.legacy.items() if k not in self.explicit})
        return (f"Note: the recipe variables {', '.join(var for var, _ in self.legacy.values())} are replaced by "
                f"the plans' recipe (`meddinov3 plan_and_preprocess --recipe KEY=VALUE ...`) and by "
                f"{OVERRIDE_ENV}; they are read as {OVERRIDE_ENV}='{as_override}' and recorded as such "
                f"(found: {found}).")


def resolve(defaults: dict, plans_block: dict, override: dict, plans_where: str, trainer: str,
            override_sources: dict | None = None) -> tuple[dict, dict]:
    """(values, sources): class defaults < plans block < environment override, key by key."""
    values, sources = {}, {}
    for key, default in defaults.items():
        if key in override:
            values[key], sources[key] = override[key], (override_sources or {}).get(key, OVERRIDE_ENV)
        elif key in plans_block:
            values[key], sources[key] = plans_block[key], f"plans {plans_where}"
        else:
            values[key], sources[key] = default, f"trainer {trainer}"
    return values, sources


def describe(values: dict, sources: dict) -> str:
    width = max(len(k) for k in values)
    return "\n".join(f"  {k:<{width}} = {format_assignments({k: v}).split('=', 1)[1]:<10} ({sources[k]})"
                     for k, v in values.items())


def is_override_source(source: str) -> bool:
    return source.startswith("MEDDINOV3_")
