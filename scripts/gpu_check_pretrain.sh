#!/usr/bin/env bash
# GPU check of pretraining (one GPU, synthetic CT made on the fly; < 4 minutes on an H100 before step 3 was added,
# whose 1 + 2 bounded runs (timeouts 120 + 120 + 90 s) have not been timed on a GPU yet):
#   1. ViT-B/16 stage 1 (2 x 224 + 8 x 96 crops, 65536-prototype heads) at batch 32 for 30 steps
#      in bf16: images/s (median of steps 11-30) and peak GPU memory;
#   2. 10 steps of stage 3 at 512 (local 112, Gram teacher 768, batch 8, gradient checkpointing),
#      starting from stage 1's checkpoint;
#   3. `python -m pretrain distill --config vits16_distill`: a ViT-S/16 student taught by a frozen random-weights
#      ViT-L/16 teacher (built here, no downloads: a dinov3-training-layout .pth with heads of the student's 65536
#      prototypes, so no head warm-up runs and the peak memory is the distillation's alone), batch 32, 20 steps
#      in bf16: s/step (median of steps 11-20), images/s and peak GPU memory; then the same student
#      self-distilled (vits16_stage1, drop path 0, same batch and crops) for 20 steps, the baseline of the ratio
#      (pretrain/README.md, "Distillation: what it costs"; DISTILL_BASELINE=0 skips it).
# Writes $OUT/gpu_check_pretrain.json when OUT is set (else ./gpu_check_pretrain.json).
#
# Knobs for a CPU dry run of the plumbing: CHECK_SIZE=tiny, STAGE1_STEPS, STAGE3_STEPS, DISTILL_STEPS, BATCH,
# WORKERS.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore
SIZE="${CHECK_SIZE:-vitb16}"
STAGE1_STEPS="${STAGE1_STEPS:-30}"
STAGE3_STEPS="${STAGE3_STEPS:-10}"
DISTILL_STEPS="${DISTILL_STEPS:-20}"
BATCH="${BATCH:-32}"
WORKERS="${WORKERS:-$(( $(nproc) > 12 ? 12 : $(nproc) ))}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_pretrain.XXXXXX")"
SUMMARY="${OUT:-.}/gpu_check_pretrain.json"
trap 'rm -rf "$WORK"' EXIT

if [ "$SIZE" = tiny ]; then
  S3_SIZES=(crops.global_sizes=[96] crops.local_sizes=[32] crops.gram_teacher_sizes=[144])
  DISTILL_CONFIG=tiny_distill TEACHER_ENCODER=meddinov3_tiny  # the tiny half-size student's 4-block teacher
  SELF=(tiny_stage1 model.encoder=meddinov3_tiny_half model.drop_path_rate=0.0)  # the same student, self-distilled
else
  S3_SIZES=(crops.global_sizes=[512] crops.local_sizes=[112] crops.gram_teacher_sizes=[768])
  DISTILL_CONFIG=vits16_distill TEACHER_ENCODER=vitl16
  SELF=(vits16_stage1 model.drop_path_rate=0.0)  # vits16_distill's student and recipe, its own EMA as teacher
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

# 3. distillation. A random-weights teacher costs what a trained one does. It is written in the layout of a dinov3
# training checkpoint ({'teacher': {'backbone.*' in Meta's key names, 'dino_head.*', 'ibot_head.*'}}, MedDINOv3's
# release) so that its heads load from the file (pretrain/model.py load_released_weights); a .safetensors export
# has no heads and would start a ViT-L head warm-up run first. Key mapping as in tests/pretrain/test_distill.py.
timeout 120 python - "$DISTILL_CONFIG" "$TEACHER_ENCODER" "$WORK/teacher.pth" <<'EOF'
import dataclasses, sys, time
import torch
from pretrain.configs import load_config
from pretrain.model import SSLNetwork

t = time.time()
config, encoder, out = sys.argv[1:]
model = dataclasses.replace(load_config(config).model, encoder=encoder, drop_path_rate=0.0, layer_scale_init=None)
torch.manual_seed(0)
state = SSLNetwork.build(model, 0.0).state_dict()

def meta(key):
    if key.startswith("backbone.encoder.vit."):
        key = "backbone." + key.removeprefix("backbone.encoder.vit.")
    return (key.replace("reg_token", "storage_tokens").replace("rope.periods", "rope_embed.periods")
            .replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma"))

torch.save({"teacher": {meta(k): v for k, v in state.items()}}, out)
print(f"random {encoder} teacher with heads ({sum(v.numel() for v in state.values()) / 1e6:.0f} M values) "
      f"written in {time.time() - t:.1f} s", flush=True)
EOF
D_START=$(date +%s)
timeout 120 python -m pretrain distill --config "$DISTILL_CONFIG" --teacher "$WORK/teacher.pth" \
  --output "$WORK/distill" "distill.teacher_encoder=$TEACHER_ENCODER" "${COMMON[@]}" \
  "train.iterations=$DISTILL_STEPS" "data.batch_size=$BATCH"
D_END=$(date +%s)
# the baseline: self-distillation of the same student, same batch and crops (DISTILL_BASELINE=0 skips it)
if [ "${DISTILL_BASELINE:-1}" = 1 ]; then
  timeout 90 python -m pretrain train --config "${SELF[0]}" --output "$WORK/self_distill" "${SELF[@]:1}" \
    "${COMMON[@]}" "train.iterations=$DISTILL_STEPS" "data.batch_size=$BATCH"
fi
S_END=$(date +%s)

python - "$WORK" "$SUMMARY" "$((MID - START))" "$((END - MID))" "$((D_END - D_START))" "$((S_END - D_END))" <<'EOF'
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
    "distill": stage("distill", sys.argv[5]),  # the vits16 student of a frozen random vitl16 teacher
}
if (work / "self_distill").is_dir():  # the same student self-distilled: what the frozen teacher adds per step
    result["self_distill"] = stage("self_distill", sys.argv[6])
    result["distill_over_self_distill_s_per_step"] = (result["distill"]["seconds_per_step_median"]
                                                      / result["self_distill"]["seconds_per_step_median"])
summary.parent.mkdir(parents=True, exist_ok=True)
summary.write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
EOF
