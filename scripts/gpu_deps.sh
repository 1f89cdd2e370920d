#!/usr/bin/env bash
# Run HERE, once, before a device session (needs PyPI; not part of CI): builds the folders that a device call
# carries so that the GPU machine can run nnU-Net, this plugin and, optionally, the MedDINOv3 reference.
#
# What the H200 image has (the device tool's KINDS.md, 2026-11-17): Python 3.12, torch, timm (version
# unknown), numpy, scipy, scikit-image, scikit-learn, pandas, matplotlib, seaborn, einops, tifffile, PIL,
# safetensors, pyyaml, threadpoolctl, msgpack, httpx, rich. Which of the rest the scripts import was read
# off a CPU dry run of scripts/gpu_check.sh (every module in sys.modules at exit, in every process).
# What is missing, and how it travels:
#   .pydeps/  pure-Python packages copied from this environment: nnunetv2, dynamic_network_architectures,
#             batchgenerators, batchgeneratorsv2, acvl_utils, and timm (DINOv3 needs >= 1.0.20; the image's
#             may be older, and .pydeps comes first on PYTHONPATH);
#   .whl/     wheels for CPython 3.12 x86_64: blosc2, ndindex, numexpr (nnU-Net's preprocessed data),
#             connected-components-3d (imported by nnU-Net's trainer), nibabel (the device run's image I/O);
#   .meddinov3_ref/  the reference's dinov3 package, when MEDDINOV3_REFERENCE_CHECKOUT names a clone of
#             https://github.com/ricklisz/MedDINOv3 (its einops is on the image).
# SimpleITK does not travel: its wheel alone is 53 MB and a call carries 64 MiB in all, the working tree
# included. nnU-Net imports it when its modules load but calls it only to read and write images, so the
# device run writes its dataset for nnU-Net's NibabelIO and scripts/gpu_env.sh puts a placeholder
# SimpleITK on the path that fails loudly if anything calls it.
#
# Prints the size that would travel; the device call then carries [".pydeps", ".whl", ".meddinov3_ref"].
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
for folder in .pydeps .whl .meddinov3_ref; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
done

rm -rf .pydeps .whl
mkdir -p .pydeps .whl
for package in nnunetv2 dynamic_network_architectures batchgenerators batchgeneratorsv2 acvl_utils timm; do
  # __path__, not __file__: batchgeneratorsv2 is a namespace package
  cp -r "$("$PY" -c "import $package; print(list($package.__path__)[0])")" .pydeps/
done
# tests, examples and caches are not needed to run
find .pydeps \( -name __pycache__ -o -name tests -o -name examples \) -prune -exec rm -rf {} +

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "blosc2==$("$PY" -c 'import blosc2; print(blosc2.__version__)')" \
  "ndindex==$("$PY" -c 'import ndindex; print(ndindex.__version__)')" \
  "numexpr==$("$PY" -c 'import numexpr; print(numexpr.__version__)')" \
  "connected-components-3d" "nibabel==$("$PY" -c 'import nibabel; print(nibabel.__version__)')"

if [ -n "${MEDDINOV3_REFERENCE_CHECKOUT:-}" ]; then
  rm -rf .meddinov3_ref && mkdir -p .meddinov3_ref
  source_folder="$MEDDINOV3_REFERENCE_CHECKOUT"
  [ -d "$source_folder/dinov3" ] || source_folder="$MEDDINOV3_REFERENCE_CHECKOUT/nnUNet/nnunetv2/training/nnUNetTrainer/dinov3"
  cp -r "$source_folder/dinov3" .meddinov3_ref/
  find .meddinov3_ref -name __pycache__ -prune -exec rm -rf {} +
fi

tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1 || true)  # a deleted file is no error
carried_bytes=$(du -cb .pydeps .whl $( [ -d .meddinov3_ref ] && echo .meddinov3_ref ) | tail -1 | cut -f1)
total=$((tree_bytes + carried_bytes))
printf 'working tree %.1f MiB + carried %.1f MiB = %.1f MiB of the 64 MiB a device call carries\n' \
  "$(echo "$tree_bytes / 1048576" | bc -l)" "$(echo "$carried_bytes / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "too big for one device call" >&2; exit 1; }
