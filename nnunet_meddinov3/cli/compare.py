"""``meddinov3 compare``: trainers' cross-validation results side by side, straight from nnU-Net's result folders.

Per class: Dice mean +/- std over the cases every trainer has, the difference to the first (baseline) trainer and a
paired Wilcoxon signed-rank p-value; optionally the same for the normalised surface distance (NSD). Writes
comparison.csv, comparison.json and boxplot.png.
"""
from __future__ import annotations

import sys

from nnunet_meddinov3.evaluation.folders import DEFAULT_FOLDS


def add_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (as for nnUNetv2_* commands)")
    parser.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--trainers", nargs="+", required=True, metavar="TRAINER",
                        help="trainer class names; the first is the baseline the others are tested against")
    parser.add_argument("--folds", nargs="+", type=int, default=list(DEFAULT_FOLDS),
                        help="cross-validation folds to use where present (default 0 1 2 3 4)")
    parser.add_argument("--nsd-tolerance", type=float, default=None, metavar="MM",
                        help="also compute the normalised surface distance at this tolerance in mm (reads the "
                             "validation predictions and nnU-Net's gt_segmentations)")
    parser.add_argument("-o", "--output-dir", default=None,
                        help="where to write CSV/JSON/PNG (default $nnUNet_results/DatasetXXX/compare_CONFIG_PLANS)")


def run(args) -> int:
    from nnunet_meddinov3.cli.datasets import trained_dataset_is_known
    from nnunet_meddinov3.evaluation.compare import compare_trainers, write_outputs
    from nnunet_meddinov3.evaluation.folders import CompareError
    from nnunet_meddinov3.evaluation.report import format_report

    if not trained_dataset_is_known("compare", args.dataset):  # 'Liver': the trained datasets are named
        return 1

    if args.nsd_tolerance is not None and args.nsd_tolerance < 0:
        print("meddinov3 compare: error: --nsd-tolerance must be >= 0 mm", file=sys.stderr)
        return 2
    try:
        comparison = compare_trainers(args.dataset, args.configuration, args.trainers, plans=args.plans,
                                      folds=args.folds, nsd_tolerance_mm=args.nsd_tolerance,
                                      progress=lambda message: print(message, file=sys.stderr, flush=True))
    except CompareError as e:
        print(f"meddinov3 compare: error: {e}", file=sys.stderr)
        return 1
    print(format_report(comparison))
    paths = write_outputs(comparison, args.output_dir)
    print()
    print(f"Wrote {paths['csv']}")
    print(f"      {paths['json']}")
    print(f"      {paths['png']}")
    return 0
