"""Tables and plots generated from a benchmark CSV (never typed by hand).

  python -m densenet_fast.bench.report benchmarks/results/X.csv [--latest] [--plot out.png]

prints the markdown table(s) of the CSV (a README fragment) and optionally writes the plot.
report(csv_path) returns the same markdown; plot(csv_path, png_path) draws memory and time per
provider (bars), or against depth when the rows are a DenseNet-BC depth sweep (lines).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .harness import bc_depth, read_csv

# Rows of one table share these (plus the run); the table's rows differ in model, provider, mode.
CONDITION_FIELDS: Tuple[str, ...] = ("run", "device", "device_name", "batch", "image_size", "dtype", "channels_last")
PROVIDER_ORDER = ("naive", "checkpoint", "compile", "triton", "triton-saved", "cuda", "cuda-saved", "torch",
                  "torch-saved")
MODE_ORDER = ("forward", "backward", "full")


def _num(value: str) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _ratio(value: str) -> str:
    x = _num(value)
    return f"{x:.2f}x" if x is not None else ""


def _fixed(value: str, digits: int) -> str:
    x = _num(value)
    return f"{x:,.{digits}f}" if x is not None else ""


def _order(seq: Sequence[str], value: str) -> int:
    return seq.index(value) if value in seq else len(seq)


def depth_of(model: str) -> Optional[int]:
    bc = bc_depth(model)
    return bc[0] if bc is not None else None


def _model_key(model: str) -> Tuple[str, int]:
    depth = depth_of(model)
    return (model.rsplit("_", 2)[0], depth) if depth is not None else (model, 0)


def group_rows(rows: List[dict]) -> "OrderedDict[tuple, List[dict]]":
    """Rows grouped by CONDITION_FIELDS, in file order; each group sorted by model (depth),
    mode, provider (naive first)."""
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for row in rows:
        groups.setdefault(tuple(row.get(f, "") for f in CONDITION_FIELDS), []).append(row)
    for members in groups.values():
        members.sort(key=lambda r: (_model_key(r["model"]), _order(MODE_ORDER, r["mode"]),
                                    _order(PROVIDER_ORDER, r["provider"])))
    return groups


def conditions(row: dict) -> str:
    """One line saying where and how a group was measured."""
    layout = "channels_last" if row.get("channels_last") == "True" else "NCHW"
    timer = "CUDA events" if row["device"] == "cuda" else "time.perf_counter"
    memory = ("max_memory_allocated" if row["device"] == "cuda"
              else "profiler allocation events")
    return (f"batch {row['batch']}, {row['image_size']}x{row['image_size']}, {row['dtype']}, {layout} on "
            f"{row['device_name']} ({row['device']}, {row['threads']} threads); torch {row['torch']}, "
            f"CUDA {row['cuda']}, triton {row['triton']}; git {row['git_sha']}; {row['date']}. "
            f"{'cuDNN benchmark mode. ' if row.get('cudnn_benchmark') == 'on' else ''}"
            f"Time: median of {row['repeats']} steps ({timer}) after {row['warmup']} warm-up steps and the "
            f"memory step; peak memory: {memory}, in a separate step, above the pre-step baseline.")


HEADER = ("model", "provider", "mode", "peak MiB", "vs naive", "median ms", "vs naive", "images/s", "vs naive",
          "TFLOP/s", "% of matmul")


def table_rows(rows: List[dict]) -> List[List[str]]:
    """The cells of a results table (HEADER's columns), one list per row."""
    out = []
    for r in rows:
        if r.get("status") != "ok":
            out.append([r["model"], r["provider"], r["mode"], r.get("status", "")] + [""] * (len(HEADER) - 4))
            continue
        out.append([r["model"], r["provider"], r["mode"], _fixed(r["peak_mem_mib"], 1), _ratio(r["mem_vs_naive"]),
                    _fixed(r["median_ms"], 1), _ratio(r["time_vs_naive"]), _fixed(r["images_per_s"], 1),
                    _ratio(r["images_per_s_vs_naive"]), _fixed(r["tflops"], 3), _fixed(r["pct_of_ceiling"], 1)])
    return out


def markdown(rows: List[dict]) -> str:
    """Markdown: per group of conditions, a line with the conditions and the results table."""
    parts = []
    for members in group_rows(rows).values():
        align = ["---" if i < 3 else "---:" for i in range(len(HEADER))]  # text left, numbers right
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(members)]
        parts.append(conditions(members[0]) + "\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def latest_run(rows: List[dict]) -> List[dict]:
    """The rows of the last run in the file."""
    if not rows:
        return rows
    last = rows[-1]["run"]
    return [r for r in rows if r["run"] == last]


def report(csv_path: os.PathLike, latest: bool = False) -> str:
    """The markdown tables of a benchmark CSV (only its last run when `latest`)."""
    rows = read_csv(csv_path)
    return markdown(latest_run(rows) if latest else rows)


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------


def is_sweep(rows: List[dict]) -> bool:
    """True when the rows measure DenseNet-BC models of at least three depths."""
    return len({depth_of(r["model"]) for r in rows} - {None}) >= 3


def plot(csv_path: os.PathLike, png_path: os.PathLike, latest: bool = True) -> Path:
    """Draw the CSV's last run (all rows when latest=False) to a PNG and return its path.

    A depth sweep gets peak memory and step time against depth, one line per provider; anything
    else bars of peak memory and median time per provider, one row of panels per model and mode.
    Needs matplotlib (pip install matplotlib).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_csv(csv_path) if r.get("status") == "ok"]
    rows = latest_run(rows) if latest else rows
    if not rows:
        raise ValueError(f"{csv_path}: no successful rows to plot")
    fig = _plot_sweep(plt, rows) if is_sweep(rows) else _plot_bars(plt, rows)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png_path


def _plot_sweep(plt, rows: List[dict]):
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_provider: Dict[str, List[dict]] = {}
    for r in rows:
        by_provider.setdefault(r["provider"], []).append(r)
    for provider in sorted(by_provider, key=lambda p: _order(PROVIDER_ORDER, p)):
        pts = sorted(by_provider[provider], key=lambda r: depth_of(r["model"]))
        depths = [depth_of(r["model"]) for r in pts]
        ax_mem.plot(depths, [float(r["peak_mem_mib"]) for r in pts], "o-", label=provider)
        ax_time.plot(depths, [float(r["median_ms"]) for r in pts], "o-", label=provider)
    r0 = rows[0]
    k = r0["model"].rsplit("_", 1)[-1]
    ax_mem.set(xlabel="DenseNet-BC depth", ylabel="peak memory of a training step (MiB)",
               title=f"Peak memory vs depth (k={k}, batch {r0['batch']})")
    ax_time.set(xlabel="DenseNet-BC depth", ylabel="median step time (ms)", title="Step time vs depth")
    for ax in (ax_mem, ax_time):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(bottom=0)
    fig.suptitle(f"{r0['device_name']}, {r0['dtype']}, torch {r0['torch']}, git {r0['git_sha']}", fontsize=9)
    return fig


def _plot_bars(plt, rows: List[dict]):
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for members in group_rows(rows).values():
        for r in members:
            groups.setdefault((r["model"], r["mode"], r["batch"], r["image_size"], r["dtype"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for (ax_mem, ax_time), (key, members) in zip(axes, groups.items()):
        model, mode, batch, size, dtype = key
        names = [r["provider"] for r in members]
        ax_mem.bar(names, [float(r["peak_mem_mib"]) for r in members], color="tab:blue")
        ax_time.bar(names, [float(r["median_ms"]) for r in members], color="tab:orange")
        ax_mem.set(ylabel="peak memory (MiB)", title=f"{model} {mode}, batch {batch}, {size}px, {dtype}")
        ax_time.set(ylabel="median time (ms)", title=f"{model} {mode}: time")
        for ax in (ax_mem, ax_time):
            ax.grid(axis="y", alpha=0.3)
    r0 = rows[0]
    fig.suptitle(f"{r0['device_name']}, torch {r0['torch']}, git {r0['git_sha']}, {r0['date']}", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet_fast.bench.report",
                                     description="Print the markdown tables of a benchmark CSV.")
    parser.add_argument("csv", help="a CSV written by `densenet-fast bench` or `densenet-fast sweep`")
    parser.add_argument("--latest", action="store_true", help="only the last run in the file")
    parser.add_argument("--plot", metavar="PNG", help="also draw the last run to this PNG")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(report(args.csv, latest=args.latest))
        if args.plot:
            print(f"\nplot: {plot(args.csv, args.plot)}", file=sys.stderr)
    except (OSError, KeyError, ValueError, ImportError) as exc:
        print(f"densenet_fast.bench.report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
