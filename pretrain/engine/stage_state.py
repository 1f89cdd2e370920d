"""A stage's state: built at the start (fresh, from released weights or an earlier stage, or restored
from this run's newest readable checkpoint) and written to a checkpoint, collectively."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from nnunet_meddinov3.durable_files import write_atomically

from ..configs import ConfigError
from ..configs.schema import DISTILLATION
from ..losses import koleo_group
from ..model import build_gram_teacher, build_student_and_teacher, copy_teacher_into_gram, load_released_weights
from ..optim import Schedules, build_optimizer
from . import checkpoint as ckpt
from .data import build_slice_dataset
from .distill_teacher import load_teacher
from .distributed import shard_inference_model, wrap_student
from .head_warmup import HeadWarmup
from .monitors import CollapseMonitor
from .objective import build_losses
from .probe_curve import ProbeCurve
from .resume import changed_settings, seed_process, starting_state
from .run_record import CONFIG_FILE

logger = logging.getLogger(__name__)


class StageState:
    """The setup and checkpoint half of :class:`~pretrain.engine.loop.Trainer`: reads ``config``, ``run_dir``,
    ``context``, ``resume`` and ``cache_dir``, and builds the networks, optimiser, schedules, data and
    guards the training step uses."""

    def setup(self) -> None:
        cfg, ctx = self.config, self.context
        ctx.use_free_cpu_threads(cfg.data.num_workers)
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
        # distillation: a frozen teacher gives the targets; self.teacher stays the student's EMA (Meta's model_ema)
        distilled = load_teacher(cfg) if cfg.stage == DISTILLATION else None
        self.distill_teacher = distilled.network if distilled is not None else None
        if state is None:
            self._initialise_weights()
            if distilled is not None:
                self.provenance["teacher"] = distilled.record
                self.provenance["licence"] = distilled.licence or self.provenance["licence"]

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
        if self.distill_teacher is not None:
            self.distill_teacher.to(device)
            if device.type == "cuda" and cfg.train.precision != "fp32":  # bf16 parameters under bf16 autocast, as
                for p in self.distill_teacher.parameters():  # Meta's inference-only models; buffers (RoPE) kept
                    p.data = p.data.to(torch.bfloat16)
            shard_inference_model(self.distill_teacher, ctx, cfg.train.parallel)
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
            write_atomically(self.run_dir / CONFIG_FILE, lambda f: f.write(text.encode()))

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
            **({"teacher": cfg.distill.teacher, "teacher_heads": cfg.distill.teacher_heads}
               if cfg.stage == DISTILLATION else {}),
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
            ckpt.save_checkpoint_file(state, path, delay_s=self.config.debug.checkpoint_write_delay_s)
            ckpt.prune_checkpoints(self.run_dir, self.config.train.keep_last, self.config.train.keep_every)
        self.context.barrier()
        return path
