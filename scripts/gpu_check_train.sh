#!/usr/bin/env bash
# GPU check of issue 11 steps 3-4: nnUNetv2_train and nnUNetv2_predict through the stock commands, on a
# synthetic CT dataset made on the machine. Not yet run on a GPU; scripts/gpu_check.sh runs it after the bench in
# one device call, under a deadline. The CPU dry run below takes 6 minutes on 2 cores and exercises every step.
#   1. the dataset: TRAIN_CASES volumes of SLICES x 512 x 512, and one 200 x 512 x 512 volume to predict;
#   2. our plans (meddinov3 plan_and_preprocess: 2d and 2d_highres at TARGET_PATCH) and nnU-Net's 2d plans;
#   3. meddinov3 bench_loader: images/s of nnU-Net's loader + augmentation at the highres patch, one worker and
#      nnU-Net's worker pool, against the 92 images/s of the 40 % MFU goal (FEED_IMAGES_PER_S);
#   4. nnUNetv2_train ID 2d_highres 0 -tr $TRAINER -p nnUNetPlansMedDINOv3 for EPOCHS epochs (of nnU-Net's 250
#      training and 50 validation iterations unless MEDDINOV3_ITERATIONS / MEDDINOV3_VAL_ITERATIONS say
#      otherwise): the epoch times from nnU-Net's log, which cover both (compare them with the bench's training
#      and inference steps at the plans' batch), and nnUNet_n_proc_DA;
#   5. one epoch each of the stock nnUNetTrainer_1epoch and of our 2d model, so that all three can predict;
#   6. nnUNetv2_predict of the 200-slice volume with each model, nnU-Net's mirroring on and off
#      (--disable_tta): seconds per volume.
#   Steps 4-6 go model by model (MODELS="highres stock 2d"): each is trained and then predicts.
# Writes $OUT/gpu_check_train.json (else ./gpu_check_train.json) and the logs next to it.
#
# Needs nnunetv2 (carried as scripts/gpu_check_bench.sh says; scripts/gpu_env.sh puts it on the path); the
# nnUNetv2_* console scripts are used when installed, else the same entry functions through python -c.
# Knobs for a CPU dry run of the plumbing: CHECK_SIZE=tiny (tiny ViT, small volumes, few iterations,
# on the CPU), EPOCHS, TARGET_PATCH, GPU_MEMORY_GB, TRAINER, DEVICE, STEPS ("loader train predict" by default),
# MODELS, and MEDDINOV3_ITERATIONS (our models' iterations per epoch; nnU-Net's 250 by default).
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" .
export PYTHONWARNINGS=ignore
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_train.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export nnUNet_raw="$WORK/raw" nnUNet_preprocessed="$WORK/preprocessed" nnUNet_results="$WORK/results"
DATASET=991
STEPS="${STEPS:-loader train predict}"
EPOCHS="${EPOCHS:-2}"
if [ "${CHECK_SIZE:-vitb16}" = tiny ]; then
  DEVICE="${DEVICE:-cpu}"
  VIT=tiny SHAPE="(6, 64, 64)" PREDICT_SHAPE="(12, 64, 64)" CASES=6  # 5 folds need 5 cases
  TARGET_PATCH="${TARGET_PATCH:-128}" TRAINER="${TRAINER:-nnUNetTrainerMedDINOv3_Tiny}"
  export MEDDINOV3_ITERATIONS="${MEDDINOV3_ITERATIONS:-4}" MEDDINOV3_VAL_ITERATIONS="${MEDDINOV3_VAL_ITERATIONS:-2}"
else
  DEVICE="${DEVICE:-cuda}"
  VIT=vitb16 SHAPE="(${SLICES:-40}, 512, 512)" PREDICT_SHAPE="(200, 512, 512)" CASES="${TRAIN_CASES:-6}"
  TARGET_PATCH="${TARGET_PATCH:-896}" TRAINER="${TRAINER:-nnUNetTrainerMedDINOv3_Scratch}"
