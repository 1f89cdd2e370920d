"""Entry point of the ``meddinov3`` console script.

Subcommand modules are imported only when their subcommand runs, and they import torch, timm and
nnU-Net only inside ``run``, so ``--help`` stays fast and a broken optional dependency of one
subcommand never breaks the others. Every error reaches the user as one message and an exit status,
never as a traceback; ``MEDDINOV3_DEBUG=1`` shows the traceback too.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

DESCRIPTION = """\
Fine-tune DINOv3 / MedDINOv3 vision transformers for 2D and 3D medical image segmentation inside nnU-Net v2,
and inspect, convert and compare their weights.

Typical first steps:
  eval "$(meddinov3 env --export)"          let nnU-Net find this plugin's trainers
  meddinov3 weights list                    which pretrained encoders exist and whether they are cached
  meddinov3 weights fetch meddinov3-vitb16-ct3m  the default trainer's encoder weights, once
  meddinov3 plan_and_preprocess -d 501      plans for the ViT (then nnUNetv2_train ... -tr nnUNetTrainerMedDINOv3)
"""
EPILOG = ("Run 'meddinov3 COMMAND --help' for a command's options. Set MEDDINOV3_DEBUG=1 to see a Python traceback "
          "when a command fails.")
DEBUG_ENV = "MEDDINOV3_DEBUG"

# name -> (module under nnunet_meddinov3.cli, one-line help)
SUBCOMMANDS = {
    "env": ("env", "show or export the environment variables nnU-Net needs to find this plugin"),
    "plan_and_preprocess": ("plan_and_preprocess", "fingerprint, plan nnUNetPlansMedDINOv3 (2d, 2d_highres) and preprocess"),
    "demo": ("demo", "synthetic CT: pretrain -> export -> nnU-Net baseline vs tiny MedDINOv3 -> Dice and probe tables"),
    "weights": ("weights", "list, inspect, convert, verify and fetch encoder checkpoints"),
    "compare": ("compare", "compare trainers' cross-validation results (Dice, NSD, Wilcoxon)"),
    "bench": ("bench", "training/inference throughput and peak memory vs the nnU-Net 2D or 3d_fullres network"),
    "bench_loader": ("bench_loader", "images/s of nnU-Net's data loading and augmentation: can its workers feed the GPU"),
    "predict": ("predict", "predict nnU-Net folders, NIfTI folders or DICOM series trees"),
    "features": ("features", "PCA and cosine-similarity pictures of the encoder's dense features"),
    "probe": ("probe", "rank encoder checkpoints by a frozen-encoder linear probe on an nnU-Net dataset"),
}


# timm's import of torch.jit.interface warns on every start with recent torch (a FutureWarning in 2.14, a
# DeprecationWarning in 2.11); it says nothing about the user's input and users cannot act on it. As a
# PYTHONWARNINGS entry (a literal message prefix; category Warning covers both) for child processes.
JIT_INTERFACE_WARNING = "ignore:`torch.jit.interface` is deprecated:Warning"


def quiet_third_party_warnings(children: bool = False) -> None:
    """Hide deprecation noise of libraries we import, here and, with ``children``, in the processes our commands
    start (nnU-Net's worker processes, the demo's steps)."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.* is deprecated")
    current = os.environ.get("PYTHONWARNINGS", "")
    if children and JIT_INTERFACE_WARNING not in current:
        # listed last, so it wins over a broader entry such as 'default' for this one message
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [current, JIT_INTERFACE_WARNING]))


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="meddinov3", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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


def error_message(error: BaseException) -> str:
    """The one paragraph a user sees for ``error``: our own messages as they are, OS errors as 'what: path'."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.strerror}: '{error.filename}'"
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    text = str(error).strip()
    return text if text else type(error).__name__


# Raised by our code and the libraries for bad input; their message is the explanation. Anything else
# is a bug, reported as one.
EXPECTED_ERRORS = (OSError, ValueError, KeyError, RuntimeError, EOFError, ImportError)


def main(argv: list[str] | None = None) -> int:
    # the console script (argv None) may set the environment its child processes inherit; an in-process caller's
    # environment is left alone
    quiet_third_party_warnings(children=argv is None)
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # the library logs; the CLI shows warnings
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    prefix = f"meddinov3 {command}" if command else "meddinov3"
    try:
        parser, modules = build_parser(argv)
        args = parser.parse_args(argv)
        args.argv = argv  # the command line as given, for reports that record it
        if args.command is None:
            parser.print_help()
            return 2
        return int(modules[args.command].run(args) or 0)
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("message"): the message is for the user
            print(f"{prefix}: error: {e.code}", file=sys.stderr)
            return 1
        raise
    except BrokenPipeError:  # `meddinov3 ... | head` closed the pipe: nothing left to say to anyone
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError):
            pass
        return 1
    except KeyboardInterrupt:
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns every failure into a message
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if isinstance(e, EXPECTED_ERRORS):
            print(f"{prefix}: error: {error_message(e)}", file=sys.stderr)
        else:
            print(f"{prefix}: error: unexpected {type(e).__name__}: {error_message(e)}. This is a bug in "
                  f"nnunet-meddinov3 or a library it uses; rerun with {DEBUG_ENV}=1 to see the traceback and "
                  "report it with that output.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
