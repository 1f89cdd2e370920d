"""Linear-probe curves while pretraining (config ``eval``): the EMA teacher, probed every ``eval.every``
iterations as ``meddinov3 probe`` does, logged as ``probe_dice`` (and per class) to metrics.jsonl.

The probe's validation cases must not be pretraining images: a probe scored on images the encoder was
pretrained on would flatter it. That overlap is refused before the first step.
"""

from __future__ import annotations

import torch

from nnunet_meddinov3.evaluation.probe import ProbeError, load_slices, preprocessed_split, probe_encoders

from ..configs.schema import ConfigError, EvalConfig


class ProbeCurve:
    def __init__(self, config: EvalConfig, pretraining_case_ids: set[str]):
        self.config = config
        try:
            split = preprocessed_split(config.dataset, config.configuration, config.plans, config.fold)
        except ProbeError as e:
            raise ConfigError(f"eval.dataset: {e}") from None
        overlap = sorted(set(split.val) & set(pretraining_case_ids))
        if overlap:
            shown = ", ".join(overlap[:8]) + (f" and {len(overlap) - 8} more" if len(overlap) > 8 else "")
            raise ConfigError(
                f"eval: the probe's validation cases {shown} (fold {config.fold} of {config.dataset}) are in the "
                "pretraining data, so the probe would score images the encoder was pretrained on. Exclude them "
                f"from pretraining: data.exclude_case_ids=[{', '.join(overlap)}], or "
                f"data.exclude_validation_of=[PATH/splits_final.json:{config.fold}] once nnU-Net has written the split")
        self.train = load_slices(split.folder, split.train, split.class_names, config.max_slices)
        self.val = load_slices(split.folder, split.val, split.class_names)

    def __call__(self, encoder) -> dict[str, float]:
        # the probe's own seeding must not move the training's random streams (bit-exact resume)
        with torch.random.fork_rng(devices=[]):
            result = probe_encoders({"teacher": encoder}, self.train, self.val, steps=self.config.steps)["teacher"]
        dice = result["dice"]
        return {"probe_dice": dice["mean"], **{f"probe_dice_{name}": v for name, v in dice["per_class"].items()}}
