"""``meddinov3 demo``: the whole workflow on a synthetic CT dataset, on a CPU, in ~10 minutes.

Writes a small CT-like dataset in nnU-Net raw format, plans and preprocesses it with the stock
command, trains the stock nnU-Net 2D baseline and the tiny MedDINOv3 variant on the same fold for
the same budget, predicts the held-out cases with ``nnUNetv2_predict``, evaluates both with
``nnUNetv2_evaluate_folder`` and prints a per-class Dice table. Every step is the real console
script; the full logs are kept in the work folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from nnunet_meddinov3.checkpoints.registry import WEIGHTS_ENV

DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID:03d}_SyntheticCT"
PROGRESS_MARKERS = ("Epoch ", "train_loss", "Pseudo dice", "Mean Validation Dice", "Preprocessing dataset",
                    "Traceback", "Error", "error:")


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="meddinov3_demo",
                        help="folder for nnU-Net's raw/preprocessed/results and logs (default ./meddinov3_demo)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs for each trainer (default 30)")
    parser.add_argument("--iterations", type=int, default=25, help="iterations per epoch (default 25)")
    parser.add_argument("--num-train", type=int, default=16)
    parser.add_argument("--num-test", type=int, default=6)
    parser.add_argument("--weights", default=None,
                        help="encoder weights for the MedDINOv3 run (path or registry name; default random init)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a 2-epoch smoke run of the whole pipeline")


def _environment(workdir: Path, args) -> dict:
    from nnunet_meddinov3.cli.env import ext_trainer_value
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
        nnUNet_results=str(workdir / "nnUNet_results"),
        nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer")),
        nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", "2"), nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"),
        MEDDINOV3_EPOCHS=str(args.epochs), MEDDINOV3_ITERATIONS=str(args.iterations),
        MEDDINOV3_VAL_ITERATIONS=str(max(1, args.iterations // 5)),
    )
    env.pop(WEIGHTS_ENV, None)
    if args.weights:
        env[WEIGHTS_ENV] = args.weights
    return env


def _step(title: str, cmd: list[str], env: dict, log_dir: Path) -> None:
    """Run one console script, echo its progress lines, keep its full log; stop on failure."""
    print(f"\n==> {title}\n    $ {' '.join(cmd)}", flush=True)
    log = log_dir / (title.lower().replace(" ", "_").replace("/", "_") + ".log")
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, encoding="utf-8", errors="replace")
        for line in proc.stdout:
            f.write(line)
            if any(m in line for m in PROGRESS_MARKERS):
                print("    " + line.rstrip()[-110:], flush=True)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"step '{title}' failed (exit {proc.returncode}); full log: {log}")
    print(f"    done in {time.time() - start:.0f} s (log: {log})", flush=True)


def _dice_table(summaries: dict[str, dict], labels: dict[str, int]) -> str:
    names = [n for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]
    header = f"{'class':<12}" + "".join(f"{t:>22}" for t in summaries)
    rows = [header, "-" * len(header)]
    for name in names + ["mean"]:
        cells = []
        for summary in summaries.values():
            if name == "mean":
                cells.append(summary["foreground_mean"]["Dice"])
            else:
                cells.append(summary["mean"][str(labels[name])]["Dice"])
        rows.append(f"{name:<12}" + "".join(f"{c:>22.4f}" for c in cells))
    return "\n".join(rows)


def run(args) -> int:
    if args.quick:
        args.epochs, args.iterations, args.num_train, args.num_test = 2, 5, 8, 2
    workdir = Path(args.workdir).resolve()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = _environment(workdir, args)
    start = time.time()

    from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset
    raw = Path(env["nnUNet_raw"]) / DATASET_NAME
    if not (raw / "dataset.json").exists():
        print(f"==> Writing the synthetic CT dataset to {raw}", flush=True)
        write_nnunet_raw_dataset(env["nnUNet_raw"], DATASET_ID, num_train=args.num_train, num_test=args.num_test,
                                 shape=(12, 96, 96))
    _step("Plan and preprocess", ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d",
                                  "-np", env["nnUNet_def_n_proc"]], env, logs)

    trainers = {"nnU-Net 2D (stock)": "nnUNetTrainerShortSchedule",
                "MedDINOv3 tiny": "nnUNetTrainerMedDINOv3_Tiny"}
    summaries = {}
    for label, trainer in trainers.items():
        _step(f"Train {trainer}", ["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer,
                                   "-device", args.device], env, logs)
        pred = workdir / "predictions" / trainer
        _step(f"Predict {trainer}", ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred),
                                     "-d", str(DATASET_ID), "-c", "2d", "-tr", trainer, "-f", "0",
                                     "-device", args.device], env, logs)
        _step(f"Evaluate {trainer}", ["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(pred),
                                      "-djfile", str(raw / "dataset.json"), "-pfile", str(pred / "plans.json")],
              env, logs)
        summaries[label] = json.loads((pred / "summary.json").read_text())

    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    table = _dice_table(summaries, labels)
    budget = f"{args.epochs} epochs x {args.iterations} iterations each, fold 0, {args.num_test} held-out cases"
    print(f"\nDice on held-out cases ({budget}):\n{table}")
    (workdir / "demo_results.json").write_text(json.dumps(
        {"budget": budget, "dice": {k: {"mean": v["mean"], "foreground_mean": v["foreground_mean"]}
                                    for k, v in summaries.items()}}, indent=2))
    print(f"\nTotal time {(time.time() - start) / 60:.1f} min. Results: {workdir / 'demo_results.json'}")
    return 0

