# Sourced by the scripts/gpu_check_*.sh scripts: the repository root, the output folder and the carried
# packages on PYTHONPATH (a .whl/ folder of wheels, installed to /tmp/site, or a .pydeps/ folder of
# installed packages; see scripts/gpu_check_bench.sh), ahead of site-packages: the image's timm may
# predate DINOv3. Sets ROOT, OUT_DIR ($OUT, else the folder given, relative to ROOT) and PY; cds to ROOT.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/$1}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
EXTRA=""
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && EXTRA=":/tmp/site"
fi
[ -d .pydeps ] && EXTRA=":$ROOT/.pydeps$EXTRA"
export PYTHONPATH="$ROOT$EXTRA${PYTHONPATH:+:$PYTHONPATH}"
