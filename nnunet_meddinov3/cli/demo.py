"""``meddinov3 demo``: the whole workflow on a synthetic CT dataset, on a CPU.

Writes a small CT-like dataset in nnU-Net raw format, plans and preprocesses it with the stock
command, pretrains the tiny encoder on the unlabelled training images (``python -m pretrain``; the
held-out test images and fold 0's validation cases excluded by the leakage guard) and exports it,
trains the stock nnU-Net 2D baseline and the tiny MedDINOv3 variant from scratch and from the export
on the same fold for the same budget, predicts the held-out cases with ``nnUNetv2_predict``,
evaluates them with ``nnUNetv2_evaluate_folder``, prints a per-class Dice table and the linear-probe
table of the export against a random init (``meddinov3 probe``). Every step is the real console
script; the full logs are kept in the work folder, and the console shows each step's progress lines. When
a step fails, the tables of the steps that finished are printed before the failure.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_meddinov3.checkpoints.registry import WEIGHTS_ENV
from nnunet_meddinov3.training.recipe import LEGACY_ENV

# --dataset: (nnU-Net id, name, generator module, volume shape); the thorax is the second generator, for a
# result that is not tuned to the first
DATASETS = {"ct": (501, "SyntheticCT", "synthetic_ct.write_nnunet_raw_dataset", (12, 96, 96)),
            "thorax": (502, "SyntheticThorax", "synthetic_thorax.write_thorax_dataset", (20, 112, 128))}
# --3d CONTEXT ...: the tiny 3D trainer of each cross-slice context (nnunet_meddinov3/training/trainer_3d.py)
TRAINERS_3D = {"slice_attention": "nnUNetTrainerMedDINOv3_3D_Tiny", "depth_conv": "nnUNetTrainerMedDINOv3_3D_TinyDepthConv",
               "none": "nnUNetTrainerMedDINOv3_3D_TinyPerSlice"}
# the random init the pretraining starts from (tiny_stage1's model.layer_scale_init), the probe's baseline
RANDOM_BASELINE = "random:meddinov3_tiny,layer_scale_init=1.0"
PRETRAIN_STOPPED_COLLAPSE = 4  # python -m pretrain's exit status for a run the collapse monitor stopped
# Lines of a step's output the console shows (the log keeps all): nnU-Net's planning stages, per-epoch lines
# ("Epoch 3", train_loss, val_loss, "Pseudo dice", "Epoch time") and per-case prediction lines, the
# pretraining's progress lines (pretrain/engine/progress.py's progress_line: "... | ETA 0:02:43"), slice-cache
# and thread-count notes, the end of each run, and anything that reads like a problem.
PROGRESS_MARKERS = ("Fingerprint extraction", "Experiment planning", "Preprocessing dataset", "Epoch ", "train_loss",
                    "val_loss", "Pseudo dice", "Mean Validation Dice", "done with ", "| ETA ", "INFO pretrain",
                    "CPU thread", "finished at iteration", "stopped_", "paused at", "Wrote", "WARNING", "Traceback",
                    "Error", "error:")
# A tqdm bar's update (each carriage return ends a line of the pipe): "Preprocessing cases:  25%|##  | 2/8 [00:07<..."
BAR_UPDATE = re.compile(r"^(.*?)\s*\d+%\|.*\| *(\d+)/(\d+) \[")
BAR_INTERVAL_S = 10.0  # as often as the pretraining's progress lines


class StepFailed(Exception):
    """A step's command exited with a status the demo cannot go on from; the message names its log."""


