"""The MedDINOv3 fine-tuning recipe: its default numbers, and the recipe as data.

A run's recipe (schedule, learning rates, layer decay, freezing, warm-up, weight decay, LoRA) comes from,
in order, each level overriding the one before:

1. the trainer class's defaults (its ``default_recipe``; its name says what it is: ``_FrozenEncoder``,
   ``_LLRD``, ...);
2. the ``meddinov3`` block of the plans configuration (``meddinov3 plan_and_preprocess --recipe
   epochs=300 ...``, under a plans name of its own so the results folder ``Trainer__Plans__config``
   says it); stock ``nnUNetPlans`` have none, so the class defaults hold there;
3. an explicit environment override, ``MEDDINOV3_RECIPE_OVERRIDE="epochs=3 encoder_lr=1e-4"``,
   recorded with the run.

The effective recipe and where each value came from is stored in the nnU-Net checkpoint and printed
to the training log; ``--c`` / ``--val`` restore it from there and refuse to resume if the plans or
the environment now say otherwise, unless ``MEDDINOV3_RECIPE_OVERRIDE`` names the change.

The keys are one table, :data:`KEYS`: each row names the trainer attribute that holds the value, how
its text is read and checked, its base default, its meaning, and whether it is structural (locked on
``--c``). A trainer takes the keys of its ``default_recipe`` mapping; the trainer base class resolves,
sets, records and restores them from the table alone. Adding a key is one row here, plus the code that
uses the attribute (and the key in the ``default_recipe`` of the trainers that take it).

This module imports nothing heavy: the trainer, the planner, the benchmark and the command line all
read it.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Callable

from nnunet_meddinov3.network.configs import DEFAULT_LORA_ALPHA, DEFAULT_LORA_TARGETS, LORA_TARGET_NAMES

ENCODER = "vitb16"
DECODER = "multiscale"
DROP_PATH_RATE = 0.2
ENCODER_LR = 3e-5
DECODER_LR = 3e-4
WEIGHT_DECAY = 0.05
HIGHRES_PATCH = 896  # longest side of the 2d_highres patch
PLANS_NAME = "nnUNetPlansMedDINOv3"
# LoRA (network/lora.py): adapters' output scaled by alpha / rank; attention layers by default
LORA_ALPHA = DEFAULT_LORA_ALPHA
LORA_TARGETS = DEFAULT_LORA_TARGETS

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


@dataclass(frozen=True)
class RecipeKey:
    """One row of the recipe table."""

    attribute: str  # the trainer attribute that holds the value (nnU-Net's own name where it has one)
    parse: Callable[[str], object]  # text -> value, ValueError if invalid; its __name__ says what is valid
    default: object  # the base default; a trainer's default_recipe may set its own
    meaning: str
    structural: bool = False  # shapes the optimizer's parameter groups: a resumed run cannot change it


KEYS = {
    "epochs": RecipeKey("num_epochs", _positive_int, 1000, "number of epochs"),
    "iterations": RecipeKey("num_iterations_per_epoch", _positive_int, 250, "training iterations per epoch"),
    "val_iterations": RecipeKey("num_val_iterations_per_epoch", _positive_int, 50, "validation iterations per epoch"),
    "encoder_lr": RecipeKey("encoder_lr", _non_negative_float, ENCODER_LR, "peak learning rate of the encoder"),
    "decoder_lr": RecipeKey("decoder_lr", _non_negative_float, DECODER_LR, "peak learning rate of the decoder"),
    "weight_decay": RecipeKey("weight_decay", _non_negative_float, WEIGHT_DECAY, "AdamW weight decay"),
    "layer_decay": RecipeKey("layer_decay", _decay, 1.0, "layer-wise LR decay over the encoder blocks",
                             structural=True),
    "warmup_epochs": RecipeKey("warmup_epochs", _non_negative_int, 0, "linear warm-up epochs"),
    "freeze_encoder": RecipeKey("freeze_encoder", parse_flag, False, "train the decoder only", structural=True),
    "lora_rank": RecipeKey("lora_rank", _non_negative_int, 0,
                           "LoRA rank of the encoder adapters; 0 = off (the whole encoder trains)", structural=True),
    "lora_alpha": RecipeKey("lora_alpha", _positive_float, LORA_ALPHA,
                            "LoRA alpha: the adapters' output is scaled by lora_alpha / lora_rank", structural=True),
    "lora_targets": RecipeKey("lora_targets", _lora_targets, LORA_TARGETS,
                              "encoder layers with adapters: qkv, proj (attention), mlp", structural=True),
}
STRUCTURAL_KEYS = frozenset(key for key, row in KEYS.items() if row.structural)


def defaults(*keys: str) -> dict:
    """The base defaults of ``keys`` (of every key if none is named), in the table's order."""
    return {key: row.default for key, row in KEYS.items() if not keys or key in keys}


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
    parse = KEYS[key].parse
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        return parse(text)
    except ValueError:
        raise RecipeError(f"{where}: {key}={value!r} is not a valid {parse.__name__}.") from None


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
