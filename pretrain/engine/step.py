"""One optimiser step of pretraining.

The teacher sees the global crops; the student sees the masked global crops and the local crops;
DINO (CLS, global and local terms), iBOT (masked patches), KoLeo (student CLS) and, when on, the
Gram loss (student patches vs a frozen Gram teacher) are summed with the recipe's weights;
gradients are accumulated to the target global batch, clipped per sub-network, and AdamW steps;
the teacher follows by EMA.
"""

from __future__ import annotations

import math
import time

import torch

from ..model import copy_teacher_into_gram, gram_teacher_patch_features, update_ema
from ..optim import apply_schedules, clip_gradients
from .distributed import autocast, gradient_sync
from .monitors import collapse_statistics
from .objective import compute_losses
from .teacher_targets import GLOBAL_BATCH, centred_targets, teacher_pass


class TrainingStep:
    """The per-iteration half of :class:`~pretrain.engine.loop.Trainer`, on the state
    :class:`~pretrain.engine.stage_state.StageState` built (networks, optimiser, schedules, losses) and
    its ``stop`` guard, whose request every rank learns at the end of the step."""

    def _micro_step(self, batch: dict, targets: dict, sched: dict, iteration: int,
                    sync: bool) -> dict[str, torch.Tensor]:
        """The student's forward and backward on one micro-batch against the teacher's centred targets."""
        cfg, device = self.config, self.context.device
        crops_global, masks, mask_indices = batch["global_crops"], batch["masks"], batch["mask_indices"]
        with gradient_sync(self.student_forward, sync):
            with autocast(device, cfg.train.precision):  # the networks in bf16 on CUDA ...
                # distillation: the student sees the global crops unmasked (Meta's MultiDistillationMetaArch);
                # iBOT compares its patches at the masked positions with the teacher's
                student_masks = None if self.distill_teacher is not None else masks
                student = self.student_forward(crops_global, batch["local_crops"], student_masks, mask_indices)
                gram_target = None
                if self.gram_teacher is not None:
                    grid = tuple(s // self.student.encoder.patch_size for s in crops_global.shape[-2:])
                    gram_target = gram_teacher_patch_features(self.gram_teacher, batch["gram_teacher_crops"], grid)
            # ... the losses in fp32 (see compute_losses)
            total, terms = compute_losses(self.losses, cfg, sched, student, targets, gram_target, masks,
                                          batch["masks_weight"])
            if self._inject_nan(iteration):
                total = total * float("nan")
            (total / self.accumulation).backward()
        terms["total_loss"] = total
        return {k: v.detach().float() for k, v in terms.items()}

    def _teacher_targets(self, batches: list[dict], sched: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """The teacher over every micro-batch, then one centring over all of them (teacher_targets.py),
        and the collapse statistics of the whole (per-rank) batch."""
        device = self.context.device
        with autocast(device, self.config.train.precision):
            source = self.teacher if self.distill_teacher is None else self.distill_teacher
            passes = [teacher_pass(source, b["global_crops"], b["mask_indices"]) for b in batches]
        temp = sched["teacher_temp"]
        # the iBOT head's from the first micro-batch's masked patches: over a whole ViT-B/16 global
        # batch their float32 softmax alone would be several GB, for a monitor that needs an estimate
        stats = collapse_statistics(torch.cat([p.cls for p in passes]), torch.cat([p.dino_logits for p in passes]),
                                    temp, passes[0].ibot_logits)
        targets = centred_targets(passes, temp, self.config.loss.sinkhorn_iterations)
        return targets, {k: v.detach().float() for k, v in stats.items()}

    def _inject_nan(self, iteration: int) -> bool:
        start = self.config.debug.inject_nan_at_iteration
        return start is not None and start <= iteration < start + self.config.debug.inject_nan_iterations

    def train_iteration(self, iteration: int, batches) -> dict:
        """One optimiser step over ``accumulation`` micro-batches; returns all-reduced metrics."""
        cfg = self.config
        sched = self.schedules.at(iteration)
        backbone_factor = self.head_warmup.backbone_factor(iteration)
        apply_schedules(self.optimizer, sched["lr"], sched["weight_decay"], bool(sched["last_layer_frozen"]),
                        backbone_factor)
        refresh = cfg.gram.refresh_every
        if self.gram_teacher is not None and refresh > 0 and iteration > 0 and iteration % refresh == 0:
            copy_teacher_into_gram(self.gram_teacher, self.teacher)
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        tick = time.perf_counter()
        micro_batches = [next(batches) for _ in range(self.accumulation)]
        data_seconds = time.perf_counter() - tick  # > 0 when the loader cannot keep up
        device = self.context.device
        micro_batches = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                          for k, v in b.items()} for b in micro_batches]
        sums: dict[str, torch.Tensor] = {}
        whole = cfg.loss.centre_over == GLOBAL_BATCH
        if whole:  # the statistics of the whole batch, not a mean over micro-batches
            targets, sums = self._teacher_targets(micro_batches, sched)
        for micro, batch in enumerate(micro_batches):
            if whole:
                target = targets[micro]
            else:  # one micro-batch's teacher logits at a time: the memory of the old per-micro step
                (target,), stats = self._teacher_targets([batch], sched)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0) + v / self.accumulation
            for k, v in self._micro_step(batch, target, sched, iteration,
                                         sync=micro == self.accumulation - 1).items():
                sums[k] = sums.get(k, 0) + v / self.accumulation
        keys = sorted(sums)
        stop_flag = torch.tensor(float(self.stop.requested is not None), device=sums[keys[0]].device)
        vector = torch.stack([sums[k] for k in keys] + [stop_flag])
        vector = self.context.all_reduce_mean(vector).tolist()
        metrics = dict(zip(keys, vector[:-1]))
        stop_requested = vector[-1] > 0

        norms = clip_gradients(self.student, cfg.optim.clip_grad)
        finite = math.isfinite(metrics["total_loss"]) and all(math.isfinite(n) for n in norms.values())
        if finite:
            self.optimizer.step()
            update_ema(self.teacher, self.student, sched["momentum"])
        self.optimizer.zero_grad(set_to_none=True)
        metrics.update({f"grad_norm_{k}": v for k, v in norms.items()})
        metrics.update({k: v for k, v in sched.items() if k != "last_layer_frozen"})
        metrics.update(backbone_lr_factor=backbone_factor, finite=finite, stop_requested=stop_requested,
                       global_crop_size=int(batch["global_crops"].shape[-1]), data_seconds=data_seconds)
        return metrics