@dataclass
class DemoResults:
    """What the finished steps produced, for the tables: printed at the end, or before a failure."""

    summaries: dict[str, dict] = field(default_factory=dict)  # run label -> nnU-Net's summary.json
    pretraining: dict | None = None
    probe: dict | None = None


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="meddinov3_demo",
                        help="folder the demo writes everything to: nnU-Net's raw/preprocessed/results, the "
                             "pretraining run, predictions and logs, about 158 MB (default ./meddinov3_demo)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs for each trainer (default 30)")
    parser.add_argument("--iterations", type=int, default=25, help="iterations per epoch (default 25)")
    parser.add_argument("--num-train", type=int, default=16, help="synthetic training cases (default 16)")
    parser.add_argument("--num-test", type=int, default=6, help="synthetic held-out test cases (default 6)")
    parser.add_argument("--pretrain-iterations", type=int, default=1500,
                        help="iterations of the tiny self-distillation pretraining (default 1500; 0 skips pretraining)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="device for pretraining, training and prediction (default cpu)")
    parser.add_argument("--3d", dest="contexts_3d", nargs="*", choices=sorted(TRAINERS_3D), default=None,
                        metavar="CONTEXT",
                        help="also train nnU-Net's stock 3d_fullres and the tiny MedDINOv3 3D model (from the "
                             "export) on the same fold; CONTEXT: the cross-slice context(s) to compare, of "
                             f"{', '.join(sorted(TRAINERS_3D))} (default slice_attention)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ct",
                        help="the synthetic dataset: ct (abdomen-like, the default) or thorax (a second generator)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of the whole pipeline (2 epochs, 60 pretraining iterations): its numbers "
                             "mean nothing")


def _environment(workdir: Path, args) -> dict:
    from nnunet_meddinov3.cli.env import ext_trainer_value
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
        nnUNet_results=str(workdir / "nnUNet_results"),
        nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer")),
        nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", "2"), nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"),
        # The same budget for every trainer, on stock nnUNetPlans (no recipe block there): an explicit,
        # recorded recipe override (each run's checkpoint and training log say so).
        MEDDINOV3_RECIPE_OVERRIDE=f"epochs={args.epochs} iterations={args.iterations} "
                                  f"val_iterations={max(1, args.iterations // 5)}",
        PYTHONUNBUFFERED="1",  # progress lines reach the console as they happen, not at the end of a step
    )
    env.pop(WEIGHTS_ENV, None)
    for variable in LEGACY_ENV:  # the old recipe variables of the calling shell would join the override
        env.pop(variable, None)
    return env


def is_progress_line(line: str) -> bool:
    return any(marker in line for marker in PROGRESS_MARKERS)


