"""The README's model benchmark: naive vs checkpoint vs densenet_fast on the configurations the
README table shows, through the shared harness (densenet_fast.bench).

    python benchmarks/bench_model.py            # the suite for this machine's device
    python benchmarks/bench_model.py --device cpu

Appends to benchmarks/results/model-<device>-<UTC date>.csv and prints the markdown table
generated from it (paste it into the README with its conditions line).  For other
configurations use `densenet-fast bench` directly.
"""

from __future__ import annotations

import argparse
import sys

import torch

from densenet_fast.bench import Case, default_providers, report, run_cases, write_csv
from densenet_fast.bench.harness import default_csv_path

# (model, batch, image_size, dtype, channels_last) per device.
SUITES = {
    "cpu": [("densenet_bc_100_12", 64, 32, "float32", False)],
    "cuda": [("densenet121", 64, 224, "float32", True), ("densenet121", 64, 224, "bfloat16", True),
             ("densenet_bc_250_24", 64, 32, "bfloat16", True)],
}
REPEATS = {"cpu": 3, "cuda": 20}
WARMUP = {"cpu": 0, "cuda": 3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    providers = default_providers(args.device) + [p + "-saved" for p in default_providers(args.device)[2:]]
    cases = [Case(p, model, batch, size, "full", dtype, cl)
             for model, batch, size, dtype, cl in SUITES[args.device] for p in providers]
    rows = run_cases(cases, args.device, REPEATS[args.device], WARMUP[args.device],
                     on_case=lambda i, c: print(f"[{i + 1}/{len(cases)}] {c}", file=sys.stderr, flush=True))
    out = write_csv(rows, default_csv_path("model", args.device))
    print(report(out, latest=True))
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
