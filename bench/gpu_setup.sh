#!/usr/bin/env bash
# Install kleinserve and everything bench/gpu.py needs, offline, from the wheels `make gpu-wheels` put in
# .gpu-wheels/, into the Python that has the CUDA torch (PYTHON, default python3). Run from anywhere:
#
#     bash bench/gpu_setup.sh && PYTHONPATH=src python3 bench/gpu.py
#
# (PYTHONPATH=src: the working tree's kleinserve, even if the wheel was built from an older one.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=.gpu-wheels

test -d "$WHEELS" || { echo "gpu_setup: no $WHEELS/: run make gpu-wheels first (on a machine with network)" >&2; exit 1; }
"$PYTHON" - "$(cat "$WHEELS/python-version")" <<'EOF'
import sys

wanted = sys.argv[1]
have = f"{sys.version_info.major}.{sys.version_info.minor}"
if have != wanted:
    sys.exit(f"gpu_setup: the wheels are for Python {wanted}, this is {have}: make gpu-wheels GPU_PYTHON={have}")
import torch  # the CUDA torch this machine came with; never installed from the wheels

print(f"gpu_setup: python {have}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()}")
try:
    import numpy  # noqa: F401  (make gpu-wheels leaves it out by default: GPU_PRESENT)
except ImportError:
    sys.exit("gpu_setup: numpy is missing here: make gpu-wheels GPU_PRESENT= carries it")
EOF
install=(-m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" kleinserve)
# An "externally managed" system Python refuses plain installs; the machine is throwaway.
"$PYTHON" "${install[@]}" 2>/dev/null || "$PYTHON" "${install[@]}" --break-system-packages
"$PYTHON" -c "import diffusers, kleinserve; print('gpu_setup: kleinserve', kleinserve.__version__, 'diffusers', diffusers.__version__)"