class ConsoleFilter:
    """Which lines of one step's output the console shows: its progress lines, and the updates of its
    progress bars at most every BAR_INTERVAL_S seconds and where a bar completes."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.last_bar_at, self.last_bar = clock(), None

    def shows(self, line: str) -> bool:
        bar = BAR_UPDATE.match(line)
        if bar is None:
            self.last_bar = None
            return is_progress_line(line)
        now, (name, done, total) = self.clock(), bar.groups()
        # tqdm draws a finished bar twice in a row
        complete = done == total and (name, done, total) != self.last_bar
        if not complete and now - self.last_bar_at < BAR_INTERVAL_S:
            return False
        self.last_bar_at, self.last_bar = now, (name, done, total)
        return True


def step_threads(args, loader_workers: int) -> int | None:
    """OMP_NUM_THREADS for a step on the CPU whose command starts ``loader_workers`` loader processes: the
    cores they leave (nnunet_meddinov3.cpu_threads). None (leave it) on CUDA or where the user set it.
    nnUNetv2_train and nnUNetv2_predict give their own process one thread per core on a CPU
    (torch.set_num_threads), whatever it says; their worker processes still take it."""
    from nnunet_meddinov3.cpu_threads import choose_threads
    choice = choose_threads(loader_workers) if args.device == "cpu" else None
    return None if choice is None else choice[0]


def _step(title: str, cmd: list[str], env: dict, log_dir: Path, ok_codes: tuple[int, ...] = (0,),
          threads: int | None = None) -> int:
    """Run one console script (with OMP_NUM_THREADS=``threads`` where given), echo its progress lines, keep
    its full log; raise StepFailed on an exit status not in ``ok_codes``, else return it."""
    if threads is not None:
        env = dict(env, OMP_NUM_THREADS=str(threads))
    shown = ([f"OMP_NUM_THREADS={threads}"] if threads is not None else []) + cmd
    print(f"\n==> {title}\n    $ {' '.join(shown)}", flush=True)
    log = log_dir / (title.lower().replace(" ", "_").replace("/", "_") + ".log")
    start = time.time()
    console = ConsoleFilter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, encoding="utf-8", errors="replace")
        for line in proc.stdout:  # universal newlines: a bar's carriage-return updates come as lines
            f.write(line)
            if console.shows(line):
                print("    " + line.rstrip()[-200:], flush=True)
        proc.wait()
    if proc.returncode not in ok_codes:
        raise StepFailed(f"step '{title}' failed (exit {proc.returncode}); full log: {log}")
    print(f"    done in {time.time() - start:.0f} s (log: {log})", flush=True)
    return proc.returncode


def _dice_table(summaries: dict[str, dict], labels: dict[str, int]) -> str:
    names = [n for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]
    width = max(22, *(len(t) + 2 for t in summaries))
    header = f"{'class':<12}" + "".join(f"{t:>{width}}" for t in summaries)
    rows = [header, "-" * len(header)]
    for name in names + ["mean"]:
        cells = []
        for summary in summaries.values():
            if name == "mean":
                cells.append(summary["foreground_mean"]["Dice"])
            else:
                cells.append(summary["mean"][str(labels[name])]["Dice"])
        rows.append(f"{name:<12}" + "".join(f"{c:>{width}.4f}" for c in cells))
    return "\n".join(rows)


def _pretraining_summary(run_dir: Path) -> dict | None:
    """The DINO loss and the teacher head's logit spread over the first and last 100 iterations: whether
    self-distillation left ln K (uniform targets) or sat there (pretrain/README.md, "Does it learn?")."""
    import yaml

    from pretrain.engine.progress import read_metrics

    metrics = [m for m in read_metrics(run_dir) if m.get("finite", True)]
    if not metrics:
        return None
    window = min(100, max(1, len(metrics) // 4))

    def mean(key, part):
        return sum(m[key] for m in part) / len(part)

    prototypes = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["dino_head"]["prototypes"]
    first, last = metrics[:window], metrics[-window:]
    return {"iterations": metrics[-1]["iteration"], "window": window, "ln_k": math.log(prototypes),
            "dino_loss": [mean("dino_loss", first), mean("dino_loss", last)],
            "teacher_logit_std": [mean("teacher_logit_std", first), mean("teacher_logit_std", last)]}


def _train_predict_evaluate(tag: str, trainer: str, env: dict, raw: Path, workdir: Path, logs: Path, args,
                            configuration: str = "2d") -> dict:
    """Train fold 0, predict the held-out cases and evaluate them; ``tag`` names the logs and predictions."""
    workers, dataset_id = int(env["nnUNet_def_n_proc"]), str(DATASETS[args.dataset][0])
    _step(f"Train {tag}", ["nnUNetv2_train", dataset_id, configuration, "0", "-tr", trainer, "-device", args.device],
          env, logs, threads=step_threads(args, int(env["nnUNet_n_proc_DA"])))
    pred = workdir / "predictions" / tag
    _step(f"Predict {tag}", ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", dataset_id,
                             "-c", configuration, "-tr", trainer, "-f", "0", "-device", args.device], env, logs,
          threads=step_threads(args, workers))
    _step(f"Evaluate {tag}", ["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(pred), "-djfile",
                              str(raw / "dataset.json"), "-pfile", str(pred / "plans.json")], env, logs,
          threads=step_threads(args, workers))
    return json.loads((pred / "summary.json").read_text())


def pretrain_resume_option(run_dir: Path) -> list[str]:
    """``--resume`` where the run folder has a checkpoint (a rerun of the demo goes on from it, or finds it
    done), else nothing: on a first run it would only warn that there is nothing to resume."""
    from pretrain.engine.checkpoint import latest_checkpoint
    return ["--resume"] if latest_checkpoint(run_dir) is not None else []


def _pretrain(args, env: dict, raw: Path, workdir: Path, logs: Path, results: DemoResults) -> Path:
    """Pretrain the tiny encoder on the training images (fold 0's validation cases and the held-out images
    left out), print what its losses did, export it; returns the export."""
    from nnunet_meddinov3.evaluation.probe import preprocessed_split
    from pretrain.configs import load_config
    dataset_name = raw.name
    validation = preprocessed_split(dataset_name, "2d", "nnUNetPlans", 0, preprocessed=env["nnUNet_preprocessed"]).val
    run_dir, export = workdir / "pretrain" / "tiny_stage1", workdir / "pretrain" / "demo_export.safetensors"
    resume = pretrain_resume_option(run_dir)
    loader_workers = load_config("tiny_stage1").data.num_workers
    code = _step("Pretrain the tiny encoder", [
        sys.executable, "-m", "pretrain", "train", "--config", "tiny_stage1", "--data", str(raw), "--output",
        str(run_dir), *resume, f"train.iterations={args.pretrain_iterations}", "train.checkpoint_every=0",
        f"data.exclude_test_images_of=[{raw}]", f"data.exclude_case_ids=[{', '.join(validation)}]",
        # nnU-Net's normalisation of this dataset, so fine-tuning sees what pretraining saw
        "data.intensity.kind=nnunet",
        f"data.intensity.plans={Path(env['nnUNet_preprocessed']) / dataset_name / 'nnUNetPlans.json'}"], env, logs,
        ok_codes=(0, PRETRAIN_STOPPED_COLLAPSE), threads=step_threads(args, loader_workers))
    if code == PRETRAIN_STOPPED_COLLAPSE:
        print("    the collapse monitor stopped pretraining (see the log); the demo goes on with the checkpoint "
              "it saved, and the probe below says whether its features are of use", flush=True)
    results.pretraining = _pretraining_summary(run_dir)
    if results.pretraining:
        (d0, d1), (s0, s1) = results.pretraining["dino_loss"], results.pretraining["teacher_logit_std"]
        print(f"    DINO loss {d0:.3f} -> {d1:.3f} (ln K = {results.pretraining['ln_k']:.3f}: uniform targets), "
              f"teacher logit spread {s0:.3f} -> {s1:.3f}: mean of the first and last "
              f"{results.pretraining['window']} iterations", flush=True)
    _step("Export the pretrained encoder", [sys.executable, "-m", "pretrain", "export", "--run", str(run_dir),
                                            "--output", str(export)], env, logs, threads=step_threads(args, 0))
    return export


def _runs(args, env: dict, workdir: Path, export: Path | None) -> dict[str, tuple[str, dict, str, str]]:
    """label -> (trainer, environment, tag, configuration) of each training, in order."""
    runs = {"nnU-Net 2D (stock)": ("nnUNetTrainerShortSchedule", env, "nnUNetTrainerShortSchedule", "2d"),
            "MedDINOv3 tiny, scratch": ("nnUNetTrainerMedDINOv3_Tiny", env, "nnUNetTrainerMedDINOv3_Tiny", "2d")}
    # the pretrained runs get a results folder of their own: the trainers' names are the scratch runs'
    pretrained_env = dict(env, nnUNet_results=str(workdir / "nnUNet_results_pretrained"))
    if export is not None:
        pretrained_env[WEIGHTS_ENV] = str(export)
        runs["MedDINOv3 tiny, own pretraining"] = ("nnUNetTrainerMedDINOv3_Tiny", pretrained_env,
                                                   "nnUNetTrainerMedDINOv3_Tiny_pretrained", "2d")
    if args.contexts_3d is not None:
        runs["nnU-Net 3d_fullres (stock)"] = ("nnUNetTrainerShortSchedule", env, "nnUNetTrainerShortSchedule_3d",
                                              "3d_fullres")
        start = "own pretraining" if export is not None else "scratch"
        for context in args.contexts_3d or ["slice_attention"]:
            trainer = TRAINERS_3D[context]
            runs[f"MedDINOv3 3D tiny, {context}, {start}"] = (trainer, pretrained_env, f"{trainer}_{start.split()[0]}",
                                                              "3d_fullres")
    return runs


def _pipeline(args, env: dict, raw: Path, workdir: Path, logs: Path, results: DemoResults) -> None:
    """Every step, in order; what each finished step produced goes into ``results``."""
    dataset_id = str(DATASETS[args.dataset][0])
    configurations = ["2d"] + (["3d_fullres"] if args.contexts_3d is not None else [])
    _step("Plan and preprocess", ["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", *configurations,
                                  "-np", env["nnUNet_def_n_proc"]], env, logs,
          threads=step_threads(args, int(env["nnUNet_def_n_proc"])))
    export = _pretrain(args, env, raw, workdir, logs, results) if args.pretrain_iterations > 0 else None

    for label, (trainer, run_env, tag, configuration) in _runs(args, env, workdir, export).items():
        results.summaries[label] = _train_predict_evaluate(tag, trainer, run_env, raw, workdir, logs, args,
                                                           configuration)
    if export is not None:
        _step("Probe the export against a random init", [
            "meddinov3", "probe", "-d", dataset_id, "--weights", RANDOM_BASELINE, str(export),
            "-o", str(workdir / "probe")], env, logs, threads=step_threads(args, 0))
        results.probe = json.loads((workdir / "probe" / "probe.json").read_text())


def _conclude(results: DemoResults, raw: Path, workdir: Path, args, failure: StepFailed | None = None) -> None:
    """Print the Dice and probe tables of what finished and write demo_results.json; after a failure, then
    raise it as the command's error (exit status 1)."""
    budget = f"{args.epochs} epochs x {args.iterations} iterations each, fold 0, {args.num_test} held-out cases"
    smoke = " -- SMOKE TEST (--quick): these numbers mean nothing" if args.quick else ""
    partial = " -- the runs that finished before the failure below" if failure else ""
    if results.summaries:
        labels = json.loads((raw / "dataset.json").read_text())["labels"]
        print(f"\nDice on held-out cases ({budget}){smoke}{partial}:\n{_dice_table(results.summaries, labels)}")
    if results.probe is not None:
        print(f"\nLinear probe (frozen encoder, fold 0 validation cases, mean Dice over classes){smoke}:")
        for source, result in results.probe["results"].items():
            name = "random init" if source.startswith("random:") else "own pretraining"
            print(f"    {name:<16} {result['dice']['mean']:.4f}")
    if failure is None:
        print("\nReading: a synthetic dataset this small and a budget this short show the mechanics and the sign of "
              "an effect,\nnot its size; real CT and released weights (meddinov3 weights fetch) on a GPU are what "
              "the paper's gains need." if not args.quick else "\nA --quick run checks that every step works; its "
              "numbers mean nothing.")
    (workdir / "demo_results.json").write_text(json.dumps(
        {"budget": budget, "pretrain_iterations": args.pretrain_iterations, "pretraining": results.pretraining,
         "dice": {k: {"mean": v["mean"], "foreground_mean": v["foreground_mean"]}
                  for k, v in results.summaries.items()},
         "probe": None if results.probe is None else {k: v["dice"] for k, v in results.probe["results"].items()},
         "failed": None if failure is None else str(failure)}, indent=2))
    if failure is not None:
        raise SystemExit(str(failure))