fi
export MEDDINOV3_EPOCHS="$EPOCHS"
LOG="$OUT_DIR/gpu_check_train_logs"
mkdir -p "$LOG"
SUMMARY="$OUT_DIR/gpu_check_train.json"
echo "{}" > "$SUMMARY"

record() {  # record KEY JSON_VALUE: one entry of the summary, written at once (a cut-short run keeps it)
  "$PY" - "$SUMMARY" "$1" "$2" <<'EOF'
import json, sys
path, key, value = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
summary = json.load(open(path))
summary[key] = value
json.dump(summary, open(path, "w"), indent=2)
EOF
}

nnunet() {  # nnunet train|predict|plan ARGS: the console script when installed, else its entry function
  local name module
  case "$1" in
    train) name=nnUNetv2_train module="nnunetv2.run.run_training:run_training_entry" ;;
    predict) name=nnUNetv2_predict module="nnunetv2.inference.predict_from_raw_data:predict_entry_point" ;;
    plan) name=nnUNetv2_plan_and_preprocess
          module="nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry" ;;
  esac
  shift
  if command -v "$name" >/dev/null; then
    "$name" "$@"
  else
    "$PY" -c "import sys; from ${module%%:*} import ${module##*:} as f; sys.argv[0] = '$name'; f()" "$@"
  fi
}

timed() {  # timed NAME COMMAND...: run, log, record {"seconds", "exit"}
  local name="$1" start end status
  shift
  start=$(date +%s.%N)
  "$@" > "$LOG/$name.log" 2>&1
  status=$?
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk "BEGIN { printf \"%.1f\", $end - $start }")
  record "$name" "{\"seconds\": $seconds, \"exit\": $status}"
  echo "$name: $seconds s, exit $status"
  return $status
}

"$PY" - "$nnUNet_raw" "$DATASET" "$CASES" "$SHAPE" "$PREDICT_SHAPE" "$SUMMARY" <<'EOF' || exit 3
import ast, json, os, sys, time
import torch
from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset
raw, dataset, cases, shape, predict_shape, summary_path = sys.argv[1:]
started = time.time()
# NibabelIO: SimpleITK does not travel to the GPU machine (scripts/gpu_deps.sh)
folder = write_nnunet_raw_dataset(raw, dataset_id=int(dataset), name="GpuCheckTrain", num_train=int(cases),
                                  num_test=0, shape=ast.literal_eval(shape), image_io="NibabelIO")
write_nnunet_raw_dataset(os.path.join(raw, "predict"), dataset_id=int(dataset), name="GpuCheckTrain",
                         num_train=1, num_test=0, shape=ast.literal_eval(predict_shape), seed=1, image_io="NibabelIO")
summary = json.load(open(summary_path))
summary["environment"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                          "cpus": os.cpu_count(), "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
                          "dataset": f"{cases} x {shape}", "predict_volume": predict_shape,
                          "our_iterations_per_epoch": int(os.environ.get("MEDDINOV3_ITERATIONS") or 250),
                          "our_val_iterations_per_epoch": int(os.environ.get("MEDDINOV3_VAL_ITERATIONS") or 50),
                          "models": os.environ.get("MODELS", "highres stock 2d")}
json.dump(summary, open(summary_path, "w"), indent=2)
print(f"dataset written in {time.time() - started:.0f} s: {folder}")
EOF
PREDICT_IN="$nnUNet_raw/predict/Dataset${DATASET}_GpuCheckTrain/imagesTr"
# as the README's workflow: nnU-Net finds our trainers through nnUNet_extTrainer
eval "$("$PY" -m nnunet_meddinov3.cli.main env --export)" || exit 3

# 26 GB plans batch 8 at 896 for this dataset (the memory model says 25.4 GB): the batch of scripts/gpu_check_bench.sh's step 3, so that an epoch
# compares with the bench's steps
timed plan_meddinov3 "$PY" -m nnunet_meddinov3.cli.main plan_and_preprocess -d "$DATASET" --vit "$VIT" \
    --target-patch "$TARGET_PATCH" --gpu-memory-gb "${GPU_MEMORY_GB:-26}" || exit 4
