"""``python -m pretrain``: train one stage, run a chain of stages, export, list configs.

    python -m pretrain train --config tiny_stage1 --data ROOT [ROOT ...] --output DIR [--resume] [key=value ...]
    python -m pretrain chain --configs vitb16_stage1 vitb16_stage2_gram vitb16_stage3_highres --data ROOT \\
        --output DIR [--resume] [--export NAME] [key=value | K:key=value ...]
    python -m pretrain cache --config C --data ROOT [ROOT ...] [--workers N] [--verify] [--output DIR | --cache-dir D]
    python -m pretrain benchmark-data --config C --data ROOT [...] [--workers N] [--samples N]
    python -m pretrain distill --config tiny_distill --teacher NAME_OR_PATH --data ROOT [...] --output DIR [--resume]
    python -m pretrain export --run DIR --name NAME [--output FILE]
    python -m pretrain configs [--show NAME [key=value ...]]

Under torchrun: ``torchrun --nproc_per_node=8 -m pretrain train ...`` (``cache`` too: every process
builds a share).
Exit status: 0 finished or paused (resumable), 2 bad arguments/config, 3 stopped on non-finite
losses, 4 stopped on suspected collapse.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from .configs import ConfigError, available_configs, load_config
from .data.slices import DataError
from .engine.checkpoint import UnreadableCheckpoints

EXIT_CODES = {"finished": 0, "paused": 0, "stopped_nonfinite": 3, "stopped_collapse": 4}
DEFAULT_OUTPUT = Path("pretrain_runs")


def _split_data_and_overrides(args: argparse.Namespace) -> None:
    """``--data A B key=value``: nargs='+' also swallows the overrides after it; move them back."""
    data = args.data or []
    args.overrides = [d for d in data if "=" in d] + list(args.overrides)
    args.data = [d for d in data if "=" not in d]


def _data_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.data:
        extra.append("data.roots=" + yaml.safe_dump([str(Path(d).resolve()) for d in args.data],
                                                    default_flow_style=True).strip())
    if getattr(args, "cache_dir", None):
        extra.append(f"data.cache_dir={Path(args.cache_dir).resolve()}")
    return extra


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", metavar="ROOT",
                        help="nnU-Net raw dataset folders, NIfTI folders or DICOM folders (sets data.roots)")
    parser.add_argument("--output", help=f"run folder (default: {DEFAULT_OUTPUT}/NAME); its slice_cache/ is the "
                                         "default cache folder")
    parser.add_argument("--cache-dir", help="slice cache folder (sets data.cache_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _common(parser: argparse.ArgumentParser) -> None:
    _data_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run (or resume) one stage")
    train.add_argument("--config", required=True,
                       help=f"a packaged config ({', '.join(available_configs())}) or a YAML path")
    _common(train)

    chain = sub.add_parser("chain", help="run stages in order, each from the previous one's last checkpoint")
    chain.add_argument("--configs", nargs="+", required=True, metavar="CONFIG")
    chain.add_argument("--teacher", metavar="NAME_OR_PATH",
                       help="the teacher of the chain's distillation stages (default: the stage before)")
    chain.add_argument("--export", metavar="NAME",
                       help="export the last stage's teacher as NAME when the chain finishes")
    _common(chain)

    distill = sub.add_parser("distill", help="run (or resume) a distillation stage: a frozen teacher teaches a "
                                             "smaller student (Meta's multi-distillation step)")
    distill.add_argument("--config", required=True, help="a distillation config (tiny_distill, vits16_distill, "
                                                         "vitb16_distill) or a YAML path")
    distill.add_argument("--teacher", metavar="NAME_OR_PATH",
                         help="registry name, pretrain run folder or checkpoint, export, or Meta's/MedDINOv3's file "
                              "(sets distill.teacher)")
    _common(distill)

    cache = sub.add_parser("cache", help="build or complete the slice cache (what train does first), and report on it")
    cache.add_argument("--config", required=True, help="the config whose data settings key the cache")
    cache.add_argument("--workers", type=int, default=1, help="processes building volumes (per torchrun process)")
    cache.add_argument("--verify", action="store_true",
                       help="also check every cached slice's checksum (reads the whole cache) and rebuild damaged volumes")
    _data_options(cache)

    bench = sub.add_parser("benchmark-data", help="measure multi-crop samples/s per loader worker from a cold cache")
    bench.add_argument("--config", required=True)
    bench.add_argument("--workers", type=int, default=1, help="loader workers (also the build's processes)")
    bench.add_argument("--samples", type=int, default=200, help="samples to time (after a warm-up batch)")
    bench.add_argument("--images-per-s", type=float, default=250.0,
                       help="the GPU's need to compare with (default: ViT-B/16 on one H100, ~250 images/s)")
    _data_options(bench)

    export = sub.add_parser("export", help="write a run's teacher backbone in the project's checkpoint format")
    export.add_argument("--run", required=True, help="run folder (its latest checkpoint) or a checkpoint file")
    export.add_argument("--name", help="registry name: writes $MEDDINOV3_CACHE/exports/NAME.safetensors "
                                       "(default: the run folder's name)")
    export.add_argument("--output", help="write here instead")

    configs = sub.add_parser("configs", help="list the packaged configs, or print one resolved")
    configs.add_argument("--show", metavar="CONFIG")
    configs.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _teacher_overrides(args) -> list[str]:
    return [f"distill.teacher={args.teacher}"] if getattr(args, "teacher", None) else []


def _train(args) -> int:
    from .engine import train
    from .engine.distill import distill

    config = load_config(args.config, [*_data_overrides(args), *_teacher_overrides(args), *args.overrides])
    if args.command == "distill" and config.stage != "distillation":
        raise ConfigError(f"config '{config.name}' is a {config.stage} stage; distill takes a distillation config "
                          "(tiny_distill, vits16_distill, vitb16_distill)")
    output = Path(args.output) if args.output else DEFAULT_OUTPUT / config.name
    result = (distill if config.stage == "distillation" else train)(config, output, resume=args.resume)
    return EXIT_CODES[result.status]


def _chain(args) -> int:
    from .engine.chain import run_chain
    from .engine.distributed import init_distributed, shutdown_distributed
    from .export import export_run

    output = Path(args.output) if args.output else DEFAULT_OUTPUT / "chain"
    context = init_distributed()
    try:
        results = run_chain(args.configs, output, [*_data_overrides(args), *_teacher_overrides(args), *args.overrides],
                            resume=args.resume,
                            context=context)
        last = results[-1]
        if len(results) == len(args.configs) and last.status == "finished" and args.export:
            if context.is_main:
                path, _ = export_run(last.run_dir, name=args.export)
                print(f"exported {last.run_dir.name} as '{args.export}': {path}")
            context.barrier()
        return EXIT_CODES[last.status]
    finally:
        shutdown_distributed(context)


def _cache_folder(args, config) -> Path:
    output = Path(args.output) if args.output else DEFAULT_OUTPUT / config.name
    return Path(config.data.cache_dir) if config.data.cache_dir else output.resolve() / "slice_cache"


def _cache(args) -> int:
    from .data.cache_report import describe_cache
    from .engine.data import build_slice_dataset
    from .engine.distributed import init_distributed, shutdown_distributed

    config = load_config(args.config, [*_data_overrides(args), *args.overrides])
    context = init_distributed(config.train.distributed_timeout_minutes)
    try:
        slices = build_slice_dataset(config, _cache_folder(args, config), context.rank, context.world_size,
                                     workers=args.workers, verify=args.verify)
        context.barrier()
        if context.is_main:
            print(describe_cache(slices))
        return 0
    finally:
        shutdown_distributed(context)


def _benchmark_data(args) -> int:
    from .engine.data_benchmark import benchmark_loader

    config = load_config(args.config, [*_data_overrides(args), *args.overrides])
    print(benchmark_loader(config, _cache_folder(args, config), args.workers, args.samples, args.images_per_s))
    return 0


def _export(args) -> int:
    from .export import export_run

    try:
        path, metadata = export_run(args.run, name=args.name, output=args.output)
    except ValueError as e:  # an output name or a --run that is not what export needs
        print(f"error: {e}", file=sys.stderr)
        return 2
    stages = ", ".join(f"{s.get('name')} ({s.get('iterations')} it)" for s in metadata.stages)
    print(f"exported to {path}\n  architecture: {metadata.architecture['embed_dim']}-dim, "
          f"{metadata.architecture['depth']} blocks\n  stages: {stages}\n  licence: {metadata.licence}")
    return 0


def _configs(args) -> int:
    if args.show:
        print(yaml.safe_dump(load_config(args.show, args.overrides).to_dict(), sort_keys=False), end="")
    else:
        print("\n".join(available_configs()))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # the library logs; the CLI shows warnings
    logging.getLogger("pretrain.data").setLevel(logging.INFO)  # and the cache build's progress
    parser = build_parser()
    # overrides may come before and after options (a job script appending --resume, say)
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if hasattr(args, "data"):
        _split_data_and_overrides(args)
    handlers = {"train": _train, "distill": _train, "chain": _chain, "cache": _cache, "benchmark-data": _benchmark_data,
                "export": _export, "configs": _configs}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError, UnreadableCheckpoints) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
