#!/usr/bin/env bash
# Create .venv and install fla_gsa into it (editable) with the extras named in $1 (e.g. "test").
# A torch that the system python can already import is reused (--system-site-packages); otherwise
# the CPU build is installed on machines with no NVIDIA GPU, so set-up never pulls the CUDA wheels there.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] reusing the torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] NVIDIA GPU found: installing torch with CUDA"
        pip install torch
    else
        echo "[setup] no GPU: installing the CPU build of torch"
        pip install "torch==${TORCH_CPU_VERSION:-2.13.0}" || {
            echo "[setup] could not install a CPU torch; install one into $VENV (or system-wide) and rerun" >&2
            exit 1
        }
    fi
fi

stamp="$VENV/.installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    echo "[setup] pip install -e '$spec'"
    pip install -e "$spec"
    touch "$stamp"
fi