def run(args) -> int:
    if args.quick:
        args.epochs, args.iterations, args.num_train, args.num_test = 2, 5, 8, 2
        args.pretrain_iterations = min(args.pretrain_iterations, 60)
    workdir = Path(args.workdir).resolve()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = _environment(workdir, args)
    start = time.time()
    print(f"Work folder: {workdir} (nnU-Net's raw/preprocessed/results, the pretraining run, logs; --workdir "
          "to change)", flush=True)
    if args.quick:
        print("--quick: a smoke test that every step runs (2 epochs, 60 pretraining iterations); its Dice and probe "
              "numbers mean nothing", flush=True)
    if step_threads(args, 0) is not None:
        from nnunet_meddinov3.cpu_threads import available_cores
        print(f"CPU threads: each step gets OMP_NUM_THREADS = the {available_cores()} available core(s) (of those other jobs leave idle) minus its "
              "loader workers, at least 1 (more spin-wait against the loaders); set OMP_NUM_THREADS to choose",
              flush=True)

    dataset_id, name, generator, shape = DATASETS[args.dataset]
    raw = Path(env["nnUNet_raw"]) / f"Dataset{dataset_id:03d}_{name}"
    if not (raw / "dataset.json").exists():
        print(f"==> Writing the synthetic dataset to {raw}", flush=True)
        module, function = generator.split(".")
        write = getattr(importlib.import_module(f"nnunet_meddinov3.data.{module}"), function)
        write(env["nnUNet_raw"], dataset_id, num_train=args.num_train, num_test=args.num_test, shape=shape)
    results = DemoResults()
    try:
        _pipeline(args, env, raw, workdir, logs, results)
    except StepFailed as failure:
        _conclude(results, raw, workdir, args, failure)
    _conclude(results, raw, workdir, args)
    print(f"\nTotal time {(time.time() - start) / 60:.1f} min. Results: {workdir / 'demo_results.json'}")
    return 0
