"""``meddinov3 plan_and_preprocess``: nnU-Net fingerprint -> our 2D planner -> nnU-Net preprocessing.

nnU-Net's ``-pl`` only finds planners inside its own package, so this runs the same three steps
through nnU-Net's API with ``nnUNetPlannerMedDINOv3``. Stock plans are never touched.
"""
from __future__ import annotations

import os

from nnunet_meddinov3.cli.datasets import find_dataset
from nnunet_meddinov3.network.configs import DECODER_NAMES, PATCH_SIZE, VIT_SIZES
from nnunet_meddinov3.training import recipe


def add_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (as for nnUNetv2_* commands)")
    parser.add_argument("-c", "--configurations", nargs="+", default=["2d", "2d_highres"],
                        choices=("2d", "2d_highres", "3d_fullres"),
                        help="configurations to preprocess (default: 2d 2d_highres; all three are planned)")
    parser.add_argument("--vit", default=recipe.ENCODER, choices=VIT_SIZES,
                        help=f"ViT size written into the plans (default {recipe.ENCODER})")
    parser.add_argument("--decoder", default=recipe.DECODER, choices=sorted(DECODER_NAMES),
                        help=f"decoder written into the plans (default {recipe.DECODER})")
    parser.add_argument("--target-patch", type=int, default=recipe.HIGHRES_PATCH,
                        help=f"longest side of the 2d_highres patch, a multiple of 16 (default {recipe.HIGHRES_PATCH}; "
                             f"0 disables it)")
    parser.add_argument("--gpu-memory-gb", type=float, default=8.0,
                        help="GPU memory target in GB from which the batch size is planned (default 8)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute the encoder blocks in the backward pass (less memory, so bigger batches "
                             "for big patches, at about a third more encoder compute)")
    parser.add_argument("--intensity-from", default="none", metavar="WEIGHTS",
                        help="registry name or file whose recorded pretraining intensity convention the plans' "
                             "normalisation takes its numbers from (e.g. meddinov3-vitb16-ct3m: HU window "
                             "[-1000, 1000], mean 65.1, std 178.0); default 'none': nnU-Net's dataset statistics, "
                             "as in the MedDINOv3 paper's fine-tuning")
    parser.add_argument("--recipe", nargs="+", metavar="KEY=VALUE", default=[],
                        help="fine-tuning recipe written into the plans (the trainers read it; --c checks it), e.g. "
                             f"--recipe epochs=300 encoder_lr=5e-5. Keys: {', '.join(recipe.KEYS)}. Give it a "
                             "--plans-name of its own, so the results folder says which recipe it holds")
    parser.add_argument("--plans-name", default=recipe.PLANS_NAME,
                        help=f"plans identifier to write; nnUNetv2_train -p takes it (default {recipe.PLANS_NAME})")
    parser.add_argument("-np", "--num-processes", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 4)),
                        help="worker processes for fingerprinting and preprocessing (default $nnUNet_def_n_proc or 4)")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="run nnU-Net's dataset integrity check (and fingerprint again) before planning")
    parser.add_argument("--no-preprocess", action="store_true", help="only plan; do not preprocess")


def run(args) -> int:
    if args.target_patch % PATCH_SIZE:
        raise SystemExit(f"--target-patch {args.target_patch} is not a multiple of {PATCH_SIZE} (the ViT patch size); "
                         f"try {round(args.target_patch / PATCH_SIZE) * PATCH_SIZE}")
    try:
        fine_tuning = recipe.parse_assignments(args.recipe, "--recipe")
    except recipe.RecipeError as e:
        raise SystemExit(str(e)) from None
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed") if not os.environ.get(v)]
    if missing:
        raise SystemExit(f"environment variable(s) {', '.join(missing)} not set: nnU-Net needs them to find the "
                         f"raw dataset and to write plans (see `meddinov3 env`)")

    intensity_weights = None if args.intensity_from.lower() == "none" else args.intensity_from
    if intensity_weights is not None:  # before nnU-Net fingerprints and plans: a typo costs seconds, not minutes
        from nnunet_meddinov3.checkpoints.conventions import recorded_intensity
        try:
            recorded_intensity(intensity_weights)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--intensity-from: {e}; or pass --intensity-from none") from None

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        preprocess_dataset,
    )
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunet_meddinov3.training.planner import nnUNetPlannerMedDINOv3

    dataset_name = find_dataset(args.dataset, ("nnUNet_raw", "nnUNet_preprocessed"))
    dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    fingerprint = os.path.join(nnUNet_preprocessed, dataset_name, "dataset_fingerprint.json")
    if args.verify_dataset_integrity or not os.path.isfile(fingerprint):
        extract_fingerprint_dataset(dataset_id, num_processes=args.num_processes,
                                    check_dataset_integrity=args.verify_dataset_integrity, clean=False)

    planner = nnUNetPlannerMedDINOv3(dataset_id, gpu_memory_target_in_gb=args.gpu_memory_gb,
                                     plans_name=args.plans_name)
    planner.encoder, planner.decoder, planner.highres_patch = args.vit, args.decoder, args.target_patch
    planner.grad_checkpointing = args.grad_checkpointing
    planner.intensity_weights = intensity_weights
    planner.fine_tuning_recipe = fine_tuning
    try:
        plans = planner.plan_experiment()
    except ValueError as e:  # the planner's own checks: say what is wrong, without a traceback
        raise SystemExit(f"cannot plan {dataset_name} for MedDINOv3: {e}") from None
    for name, conf in plans["configurations"].items():
        print(f"{args.plans_name} / {name}: patch {conf['patch_size']}, spacing "
              f"{[round(s, 4) for s in conf['spacing']]}, batch {conf['batch_size']}")

    for channel, status in plans["meddinov3_intensity"]["channels"].items():
        print(f"intensity of channel '{channel}': {status}")

    if not args.no_preprocess:
        configurations = [c for c in args.configurations if c in plans["configurations"]]
        for name in sorted(set(args.configurations) - set(configurations)):
            print(f"{name}: not planned ({'a 2D dataset' if name == '3d_fullres' else '--target-patch 0'}), "
                  f"so not preprocessed")
        preprocess_dataset(dataset_id, args.plans_name, configurations, [args.num_processes] * len(configurations))
    if fine_tuning:
        print(f"Recipe in {args.plans_name} (each configuration's '{recipe.PLANS_KEY}' block): "
              f"{recipe.format_assignments(fine_tuning)}")
        if args.plans_name == recipe.PLANS_NAME:
            print(f"Note: under the default plans name the results folder does not say which recipe it holds; "
                  f"--plans-name {recipe.PLANS_NAME}_<tag> gives it a folder of its own")
    print(f"Train with: nnUNetv2_train {dataset_id} 2d FOLD -tr nnUNetTrainerMedDINOv3 -p {args.plans_name}")
    if "3d_fullres" in plans["configurations"]:
        print(f"       3D: nnUNetv2_train {dataset_id} 3d_fullres FOLD -tr nnUNetTrainerMedDINOv3_3D -p {args.plans_name}"
              + ("" if "3d_fullres" in args.configurations else " (preprocess it first: -c 3d_fullres)"))
    return 0

