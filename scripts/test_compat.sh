#!/usr/bin/env bash
# The oldest supported stack, the GPU machines' (torch 2.11.0, torchvision 0.26.0, triton 3.6.0),
# on the CPU: the whole test suite without the compiled extension (the checkout's extension is
# built against the main .venv's torch 2.14; DENSENET_FAST_NO_EXTENSION=1 leaves it unloaded), so
# that Python-level breakage on the older torch/triton (dynamo, inductor, triton's interpreter)
# shows in CI. Run after scripts/test.sh: torch's CUDA runtime libraries, which torch loads at
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
