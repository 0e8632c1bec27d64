"""Planning: the peak memory of a training step predicted without running its arithmetic, and the
largest batch / DenseNet-BC depth that fits a memory budget.

The step runs on the meta device (float32) or on fake tensors (torch._subclasses.FakeTensorMode,
for autocast dtypes: autocast has no meta device), so no kernel computes and nothing is
allocated, under memory.StorageTracker, which adds up live storage bytes op by op.  All backends allocate the
same tensors (they differ in which kernel computes the statistics), so 'cuda' plans as 'torch';
a CUDA plan (device='cuda') rounds each storage to the caching allocator's 512-byte blocks but
does not model cuDNN workspaces.  Nor does a CPU plan model the CPU convolutions' own workspaces
(mkldnn's reorders, im2col), which set the peak of small steps of our model: DenseNet-BC-40 at
batch 8 measures 23.2 MiB against 20.2 planned; at batch 64 both are 126.0 MiB.

Fits: peak memory is affine in the batch (every activation has the batch as a dimension; the
parameter gradients do not), so two plans give the line and one or two more confirm the answer.
Against depth it is quadratic for the naive model (layer l concatenates l inputs) and close to
linear for ours; a quadratic fit through three depths predicts the largest depth.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..models import is_segmentation_model
from .harness import (DTYPES, Case, Step, bc_depth, build_model, make_inputs, num_classes_of, reference_config_for,
                      split_provider)
from .memory import CUDA_BLOCK, StorageTracker

MAX_BC_DEPTH = 6 * 5000 + 4  # the depth search stops here (5000 layers per block)


def planned_peak_bytes(case: Case, device: str = "cpu") -> int:
    """Predicted peak bytes of one step of `case` above the pre-step baseline (parameters and
    inputs excluded, gradients included), as the measured peak of harness.run_case counts it."""
    base, saved = split_provider(case.provider)
    provider = "torch" + ("-saved" if saved else "") if base == "cuda" else case.provider
    granularity = CUDA_BLOCK if torch.device(device).type == "cuda" else 1
    if case.dtype == "float32":
        # Plain meta tensors: no kernel runs, nothing is allocated, and no fake-tensor
        # bookkeeping (about 50x faster than FakeTensorMode for DenseNet-BC-100).
        with torch.device("meta"):
            model = build_model(provider, case.model).train()
        tracker = _planned_step(model, case, "meta", granularity)
    else:
        # Autocast has no meta device: fake tensors report the CPU as their device.
        if not is_segmentation_model(case.model):
            reference_config_for(case.model)  # built on the meta device, which FakeTensorMode would reject
        with FakeTensorMode():
            model = build_model(provider, case.model).train()
            tracker = _planned_step(model, case, "cpu", granularity)
    return tracker.peak


def _planned_step(model: torch.nn.Module, case: Case, device: str, granularity: int) -> StorageTracker:
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = make_inputs(case, num_classes_of(model), device)
    step = Step(model, x, y, case.mode, None if case.dtype == "float32" else DTYPES[case.dtype])
    step.setup()
    with StorageTracker(granularity) as tracker:
        step.run()
    step.teardown()
    return tracker


class Fit(NamedTuple):
    value: Optional[int]        # the largest batch / depth that fits (None: not even the smallest)
    peak: Optional[float]       # its (planned or fitted) peak bytes
    verified: bool              # True when `peak` is a plan at `value`, False when only the fit


def search_largest(fits: Callable[[int], bool], guess: int, lo: int = 1, hi: Optional[int] = None) -> Optional[int]:
    """The largest i in [lo, hi] with fits(i), for a monotone `fits` (True up to some i, then
    False): steps of 1, 2, 4, ... away from `guess` bracket the answer, then bisection.
    None when not even `lo` fits.  Each call of `fits` is one plan, so a good guess matters."""
    guess = max(lo, guess if hi is None else min(hi, guess))
    if fits(guess):
        good, step = guess, 1
        while hi is None or good < hi:
            nxt = good + step if hi is None else min(hi, good + step)
            if not fits(nxt):
                bad = nxt
                break
            good, step = nxt, step * 2
        else:
            return good
    else:
        bad, step = guess, 1
        while True:
            nxt = max(lo, bad - step)
            if fits(nxt):
                good = nxt
                break
            if nxt == lo:
                return None
            bad, step = nxt, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def largest_batch(peak_at: Callable[[int], float], budget: int, batch: int) -> Fit:
    """The largest batch whose planned peak_at(batch) <= budget.

    The peak is close to affine in the batch (activations scale with it; the parameter
    gradients and densenet_fast's fixed-size chunk transients do not), so a few secant steps
    from batch and 2*batch give a guess that search_largest confirms with plans.
    """
    b0, b1 = batch, 2 * batch
    for _ in range(3):
        p0, p1 = peak_at(b0), peak_at(b1)
        if p1 <= p0:
            break
        guess = max(1, int(b1 + (budget - p1) * (b1 - b0) / (p1 - p0)))
        if guess in (b0, b1):
            break
        b0, b1 = b1, guess
    best = search_largest(lambda b: peak_at(b) <= budget, b1)
    return Fit(best, peak_at(best if best is not None else 1), True)


def valid_bc_depth(depth: float) -> int:
    """The nearest DenseNet-BC depth 6n + 4 (n >= 1)."""
    return 6 * max(1, round((depth - 4) / 6)) + 4


def _polyfit(depths: Sequence[int], peaks: Sequence[float], degree: int) -> list:
    d = torch.tensor(depths, dtype=torch.float64)
    powers = torch.stack([d ** i for i in range(degree + 1)], dim=1)
    return torch.linalg.lstsq(powers, torch.tensor(peaks, dtype=torch.float64)[:, None]).solution[:, 0].tolist()


def fit_depth(depths: Sequence[int], peaks: Sequence[float], budget: int, growth: Optional[int] = None) -> Fit:
    """The largest DenseNet-BC depth whose fitted peak stays within budget.  `verified` is False:
    this is the fit's answer.

    With `growth`, the parameter gradients are split off first: their bytes are counted exactly
    and are a quadratic in the depth (the 1x1 convs' inputs widen linearly), which dominates
    far beyond the measured depths.  The rest (activations) gets a least-squares quadratic, or a
    line when the quadratic bends down (ours grows slightly less than linearly where its chunked
    transients stop growing, and a concave fit would extrapolate to negative memory) or only two
    depths are known.
    """
    degree = min(2, len(depths) - 1)
    fixed = [0.0] * len(depths) if growth is None else \
        [float(parameter_bytes(f"densenet_bc_{d}_{growth}")) for d in depths]
    coeffs = _polyfit(depths, [p - f for p, f in zip(peaks, fixed)], degree)
    if len(coeffs) == 3 and coeffs[2] < 0:
        coeffs = _polyfit(depths, [p - f for p, f in zip(peaks, fixed)], 1) + [0.0]
    coeffs = [a + b for a, b in zip(coeffs, _polyfit(depths, fixed, degree))]
    grid = 6 * torch.arange(1, (MAX_BC_DEPTH - 4) // 6 + 1, dtype=torch.float64) + 4
    fitted = sum(c * grid ** i for i, c in enumerate(coeffs))
    over = torch.nonzero(fitted > budget)[:, 0].tolist()
    if over and over[0] == 0:
        return Fit(None, float(fitted[0]), False)
    i = over[0] - 1 if over else len(grid) - 1
    return Fit(int(grid[i]), float(fitted[i]), False)


def largest_depth(peak_at: Callable[[int], float], budget: int, depth: int, growth: int,
                  verify_up_to: int = 400) -> Fit:
    """The largest DenseNet-BC depth whose planned peak_at(depth) <= budget.

    A quadratic through the plans at about depth/2, depth and 1.5*depth gives the guess, which
    plans confirm when it is at most `verify_up_to` (a plan's cost grows with the depth); a
    larger guess is returned as the fit's, unverified, once a plan shows that verify_up_to fits.
    """
    points = sorted({valid_bc_depth(depth / 2), valid_bc_depth(depth), valid_bc_depth(1.5 * depth)})
    fit = fit_depth(points, [peak_at(d) for d in points], budget, growth)
    cap = valid_bc_depth(verify_up_to)
    if fit.value is not None and fit.value > cap and peak_at(cap) <= budget:
        return fit
    guess = (min(fit.value, cap) if fit.value is not None else 10) // 6
    best = search_largest(lambda n: peak_at(6 * n + 4) <= budget, guess, lo=1, hi=(cap - 4) // 6)
    return Fit(None if best is None else 6 * best + 4, peak_at(6 * (best or 1) + 4), True)


def plan_case(case: Case, budget: int, device: str = "cpu",
              on_plan: Callable[[Case], None] = lambda case: None) -> dict:
    """peak at the case's batch, the largest batch within budget and (DenseNet-BC models) the
    largest depth within budget at the case's batch, with their planned peaks."""
    cache: Dict[Case, float] = {}

    def peak(c: Case) -> float:
        if c not in cache:
            on_plan(c)
            cache[c] = planned_peak_bytes(c, device)
        return cache[c]

    out = {"case": case, "peak": peak(case), "depth": None,
           "batch": largest_batch(lambda b: peak(replace(case, batch=b)), budget, case.batch)}
    bc = bc_depth(case.model)
    if bc is not None:
        depth, k = bc
        out["depth"] = largest_depth(lambda d: peak(replace(case, model=f"densenet_bc_{d}_{k}")), budget, depth, k)
    return out


def parameter_bytes(model_name: str) -> int:
    """Bytes of the parameters' gradients (fp32) of `model_name`: the batch-independent part of a
    training step's peak."""
    with torch.device("meta"):
        model = build_model("naive", model_name)
    return sum(p.numel() * 4 for p in model.parameters())


def largest_batch_measured(peak: float, batch: int, model_name: str, budget: int) -> Optional[int]:
    """The largest batch within budget predicted from one measured peak at `batch`: the peak is
    the gradient bytes (batch-independent) plus activations proportional to the batch."""
    fixed = parameter_bytes(model_name)
    per_image = (peak - fixed) / batch
    if per_image <= 0:
        return None
    b = int((budget - fixed) // per_image)
    return b if b >= 1 else None
