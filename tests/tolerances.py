"""The tolerance policy of the test suite: one table, used by every test file.

Two kinds of comparison:

* ``assert_close(actual, expected, dtype, name)``: the fast result against the naive reference run
  in the SAME dtype (or float64).  Elementwise
      |actual - expected| <= atol * max|expected| + rtol * |expected|
  with (atol, rtol) = TOLERANCES[dtype].  atol is relative to the tensor's largest magnitude
  because the quantities compared (activations, BN/conv gradients, running statistics) have no
  natural absolute scale, and because a gradient entry that is small only through cancellation (a
  BN gradient is a sum over N*H*W terms of both signs) can only be as accurate as the terms it
  cancels, i.e. as the largest entries.

* ``assert_within_naive_error(fast, naive, exact, dtype, name)`` (style.md, "Tests": compare three
  results): `fast` and `naive` computed in `dtype`, `exact` the reference in a higher precision.
      ||fast - exact|| <= NAIVE_ERROR_FACTOR * ||naive - exact|| + TOLERANCES[dtype].atol * ||exact||
  (2-norms over the whole tensor).  Used for fp16/bf16 (autocast) and for float32 where rounding
  compounds over several training steps: there torchvision's own float32 run is up to 7e-5 * max
  away from its float64 run (measured on tests/test_equivalence.py's configurations, BN-parameter
  gradients at step 3), so a fixed float32 tolerance would only measure rounding noise; what
  matters is that the fast path is not less accurate than the naive one.  The 2-norm, not the
  max: the max error is the statistic of one element, and in low precision the gradient of a ReLU
  network has isolated O(1) jumps wherever rounding flips a ReLU mask (a pre-activation within one
  ulp of 0), which both the fast and the naive model hit, at different elements.  Errors confined
  to a few elements are the float64 tests' job (1e-8, elementwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from helpers import assert_close_report


@dataclass(frozen=True)
class Tol:
    atol: float  # relative to max|expected| (see the module docstring)
    rtol: float


TOLERANCES = {
    # float64: both sides are exact up to summation order; measured differences are ~1e-14 of the
    # max, so 1e-8 is far above rounding and far below any real bug (a wrong term is O(1)).
    torch.float64: Tol(atol=1e-8, rtol=1e-8),
    # float32: eps = 1.2e-7.  The fast block reorders every reduction (ATen's fused batch-norm
    # backward fed cached statistics, the chunked 1x1-conv backward, pool-before-conv in the
    # transitions), BN's invstd amplifies input rounding, and a DenseNet chains O(depth) of them.
    # 1e-5 of the largest magnitude (~100 ulp) and rtol 1e-4 hold for one forward/backward of a
    # block; it is also the floor of the three-way rule for whole models over several steps.
    torch.float32: Tol(atol=1e-5, rtol=1e-4),
    # Low precision, used only as the floor of the three-way rule (rtol unused there): a few
    # roundings of the largest value (bf16 eps = 7.8e-3, fp16 eps = 9.8e-4).
    torch.bfloat16: Tol(atol=2e-2, rtol=1e-2),
    torch.float16: Tol(atol=4e-3, rtol=2e-3),
}

# The fast path may be at most this many times as far from the exact result as the naive model
# computed in the same precision (style.md: "at most ~2x the reference's own error").
NAIVE_ERROR_FACTOR = 2.0


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, name: str) -> None:
    """actual ~ expected under TOLERANCES[dtype] (atol relative to max|expected|)."""
    tol = TOLERANCES[dtype]
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    assert_close_report(actual, expected, atol=tol.atol * max(scale, 1e-30), rtol=tol.rtol, name=name)


def assert_within_naive_error(fast: Tensor, naive: Tensor, exact: Tensor, dtype: torch.dtype, name: str) -> None:
    """||fast - exact|| <= NAIVE_ERROR_FACTOR * ||naive - exact|| + TOLERANCES[dtype].atol * ||exact||.

    fast, naive: the same quantity computed in `dtype` (or under autocast to `dtype`) by the fast
    path and by the naive reference; exact: the naive reference in float32 or float64.  On
    failure the message adds helpers.assert_close_report's account of where they differ most.
    """
    if fast.shape != exact.shape or naive.shape != exact.shape:
        raise AssertionError(f"{name}: shapes fast {tuple(fast.shape)}, naive {tuple(naive.shape)}, "
                             f"exact {tuple(exact.shape)}")
    e = exact.detach().to("cpu", torch.float64)
    fast_err = float((fast.detach().to("cpu", torch.float64) - e).norm())
    naive_err = float((naive.detach().to("cpu", torch.float64) - e).norm())
    scale = float(e.norm())
    allowed = NAIVE_ERROR_FACTOR * naive_err + TOLERANCES[dtype].atol * scale
    if fast_err <= allowed:  # NaN fails here
        return
    try:
        assert_close_report(fast, exact, atol=0.0, rtol=0.0, name=name)
        detail = ""
    except AssertionError as exc:
        detail = "\n" + str(exc)
    raise AssertionError(
        f"{name}: ||fast - exact|| = {fast_err:.4g} exceeds {NAIVE_ERROR_FACTOR:g} * ||naive - exact|| "
        f"({naive_err:.4g}) + {TOLERANCES[dtype].atol:g} * ||exact|| ({scale:.4g}) = {allowed:.4g} "
        f"[relative: fast {fast_err / max(scale, 1e-300):.3g}, naive {naive_err / max(scale, 1e-300):.3g}]{detail}")


def assert_model_within_naive_error(fast, slow, ref, dtype) -> None:
    """fast, slow, ref: (logits, input grad, {param: grad}, state_dict) of ours, the naive model in
    the same dtype and the float64 reference.  Logits and running statistics elementwise;
    gradients (input first, then every parameter, each scaled by its reference norm) as one
    vector: rounding flips single ReLU masks."""
    assert_within_naive_error(fast[0], slow[0], ref[0], dtype, "logits")
    for name in ref[3]:
        if "running" in name:
            assert_within_naive_error(fast[3][name], slow[3][name], ref[3][name], dtype, name)

    def vector(result):
        parts = [result[1].double().flatten() / ref[1].double().norm()]
        parts += [result[2][n].double().flatten() / ref[2][n].double().norm() for n in sorted(ref[2])]
        return torch.cat(parts)

    assert_within_naive_error(vector(fast), vector(slow), vector(ref), dtype, "all gradients (normalised)")
