#!/usr/bin/env bash
# GPU check of pretraining (one GPU, synthetic CT made on the fly, < 4 minutes on an H100):
#   1. ViT-B/16 stage 1 (2 x 224 + 8 x 96 crops, 65536-prototype heads) at batch 32 for 30 steps
#      in bf16: images/s (median of steps 11-30) and peak GPU memory;
#   2. 10 steps of stage 3 at 512 (local 112, Gram teacher 768, batch 8, gradient checkpointing),
#      starting from stage 1's checkpoint.
# Writes $OUT/gpu_check_pretrain.json when OUT is set (else ./gpu_check_pretrain.json).
#
# Knobs for a CPU dry run of the plumbing: CHECK_SIZE=tiny, STAGE1_STEPS, STAGE3_STEPS, BATCH, WORKERS.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore
SIZE="${CHECK_SIZE:-vitb16}"
STAGE1_STEPS="${STAGE1_STEPS:-30}"
STAGE3_STEPS="${STAGE3_STEPS:-10}"
BATCH="${BATCH:-32}"
WORKERS="${WORKERS:-$(( $(nproc) > 12 ? 12 : $(nproc) ))}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_pretrain.XXXXXX")"
SUMMARY="${OUT:-.}/gpu_check_pretrain.json"
trap 'rm -rf "$WORK"' EXIT

if [ "$SIZE" = tiny ]; then
  S3_SIZES=(crops.global_sizes=[96] crops.local_sizes=[32] crops.gram_teacher_sizes=[144])
else
  S3_SIZES=(crops.global_sizes=[512] crops.local_sizes=[112] crops.gram_teacher_sizes=[768])
fi

python - "$WORK" <<'EOF'
import sys, time
t = time.time()
import torch
from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""), flush=True)
# 8 volumes of 24 slices at 256 x 256: enough distinct slices for 30 steps of batch 32
write_nnunet_raw_dataset(sys.argv[1], dataset_id=990, name="GpuCheck", num_train=8, num_test=0,
                         shape=(24, 256, 256))
print(f"synthetic data written in {time.time() - t:.1f} s", flush=True)
EOF
DATA="$WORK/Dataset990_GpuCheck"
COMMON=(--data "$DATA" --cache-dir "$WORK/slice_cache" train.log_every=1 train.checkpoint_every=0
        train.progress_bar=false optim.global_batch_size=null "data.num_workers=$WORKERS"
        monitor.min_feature_std=null monitor.min_teacher_entropy=null)

START=$(date +%s)
timeout 150 python -m pretrain train --config "${SIZE}_stage1" --output "$WORK/stage1" "${COMMON[@]}" \
  "train.iterations=$STAGE1_STEPS" "data.batch_size=$BATCH"
MID=$(date +%s)
timeout 120 python -m pretrain train --config "${SIZE}_stage3_highres" --output "$WORK/stage3" "${COMMON[@]}" \
  "train.iterations=$STAGE3_STEPS" data.batch_size=8 "init.checkpoint=$WORK/stage1" \
  "${S3_SIZES[@]}" "crops.probabilities=[1.0]"
END=$(date +%s)

python - "$WORK" "$SUMMARY" "$((MID - START))" "$((END - MID))" <<'EOF'
import json, statistics, sys
from pathlib import Path
import torch
from pretrain.engine.progress import read_metrics

work, summary = Path(sys.argv[1]), Path(sys.argv[2])

def stage(name, wall):
    m = read_metrics(work / name)
    steady = m[10:] if len(m) > 12 else m[len(m) // 2:]  # skip warm-up (allocator, autotuning)
    return {
        "steps": len(m),
        "images_per_s_median": statistics.median(r["images_per_s"] for r in steady),
        "seconds_per_step_median": statistics.median(r["seconds"] for r in steady),
        "data_wait_s_median": statistics.median(r["data_seconds"] for r in steady),
        "peak_memory_gib": max(r["memory_gib"] for r in m),
        "global_crop_size": m[-1]["global_crop_size"],
        "losses_first_last": {k: [m[0][k], m[-1][k]] for k in ("total_loss", "dino_loss", "ibot_loss", "koleo_loss",
                                                                  "gram_loss") if k in m[-1]},
        "all_finite": all(r["finite"] for r in m),
        "wall_s": float(wall),
    }

result = {
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__,
    "stage1": stage("stage1", sys.argv[3]),
    "stage3": stage("stage3", sys.argv[4]),
}
summary.parent.mkdir(parents=True, exist_ok=True)
summary.write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
EOF
