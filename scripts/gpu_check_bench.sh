#!/usr/bin/env bash
# GPU check of `meddinov3 bench` (issues 5 and 33): about 7.5 minutes on one H100 (at most BENCH_DEADLINE_S,
# 580 s: every run is bounded by a timeout, and step 4 by what is left; give the device call timeout_s 600).
#
#   Steps 1 and 3 also profile one training step (--profile: the 15 kernels with the most CUDA time).
#   1. ViT-B/16 at 896x896, batch 2, bf16: MedDINOv3Net multiscale and bottleneck decoders next to the
#      nnU-Net PlainConvUNet planned for the same patch and, when MEDDINOV3_REFERENCE_REPO is set, the
#      MedDINOv3 reference's Primus_Multiscale (--reference-repo; fp16 autocast + GradScaler, as its
#      trainer; there is no reference bottleneck). Unset, the reference is skipped.
#                                                                  -> bench_vitb16_896.{json,txt}
#   2. The multiscale network and the reference compiled whole (--compile network), as nnU-Net's
#      trainers run on CUDA by default (nnUNet_compile); compiling is the cost of this step, so it is
#      bounded by a timeout and may be cut short.       -> bench_vitb16_896_compile.{json,txt}
#   3. The compiled multiscale network at batch 8 (the planner's batch for `--gpu-memory-gb 26`; its memory
#      model says 25.4 GB): MFU at a batch that amortises the launch overheads of 3141-token GEMMs.
#                                                       -> bench_vitb16_896_compile_b8.{json,txt}
#   4. 3D (issue 33): ViT-B/16 MedDINOv3Net3D (multiscale) with slice attention and with the depth convolution
#      next to nnU-Net's 3d_fullres PlainConvUNet as its planner plans a 32 x 192 x 192 CT patch (spacing
#      2.5 x 0.8 x 0.8 mm), batch 2, bf16, eager: step time, peak memory and inference as ratios to nnU-Net's.
#      Alone (BENCH_STEPS=4) about 2 minutes in all.     -> bench_3d_vitb16_32x192x192.{json,txt}
#
# Results go to $OUT when set (the device tool's folder), else ./bench_out. BENCH_STEPS="1 3" runs only those
# steps; BENCH1_DECODERS="multiscale" leaves the bottleneck decoder out of step 1; BENCH_STEP{1,2,3,4}_TIMEOUT bound
# each step (160, 190, 100, 120 s; a timeout around this script would not reach them: each starts its own group),
# and step 4 gets at most what is left of BENCH_DEADLINE_S (580 s from the start). scripts/gpu_check.sh runs
# steps 1 and 3 with the train check in one device call.
#
# Needs python3 with CUDA torch, timm (the pyproject range), nnunetv2 and the packages its trainer imports
# (the baseline is planned and built by nnU-Net's own planner and trainer). The GPU machine lacks several of them:
# run `bash scripts/gpu_deps.sh` here first, which builds the folders to carry and says what travels and why
# (MEDDINOV3_REFERENCE_CHECKOUT=<clone of https://github.com/ricklisz/MedDINOv3> adds the reference's code).
#   device run:   carry [".pydeps", ".whl", ".meddinov3_ref"],
#                 command "MEDDINOV3_REFERENCE_REPO=.meddinov3_ref bash scripts/gpu_check_bench.sh"
set -uo pipefail
START=$(date +%s)

source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" bench_out

REFERENCE=()
if [ -n "${MEDDINOV3_REFERENCE_REPO:-}" ]; then
    REFERENCE=(--reference-repo "$MEDDINOV3_REFERENCE_REPO")
    echo "MedDINOv3 reference: $MEDDINOV3_REFERENCE_REPO"
else
    echo "MEDDINOV3_REFERENCE_REPO is not set: skipping the MedDINOv3 reference configurations"
fi

# Fail early, and say what is missing, rather than inside every benchmark worker.
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/environment.txt" || exit 3
import importlib, os, sys
missing = []
# einops: imported by the MedDINOv3 reference's primus.py; nnUNetTrainer: the baseline and every loss come from it
for name in ("torch", "timm", "nnunetv2", "dynamic_network_architectures", "nnunetv2.training.nnUNetTrainer.nnUNetTrainer") + (
        ("einops",) if os.environ.get("MEDDINOV3_REFERENCE_REPO") else ()):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except ImportError as e:
        missing.append(f"{name} ({e})")
