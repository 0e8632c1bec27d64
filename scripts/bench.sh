#!/usr/bin/env bash
# The benchmark command (README, "Benchmarks"): set up .venv, build densenet_fast, run the
# benchmarks; arguments go to `python -m densenet_fast bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
python -m densenet_fast bench "$@"
