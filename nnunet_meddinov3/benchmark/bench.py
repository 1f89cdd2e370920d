"""Training and inference throughput and peak memory: MedDINOv3Net variants vs the nnU-Net 2D network,
and optionally vs the MedDINOv3 reference implementation; on 3D patches (S, H, W), MedDINOv3Net3D per
cross-slice context vs nnU-Net's 3d_fullres network (``BenchConfig.patch_size`` a 3-tuple).

Every configuration runs in its own fresh process (``python -m nnunet_meddinov3.benchmark.bench
--worker JSON``), so its peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``
(reset before each phase), on CPU the growth of the peak resident set size (``getrusage``) over
the process's size before the network was built. The CPU peak is monotonic within a process, so
inference is measured first and training second.

Three kinds of network (``BenchConfig.network``):

- ``BASELINE``: nnU-Net's PlainConvUNet, planned by nnU-Net's ExperimentPlanner for the patch and
  built, with its loss, optimiser and deep-supervision targets, by an nnUNetTrainer
  (:mod:`~nnunet_meddinov3.benchmark.baseline`); for a 3D patch its 3d_fullres configuration.
- ``OURS``: MedDINOv3Net (encoder x decoder); for a 3D patch MedDINOv3Net3D with a cross-slice context.
- ``REFERENCE``: the MedDINOv3 reference implementation (github ricklisz/MedDINOv3), imported from a
  checkout the user points at (``--reference-repo``; its code is never copied here) and built exactly
  as its trainer ``meddinov3_base_primus_multiscale_Trainer`` builds it:
  ``DinoVisionTransformer(patch_size=16, embed_dim=E, depth=D, num_heads=H, ffn_ratio=4,
  drop_path_rate=0.2, layerscale_init=1e-5, n_storage_tokens=4, qkv_bias=False, mask_k_bias=True)``,
  ``.init_weights()``, wrapped in ``Primus_Multiscale(embed_dim=E, patch_embed_size=16, num_classes=K,
  dino_encoder=vit, interaction_indices=default_feature_layers(D))`` for our ``multiscale`` decoder or
  ``Primus(...)`` for ``single``; E/D/H come from our encoder registry. There is no reference for the
  ``bottleneck`` decoder. The reference takes one input channel only (it repeats it to three).

What one step is, for each network as its trainer runs it:

- training: ``zero_grad``, forward, nnU-Net's loss (``nnUNetTrainer._build_loss``: soft Dice without
  background + cross-entropy, batch Dice), backward, ``clip_grad_norm_(12)``, optimiser step,
  ``loss.item()`` (the sync nnU-Net's ``train_step`` does). The nnU-Net network trains with deep
  supervision: the loss is taken on all its outputs with nnU-Net's weights against targets made
  once outside the timing by nnU-Net's data-loader transform; the other two have one output
  (nnU-Net's loss without deep supervision).
  Optimisers: nnU-Net's own (``configure_optimizers``: SGD, Nesterov, momentum 0.99); AdamW with our trainer's encoder/decoder
  parameter groups for MedDINOv3Net; for the reference, its trainer's AdamW: parameters whose name
  contains ``dino_encoder`` lr 3e-5, the others lr 3e-4, weight decay 0.05, betas (0.9, 0.98).
- inference: ``eval()``, ``torch.no_grad()`` forward; the nnU-Net network without deep
  supervision, as nnU-Net's predictor builds it.

Precision: on CUDA with ``dtype="bf16"`` MedDINOv3Net runs its own bf16 autocast and the nnU-Net
network runs under ``torch.autocast(bfloat16)`` (nnU-Net itself uses fp16 + GradScaler, the same
tensor-core rate; bf16 needs no scaler). The reference on CUDA always runs as its (nnU-Net) trainer
does, whatever ``dtype`` says: training under ``torch.autocast("cuda")`` (fp16) with
``torch.amp.GradScaler`` (scale, backward, unscale_, clip, step, update), inference under fp16
autocast as nnU-Net's predictor; its ``effective_dtype`` is ``"fp16+GradScaler"``. On CPU all run
fp32, as nnU-Net does, except our networks with ``cpu_bf16`` (bf16 autocast inside MedDINOv3Net).

Modules by job: :mod:`~nnunet_meddinov3.benchmark.configs` (what is measured),
:mod:`~nnunet_meddinov3.benchmark.reference` (importing and building the reference),
:mod:`~nnunet_meddinov3.benchmark.baseline` (everything taken from nnU-Net),
:mod:`~nnunet_meddinov3.benchmark.factories` (networks and optimisers),
:mod:`~nnunet_meddinov3.benchmark.measure` (the worker's measurement),
:mod:`~nnunet_meddinov3.benchmark.report` (ratios, report, table); this module runs the workers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from typing import Callable, Sequence

# The names the CLI and the tests use, from the modules that define them.
from nnunet_meddinov3.benchmark.baseline import nnunet_2d_arch_kwargs, plan_2d, plan_3d  # noqa: F401
from nnunet_meddinov3.benchmark.configs import (  # noqa: F401
    BASELINE,
    COMPILE_MODES,
    METHOD_NOTES,
    OURS,
    REFERENCE,
    BenchConfig,
    build_configs,
    patch_label,
)
from nnunet_meddinov3.benchmark.measure import grad_scaler_report, measure, nnunet_plan_for  # noqa: F401
from nnunet_meddinov3.benchmark.reference import (  # noqa: F401
    REFERENCE_DECODERS,
    REFERENCE_PACKAGE_PARENT,
    ReferenceRepoError,
    reference_commit,
    reference_parameter_groups,
    resolve_reference_repo,
)
from nnunet_meddinov3.benchmark.report import (  # noqa: F401
    add_baseline_ratios,
    add_reference_ratios,
    environment,
    format_baseline_ratios,
    format_table,
    write_report,
)

RESULT_MARKER = "MEDDINOV3_BENCH_RESULT "


def run_worker(config: BenchConfig, timeout_s: float | None = None) -> dict:
    """Measure one configuration in a fresh Python process; errors come back as ``{"error": ...}``."""
    failed = {"label": config.label, "config": dataclasses.asdict(config)}
    try:
        plan = nnunet_plan_for(config)
    except ValueError as e:
        return {**failed, "error": str(e)}
    command = [sys.executable, "-m", "nnunet_meddinov3.benchmark.bench", "--worker", config.to_json(),
               "--nnunet-plan", json.dumps(plan)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timed out after {timeout_s:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {**failed, "error": f"worker exited with status {proc.returncode}:\n{tail}"}


def run_benchmark(configs: Sequence[BenchConfig], timeout_s: float | None = None,
                  progress: Callable[[str], None] | None = None,
                  on_result: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Measure every configuration in turn; ``on_result`` sees the results so far after each one
    (so a run cut short still leaves what it measured)."""
    results = []
    for i, config in enumerate(configs, 1):
        if progress:
            progress(f"[{i}/{len(configs)}] {config.label} @ {patch_label(config.patch_size)}px, "
                     f"batch {config.batch_size}")
        started = time.perf_counter()
        result = run_worker(config, timeout_s)
        result["wall_s"] = time.perf_counter() - started
        if progress and "error" in result:
            progress(f"    failed: {result['error']}")
        results.append(result)
        add_baseline_ratios(results)
        add_reference_ratios(results)
        if on_result:
            on_result(results)
    return results


# --------------------------------------------------------------------------------------------
# Worker entry point
# --------------------------------------------------------------------------------------------

def _worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="measure one benchmark configuration (used by meddinov3 bench)")
    parser.add_argument("--worker", required=True, metavar="JSON", help="a BenchConfig as JSON")
    parser.add_argument("--nnunet-plan", metavar="JSON",
                        help="nnU-Net's plan for it (plan_2d or plan_3d); planned here if absent")
    args = parser.parse_args(argv)
    result = measure(BenchConfig.from_json(args.worker), json.loads(args.nnunet_plan) if args.nnunet_plan else None)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
