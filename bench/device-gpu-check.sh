#!/usr/bin/env bash
# bench/gpu_check.py on a GPU machine that has a driver, a Python and nothing of corral's:
# no bubblewrap, no pydantic, no package registry to fetch them from.
#
#   bash bench/device-gpu-check.sh --prepare   # here, with a registry: fills .device/
#   bash bench/device-gpu-check.sh [OUT_DIR]   # there, with .device/ copied along
#
# --prepare downloads, for CPython 3.12 on x86-64, the wheels corral imports that such a
# machine lacks (versions pinned to this checkout's environment), and Debian's bubblewrap
# and libseccomp packages. The run unpacks them under /tmp, never over the system, and
# writes gpu_check.log and gpu_check.json to OUT_DIR (default $OUT, else build/).
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.device

if [[ "${1:-}" == "--prepare" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p "$DEV/whl" "$DEV/deb"
    pins=$("$PY" -m pip freeze | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|tree[-_]sitter|tree[-_]sitter[-_]bash|pyseccomp|dnspython)==')
    # shellcheck disable=SC2086 # one argument per pin
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEV/whl" $pins
    (cd "$DEV/deb" && apt-get download bubblewrap libseccomp2 >/dev/null)
    ls -l "$DEV/whl" "$DEV/deb"
    du -sh "$DEV"
    exit 0
fi

OUT_DIR=${1:-${OUT:-build}}
mkdir -p "$OUT_DIR"
[[ -d "$DEV/whl" ]] || { echo "no $DEV/: run '$0 --prepare' where a registry is reachable" >&2; exit 2; }
BW=/tmp/corral-device
mkdir -p "$BW"
if ! command -v bwrap >/dev/null; then
    dpkg -x "$DEV"/deb/bubblewrap_*.deb "$BW"
    export PATH="$BW/usr/bin:$PATH"
fi
if ! ldconfig -p | grep -q 'libseccomp\.so\.2'; then
    dpkg -x "$DEV"/deb/libseccomp2_*.deb "$BW"
    # ctypes finds libraries through ldconfig's cache, not LD_LIBRARY_PATH.
    echo "$BW/usr/lib/x86_64-linux-gnu" >/etc/ld.so.conf.d/corral-device.conf
    ldconfig
fi
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/corral-site "$DEV"/whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/corral-site" PYTHONUNBUFFERED=1
{ nvidia-smi -L || true; bwrap --version; python3 --version; } 2>&1 | tee "$OUT_DIR/gpu_check.log"
python3 bench/gpu_check.py -n "${RUNS:-3}" --json "$OUT_DIR/gpu_check.json" 2>&1 |
    tee -a "$OUT_DIR/gpu_check.log"
