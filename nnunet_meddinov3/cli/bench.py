"""``meddinov3 bench``: training/inference throughput and peak memory of MedDINOv3Net variants next to
the nnU-Net 2D network (PlainConvUNet as nnU-Net plans it) at the same patch size and batch, and
optionally next to the MedDINOv3 reference implementation (``--reference-repo``, a checkout of
https://github.com/ricklisz/MedDINOv3: its Primus_Multiscale / Primus for our multiscale / single
decoders, built as its trainer builds them; there is no reference for the bottleneck decoder).
With ``--patch-3d S H W``, the same for 3D patches: MedDINOv3Net3D, once per cross-slice context of
``--contexts``, next to nnU-Net's 3d_fullres network planned for that patch at CT-like spacing.

Each configuration runs in a fresh process, so peak memory is per configuration; ``--interleave``
instead times training steps of all of them in one process, one step of each in turn. See
:mod:`nnunet_meddinov3.benchmark.bench` for exactly what a step is (loss, optimiser, precision).

    meddinov3 bench --device cuda --encoders vitb16 --decoders multiscale bottleneck --patch-sizes 896
    meddinov3 bench --device cuda --decoders multiscale --patch-sizes 448 --reference-repo ~/MedDINOv3
    meddinov3 bench --device cpu --dtype fp32 --decoders multiscale --patch-sizes 448 --no-baseline \
        --interleave --plain-decoder-too --reference-repo ~/MedDINOv3
    meddinov3 bench --device cuda --encoders vitb16 --decoders multiscale --patch-3d 32 192 192 \
        --contexts slice_attention depth_conv
"""
from __future__ import annotations

import os
import shlex
import sys
import time

DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 (and fp16)
DEFAULT_PATCH_SIZES = (512, 896)
REFERENCE_REPO_ENV = "MEDDINOV3_REFERENCE_REPO"


def add_arguments(parser) -> None:
    from nnunet_meddinov3.benchmark.configs import COMPILE_MODES  # imports nothing heavy
    from nnunet_meddinov3.network.configs import DECODER_NAMES, ENCODER_CONFIGS

    parser.add_argument("--encoders", nargs="+", default=["vitb16"], choices=sorted(ENCODER_CONFIGS),
                        metavar="ENCODER", help="encoder configs (default vitb16; 'tiny' for smoke tests)")
    parser.add_argument("--decoders", nargs="+", default=["multiscale", "single", "bottleneck"],
                        choices=sorted(DECODER_NAMES), metavar="DECODER",
                        help="decoders (default: multiscale single bottleneck)")
    parser.add_argument("--patch-sizes", nargs="+", type=int, default=None, metavar="PX",
                        help="square 2D patch sizes, multiples of 16 (default "
                             f"{' '.join(map(str, DEFAULT_PATCH_SIZES))}, none when --patch-3d is given)")
    parser.add_argument("--patch-3d", nargs=3, type=int, action="append", default=None, metavar=("S", "H", "W"),
                        dest="patches_3d",
                        help="a 3D patch, slice axis first (H and W multiples of 16, S >= 2); repeat for more. "
                             "Measures MedDINOv3Net3D per --contexts against nnU-Net's 3d_fullres network as its "
                             "ExperimentPlanner plans that patch at CT-like spacing (2.5, 0.8, 0.8) mm")
    parser.add_argument("--contexts", nargs="+", default=["slice_attention"], metavar="CONTEXT",
                        help="cross-slice contexts of MedDINOv3Net3D on --patch-3d patches: slice_attention, "
                             "depth_conv, none (default slice_attention)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--classes", type=int, default=16, help="segmentation classes incl. background (default 16)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when available (default)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="CUDA autocast dtype (default bf16); CPU runs fp32, as nnU-Net does (see --cpu-bf16)")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="on CPU, run our networks in bf16 (MEDDINOV3_CPU_BF16=1 in training and prediction); "
                             "fast on CPUs with AVX512-BF16 or AMX. The baseline stays fp32, as nnU-Net")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per phase (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per phase; the median counts (default 10)")
    parser.add_argument("--compile", nargs="?", const="encoder", default=None, choices=COMPILE_MODES,
                        help="torch.compile: 'encoder' (bare --compile) compiles each ViT block of our networks; "
                             "'network' compiles every whole network, the baseline included, as nnU-Net's "
                             "trainers do on CUDA")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="activation checkpointing of the ViT blocks (our networks)")
    parser.add_argument("--reference-repo", default=os.environ.get(REFERENCE_REPO_ENV) or None, metavar="PATH",
                        help="also measure the MedDINOv3 reference implementation from this checkout (the "
                             "repository root of git clone https://github.com/ricklisz/MedDINOv3, or the folder "
                             "that directly contains its 'dinov3' package): its Primus_Multiscale next to our "
                             "multiscale decoder and Primus next to single, per encoder and patch size (none for "
                             f"bottleneck); on CUDA it runs fp16 autocast + GradScaler as its trainer, whatever "
                             f"--dtype says (default: ${REFERENCE_REPO_ENV})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the nnU-Net PlainConvUNet baseline")
    parser.add_argument("--interleave", action="store_true",
                        help="time training steps only, all configurations in this one process, one step of each "
                             "in turn: machine drift hits all alike (for CPU comparisons); no memory or FLOP "
                             "numbers, and no inference ones without --interleave-inference")
    parser.add_argument("--interleave-inference", action="store_true",
                        help="with --interleave: after each training step, time one inference step of the same "
                             "configuration too (eval, no_grad), so that inference ratios share the drift as well")
    parser.add_argument("--profile", action="store_true",
                        help="after the timing, profile one training step (torch.profiler) and print the 15 "
                             "ops/kernels with the most self time (CUDA: kernel time); not with --interleave")
    parser.add_argument("--plain-decoder-too", action="store_true",
                        help="also run each of our networks with the decoder's plain autograd path, to see what "
                             "the CPU path (buffers reused between steps) gains (on CUDA both run the plain path)")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help=f"accelerator peak for MFU, in TFLOP/s (default {DEFAULT_PEAK_TFLOPS:g}: H100 dense bf16)")
    parser.add_argument("--worker-timeout", type=float, default=1800.0, metavar="S",
                        help="give up on one configuration after this many seconds (default 1800)")
    parser.add_argument("-o", "--output", default=None, help="write the results as JSON here")


