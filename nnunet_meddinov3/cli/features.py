"""``meddinov3 features``: what an encoder sees in one CT/MR slice, as a three-panel PNG.

Panels (each --size pixels square; the PNG is 3*size x size): the normalised slice, the first three
PCA components of the last block's patch features as RGB (background patches black), and the cosine
similarity of every patch to the one under --point (marked). Details:
:mod:`nnunet_meddinov3.visualize.features`.

    meddinov3 features -i case_000_0000.nii.gz --checkpoint meddinov3-vitb16-ct3m -o features.png
"""
from __future__ import annotations

import sys
from pathlib import Path

from nnunet_meddinov3.network.configs import ENCODER_CONFIGS
from nnunet_meddinov3.visualize.feature_settings import (
    DEFAULT_FOREGROUND_THRESHOLD,
    DEFAULT_INTENSITY,
    INTENSITY_PRESETS,
)


def add_arguments(parser) -> None:
    encoders = sorted(ENCODER_CONFIGS)
    parser.add_argument("-i", "--image", required=True,
                        help="a 2D image or 3D volume in any format SimpleITK reads (NIfTI, MHA, NRRD, PNG, a "
                             "DICOM file or a folder holding one DICOM series)")
    parser.add_argument("--slice", type=int, default=None, metavar="N",
                        help="slice of a 3D volume along the last SimpleITK axis (first numpy axis); default middle")
    parser.add_argument("--checkpoint", required=True, metavar="NAME_OR_PATH",
                        help="encoder weights: a registry name (meddinov3 weights list) or a file in any known layout")
    parser.add_argument("--encoder", default=None, choices=encoders, metavar="CONFIG",
                        help="encoder config for weights that record none (one of: " + ", ".join(encoders) + "; "
                             "default: inferred from the file's layout and tensor shapes, as `meddinov3 weights "
                             "info` shows it)")
    parser.add_argument("--size", type=int, default=448,
                        help="the slice is resized to SIZE x SIZE; a multiple of 16 (default 448)")
    parser.add_argument("--point", nargs=2, type=float, default=None, metavar=("Y", "X"),
                        help="similarity query point, (row, column) in pixels of the original slice; default centre")
    parser.add_argument("--intensity", default=None, choices=tuple(INTENSITY_PRESETS),
                        help="intensity convention when the checkpoint records none (default "
                             f"{DEFAULT_INTENSITY}: clip [-1000, 1000] HU, (x - 65.1084) / 178.0166; minmax: volume "
                             "min-max then ImageNet mean/std, for the official DINOv3 weights; zscore: volume z-score)")
    parser.add_argument("--foreground-threshold", type=float, default=DEFAULT_FOREGROUND_THRESHOLD, metavar="T",
                        help="a patch is foreground (coloured in the PCA panel) when its mean display intensity, in "
                             "[0, 1] through the CT window or the slice's min-max, exceeds T; 0 keeps every patch "
                             f"(default {DEFAULT_FOREGROUND_THRESHOLD:g})")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write (its folder is created)")


def run(args) -> int:
    from nnunet_meddinov3.checkpoints import CheckpointMismatchError, LayoutError
    from nnunet_meddinov3.cli.weights import checkpoint_path
    from nnunet_meddinov3.visualize.features import FeaturePictureError, feature_picture

    if Path(args.output).is_dir():
        print(f"meddinov3 features: error: -o '{args.output}' is a folder; give the PNG file's name, e.g. "
              f"{Path(args.output) / 'features.png'}", file=sys.stderr)
        return 1
    try:
        if Path(args.checkpoint).expanduser().exists():
            checkpoint_path(args.checkpoint)  # an empty file: say so before any reader guesses
        summary = feature_picture(args.image, args.checkpoint, args.output, slice_index=args.slice,
                                  encoder=args.encoder, size=args.size,
                                  point=tuple(args.point) if args.point else None, intensity=args.intensity,
                                  foreground_threshold=args.foreground_threshold)
    except (FeaturePictureError, CheckpointMismatchError, LayoutError, FileNotFoundError, ValueError) as e:
        print(f"meddinov3 features: error: {e}", file=sys.stderr)
        return 1
    for option, source in (("encoder", summary["encoder_source"]), ("intensity", summary["intensity_source"])):
        if getattr(args, option) and not source.startswith(f"--{option}"):
            print(f"meddinov3 features: note: --{option} {getattr(args, option)} not used; the {source} records "
                  f"the {option}", file=sys.stderr)
    print(f"image:     {summary['image']}")
    print(f"encoder:   {summary['encoder']} ({summary['encoder_source']}), weights {summary['checkpoint']} "
          f"(layout {summary['layout']})")
    print(f"intensity: {summary['intensity']} ({summary['intensity_source']})")
    print(f"foreground patches: {summary['foreground_patches']}/{summary['patches']}")
    print(f"Wrote {summary['output']} ({3 * summary['size']}x{summary['size']} px)")
    return 0
