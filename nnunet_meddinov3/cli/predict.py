"""``meddinov3 predict``: segment nnU-Net folders, image files with any names, or DICOM series trees.

    meddinov3 predict -i INPUT -o OUTPUT -d DATASET -c CONFIG -tr TRAINER [-p PLANS] [-f FOLD ...]
                      [-chk checkpoint_final.pth] [-device cpu|cuda] [--step-size 0.5] [--disable-tta]
                      [-npp 3] [-nps 3] [--keep-staged DIR]

Inputs are converted to nnU-Net-named files and predicted by nnU-Net's own predictor (results equal
``nnUNetv2_predict`` on the converted files); one ``NAME.nii.gz`` per case/series in OUTPUT with the input's
geometry, plus ``NAME.json`` with the DICOM UIDs for DICOM series. Naming rules: see
``nnunet_meddinov3.inference.inputs``.

Exit status: 0 when at least one case was predicted (skipped ones are listed with the reason), 1 when none could
be, 2 for setup errors (nnUNet_results not set, model folder or checkpoint missing, no inputs found).
"""
from __future__ import annotations

import os
import sys


def _fold(value: str) -> str:
    if value != "all" and not value.isdigit():
        raise ValueError(value)
    return value


_fold.__name__ = "fold (a number or 'all')"


EPILOG = """\
inputs (the folder tree is searched; DICOM and image files may be mixed):
  DICOM series  the files of one folder sharing a SeriesInstanceUID -> PatientID_SeriesDescription.nii.gz
                (file-name safe; the SeriesInstanceUID if both are empty) + .json sidecar with the Study/Series/
                SOPInstanceUIDs (slice order), source folder and files
  image files   .nii.gz .nii .nrrd .mha -> same name .nii.gz (CASE_0000.nii.gz -> CASE.nii.gz, as nnU-Net);
                multi-channel models need nnU-Net naming CASE_0000 ... CASE_000N in one folder
  repeated names get _2, _3, ...; unreadable series/files are listed with the reason and skipped
  a DICOM file that cannot be read is named with the series it belongs to, and that series is skipped:
  its readable slices may cover less anatomy than was acquired (--allow-partial-series predicts them anyway;
  the .json sidecar then lists the files used and the unreadable ones)
checks (stock nnUNetv2_predict makes none and fails with a traceback; this command skips the case and says why):
  the model's number of channels per case; 2D or 3D images with one value per voxel (no 4D, no colour);
  channels of one case with the same size and geometry; readable DICOM files and even slice spacing
  NaN/-Inf voxels become the image's lowest finite value and +Inf its highest, with a WARNING line per case
exit status: 0 if anything was predicted, 1 if nothing could be, 2 for setup errors
"""


def add_arguments(parser) -> None:
    import argparse
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("-i", "--input", required=True,
                        help="folder (searched recursively) with DICOM series and/or .nii.gz/.nii/.nrrd/.mha files, "
                             "e.g. an nnU-Net imagesTs folder")
    parser.add_argument("-o", "--output", required=True, help="folder for NAME.nii.gz (+ NAME.json for DICOM)")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, as for nnUNetv2_predict")
    parser.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 2d")
    parser.add_argument("-tr", "--trainer", required=True, help="trainer class name, e.g. nnUNetTrainerMedDINOv3")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", "--folds", nargs="+", type=_fold, default=None,
                        help="folds to ensemble (default: every fold that has the checkpoint)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                        help="checkpoint file name inside fold_X (default checkpoint_final.pth)")
    parser.add_argument("-device", "--device", choices=("cuda", "cpu", "mps"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--step-size", "-step_size", type=float, default=0.5,
                        help="sliding-window step as a fraction of the patch (default 0.5)")
    parser.add_argument("--disable-tta", "--disable_tta", action="store_true",
                        help="no mirroring test-time augmentation (faster, usually slightly worse)")
    parser.add_argument("-npp", type=int, default=3, help="preprocessing processes (default 3; -npp 0 -nps 0: "
                                                          "no worker processes)")
    parser.add_argument("-nps", type=int, default=3, help="segmentation export processes (default 3)")
    parser.add_argument("--allow-partial-series", action="store_true",
                        help="predict a DICOM series even when some of its files cannot be read (default: skip it); "
                             "the sidecar lists the files used and those left out")
    parser.add_argument("--keep-staged", metavar="DIR", default=None,
                        help="keep the converted nnU-Net-named inputs in DIR/imagesTs (+ DIR/cases.json: staged "
                             "name -> output name and source), e.g. to rerun nnUNetv2_predict on them")


def run(args) -> int:
    from nnunet_meddinov3.cli.datasets import trained_dataset_is_known
    from nnunet_meddinov3.cli.env import ext_trainer_value
    from nnunet_meddinov3.inference.clinical import predict_cases
    from nnunet_meddinov3.inference.model_folder import find_model_folder
    from nnunet_meddinov3.inference.report import PredictError

    if not trained_dataset_is_known("predict", args.dataset):  # 'Liver': the trained datasets are named
        return 2

    # nnU-Net finds our trainers only through nnUNet_extTrainer: add our folder for this process.
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model_folder = find_model_folder(args.dataset, args.trainer, args.plans, args.configuration)
        report = predict_cases(args.input, args.output, model_folder, folds=args.folds, checkpoint=args.checkpoint,
                               device=device, step_size=args.step_size, use_mirroring=not args.disable_tta,
                               npp=args.npp, nps=args.nps, keep_staged=args.keep_staged,
                               allow_partial_series=args.allow_partial_series)
    except PredictError as e:
        print(f"meddinov3 predict: error: {e}", file=sys.stderr)
        return 2
    print()
    for note in report.warnings:
        print(f"WARNING {note.source}: {note.message}")
    for case, output in report.predicted:
        print(f"predicted {output}  <-  {case.source}")
        left_out = (case.dicom or {}).get("unreadable_files")
        if left_out:
            print(f"  PARTIAL: {len(left_out)} unreadable file(s) left out ({', '.join(left_out)}); the segmentation "
                  f"covers the {len(case.files)} readable slices only")
    for skipped in report.skipped:
        print(f"SKIPPED {skipped.source}: {skipped.reason}")
    print(f"meddinov3 predict: {report.summary()}")
    return 0 if report.predicted else 1
