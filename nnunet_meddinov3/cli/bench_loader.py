"""``meddinov3 bench_loader``: can nnU-Net's data loading and augmentation feed the GPU?

Images/s of nnU-Net's own training pipeline for a preprocessed dataset, first for one worker process
(with the time of each transform), then for nnU-Net's worker pool as ``nnUNetv2_train`` starts it.
With ``--gpu-images-per-s`` (e.g. a training rate from ``meddinov3 bench``) it says how many workers
that rate needs. Method: :mod:`nnunet_meddinov3.benchmark.loader`.

    meddinov3 bench_loader -d 501 -c 2d_highres
    meddinov3 bench_loader -d 501 -c 2d -p nnUNetPlans -tr nnUNetTrainer --workers 4 --gpu-images-per-s 60
"""
from __future__ import annotations

import json
import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name, preprocessed by nnU-Net")
    parser.add_argument("-c", "--configuration", default="2d_highres",
                        help="configuration of the plans (default 2d_highres)")
    parser.add_argument("-p", "--plans", default="nnUNetPlansMedDINOv3",
                        help="plans identifier (default nnUNetPlansMedDINOv3)")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerMedDINOv3",
                        help="trainer whose pipeline is measured (default nnUNetTrainerMedDINOv3; nnU-Net's own "
                             "trainers work too)")
    parser.add_argument("-f", "--fold", type=int, default=0, help="fold whose training cases are loaded (default 0)")
    parser.add_argument("--batches", type=int, default=10,
                        help="batches timed for one worker (default 10); the worker pool times max(this, 2 x workers) and at least 3 s")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of the pool measurement (default: as many as nnU-Net starts here, "
                             "nnUNet_n_proc_DA or its default; 0 skips it)")
    parser.add_argument("--gpu-images-per-s", type=float, default=None, metavar="RATE",
                        help="the training rate to feed, in images/s (e.g. batch / step time from meddinov3 bench): "
                             "prints the workers it needs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="the trainer's device; on cuda the pool pins memory as in training (default auto)")
    parser.add_argument("-o", "--output", default=None, help="also write the numbers to this JSON file")


def report_lines(result, gpu_images_per_s: float | None) -> list[str]:
    patch = " x ".join(str(p) for p in result.patch_size)
    crop = " x ".join(str(p) for p in result.crop_size)
    lines = [f"nnU-Net's training pipeline: {result.dataset} {result.configuration}, plans {result.plans}, "
             f"trainer {result.trainer}, fold {result.fold}",
             f"batch {result.batch_size} of {patch} patches, cut from {crop} crops before the spatial transform",
             "",
             f"one worker (1 thread, as nnU-Net's workers): {result.ms_per_image_one_worker:.1f} ms per image = "
             f"{result.images_per_s_one_worker:.1f} images/s ({result.images_one_worker} images)"]
    width = max(len(stage) for stage, _ in result.stages_ms)
    lines += [f"  {stage:<{width}}  {ms:7.1f} ms" for stage, ms in result.stages_ms]
    source = "nnUNet_n_proc_DA" if os.environ.get("nnUNet_n_proc_DA") else "its default; nnUNet_n_proc_DA unset"
    lines.append(f"nnU-Net starts {result.nnunet_workers} worker(s) here ({source}; {result.cpus} CPUs)")
    if result.images_per_s_workers is not None:
        ideal = result.workers * result.images_per_s_one_worker
        lines.append(f"{result.workers} worker(s), nnU-Net's NonDetMultiThreadedAugmenter: "
                     f"{result.images_per_s_workers:.1f} images/s ({result.images_workers} images; "
                     f"{result.workers} x one worker would be {ideal:.1f})")
    if gpu_images_per_s is not None:
        needed = result.workers_needed(gpu_images_per_s)
        line = f"to feed {gpu_images_per_s:g} images/s: {needed} worker(s) at the one-worker rate"
        if result.images_per_s_workers is not None:
            ratio = result.images_per_s_workers / gpu_images_per_s
            verdict = "enough" if ratio >= 1 else "NOT enough: the GPU would wait for data"
            line += f"; the {result.workers} measured deliver {ratio:.2f}x that ({verdict})"
        lines.append(line)
    return lines


def run(args) -> int:
    from nnunet_meddinov3.cli.datasets import DatasetNotFound, find_dataset
    from nnunet_meddinov3.cli.env import ext_trainer_value

    if args.gpu_images_per_s is not None and args.gpu_images_per_s <= 0:
        print("meddinov3 bench_loader: error: --gpu-images-per-s must be positive", file=sys.stderr)
        return 2
    try:
        dataset = find_dataset(args.dataset, ("nnUNet_preprocessed",),
                               "there are none: run meddinov3 plan_and_preprocess (or nnUNetv2_plan_and_preprocess) "
                               "first, or point nnUNet_preprocessed at its folder")
    except DatasetNotFound as e:
        print(f"meddinov3 bench_loader: error: {e}", file=sys.stderr)
        return 2

    import torch

    from nnunet_meddinov3.benchmark.loader import LoaderBenchError, measure_loader

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        print("meddinov3 bench_loader: error: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return 2
    # nnU-Net finds our trainers only through nnUNet_extTrainer: add our folder for this process.
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))
    try:
        result = measure_loader(dataset, args.configuration, plans=args.plans, trainer=args.trainer, fold=args.fold,
                                batches=args.batches, workers=args.workers, device=device)
    except LoaderBenchError as e:
        print(f"meddinov3 bench_loader: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(result, args.gpu_images_per_s)))
    if args.output:
        record = {**result.as_dict(), "gpu_images_per_s": args.gpu_images_per_s, "device": device,
                  "torch": torch.__version__, "command": "meddinov3 " + " ".join(args.argv)}
        if args.gpu_images_per_s is not None:
            record["workers_needed"] = result.workers_needed(args.gpu_images_per_s)
        folder = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(folder, exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(record, f, indent=2)
        print(f"written: {args.output}")
    return 0