if missing:
    sys.exit("missing: " + ", ".join(missing) + " -- carry them: run scripts/gpu_deps.sh here and name its folders in carry")
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3  # noqa: F401  (timm >= 1.0.20)
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| cuda", torch.version.cuda)
EOF

BENCH=("$PY" -m nnunet_meddinov3.cli.main bench --device cuda --dtype bf16 --encoders meddinov3_vitb16
       --patch-sizes 896)

STEPS="${BENCH_STEPS:-1 2 3 4}"  # which of the four steps to run (scripts/gpu_check.sh runs 1 and 3)
status=0
if [[ " $STEPS " == *" 1 "* ]]; then
echo "== 1/4: baseline vs multiscale/bottleneck${REFERENCE[0]:+ vs the MedDINOv3 reference}"
# shellcheck disable=SC2086  # BENCH1_DECODERS is a list of words
timeout "${BENCH_STEP1_TIMEOUT:-160}" "${BENCH[@]}" --batch-size 2 --decoders ${BENCH1_DECODERS:-multiscale bottleneck} ${REFERENCE[@]+"${REFERENCE[@]}"} --warmup 5 --repeats 20 --profile \
    --worker-timeout 90 -o "$OUT_DIR/bench_vitb16_896.json" 2>&1 | tee "$OUT_DIR/bench_vitb16_896.txt"
status=${PIPESTATUS[0]}
fi

if [[ " $STEPS " == *" 2 "* ]]; then
echo "== 2/4: multiscale${REFERENCE[0]:+ and the reference}, whole network compiled"
timeout "${BENCH_STEP2_TIMEOUT:-190}" "${BENCH[@]}" --batch-size 2 --decoders multiscale --no-baseline --compile network ${REFERENCE[@]+"${REFERENCE[@]}"} \
    --warmup 5 --repeats 20 --worker-timeout 100 -o "$OUT_DIR/bench_vitb16_896_compile.json" 2>&1 \
    | tee "$OUT_DIR/bench_vitb16_896_compile.txt"
fi

if [[ " $STEPS " == *" 3 "* ]]; then
echo "== 3/4: multiscale compiled, batch 8"
timeout "${BENCH_STEP3_TIMEOUT:-100}" "${BENCH[@]}" --batch-size 8 --decoders multiscale --no-baseline --compile network \
    --warmup 2 --repeats 8 --profile --worker-timeout 95 -o "$OUT_DIR/bench_vitb16_896_compile_b8.json" 2>&1 \
    | tee "$OUT_DIR/bench_vitb16_896_compile_b8.txt"
fi

if [[ " $STEPS " == *" 4 "* ]]; then
left=$(( ${BENCH_DEADLINE_S:-580} - ($(date +%s) - START) ))
step4=$(( left < ${BENCH_STEP4_TIMEOUT:-120} ? left : ${BENCH_STEP4_TIMEOUT:-120} ))
if [ "$step4" -lt 60 ]; then  # three workers (CUDA start, cudnn autotuning of the 3D convolutions) need more
    echo "== 4/4: 3D skipped: $left s left of BENCH_DEADLINE_S"
else
echo "== 4/4: 3D, ViT-B slice_attention / depth_conv vs nnU-Net 3d_fullres at 32x192x192, batch 2, at most $step4 s"
timeout "$step4" "$PY" -m nnunet_meddinov3.cli.main bench --device cuda --dtype bf16 --encoders meddinov3_vitb16 \
    --decoders multiscale --patch-3d 32 192 192 --contexts slice_attention depth_conv --batch-size 2 \
    --warmup 3 --repeats 10 --worker-timeout 50 -o "$OUT_DIR/bench_3d_vitb16_32x192x192.json" 2>&1 \
    | tee "$OUT_DIR/bench_3d_vitb16_32x192x192.txt"
step4_status=${PIPESTATUS[0]}
[ "$step4_status" = 0 ] || status=$step4_status
fi
fi

exit "$status"
