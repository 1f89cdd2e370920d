"""Training step times of several configurations in one process, one step of each in turn.

Why: on a small shared CPU the speed of the machine drifts over minutes (other processes, memory
state, clocks), so step times measured one configuration after another compare different machines.
Round-robin steps in one process see the same drift, and their ratios are stable where separate
processes' are not (the separate-process ``meddinov3 bench`` stays the source of memory and
inference numbers: here all networks share one process, so neither is measured).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import torch

from nnunet_meddinov3.benchmark.configs import BenchConfig
from nnunet_meddinov3.benchmark.measure import Workload, nnunet_parts_for, synchronize


INTERLEAVED_NOTE = ("all configurations in one process; after each one's warm-up steps, rounds of one timed "
                     "training step per configuration in turn; median over the rounds; no memory, inference "
                     "or FLOP numbers")
INTERLEAVED_INFERENCE_NOTE = ("--interleave-inference: in each round each configuration's training step is followed "
                              "by one timed inference step (eval(), no_grad), so inference ratios share the drift too")


def _phase_times(times: list[float], batch_size: int) -> dict:
    median = statistics.median(times)
    return {"median_step_s": median, "step_times_s": times, "images_per_s": batch_size / median,
            "peak_memory_bytes": None, "flops_per_step": None}


def measure_interleaved(configs: Sequence[BenchConfig], progress: Callable[[str], None] | None = None,
                        inference: bool = False) -> list[dict]:
    """Each configuration's ``warmup`` steps, then ``repeats`` rounds of one timed training step each
    (the largest ``warmup``/``repeats`` among them); with ``inference``, each training step is followed by
    one inference step (``eval()``, ``no_grad``), timed too. A configuration that cannot be built or run
    gets ``{"error": ...}`` and leaves the rounds; the others go on."""
    say = progress or (lambda message: None)
    phases = ("training", "inference") if inference else ("training",)
    workloads, results = [], []
    for config in configs:
        result = {"label": config.label, "config": dataclasses.asdict(config), "interleaved": True}
        try:
            device = torch.device(config.device)
            work = Workload(config, nnunet_parts_for(config, device), device)
            work.set_mode(True)
            work.build_optimizer()
            result.update(work.describe(), interleaved=True)
            workloads.append((work, result, {phase: [] for phase in phases}))
        except (ValueError, ImportError, RuntimeError) as e:
            result["error"] = f"{type(e).__name__}: {e}"
            say(f"    {config.label}: {result['error']}")
        results.append(result)

    warmup = max((w.config.warmup for w, _, _ in workloads), default=0)
    repeats = max((w.config.repeats for w, _, _ in workloads), default=0)
    for round_ in range(warmup + repeats):
        timed = round_ >= warmup
        say(f"round {round_ + 1}/{warmup + repeats}" + ("" if timed else " (warm-up)"))
        for work, result, times in workloads:
            for phase in phases:
                if "error" in result:
                    break
                training = phase == "training"
                work.set_mode(training)
                try:
                    with torch.enable_grad() if training else torch.no_grad():
                        synchronize(work.device)
                        start = time.perf_counter()
                        if training:
                            work.train_step()
                        else:
                            work.infer_step()
                        synchronize(work.device)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                    say(f"    {work.config.label}: {result['error']}")
                    break
                if timed:
                    times[phase].append(time.perf_counter() - start)

    for work, result, times in workloads:
        if "error" in result:
            continue
        for phase, phase_times in times.items():
            if phase_times:
                result[phase] = _phase_times(phase_times, work.config.batch_size)
    return results
