# Sourced by the scripts/gpu_check*.sh scripts: the repository root, the output folder and the carried packages
# on PYTHONPATH (a .whl/ folder of wheels, installed to /tmp/site, or a .pydeps/ folder of installed packages;
# scripts/gpu_deps.sh builds both), ahead of site-packages: the image's timm may predate DINOv3. Sets ROOT, OUT_DIR
# ($OUT, else the folder given, relative to ROOT) and PY; cds to ROOT. The packages are set up once per call: a
# script run by another that sourced this finds GPU_ENV_READY set and PYTHONPATH ready.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/$1}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ -z "${GPU_ENV_READY:-}" ]; then
    EXTRA=""
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        if pip_error=$("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl 2>&1); then
            EXTRA=":/tmp/site"
        else  # e.g. a CPU dry run here: the wheels are built for the GPU machine's CPython 3.12
            echo "the carried wheels in .whl/ did not install on $("$PY" -V 2>&1); using what is installed. pip said:"
            echo "$pip_error" | tail -3
        fi
    fi
    [ -d .pydeps ] && EXTRA=":$ROOT/.pydeps$EXTRA"
    export PYTHONPATH="$ROOT$EXTRA${PYTHONPATH:+:$PYTHONPATH}"
    # SimpleITK cannot travel with the rest (its wheel is 53 MB of the 64 MiB a device call carries; see
    # scripts/gpu_deps.sh). nnU-Net imports it when its modules load but calls it only to read and write images,
    # and the GPU checks write their dataset for nnU-Net's NibabelIO. So where it does not import, a placeholder
    # goes first on the path: importing it works, using it raises. GPU_CHECK_SIMPLEITK_PLACEHOLDER=1 forces it
    # (for a CPU dry run that shows nothing calls SimpleITK), 0 never uses it.
    if [ "${GPU_CHECK_SIMPLEITK_PLACEHOLDER:-auto}" = 1 ] || { [ "${GPU_CHECK_SIMPLEITK_PLACEHOLDER:-auto}" = auto ] \
            && ! "$PY" -c "import SimpleITK" 2>/dev/null; }; then
        PLACEHOLDER="${TMPDIR:-/tmp}/meddinov3_simpleitk_placeholder"
        mkdir -p "$PLACEHOLDER/SimpleITK"
        cat > "$PLACEHOLDER/SimpleITK/__init__.py" <<'PLACEHOLDER_EOF'
"""Placeholder: SimpleITK is not installed on this machine (see scripts/gpu_deps.sh of nnunet-meddinov3)."""


def __getattr__(name):
    raise AttributeError(f"SimpleITK.{name} was used, but SimpleITK is not installed here: only a placeholder "
                         "stands in, so that nnU-Net's modules import. Write images for nnU-Net's NibabelIO.")
PLACEHOLDER_EOF
        export PYTHONPATH="$PLACEHOLDER:$PYTHONPATH"
        echo "SimpleITK: a placeholder ($PLACEHOLDER); image files go through nnU-Net's NibabelIO"
    fi
    export GPU_ENV_READY=1
fi
