"""The recipe as data, for any ``nnUNetTrainer`` subclass (the base of this project's trainers).

The recipe (schedule, learning rates, ...; :mod:`nnunet_meddinov3.training.recipe`) is resolved when the
trainer is built, recorded in every checkpoint, printed to the log and restored and checked by ``--c`` /
``--val``. Crash safety comes with it (:mod:`nnunet_meddinov3.training.crash_safety`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_meddinov3.cpu_threads import choose_threads, threads_set_by_user
from nnunet_meddinov3.nnunet_checkpoints import read_checkpoint_lazily
from nnunet_meddinov3.training import recipe
from nnunet_meddinov3.training.crash_safety import CrashSafeTraining
from nnunet_meddinov3.training.recipe import RecipeError


def read_recorded_recipe(checkpoint_file: str) -> tuple[dict | None, int]:
    """(the recipe record, current_epoch) of an nnU-Net checkpoint, without reading its tensors
    (memory-mapped: nnU-Net's own ``load_checkpoint`` reads the file right after). A truncated or
    otherwise unreadable file raises ``CheckpointUnreadable``, which names it."""
    checkpoint = read_checkpoint_lazily(checkpoint_file)
    return (checkpoint.get("init_args") or {}).get(recipe.CHECKPOINT_KEY), int(checkpoint.get("current_epoch", 0))


_RECIPE_ATTRIBUTES = frozenset(row.attribute for row in recipe.KEYS.values())
# how trainers declared their recipe before default_recipe
_RETIRED_ATTRIBUTES = frozenset({"recipe_keys", "structural_keys", "num_epochs_default", "iterations_default",
                                 "val_iterations_default", "weight_decay_default"})


class RecipeConflict(NamedTuple):
    """A key the checkpoint recorded one way and the plans or the environment now say another."""

    key: str
    recorded: object
    recorded_source: str
    now: object
    now_source: str


class RecipeTrainerBase(CrashSafeTraining, nnUNetTrainer):
    """The recipe as data, for any nnUNetTrainer subclass: resolved in ``__init__``, recorded in the
    checkpoint (``init_args["meddinov3_recipe"]``: nnU-Net saves and restores ``init_args`` itself),
    printed at the start of training, restored and checked by ``load_checkpoint`` (``--c``, ``--val``).

    A subclass may also set a recipe attribute the nnU-Net way, after ``super().__init__()`` (e.g.
    ``self.num_epochs = 3``, as nnU-Net's ``nnUNetTrainer_5epochs``): that value is the subclass's
    default, as if it were in its ``default_recipe`` (plans and override still win over it), recorded as
    ``trainer NAME (__init__)`` and kept by ``--c``. It is taken up before anything uses the recipe
    (``initialize``, ``load_checkpoint``)."""

    # The recipe this trainer takes: key -> its default here. Each key is a row of recipe.KEYS, which
    # names the attribute that holds the value; a variant extends its parent's mapping,
    # ``default_recipe = {**Parent.default_recipe, "epochs": 20}``.
    default_recipe: dict = recipe.defaults("epochs", "iterations", "val_iterations")
    # what a variant's name promises: key -> (test of the value, the promise, what to use instead)
    defining_recipe: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a class attribute named like a recipe attribute would be silently overwritten by the recipe
        misplaced = [name for name in cls.__dict__ if name in _RECIPE_ATTRIBUTES or name in _RETIRED_ATTRIBUTES]
        if misplaced:
            raise TypeError(f"{cls.__name__} sets {', '.join(misplaced)} as class attribute(s); a trainer declares "
                            f"its recipe as default_recipe = {{**{cls.__mro__[1].__name__}.default_recipe, "
                            f"'KEY': value}} (keys: {', '.join(recipe.KEYS)})")
        declared = cls.__dict__.get("default_recipe")
        if declared is not None:  # an unknown key or a bad value fails here, not in a run; table order
            where = f"{cls.__name__}.default_recipe"
            checked = {key: recipe.parse_value(key, value, where) for key, value in declared.items()}
            cls.default_recipe = {key: checked[key] for key in recipe.KEYS if key in checked}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.continue_training = bool(plans.get("continue_training", False))  # nnU-Net pops it
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.recipe_override = recipe.EnvironmentOverride(keys=self.default_recipe)
        self.recipe_plans_where = f"{self.plans_manager.plans_name}/{configuration}"
        self.recipe_block = recipe.parse_plans_block(
            self.configuration_manager.configuration.get(recipe.PLANS_KEY),
            f"the '{recipe.PLANS_KEY}' block of plans {self.recipe_plans_where}", self.default_recipe)
        self.recipe_set_in_init: dict = {}  # key -> (class default, value a subclass's __init__ set)
        self.recipe_settled = False
        values, sources = self.resolve_recipe(dict(self.default_recipe), {})
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
        return {key: getattr(self, recipe.KEYS[key].attribute) for key in self.default_recipe}

    def settle_recipe(self) -> None:
        """Take up the recipe attributes a subclass set after ``super().__init__()`` as its defaults."""
        if self.recipe_settled:
            return
        self.recipe_settled = True
        attributes, defaults = self.recipe_attributes(), dict(self.default_recipe)
        assigned = {k: v for k, v in attributes.items() if v != self.recipe_values[k]}
        if not assigned:
            return
        self.recipe_set_in_init = {k: (defaults[k], v) for k, v in assigned.items()}
        where = f"trainer {self.__class__.__name__} (__init__)"
        values, sources = self.resolve_recipe({**defaults, **assigned}, {k: where for k in assigned})
        self.set_recipe(values, sources)

    def initialize(self):
        self.settle_recipe()
        if self.device.type == "cpu":
            # nnUNetv2_train -device cpu asks for one thread per core, whose spin-waits then take the cores
            # from the augmentation workers: the free cores instead, or what OMP_NUM_THREADS says
            threads, why = choose_threads(get_allowed_n_proc_DA()) or (threads_set_by_user(), "OMP_NUM_THREADS")
            torch.set_num_threads(threads)
            self.print_to_log_file(f"CPU: {threads} torch thread(s): {why}")
        super().initialize()

    def apply_recipe(self, values: dict) -> None:
        """Each value onto the trainer attribute its row of ``recipe.KEYS`` names."""
        for key, value in values.items():
            setattr(self, recipe.KEYS[key].attribute, value)

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
        recorded_values, recorded_sources = stored.get("values", {}), stored.get("sources", {})
        conflicts, forced, predating = self.compare_with_recorded(recorded_values, recorded_sources)
        self.refuse_conflicts(conflicts, where)
        self.refuse_structural_changes(forced, where)
        values, sources = self.restored_recipe(recorded_values, recorded_sources, forced, predating)
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

    def compare_with_recorded(self, recorded_values: dict, recorded_sources: dict) -> tuple[list, dict, set]:
        """Key by key, the checkpoint's recipe against what holds now: (conflicts, changes the explicit
        override forces as key -> (recorded, new), keys recorded before ``__init__`` assignments were taken
        up). A key newer than the checkpoint is in none of them: its current value holds."""
        conflicts, forced, predating = [], {}, set()
        base_values, base_sources = self.recipe_base
        explicit, legacy = self.recipe_override.explicit, self.recipe_override.legacy
        for key in (k for k in self.default_recipe if k in recorded_values):
            old, old_source = recorded_values[key], recorded_sources.get(key, "?")
            if key in explicit:
                if explicit[key] != old:
                    forced[key] = (old, explicit[key])
            elif key in legacy:  # a legacy variable cannot change a recorded value
                variable, value = legacy[key]
                if value != old:
                    conflicts.append(RecipeConflict(key, old, old_source, value, f"{variable} (legacy)"))
            elif self.predates_init_assignment(key, old, old_source):
                predating.add(key)
            elif not recipe.is_override_source(old_source) and base_values[key] != old:
                conflicts.append(RecipeConflict(key, old, old_source, base_values[key], base_sources[key]))
        return conflicts, forced, predating

    def predates_init_assignment(self, key: str, old, old_source: str) -> bool:
        """Whether ``key`` was recorded as the class default by a version that did not yet take up the
        value a subclass's ``__init__`` assigns: that run used the assigned value, which therefore holds."""
        return (key in self.recipe_set_in_init and old_source == f"trainer {self.__class__.__name__}"
                and old == self.recipe_set_in_init[key][0])

    def refuse_conflicts(self, conflicts: list, where: str) -> None:
        if not conflicts:
            return
        said = recipe.format_assignments
        keep, change = said({c.key: c.recorded for c in conflicts}), said({c.key: c.now for c in conflicts})
        lines = "\n".join(f"  {c.key}: checkpoint {said({c.key: c.recorded})} ({c.recorded_source}), "
                          f"now {said({c.key: c.now})} ({c.now_source})" for c in conflicts)
        raise RecipeError(
            f"{self.__class__.__name__}: the recipe recorded in {where} differs from what the plans and the "
            f"environment say now:\n{lines}\nA resumed run keeps its recipe. To resume it unchanged, restore the "
            f"plans / unset the variables (or set {recipe.OVERRIDE_ENV}='{keep}'); to change it on purpose "
            f"(recorded in the checkpoint and the log), set {recipe.OVERRIDE_ENV}='{change}'; or start a new "
            f"training under a plans name of its own (meddinov3 plan_and_preprocess --plans-name ... --recipe ...).")

    def refuse_structural_changes(self, forced: dict, where: str) -> None:
        structural = sorted(set(forced) & recipe.STRUCTURAL_KEYS)
        if structural:
            raise RecipeError(
                f"{self.__class__.__name__}: {', '.join(structural)} cannot change in a resumed run ({where}): it "
                f"decides which parameters the optimizer trains. Drop it from {recipe.OVERRIDE_ENV}, or start a new "
                f"training under a plans name of its own (meddinov3 plan_and_preprocess --plans-name ... --recipe ...).")

    def restored_recipe(self, recorded_values: dict, recorded_sources: dict, forced: dict,
                        predating: set) -> tuple[dict, dict]:
        """(values, sources) as recorded, but the current ones for keys the checkpoint lacks or that
        predate an ``__init__`` assignment, and the forced changes on top."""
        values, sources = dict(self.recipe_values), dict(self.recipe_sources)
        for key in self.default_recipe:
            if key in recorded_values and key not in predating:
                values[key] = recorded_values[key]
                sources[key] = recorded_sources.get(key, sources[key])
        for key, (_, new) in forced.items():
            values[key], sources[key] = new, recipe.OVERRIDE_ENV
        return values, sources