timed plan_stock nnunet plan -d "$DATASET" -c 2d || exit 4
"$PY" - "$nnUNet_preprocessed/Dataset${DATASET}_GpuCheckTrain/nnUNetPlansMedDINOv3.json" "$SUMMARY" <<'EOF'
import json, sys
plans = json.load(open(sys.argv[1]))
summary = json.load(open(sys.argv[2]))
summary["plans"] = {name: {"patch_size": c["patch_size"], "batch_size": c["batch_size"]}
                    for name, c in plans["configurations"].items()}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print("our plans:", summary["plans"])
EOF

epoch_times() {  # epoch_times NAME: nnU-Net's "Epoch time: X s" lines of a training log into the summary
  "$PY" - "$LOG/$1.log" "$SUMMARY" "$1" <<'EOF'
import json, re, statistics, sys
times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", open(sys.argv[1]).read())]
summary = json.load(open(sys.argv[2]))
entry = summary.setdefault(sys.argv[3], {})
entry["epoch_times_s"] = times
if len(times) > 1:
    entry["median_epoch_after_first_s"] = statistics.median(times[1:])  # the first compiles
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(f"{sys.argv[3]}: epoch times {times}")
EOF
}

if [[ " $STEPS " == *" loader "* ]]; then
  # Can nnU-Net's loader and augmentation feed the GPU at the highres patch? FEED_IMAGES_PER_S defaults to 92, the
  # rate of the 40 % MFU goal for ViT-B multiscale at 896 on an H100/H200 (4311 GFLOP per training image:
  # benchmark/RESULTS.md, rows L). One worker with each transform's time, then nnU-Net's own worker pool.
  timed loader_2d_highres "$PY" -m nnunet_meddinov3.cli.main bench_loader -d "$DATASET" -c 2d_highres \
      -p nnUNetPlansMedDINOv3 -tr "$TRAINER" --batches "${LOADER_BATCHES:-20}" \
      --gpu-images-per-s "${FEED_IMAGES_PER_S:-92}" -o "$OUT_DIR/gpu_check_loader.json" \
    && record loader_result "$(cat "$OUT_DIR/gpu_check_loader.json")"
  cat "$LOG/loader_2d_highres.log"
fi

# One model at a time, trained and then predicted with, so that a run cut short by a deadline keeps whole pairs.
# MODELS, most important first: our 2d_highres (EPOCHS epochs), the stock nnU-Net 2D model (nnUNetTrainer_1epoch),
# our 2d (1 epoch).
for model in ${MODELS:-highres stock 2d}; do
  case "$model" in
    highres) config=2d_highres trainer="$TRAINER" plans=nnUNetPlansMedDINOv3 epochs="$EPOCHS" ;;
    2d) config=2d trainer="$TRAINER" plans=nnUNetPlansMedDINOv3 epochs=1 ;;
    stock) config=2d trainer=nnUNetTrainer_1epoch plans=nnUNetPlans epochs=1 ;;
    *) echo "unknown model '$model' in MODELS (highres, stock, 2d)"; exit 2 ;;
  esac
  name="train_${trainer}_${config}"
  if [[ " $STEPS " == *" train "* ]]; then
    MEDDINOV3_EPOCHS="$epochs" timed "$name" nnunet train "$DATASET" "$config" 0 -tr "$trainer" -p "$plans" \
        -device "$DEVICE"
    epoch_times "$name"
  fi
  if [[ " $STEPS " == *" predict "* ]]; then
    for tta in on off; do
      extra=()
      [ "$tta" = off ] && extra=(--disable_tta)
      timed "predict_${trainer}_${config}_mirroring_${tta}" nnunet predict -i "$PREDICT_IN" \
          -o "$WORK/pred_${trainer}_${config}_${tta}" -d "$DATASET" -c "$config" -tr "$trainer" -p "$plans" -f 0 \
          -device "$DEVICE" ${extra[@]+"${extra[@]}"}
    done
  fi
done
echo "summary: $SUMMARY"
cat "$SUMMARY"
