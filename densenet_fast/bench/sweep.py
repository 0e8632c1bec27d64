"""The depth sweep: DenseNet-BC at several depths, one growth rate, measured for each provider
(peak memory and time of a training step), and what fits a memory budget.

Naive DenseNet memory grows quadratically with depth (layer l concatenates its l inputs into a
new tensor that autograd keeps); the shared-buffer block grows linearly.  The budget answers come
from the measured rows: the largest depth from a quadratic fit of peak against depth (marked
"extrapolated" beyond the deepest measured model), the largest batch per depth from the measured
peak split into the parameter gradients (batch-independent) and activations (proportional to the
batch).  `densenet-fast plan` answers the same questions by planning instead of measuring.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from .harness import Case, bc_depth
from .memory import format_size
from .plan import fit_depth, largest_batch_measured

DEFAULT_DEPTHS = (40, 64, 100, 136, 172)


def sweep_cases(depths: Sequence[int], growth: int, batch: int, providers: Sequence[str], dtype: str = "float32",
                channels_last: bool = False) -> List[Case]:
    """Training-step cases of densenet_bc_<depth>_<growth> at 32x32 for every depth and provider."""
    return [Case(p, f"densenet_bc_{d}_{growth}", batch, 32, "full", dtype, channels_last)
            for d in depths for p in providers]


def budget_summary(rows: List[dict], budget: int) -> str:
    """Markdown lines: per provider, the largest depth at the sweep's batch and the largest batch
    at each measured depth that fit `budget`, from the measured peaks."""
    by_provider: Dict[str, List[dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and bc_depth(r["model"]) is not None:
            by_provider.setdefault(r["provider"], []).append(r)
    lines = [f"Within a budget of {format_size(budget)}:", ""]
    for provider, pts in by_provider.items():
        pts.sort(key=lambda r: bc_depth(r["model"])[0])
        depths = [bc_depth(r["model"])[0] for r in pts]
        peaks = [float(r["peak_mem_bytes"]) for r in pts]
        batch = int(pts[0]["batch"])
        if len(pts) >= 2:
            fit = fit_depth(depths, peaks, budget, growth=bc_depth(pts[0]["model"])[1])
            if fit.value is None:
                depth_text = "none (not even depth 10)"
            else:
                how = "extrapolated" if fit.value > depths[-1] else "interpolated"
                depth_text = f"{fit.value} ({how}, fitted peak {format_size(fit.peak)})"
        else:
            depth_text = "needs two depths"
        batches = ", ".join(
            f"{d}: {largest_batch_measured(p, batch, r['model'], budget) or 'none'}"
            for d, p, r in zip(depths, peaks, pts))
        lines.append(f"- **{provider}**: largest depth at batch {batch}: {depth_text}; "
                     f"largest batch per depth: {batches}")
    return "\n".join(lines) + "\n"
