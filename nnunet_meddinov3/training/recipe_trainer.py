"""The recipe as data, for any ``nnUNetTrainer`` subclass (the base of this project's trainers).

The recipe (schedule, learning rates, ...; :mod:`nnunet_meddinov3.training.recipe`) is resolved when the
trainer is built, recorded in every checkpoint, printed to the log and restored and checked by ``--c`` /
``--val``. Crash safety comes with it (:mod:`nnunet_meddinov3.training.crash_safety`).
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_meddinov3.training import recipe
from nnunet_meddinov3.training.crash_safety import CrashSafeTraining, read_checkpoint_lazily
from nnunet_meddinov3.training.recipe import RecipeError


def read_recorded_recipe(checkpoint_file: str) -> tuple[dict | None, int]:
    """(the recipe record, current_epoch) of an nnU-Net checkpoint, without reading its tensors
    (memory-mapped: nnU-Net's own ``load_checkpoint`` reads the file right after). A truncated or
    otherwise unreadable file raises ``CheckpointUnreadable``, which names it."""
    checkpoint = read_checkpoint_lazily(checkpoint_file)
    return (checkpoint.get("init_args") or {}).get(recipe.CHECKPOINT_KEY), int(checkpoint.get("current_epoch", 0))


class RecipeTrainerBase(CrashSafeTraining, nnUNetTrainer):
    """The recipe as data, for any nnUNetTrainer subclass: resolved in ``__init__``, recorded in the
    checkpoint (``init_args["meddinov3_recipe"]``: nnU-Net saves and restores ``init_args`` itself),
    printed at the start of training, restored and checked by ``load_checkpoint`` (``--c``, ``--val``).

    A subclass may also set a recipe attribute the nnU-Net way, after ``super().__init__()`` (e.g.
    ``self.num_epochs = 3``, as nnU-Net's ``nnUNetTrainer_5epochs``): that value is the subclass's
    default, as if it were a class attribute (plans and override still win over it), recorded as
    ``trainer NAME (__init__)`` and kept by ``--c``. It is taken up before anything uses the recipe
    (``initialize``, ``load_checkpoint``)."""

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
        self.continue_training = bool(plans.get("continue_training", False))  # nnU-Net pops it
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.recipe_override = recipe.EnvironmentOverride(keys=self.recipe_keys)
        self.recipe_plans_where = f"{self.plans_manager.plans_name}/{configuration}"
        self.recipe_block = recipe.parse_plans_block(
            self.configuration_manager.configuration.get(recipe.PLANS_KEY),
            f"the '{recipe.PLANS_KEY}' block of plans {self.recipe_plans_where}", self.recipe_keys)
        self.recipe_set_in_init: dict = {}  # key -> (class default, value a subclass's __init__ set)
        self.recipe_settled = False
        values, sources = self.resolve_recipe(self.recipe_defaults(), {})
        self.recipe_history: list = []
        self.weights_record: dict | None = None
        self.recipe_notices = [n for n in (self.recipe_override.legacy_notice(),) if n]
        for notice in self.recipe_notices:
            if self.local_rank == 0:
                print(notice)
        self.set_recipe(values, sources)

    # --- what the recipe is and does -------------------------------------------------------------

    def resolve_recipe(self, defaults: dict, default_sources: dict) -> tuple[dict, dict]:
        """(values, sources) from ``defaults`` < plans < override; sets ``recipe_base`` (defaults + plans
        alone: what --c compares a checkpoint's recipe against)."""
        name, override = self.__class__.__name__, self.recipe_override.values()
        base = recipe.resolve(defaults, self.recipe_block, {}, self.recipe_plans_where, name)
        values, sources = recipe.resolve(defaults, self.recipe_block, override, self.recipe_plans_where, name,
                                         {k: self.recipe_override.source(k) for k in override})
        for key, source in default_sources.items():
            for resolved_sources in (base[1], sources):
                if resolved_sources[key] == f"trainer {name}":
                    resolved_sources[key] = source
        self.recipe_base = base
        self.check_defining_recipe(values, sources)
        return values, sources

    def recipe_attributes(self) -> dict:
        """The recipe as the trainer's attributes hold it now (what ``apply_recipe`` set, unless a
        subclass's ``__init__`` set something else afterwards)."""
        return {"epochs": self.num_epochs, "iterations": self.num_iterations_per_epoch,
                "val_iterations": self.num_val_iterations_per_epoch}

    def settle_recipe(self) -> None:
        """Take up the recipe attributes a subclass set after ``super().__init__()`` as its defaults."""
        if self.recipe_settled:
            return
        self.recipe_settled = True
        attributes, defaults = self.recipe_attributes(), self.recipe_defaults()
        assigned = {k: v for k, v in attributes.items() if v != self.recipe_values[k]}
        if not assigned:
            return
        self.recipe_set_in_init = {k: (defaults[k], v) for k, v in assigned.items()}
        where = f"trainer {self.__class__.__name__} (__init__)"
        values, sources = self.resolve_recipe({**defaults, **assigned}, {k: where for k in assigned})
        self.set_recipe(values, sources)

    def initialize(self):
        self.settle_recipe()
        super().initialize()

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
        self.settle_recipe()
        if isinstance(filename_or_checkpoint, dict):
            stored = (filename_or_checkpoint.get("init_args") or {}).get(recipe.CHECKPOINT_KEY)
            epoch, where = int(filename_or_checkpoint.get("current_epoch", 0)), "the given checkpoint"
        else:  # --c goes on from an older checkpoint if this one is unreadable (crash_safety.py)
            filename_or_checkpoint, (stored, epoch) = self.first_readable(filename_or_checkpoint, read_recorded_recipe)
            where = filename_or_checkpoint
        changed = self.restore_recipe(stored, epoch, where)
        if changed and self.was_initialized:  # the optimizer and schedule were built from the old values
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
        super().load_checkpoint(filename_or_checkpoint)
        self.after_checkpoint_loaded()
        self.store_recipe_record()  # nnU-Net replaced init_args with the checkpoint's

    def after_checkpoint_loaded(self) -> None:
        """Hook: re-apply the recipe to restored optimizer state where it keeps its own copy."""

    def finished_run_note(self) -> str:
        return (f" To train it longer on purpose, set {recipe.OVERRIDE_ENV}='epochs=N' with N > {self.current_epoch} "
                f"(recorded in the checkpoint); to train it anew, use another plans name or remove the fold folder.")

    def restore_recipe(self, stored: dict | None, epoch: int, where: str) -> bool:
        """Adopt the checkpoint's recipe; refuse if the plans or the environment now disagree, unless
        MEDDINOV3_RECIPE_OVERRIDE names the change. Returns whether the values changed."""
        if stored is None:
            self.print_to_log_file(f"{where} records no recipe (written before recipes were recorded); going on with "
                                   f"the current one:\n" + recipe.describe(self.recipe_values, self.recipe_sources))
            return False
        old_values, old_sources = stored.get("values", {}), stored.get("sources", {})
        base_values, base_sources = self.recipe_base
        conflicts, forced, predating = [], {}, set()
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
            elif (key in self.recipe_set_in_init and old_source == f"trainer {self.__class__.__name__}"
                  and old == self.recipe_set_in_init[key][0]):
                predating.add(key)  # recorded before __init__ assignments were taken up: the run used the assigned one
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
        values = {k: old_values.get(k, self.recipe_values[k]) if k not in predating else self.recipe_values[k]
                  for k in self.recipe_keys}
        sources = {k: old_sources[k] if k in old_values and k in old_sources and k not in predating
                   else self.recipe_sources[k] for k in self.recipe_keys}
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
