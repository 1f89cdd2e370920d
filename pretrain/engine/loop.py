"""One pretraining stage: setup, the training step, checkpoints, guards.

Each iteration: the teacher sees the global crops; the student sees the masked global crops and
the local crops; DINO (CLS, global and local terms), iBOT (masked patches), KoLeo (student CLS)
and, when on, the Gram loss (student patches vs a frozen Gram teacher) are summed with the
recipe's weights; gradients are accumulated to the target global batch, clipped per
sub-network, and AdamW steps; the teacher follows by EMA.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..configs import ConfigError, PretrainConfig, config_from_dict
from ..losses import koleo_group
from ..model import (
    build_gram_teacher,
    build_student_and_teacher,
    copy_teacher_into_gram,
    gram_teacher_patch_features,
    load_released_weights,
    update_ema,
)
from ..optim import Schedules, apply_schedules, build_optimizer, clip_gradients
from ..data.atomic_files import replace_file
from . import checkpoint as ckpt
from .data import build_loader, build_slice_dataset
from .distributed import (
    DistributedContext,
    autocast,
    gradient_sync,
    init_distributed,
    peak_memory_gib,
    shard_inference_model,
    shutdown_distributed,
    wrap_student,
)
from .head_warmup import HeadWarmup
from .monitors import CollapseMonitor, collapse_statistics
from .objective import build_losses, compute_losses
from .probe_curve import ProbeCurve
from .progress import ProgressReporter
from .resume import changed_settings, seed_process, starting_state
from .signals import StopRequests
from .teacher_targets import GLOBAL_BATCH, centred_targets, teacher_pass

logger = logging.getLogger(__name__)

FINISHED = "finished"  # reached train.iterations
PAUSED = "paused"  # stopped early by train.max_iterations or a signal, with a checkpoint to resume from
STOPPED_NONFINITE = "stopped_nonfinite"
STOPPED_COLLAPSE = "stopped_collapse"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"


@dataclass
class RunResult:
    run_dir: Path
    status: str
    iteration: int
    checkpoint: Path | None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (FINISHED, PAUSED)


def read_run_status(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class Trainer:
    """Runs one stage in ``run_dir``; ``resume`` continues from its latest checkpoint if it has one."""

    def __init__(self, config: PretrainConfig, run_dir: str | Path, context: DistributedContext, resume: bool = False,
                 cache_dir: str | Path | None = None):
        self.config = config
        self.run_dir = Path(run_dir).resolve()
        self.context = context
        self.resume = resume
        self.cache_dir = Path(cache_dir or config.data.cache_dir or self.run_dir / "slice_cache")
        self.stop = StopRequests()

    # --- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, ctx = self.config, self.context
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_from, state = starting_state(self.run_dir, self.resume, ctx.is_main)
        if state is not None:
            self._warn_config_changes(state["config"])

        # the same initial weights on every rank; per-rank randomness (drop path) after the build
        torch.manual_seed(cfg.train.seed)
        self.student, self.teacher = build_student_and_teacher(cfg.model)
        self.depth = self.student.encoder.depth
        self.gram_teacher = build_gram_teacher(cfg.model) if cfg.gram.enabled else None
        self.provenance = {"init": {"kind": "scratch"}, "licence": None}
        self.history: list[dict] = []
        if state is None:
            self._initialise_weights()

        # per-process randomness (drop path) must differ between ranks; a resume restores it below
        seed_process(cfg.train.seed, ctx.rank)

        self.slices = self._build_slices()
        world = ctx.world_size
        global_batch = cfg.optim.global_batch_size or cfg.data.batch_size * world
        if global_batch % (cfg.data.batch_size * world):
            raise ConfigError(f"optim.global_batch_size {global_batch} is not a multiple of data.batch_size "
                             f"{cfg.data.batch_size} x {world} processes")
        if cfg.loss.koleo_group_size is not None:
            try:  # checked now rather than at the first step, on every rank
                koleo_group(cfg.loss.koleo_group_size, cfg.data.batch_size, world)
            except ValueError as e:
                raise ConfigError(f"loss.koleo_group_size: {e} (data.batch_size x {world} processes)") from None
        self.global_batch = global_batch
        self.accumulation = global_batch // (cfg.data.batch_size * world)
        self.schedules = Schedules(cfg, global_batch)

        device = ctx.device
        for module in (self.student, self.teacher, self.gram_teacher):
            if module is not None:
                module.to(device)
        shard_inference_model(self.teacher, ctx, cfg.train.parallel)
        if self.gram_teacher is not None:
            shard_inference_model(self.gram_teacher, ctx, cfg.train.parallel)
        self.student_forward = wrap_student(self.student, ctx, cfg.train.parallel)
        self.optimizer = build_optimizer(self.student, cfg.optim, self.depth)

        warmup_mode = cfg.head_warmup.enabled
        active = warmup_mode == "on" or (warmup_mode == "auto" and self.provenance["init"]["kind"] == "weights"
                                         and not self.provenance["init"].get("heads_loaded", False))
        self.head_warmup = HeadWarmup(cfg.head_warmup, active)
        self.monitor = CollapseMonitor.for_config(cfg)
        self.nonfinite_streak = 0
        self.nonfinite_iterations: list[int] = []
        self.start_iteration = 0
        if state is not None:
            self._load_state(state)
        self.resumed_from = resume_from

        self.losses = build_losses(cfg)
        self.probe = self._build_probe()
        if ctx.is_main:
            text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            replace_file(self.run_dir / CONFIG_FILE, lambda f: f.write(text.encode()))

    def _build_slices(self):
        # every rank builds its share of what the cache lacks and waits for the others' (no collective,
        # so no timeout, however long the build); then all hold the same index
        ctx = self.context
        slices = build_slice_dataset(self.config, self.cache_dir, ctx.rank, ctx.world_size)
        manifests = ctx.all_gather_object(slices.manifest_sha256)
        if len(set(manifests)) > 1:
            raise RuntimeError(f"the processes see different data (manifests {sorted(set(manifests))}): the data "
                               "roots and the cache folder must be the same files on every node")
        slices.require_slices()  # on every rank alike
        return slices

    def _build_probe(self) -> ProbeCurve | None:
        """The main process's probe (config ``eval``); its leakage check fails every rank alike."""
        if self.config.eval.dataset is None:
            return None
        probe, error = None, None
        if self.context.is_main:
            try:
                probe = ProbeCurve(self.config.eval, {v["case_id"] for v in self.slices.volumes})
            except ConfigError as e:
                error = str(e)
        error = self.context.broadcast_object(error)
        if error:
            raise ConfigError(error)
        return probe

    def _initialise_weights(self) -> None:
        cfg = self.config
        if cfg.init.checkpoint:
            state = ckpt.read_training_checkpoint(cfg.init.checkpoint)
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            previous = dict(state["stage_record"], iterations=state["iteration"])
            self.history = list(state["history"]) + [previous]
            self.provenance = {
                "init": {"kind": "checkpoint", "path": state["path"], "heads_loaded": True},
                "licence": state["provenance"].get("licence"),
                "start_weights": state["provenance"].get("start_weights"),
            }
        elif cfg.init.weights:
            info = load_released_weights(self.student, cfg.init.weights)
            self.teacher.load_state_dict(self.student.state_dict())
            self.history = list(info.pop("stages", []))
            self.provenance = {"init": {"kind": "weights", **info}, "licence": info["licence"],
                               "start_weights": {k: info[k] for k in ("source", "layout")}}
        if self.gram_teacher is not None:
            self._initialise_gram_teacher()

    def _initialise_gram_teacher(self) -> None:
        source = self.config.gram.teacher
        if source == "ema":
            copy_teacher_into_gram(self.gram_teacher, self.teacher)
            self.gram_source = "EMA teacher at the stage start"
        elif source.startswith("previous"):
            raise ConfigError(f"gram.teacher '{source}' refers to the previous stage of a chain; for a single "
                             "stage give a checkpoint path (gram.teacher=RUN/checkpoints/checkpoint_N.pt) or 'ema'")
        else:
            ckpt.load_gram_teacher(self.gram_teacher, source)
            self.gram_source = str(source)

    def _warn_config_changes(self, saved: dict) -> None:
        changed = changed_settings(self.config.to_dict(), saved)
        if changed and self.context.is_main:
            logger.warning("resuming with a config that differs from the checkpoint's in %s; the run will not "
                           "reproduce an uninterrupted one", ", ".join(changed))

    def _load_state(self, state: dict) -> None:
        ckpt.load_model_state(self.student, state["student"])
        ckpt.load_model_state(self.teacher, state["teacher"])
        if self.gram_teacher is not None:
            if state.get("gram_teacher") is None:
                raise ValueError("the checkpoint has no Gram teacher but gram.enabled is true")
            ckpt.load_model_state(self.gram_teacher, state["gram_teacher"])
        ckpt.load_optimizer_state(self.student, self.optimizer, state["optimizer"])
        self.start_iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.provenance = dict(state["provenance"])
        self.gram_source = state["stage_record"].get("gram_teacher")
        self.head_warmup.load_state_dict(state["head_warmup"])
        self.monitor.load_state_dict(state["monitor"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        rng = state["rng"]
        if len(rng) == self.context.world_size:
            ckpt.restore_rng_state(rng[self.context.rank])
        elif self.context.is_main:
            logger.warning("the checkpoint was written by %d processes, this run has %d; RNG states are re-seeded "
                           "(not bit-exact)", len(rng), self.context.world_size)

    # --- checkpoints -----------------------------------------------------------------------------

    def stage_record(self, iteration: int) -> dict:
        cfg = self.config
        return {
            "name": cfg.name, "stage": cfg.stage, "iterations": iteration, "planned_iterations": cfg.train.iterations,
            "encoder": cfg.model.encoder, "global_batch_size": self.global_batch,
            "global_crop_sizes": list(cfg.crops.global_sizes), "local_crop_sizes": list(cfg.crops.local_sizes),
            "gram_teacher": getattr(self, "gram_source", None) if cfg.gram.enabled else None,
            "gram_teacher_refresh_every": cfg.gram.refresh_every if cfg.gram.enabled else None,
            "data_manifest_sha256": self.slices.manifest_sha256, "n_slices": len(self.slices),
            "excluded_volumes": len(self.slices.excluded),
        }

    def save(self, iteration: int) -> Path:
        """Collective: every rank contributes (FSDP2 gathers shards, RNG states are per rank)."""
        rng = self.context.all_gather_object(ckpt.capture_rng_state())
        path = ckpt.checkpoint_path(self.run_dir, iteration)
        if not (self.context.is_main or self.config.train.parallel == "fsdp"):
            self.context.barrier()  # DDP replicas hold the same weights as rank 0: nothing to gather
            return path
        state = {
            "format": ckpt.CHECKPOINT_FORMAT,
            "iteration": iteration,
            "student": ckpt.model_state(self.student),
            "teacher": ckpt.model_state(self.teacher),
            "gram_teacher": ckpt.model_state(self.gram_teacher) if self.gram_teacher is not None else None,
            "optimizer": ckpt.optimizer_state(self.student, self.optimizer),
            "rng": rng,
            "head_warmup": self.head_warmup.state_dict(),
            "monitor": self.monitor.state_dict(),
            "nonfinite_streak": self.nonfinite_streak,
            "config": self.config.to_dict(),
            "stage_record": self.stage_record(iteration),
            "history": self.history,
            "provenance": self.provenance,
            "intensity": dict(self.config.data.intensity),
        }
        if self.context.is_main:
            ckpt.write_atomic(state, path, delay_s=self.config.debug.checkpoint_write_delay_s)
            ckpt.prune_checkpoints(self.run_dir, self.config.train.keep_last, self.config.train.keep_every)
        self.context.barrier()
        return path

    # --- the training step ----------------------------------------------------------------------------

    def _micro_step(self, batch: dict, targets: dict, sched: dict, iteration: int,
                    sync: bool) -> dict[str, torch.Tensor]:
        """The student's forward and backward on one micro-batch against the teacher's centred targets."""
        cfg, device = self.config, self.context.device
        crops_global, masks, mask_indices = batch["global_crops"], batch["masks"], batch["mask_indices"]
        with gradient_sync(self.student_forward, sync):
            with autocast(device, cfg.train.precision):  # the networks in bf16 on CUDA ...
                student = self.student_forward(crops_global, batch["local_crops"], masks, mask_indices)
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
            passes = [teacher_pass(self.teacher, b["global_crops"], b["mask_indices"]) for b in batches]
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
        stop_flag = torch.tensor(float(self.stop.requested), device=sums[keys[0]].device)
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

    # --- the run --------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg, ctx = self.config, self.context
        total = cfg.train.iterations
        stop = min(total, cfg.train.max_iterations or total)
        start = self.start_iteration
        progress = ProgressReporter(self.run_dir, total, start, ctx.is_main, cfg.train.progress_bar)
        if self.resumed_from is not None:
            progress.message(f"resuming {self.run_dir.name} from {self.resumed_from.name} (iteration {start})")
        if start >= stop:
            progress.close()
            status = FINISHED if start >= total else PAUSED
            return self._finish(status, start, self.resumed_from, "nothing to do: already at iteration "
                                f"{start}", progress)
        loader = build_loader(cfg, self.slices, ctx.rank, ctx.world_size, self.accumulation, start, stop,
                              pin_memory=ctx.device.type == "cuda", patch_size=self.student.encoder.patch_size)
        batches = iter(loader)
        last_saved = self.resumed_from
        window_time, window_iterations = 0.0, 0
        with self.stop:
            for iteration in range(start, stop):
                tick = time.perf_counter()
                metrics = self.train_iteration(iteration, batches)
                done = iteration + 1
                probed = self.probe is not None and done % cfg.eval.every == 0
                if probed:
                    metrics.update(self.probe(self.teacher.encoder))
                elapsed = time.perf_counter() - tick
                window_time += elapsed
                window_iterations += 1
                if metrics["finite"]:
                    self.nonfinite_streak = 0
                    message = self.head_warmup.observe(iteration, metrics["dino_loss"])
                    if message:
                        progress.message(message)
                else:
                    self.nonfinite_streak += 1
                    self.nonfinite_iterations.append(done)
                progress.step(metrics)
                if done % cfg.train.log_every == 0 or not metrics["finite"] or done == stop or probed:
                    progress.log({"iteration": done, **metrics,
                                  "images_per_s": self.global_batch * window_iterations / max(window_time, 1e-9),
                                  "memory_gib": peak_memory_gib(ctx.device), "seconds": elapsed})
                    window_time, window_iterations = 0.0, 0

                if self.nonfinite_streak >= cfg.monitor.nonfinite_patience:
                    bad = self.nonfinite_iterations[-self.nonfinite_streak:]
                    message = (f"stopping: the loss was not finite for {self.nonfinite_streak} consecutive iterations "
                               f"({bad[0]}-{bad[-1]}); no optimiser step was taken on them. The last good "
                               f"checkpoint is {last_saved or 'none (no checkpoint was written yet)'}. Lower optim.lr, "
                               "raise the warm-up, or check the data")
                    return self._finish(STOPPED_NONFINITE, done, last_saved, message, progress)
                collapse = self.monitor.update(iteration, metrics) if metrics["finite"] else None
                if collapse:
                    # the weights are finite and may still be of use (export, probe): keep them
                    last_saved = self.save(done)
                    message = (f"stopping: {collapse}. Saved {last_saved}: export or probe it as it is, or continue "
                               "with --resume and that monitor's threshold set to null")
                    return self._finish(STOPPED_COLLAPSE, done, last_saved, message, progress)

                periodic = cfg.train.checkpoint_every > 0 and done % cfg.train.checkpoint_every == 0
                # a checkpoint written during a non-finite streak would not be a "good" one
                if (periodic or done == stop or metrics["stop_requested"]) and self.nonfinite_streak == 0:
                    last_saved = self.save(done)
                    if done < stop and not metrics["stop_requested"]:
                        progress.plot()  # at the end of the run _finish draws it
                if metrics["stop_requested"]:
                    return self._finish(PAUSED, done, last_saved, f"stopped by {self.stop.signal_name or 'a signal'} "
                                        "after a checkpoint; resume with --resume", progress)
            status = FINISHED if stop == total else PAUSED
            message = "done" if status == FINISHED else f"paused at train.max_iterations={stop}; resume with --resume"
            return self._finish(status, stop, last_saved, message, progress)

    def _finish(self, status: str, iteration: int, checkpoint: Path | None, message: str,
                progress: ProgressReporter) -> RunResult:
        progress.plot()
        progress.message(f"[{self.config.name}] {status} at iteration {iteration}: {message}")
        progress.close()
        if self.context.is_main:
            record = {"status": status, "iteration": iteration, "message": message,
                      "checkpoint": str(checkpoint) if checkpoint else None, "config": self.config.name,
                      "stage": self.config.stage, "global_batch_size": self.global_batch,
                      "processes": self.context.world_size, "accumulation": self.accumulation}
            replace_file(self.run_dir / RUN_FILE, lambda f: f.write(json.dumps(record, indent=1).encode()))
        self.context.barrier()
        return RunResult(self.run_dir, status, iteration, Path(checkpoint) if checkpoint else None, message)


def train(config: PretrainConfig | dict, run_dir: str | Path, resume: bool = False,
          context: DistributedContext | None = None, cache_dir: str | Path | None = None) -> RunResult:
    """Run (or resume) one stage; joins/leaves the torchrun process group unless ``context`` is given."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    own_context = context is None
    context = context or init_distributed(config.train.distributed_timeout_minutes)
    try:
        trainer = Trainer(config, run_dir, context, resume=resume, cache_dir=cache_dir)
        trainer.setup()
        return trainer.run()
    finally:
        if own_context:
            shutdown_distributed(context)


__all__ = ["FINISHED", "PAUSED", "STOPPED_COLLAPSE", "STOPPED_NONFINITE", "RunResult", "Trainer", "read_run_status",
           "train"]
