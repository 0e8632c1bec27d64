#!/usr/bin/env bash
# The test command (README, "Tests"): set up .venv, build densenet_fast, run the test suite.
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0": Ampere and Hopper) and MAX_JOBS (default 2) pass through to the build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
python -m pytest -q tests
