# Sourced (not run) by scripts/test.sh and scripts/bench.sh, from the repository root.
# From nothing: creates .venv (or reuses it when its torch is already the pinned one), installs
# the pinned torch/torchvision (CUDA 13.0 builds) and the tools (timm: convert()'s tests convert its
# DenseNets), then builds densenet_fast in place. Where nvcc exists the compiled extension is
# required: the build is forced, so it fails loudly instead of silently installing the
# pure-Python package, and densenet_fast._C must import.

VENV=.venv
NVCC=/usr/local/cuda/bin/nvcc

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
export PATH="$PWD/$VENV/bin:$PATH"  # python and pip below are the venv's

if ! python -c 'import sys, torch, torchvision; sys.exit(not torch.__version__.startswith("2.14.1"))' 2>/dev/null; then
    python -m pip install torch==2.14.1 torchvision==0.29.1
fi
# setuptools >= 64 builds PEP 660 editable installs; ninja makes MAX_JOBS effective.
python -m pip install -q "setuptools>=64" wheel ninja pytest numpy scikit-learn rich matplotlib timm

if [ -x "$NVCC" ]; then
    export DENSENET_FAST_FORCE_CUDA_BUILD=1
fi
CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
    python -m pip install --no-build-isolation --no-deps -e .
if [ -x "$NVCC" ]; then
    python -c 'import densenet_fast._C'
fi
