#!/usr/bin/env bash
# GPU checks in one go (run on a machine with a CUDA GPU, from the repo root):
#   bash scripts/gpu_check.sh OUT_DIR [pytest paths...]
# Prints the environment, then runs the given test paths on CUDA tensors (default: ops and modules,
# then the real-size tests), writing each log under OUT_DIR.
set -uo pipefail
out="${1:-gpu-results}"; shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
python3 - <<'PY' | tee "$out/env.txt"
import torch, triton, platform
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| python", platform.python_version())
PY
paths=("$@")
[ ${#paths[@]} -eq 0 ] && paths=(tests/ops tests/modules)
python3 -m pytest -q -p no:cacheprovider "${paths[@]}" 2>&1 | tee "$out/pytest.log" | tail -25
