#!/usr/bin/env bash
# Issue 11's GPU measurements in ONE device call. A session has 15 minutes of device time in all (the machine's
# start included) and 10 minutes per call, so the steps run most important first, each bounded by what is left
# of DEADLINE_S (default 540 s), and a step cut short still leaves what it wrote.
#   1. bench, eager, batch 2, 896: nnU-Net's 2D network vs ours (multiscale) vs the MedDINOv3 reference, with
#      the profile of one step (scripts/gpu_check_bench.sh step 1), leaving 330 s for the rest;
#   2. the stock commands (scripts/gpu_check_train.sh): the data pipeline's rate (meddinov3 bench_loader), then
#      model by model nnUNetv2_train and nnUNetv2_predict of a 200 x 512 x 512 volume with mirroring on and off:
#      our 2d_highres (2 epochs of MEDDINOV3_ITERATIONS=100 training and MEDDINOV3_VAL_ITERATIONS=20 validation
#      iterations, nnU-Net's 250:50 ratio; nnU-Net compiles it and trains at the plans' batch 8, so the second
#      epoch also gives the compiled throughput), the stock 2D model, our 2d;
#   3. if 150 s are left: bench, ours compiled whole at batch 8: MFU and the profile (its step 3).
# Before the call, here: bash scripts/gpu_deps.sh (MEDDINOV3_REFERENCE_CHECKOUT=<clone of
# https://github.com/ricklisz/MedDINOv3> for the reference). The call: carry [".pydeps", ".whl", ".meddinov3_ref"],
# timeout_s 600, command "bash scripts/gpu_check.sh".
# Back in $OUT (at most 8 files come back): gpu_check.log (all output), gpu_check_train.json, the two bench JSONs,
# and gpu_check_all.tar.gz (every log and text report).
# CPU dry run of the plumbing (no bench: it needs CUDA): CHECK_SIZE=tiny GPU_CHECK_SIMPLEITK_PLACEHOLDER=1
# bash scripts/gpu_check.sh
set -uo pipefail
START=$(date +%s)
DEADLINE_S="${DEADLINE_S:-540}"
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" gpu_check_out
FINAL_OUT="$OUT_DIR"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
exec > >(tee "$FINAL_OUT/gpu_check.log") 2>&1
TEE_PID=$!

collect() {  # the few files that come back, and everything else in one archive; after every step, so that a
             # call killed at its limit still returns what the finished steps wrote
  cp "$STAGE"/bench/*.json "$STAGE"/train/gpu_check_train.json "$FINAL_OUT"/ 2>/dev/null
  tar -czf "$FINAL_OUT/gpu_check_all.tar.gz" -C "$STAGE" . 2>/dev/null
}
finish() {
  collect
  rm -rf "$STAGE"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null  # the log's last lines
}
trap finish EXIT

left() {  # seconds left before the deadline, less $1 kept for the steps after this one
  local remaining=$((DEADLINE_S - ($(date +%s) - START) - ${1:-0}))
  echo $((remaining > 0 ? remaining : 1))
}
at_most() { echo $(($1 < $2 ? $1 : $2)); }
[ -z "${MEDDINOV3_REFERENCE_REPO:-}" ] && [ -d .meddinov3_ref/dinov3 ] && export MEDDINOV3_REFERENCE_REPO=.meddinov3_ref

TINY=$([ "${CHECK_SIZE:-vitb16}" = tiny ] && echo 1 || echo 0)
if [ "$TINY" = 0 ]; then
  # the bench's steps bound themselves (BENCH_STEP*_TIMEOUT): a timeout around the script would not reach them
  step1=$(at_most 160 "$(left 330)")
  echo "== 1. bench: eager, batch 2 (step 1 of scripts/gpu_check_bench.sh), at most $step1 s"
  BENCH_STEPS=1 BENCH1_DECODERS=multiscale BENCH_STEP1_TIMEOUT="$step1" OUT="$STAGE/bench" \
      bash scripts/gpu_check_bench.sh
  [ $? = 3 ] && { echo "the environment check failed: see above"; exit 3; }
  collect
  # nnU-Net's 250:50 ratio of training to validation iterations, at 100 training iterations per epoch
  export MEDDINOV3_ITERATIONS="${MEDDINOV3_ITERATIONS:-100}" MEDDINOV3_VAL_ITERATIONS="${MEDDINOV3_VAL_ITERATIONS:-20}"
fi
echo "== 2. the stock commands (scripts/gpu_check_train.sh), at most $(left 0) s"
# its commands run in this timeout's process group, so the timeout stops them too
OUT="$STAGE/train" timeout "$(left 0)" bash scripts/gpu_check_train.sh
[ $? = 124 ] && echo "(cut short at the deadline: gpu_check_train.json holds the steps that finished)"
collect
# step 3 needs about 40 s before its own timeout starts (the environment check, CUDA's start)
if [ "$TINY" = 0 ] && [ "$(left 0)" -gt 150 ]; then
  step3=$(at_most 100 "$(left 40)")
  echo "== 3. bench: compiled, batch 8 (step 3 of scripts/gpu_check_bench.sh), at most $step3 s"
  BENCH_STEPS=3 BENCH_STEP3_TIMEOUT="$step3" OUT="$STAGE/bench" bash scripts/gpu_check_bench.sh
fi
echo "== done in $(( $(date +%s) - START )) s"
