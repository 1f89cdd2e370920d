"""``python -m pretrain distill``: a frozen teacher teaches a smaller student, Meta's multi-distillation step.

The stage is the pretraining :class:`~pretrain.engine.loop.Trainer` with ``stage: distillation``
(pretrain/configs/schema.py ``DistillConfig``): the targets come from the frozen teacher
(pretrain/engine/distill_teacher.py) instead of the EMA teacher, the student sees its global crops unmasked, and
the objective is the same DINO (global and local crops) + iBOT (the masked positions) + KoLeo with
Sinkhorn-Knopp centring over the global batch as in Meta's ``MultiDistillationMetaArch``. The EMA of the
student (Meta's ``model_ema``) still follows the student and is what is exported; the teacher never changes.

A teacher file without DINO/iBOT heads (an export, Meta's hub weights) first gets heads trained on its
frozen backbone: a pretraining run in ``RUN/teacher_heads/`` of ``head_warmup.iterations`` iterations with
the backbone's LR held at 0 (the continued-pretraining head warm-up, pretrain/engine/head_warmup.py), whose
last checkpoint's (EMA) heads the teacher then takes (``distill.teacher_heads``).
"""

from __future__ import annotations

from pathlib import Path

from ..configs import ConfigError, PretrainConfig, config_from_dict
from . import checkpoint as ckpt
from .distill_teacher import load_teacher
from .distributed import DistributedContext, init_distributed, shutdown_distributed
from .loop import train
from .run_record import FINISHED, RunResult, read_run_status

HEADS_RUN = "teacher_heads"  # the head warm-up run's folder inside the distillation run


def head_warmup_config(config: PretrainConfig, teacher_model, source: str) -> PretrainConfig:
    """The head warm-up run: the teacher's backbone (``init.weights``) frozen for the whole run, new heads."""
    if teacher_model.encoder is None:
        raise ConfigError(f"the teacher '{source}' has no DINO/iBOT heads and an architecture no named encoder "
                          "config has, which a head warm-up run needs; name its layout with distill.teacher_encoder")
    plain = config.to_dict()
    iterations = config.head_warmup.iterations
    plain.update(name=f"{config.name}_teacher_heads", stage="self_distillation", init={"weights": source})
    plain["model"] = dict(plain["model"], encoder=teacher_model.encoder, drop_path_rate=0.0,
                          layer_scale_init=None, rope_rescale_coords=None)
    plain["distill"] = {"teacher": None, "teacher_encoder": None, "teacher_heads": None}
    # unfrozen only at the end: the backbone never moves
    plain["head_warmup"] = dict(plain["head_warmup"], enabled="on", plateau_window=0)
    plain["train"] = dict(plain["train"], iterations=iterations, max_iterations=None)
    plain["optim"] = dict(plain["optim"], warmup_iterations=min(config.optim.warmup_iterations, iterations // 10),
                          freeze_last_layer_iterations=min(config.optim.freeze_last_layer_iterations, iterations // 10))
    plain["eval"] = dict(plain["eval"], dataset=None)
    return config_from_dict(plain)


def distill(config: PretrainConfig, run_dir: str | Path, resume: bool = False,
            context: DistributedContext | None = None, cache_dir: str | Path | None = None) -> RunResult:
    """Run (or resume) a distillation stage in ``run_dir``, its teacher's head warm-up first if needed."""
    own_context = context is None
    context = context or init_distributed(config.train.distributed_timeout_minutes)
    run_dir = Path(run_dir)
    cache_dir = cache_dir or config.data.cache_dir or run_dir.resolve() / "slice_cache"
    try:
        if not config.distill.teacher_heads:
            teacher = load_teacher(config)  # its checks fail here, before any run starts
            if not teacher.heads_loaded:
                heads_dir = run_dir / HEADS_RUN
                status = read_run_status(heads_dir)
                if not (status and status["status"] == FINISHED):
                    warmup = head_warmup_config(config, teacher.model, config.distill.teacher)
                    result = train(warmup, heads_dir, resume=resume, context=context, cache_dir=cache_dir)
                    if result.status != FINISHED:
                        return result
                plain = config.to_dict()
                plain["distill"]["teacher_heads"] = str(ckpt.latest_checkpoint(heads_dir).resolve())
                config = config_from_dict(plain)
        return train(config, run_dir, resume=resume, context=context, cache_dir=cache_dir)
    finally:
        if own_context:
            shutdown_distributed(context)


__all__ = ["HEADS_RUN", "distill", "head_warmup_config"]
