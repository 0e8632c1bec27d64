#!/usr/bin/env bash
# The oldest supported stack, the GPU machines' (torch 2.11.0, torchvision 0.26.0, triton 3.6.0),
# on the CPU: the whole test suite without the compiled extension (the checkout's extension is
# built against the main .venv's torch 2.14; DENSENET_FAST_NO_EXTENSION=1 leaves it unloaded), so
# that Python-level breakage on the older torch/triton (dynamo, inductor, triton's interpreter)
# shows in CI; then the extension built against torch 2.11 and its tests. Run after scripts/test.sh: torch's CUDA runtime libraries, which torch loads at
# import even without a GPU, come from the main .venv instead of 3 GB of downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=.venv
VENV=.venv-torch211
[ -x "$MAIN/bin/python" ] || { echo "scripts/test_compat.sh: run scripts/test.sh first (it creates $MAIN)" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
if ! $PY -c 'import sys, torch, torchvision, triton; sys.exit(not torch.__version__.startswith("2.11.0"))' 2>/dev/null; then
    $PY -m pip install -q --no-deps torch==2.11.0 torchvision==0.26.0 triton==3.6.0
fi
# numpy < 2.3: triton 3.6's interpreter converts one-element arrays with int(), which newer numpy refuses
$PY -m pip install -q "numpy<2.3" pytest scikit-learn rich matplotlib pillow sympy networkx jinja2 filelock fsspec \
    typing_extensions
site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
[ -e "$(site $PY)/nvidia" ] || ln -s "$(site $MAIN/bin/python)/nvidia" "$(site $PY)/nvidia"
$PY -c 'import torch, triton; print(f"compat lane: torch {torch.__version__}, triton {triton.__version__}")'
DENSENET_FAST_NO_EXTENSION=1 PYTHONPATH=$PWD $PY -m pytest -q -W "ignore:Conversion of an array with ndim:DeprecationWarning" tests "$@"

# The compiled extension built against torch 2.11 (as the GPU machines build it), in a scratch copy
# of the package, and the tests of its ops and of the cuda backend's block (the CPU kernels) run
# with it: C++ API differences between the torch versions show here, not on a lent GPU. sm_90
# only, to keep the build short.
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
if [ -x "$NVCC" ]; then
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    PY=$PWD/$PY  # the steps below run in $BUILD
    cp -r setup.py pyproject.toml csrc densenet_fast tests "$BUILD"/
    rm -f "$BUILD"/densenet_fast/_C*.so
    $PY -m pip install -q "setuptools>=64" ninja
    (cd "$BUILD" && CUDA_HOME=$(dirname "$(dirname "$NVCC")") TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" \
        DENSENET_FAST_FORCE_CUDA_BUILD=1 $PY setup.py -q build_ext --inplace >build.log 2>&1 \
        || { tail -40 build.log; exit 1; })
    echo "compat lane: densenet_fast._C built against torch $($PY -c 'import torch; print(torch.__version__)')"
    (cd "$BUILD" && PYTHONPATH=$BUILD $PY -m pytest -q -p no:cacheprovider tests/test_extension.py \
        tests/test_fused_bn.py tests/test_channel_stats.py tests/test_cuda_backend.py)
fi