def _error(message: str) -> int:
    print(f"meddinov3 bench: error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    import torch

    from nnunet_meddinov3.benchmark.bench import (
        METHOD_NOTES, REFERENCE_DECODERS, ReferenceRepoError, add_baseline_ratios, add_reference_ratios,
        build_configs, environment, format_baseline_ratios, format_table, nnunet_2d_arch_kwargs, plan_3d,
        reference_commit, resolve_reference_repo, run_benchmark, write_report)
    from nnunet_meddinov3.benchmark.interleaved import (
        INTERLEAVED_INFERENCE_NOTE, INTERLEAVED_NOTE, measure_interleaved)
    from nnunet_meddinov3.benchmark.report import format_profiles, format_step_times
    from nnunet_meddinov3.network.slice_context import CONTEXT_KINDS

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda, but torch sees no CUDA device")
    else:
        device = args.device
    patches_3d = [tuple(patch) for patch in args.patches_3d or ()]
    patch_sizes = args.patch_sizes if args.patch_sizes is not None else [] if patches_3d else list(DEFAULT_PATCH_SIZES)
    bad = [p for p in patch_sizes if p <= 0 or p % 16]
    if bad:
        return _error(f"patch sizes must be positive multiples of 16 (the ViT patch); got {bad}")
    bad = [patch for patch in patches_3d if patch[0] < 2 or any(side <= 0 or side % 16 for side in patch[1:])]
    if bad:
        return _error(f"--patch-3d S H W needs S >= 2 slices (nnU-Net plans no 3d_fullres for one, the contexts mix "
                      f"slices) and H, W positive multiples of 16 (the ViT patch); got {bad}")
    unknown = sorted(set(args.contexts) - set(CONTEXT_KINDS))
    if unknown:
        return _error(f"--contexts: unknown {unknown}; choose from {', '.join(CONTEXT_KINDS)}")
    if not args.no_baseline:
        for patch in patch_sizes + patches_3d:
            try:
                if isinstance(patch, tuple):
                    plan_3d(patch)
                else:
                    nnunet_2d_arch_kwargs(patch)
            except ValueError as e:
                return _error(f"{e} (or run without the baseline: --no-baseline)")
    for name in ("batch_size", "classes", "repeats"):
        if getattr(args, name) < 1:
            return _error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        return _error("--warmup must be >= 0")
    if args.profile and args.interleave:
        return _error("--profile profiles each configuration in its own process; run it without --interleave")
    if args.interleave_inference and not args.interleave:
        return _error("--interleave-inference adds inference steps to --interleave's rounds; add --interleave")
    reference = None
    if args.reference_repo:
        # Resolved here, before any worker starts, so that a wrong path fails at once.
        try:
            reference_root = resolve_reference_repo(args.reference_repo)
        except ReferenceRepoError as e:
            return _error(f"--reference-repo (default ${REFERENCE_REPO_ENV}): {e}")
        path = os.path.abspath(os.path.expanduser(args.reference_repo))
        reference = {"path": path, "import_root": reference_root, "commit": reference_commit(path)}
        without = [d for d in args.decoders if d not in REFERENCE_DECODERS]
        if without:
            print(f"meddinov3 bench: note: no reference configuration for the {'/'.join(without)} decoder (the "
                  f"reference has {' and '.join(sorted(REFERENCE_DECODERS))} only)", file=sys.stderr)
        if device == "cuda":
            print("meddinov3 bench: note: the reference runs fp16 autocast + GradScaler on CUDA, as its trainer, "
                  f"while ours runs --dtype {args.dtype}", file=sys.stderr)
        if args.grad_checkpointing:
            print("meddinov3 bench: note: the reference has no activation checkpointing; it runs without",
                  file=sys.stderr)
        if patches_3d:
            print("meddinov3 bench: note: the reference has no 3D network; none on the --patch-3d patches",
                  file=sys.stderr)
    if device == "cpu" and args.dtype == "bf16" and not args.cpu_bf16:
        print("meddinov3 bench: note: CPU runs fp32 (no autocast), as nnU-Net does; --cpu-bf16 runs ours in bf16",
              file=sys.stderr)

    configs = build_configs(
        args.encoders, args.decoders, patch_sizes + patches_3d, contexts=args.contexts, baseline=not args.no_baseline,
        reference_repo=reference["import_root"] if reference else None, batch_size=args.batch_size,
        num_classes=args.classes, device=device, dtype=args.dtype, warmup=args.warmup, repeats=args.repeats,
        compile=args.compile, grad_checkpointing=args.grad_checkpointing, cpu_bf16=args.cpu_bf16,
        peak_tflops=args.peak_tflops, plain_decoder_too=args.plain_decoder_too, profile=args.profile)
    started = time.time()
    meta = {"command": "meddinov3 " + shlex.join(args.argv), "device": device,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "environment": environment(device), "method": METHOD_NOTES, "complete": False}
    if reference:
        meta["reference"] = reference

    def save(results: list[dict]) -> None:
        if args.output:
            write_report(args.output, results, {**meta, "wall_s": time.time() - started,
                                                "complete": len(results) == len(configs)})

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.interleave:
        meta["method"] = {**METHOD_NOTES, "interleaved": INTERLEAVED_NOTE}
        if args.interleave_inference:
            meta["method"]["interleaved_inference"] = INTERLEAVED_INFERENCE_NOTE
        results = measure_interleaved(configs, progress=progress, inference=args.interleave_inference)
        add_baseline_ratios(results)
        add_reference_ratios(results)
        save(results)
    else:
        results = run_benchmark(configs, timeout_s=args.worker_timeout, on_result=save, progress=progress)
    print(format_table(results))
    if args.interleave:
        print(format_step_times(results))
    baseline_ratios = format_baseline_ratios(results)
    if baseline_ratios:
        print("\n" + baseline_ratios)
    if args.profile:
        print("\n" + format_profiles(results))
    if args.output:
        print(f"\nWrote {args.output}")
    failed = [r["label"] for r in results if "error" in r]
    return 1 if failed and len(failed) == len(results) else 0
