"""Entry point of the ``meddinov3`` console script.

Subcommand modules are imported only when their subcommand runs, so ``meddinov3 env`` stays fast
and a broken optional dependency of one subcommand never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under nnunet_meddinov3.cli, one-line help)
SUBCOMMANDS = {
    "env": ("env", "show or export the environment variables nnU-Net needs to find this plugin"),
    "plan_and_preprocess": ("plan_and_preprocess", "fingerprint, plan nnUNetPlansMedDINOv3 (2d, 2d_highres) and preprocess"),
    "demo": ("demo", "synthetic CT: pretrain -> export -> nnU-Net baseline vs tiny MedDINOv3 -> Dice and probe tables"),
    "weights": ("weights", "list, inspect, convert, verify and fetch encoder checkpoints"),
    "compare": ("compare", "compare trainers' cross-validation results (Dice, NSD, Wilcoxon)"),
    "bench": ("bench", "training/inference throughput and peak memory vs the nnU-Net 2D network"),
    "predict": ("predict", "predict nnU-Net folders, NIfTI folders or DICOM series trees"),
    "features": ("features", "PCA and cosine-similarity pictures of the encoder's dense features"),
    "probe": ("probe", "rank encoder checkpoints by a frozen-encoder linear probe on an nnU-Net dataset"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="meddinov3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    wanted = argv[0] if argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported; the others just show their help line.
        if name == wanted:
            try:
                module = importlib.import_module(f"nnunet_meddinov3.cli.{module_name}")
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("nnunet_meddinov3.cli."):
                    parser.error(f"'{name}' is not available in this version of nnunet-meddinov3")
                raise
            module.add_arguments(p)
            modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, modules = build_parser(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given, for reports that record it
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
