"""Measurement, worker side: peak memory, step times and FLOPs of one configuration, in its own process.

What one step is, for each network as its trainer runs it:

- training: ``zero_grad``, forward, the loss, backward, ``clip_grad_norm_(12)``, optimiser step,
  ``loss.item()``: the step of nnU-Net's ``nnUNetTrainer.train_step`` (which our trainer keeps),
  run the same way for all three networks so that they are timed alike. The nnU-Net network trains
  with deep supervision against targets made once outside the timing, as nnU-Net's data loader
  makes them; the other two have one output.
- inference: ``eval()``, ``torch.no_grad()`` forward; the nnU-Net network without deep
  supervision, as nnU-Net's predictor builds it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import statistics
import sys
import time
from typing import Callable

import torch
from torch.utils import flop_counter

from nnunet_meddinov3.benchmark.baseline import NNUNetParts, plan_2d, plan_3d
from nnunet_meddinov3.benchmark.configs import OURS, BenchConfig
from nnunet_meddinov3.benchmark.factories import CompiledBlocks, build_network, build_optimizer
from nnunet_meddinov3.benchmark.reference import REFERENCE_EFFECTIVE_DTYPE_CUDA, import_reference
from nnunet_meddinov3.network.volumetric import MedDINOv3Net3D

GRAD_CLIP_NORM = 12.0  # nnUNetTrainer.train_step: clip_grad_norm_(..., 12)


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """Peak memory of a phase: CUDA allocator peak, or CPU peak-RSS growth since ``start()``."""

    def __init__(self, device):
        self.device = device
        self.rss_start = 0

    def start(self) -> None:
        if self.device.type == "cpu":
            current = _current_rss_bytes()
            self.rss_start = current if current is not None else _peak_rss_bytes()

    def new_phase(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _peak_rss_bytes() - self.rss_start)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device, warmup: int, repeats: int,
               after_warmup: Callable[[], object] | None = None) -> list[float]:
    for _ in range(warmup):
        step()
    synchronize(device)
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions and attention; not elementwise ops)."""
    # The CPU fused attention kernels have no registered formula; give them the SDPA ones.
    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    cpu_sdpa_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v)
    if cpu_sdpa_backward is not None:
        custom[cpu_sdpa_backward] = (lambda g, q, k, v, *a, out_shape=None, **kw:
                                     flop_counter.sdpa_backward_flop_count(g, q, k, v))
    with flop_counter.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        step()
    return int(counter.get_total_flops())


PROFILE_TOP = 15


def profile_step(step: Callable[[], object], device) -> dict:
    """One call of ``step`` under torch.profiler: the ``PROFILE_TOP`` entries with the most self time
    (on CUDA the device time, so the kernels; on CPU the aten ops' CPU time), and the total."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    attribute = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attribute) > 0]
    events.sort(key=lambda e: getattr(e, attribute), reverse=True)
    return {"clock": "device" if on_cuda else "cpu",
            "total_self_ms": sum(getattr(e, attribute) for e in events) / 1e3,
            "top": [{"name": e.key, "self_ms": getattr(e, attribute) / 1e3, "calls": e.count}
                    for e in events[:PROFILE_TOP]]}


def grad_scaler_report(scale_before: float, scale_after: float) -> dict:
    """GradScaler scale around the timed steps. Each step with inf/NaN gradients halves the scale and
    skips the optimiser step (a cheaper step); the scale grows only after 2000 clean steps, so over
    fewer timed steps the halvings count the skipped ones."""
    skipped = round(math.log2(scale_before / scale_after)) if 0 < scale_after < scale_before else 0
    return {"scale_before_timing": scale_before, "scale_after_timing": scale_after, "skipped_timed_steps": skipped}


def _phase_result(times: list[float], batch_size: int, peak: int) -> dict:
    median = statistics.median(times)
    return {"median_step_s": median, "step_times_s": times, "images_per_s": batch_size / median,
            "peak_memory_bytes": peak, "flops_per_step": None}


def _out_of_memory(error: BaseException) -> dict:
    return {"error": f"out of memory: {str(error).splitlines()[0]}"}


def nnunet_plan_for(config: BenchConfig) -> dict:
    """nnU-Net's plan the configuration's nnU-Net parts are built from (``plan_2d``, or ``plan_3d`` for a 3D
    patch; both cached per patch)."""
    plan = plan_3d if config.is_volumetric else plan_2d
    return plan(config.patch_size, config.num_classes, config.input_channels, require_patch=config.is_baseline)


def nnunet_parts_for(config: BenchConfig, device: torch.device, nnunet_plan: dict | None = None) -> NNUNetParts:
    """nnU-Net's trainer parts (loss, optimiser, targets) for ``config``, from ``nnunet_plan`` (planned here
    when not given); the reference's code is imported first when the configuration is the reference."""
    if config.is_reference:
        import_reference(config.reference_repo)
    return NNUNetParts.build(nnunet_plan or nnunet_plan_for(config), device, deep_supervision=config.is_baseline)


class Workload:
    """One configuration's network, inputs, loss, optimiser and steps, as its trainer runs them.

    Built on ``device`` with seed 0; ``train_step``/``infer_step`` take another module to run the same
    step through it (the eager network, for FLOP counting).
    """

    def __init__(self, config: BenchConfig, parts: NNUNetParts, device: torch.device):
        self.config, self.parts, self.device = config, parts, device
        torch.manual_seed(0)
        self.model = build_network(config, parts).to(device)
        if config.plain_decoder and config.network == OURS:
            self.model.decoder.upsample.cpu_workspace = False
        self.images = torch.randn(config.batch_size, config.input_channels, *config.spatial_shape, device=device)
        labels = torch.randint(0, config.num_classes, (config.batch_size, 1, *config.spatial_shape), device=device)
        # as nnU-Net's data loader makes them, once, outside the timing
        self.targets = parts.deep_supervision_targets(labels) if config.is_baseline else labels

        # MedDINOv3Net autocasts itself; the other two need the caller's autocast, as in nnU-Net's
        # train_step. The reference on CUDA: fp16 autocast + GradScaler, as its nnU-Net trainer, whatever
        # config.dtype says.
        on_cuda = device.type == "cuda"
        self.autocast_dtype, self.scaler = None, None
        if config.is_reference:
            self.effective_dtype = REFERENCE_EFFECTIVE_DTYPE_CUDA if on_cuda else "fp32"
            if on_cuda:
                self.autocast_dtype, self.scaler = torch.float16, torch.amp.GradScaler("cuda")
        else:
            use_bf16 = on_cuda and config.dtype == "bf16"
            self.effective_dtype = "bf16" if use_bf16 or config.runs_cpu_bf16 else "fp32"
            if use_bf16 and config.is_baseline:
                self.autocast_dtype = torch.bfloat16

        self.eager_model = self.run_model = self.model
        self.compiled_blocks = None
        if config.compile == "network":
            self.run_model = torch.compile(self.model)
        elif config.compile == "encoder" and config.is_reference:
            self.compiled_blocks = CompiledBlocks(self.model.dino_encoder)
        elif config.compile == "encoder" and not config.is_baseline:
            self.compiled_blocks = CompiledBlocks(self.model.encoder.vit)
        self.optimizer = None

    def _precision(self):
        if self.autocast_dtype:
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def set_mode(self, training: bool) -> None:
        """train()/eval(), and the baseline's deep supervision on for training, off for inference."""
        self.model.train(training)
        if self.config.is_baseline:
            self.model.decoder.deep_supervision = training

    def build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.config, self.parts)

    def infer_step(self, net=None):
        with self._precision():
            return (self.run_model if net is None else net)(self.images)

    def train_step(self, net=None):
        self.optimizer.zero_grad(set_to_none=True)
        with self._precision():
            loss = self.parts.loss((self.run_model if net is None else net)(self.images), self.targets)
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)
            self.optimizer.step()
        else:  # nnUNetTrainer.train_step with its GradScaler
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.item()

    def describe(self) -> dict:
        description = {"label": self.config.label, "config": dataclasses.asdict(self.config),
                       "parameters": sum(p.numel() for p in self.model.parameters()),
                       "effective_dtype": self.effective_dtype}
        if isinstance(self.model, MedDINOv3Net3D):
            description["context_parameters"] = self.model.context_parameter_count()
        return description


def measure(config: BenchConfig, nnunet_plan: dict | None = None) -> dict:
    """Build the configuration's network and time inference then training; one process per call.

    ``nnunet_plan`` is :func:`~nnunet_meddinov3.benchmark.baseline.plan_2d`'s (3D:
    :func:`~nnunet_meddinov3.benchmark.baseline.plan_3d`'s) answer for the configuration (planned here
    when not given; the parent plans once per patch size).
    """
    device = torch.device(config.device)
    # nnU-Net's trainer (loss, optimiser, targets), built before the memory baseline: it holds no tensors
    parts = nnunet_parts_for(config, device, nnunet_plan)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training and predictor set it
    memory = PeakMemory(device)
    memory.start()
    work = Workload(config, parts, device)
    result = work.describe()

    # Inference first: on CPU the peak RSS only grows, and training's peak is the larger one.
    work.set_mode(False)
    memory.new_phase()
    try:
        with torch.no_grad():
            times = time_steps(work.infer_step, device, config.warmup, config.repeats)
        result["inference"] = _phase_result(times, config.batch_size, memory.peak_bytes())
    except torch.OutOfMemoryError as e:
        result["inference"] = _out_of_memory(e)

    work.set_mode(True)
    memory.new_phase()
    scaler = work.scaler
    try:
        work.build_optimizer()
        scale_before = []
        times = time_steps(work.train_step, device, config.warmup, config.repeats,
                           after_warmup=(lambda: scale_before.append(scaler.get_scale())) if scaler else None)
        result["training"] = _phase_result(times, config.batch_size, memory.peak_bytes())
        if scaler is not None:
            result["training"]["grad_scaler"] = grad_scaler_report(scale_before[0], scaler.get_scale())
        if config.profile:
            result["training"]["profile"] = profile_step(work.train_step, device)
    except torch.OutOfMemoryError as e:
        result["training"] = _out_of_memory(e)

    # FLOPs last (the counting step allocates like a real one), on the eager modules.
    peak_tflops = config.peak_tflops if device.type == "cuda" else None
    with work.compiled_blocks.eager() if work.compiled_blocks else contextlib.nullcontext():
        for phase, step, training in (("inference", work.infer_step, False), ("training", work.train_step, True)):
            if "error" in result[phase]:
                continue
            work.set_mode(training)
            try:
                with torch.enable_grad() if training else torch.no_grad():
                    flops = count_flops(lambda: step(work.eager_model))
            except torch.OutOfMemoryError:
                continue
            result[phase]["flops_per_step"] = flops
            if peak_tflops:
                result[phase]["mfu"] = flops / result[phase]["median_step_s"] / (peak_tflops * 1e12)
    return result
