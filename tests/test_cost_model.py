"""scripts/cost_model.py, the roofline estimate used to rank providers and changes without a GPU:
what it charges each kernel, checked against hand counts (bytes of operands and results, 2 FLOPs
per multiply-add, nothing for views), and that a broadcast operand is counted once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import load_file_module


@pytest.fixture(scope="module")
def cost_model():
    return load_file_module("cost_model", "scripts/cost_model.py")


def _mode(cost_model, tf32=False):
    # 1 B/s and 1 FLOP/s (4 for the fast rate), no launch floor: the charge is max(bytes, flops[/4]).
    return cost_model.CostModel(bandwidth=1.0, fp32_peak=1.0, fast_peak=4.0, launch=0.0, tf32=tf32)


def test_conv_charges_bytes_and_flops(cost_model):
    with torch.device("meta"):
        x, w = torch.empty(2, 8, 5, 6), torch.empty(4, 8, 3, 3)
    mode = _mode(cost_model)
    with mode:
        F.conv2d(x, w, padding=1)
    count, nbytes, flops, secs = mode.ops["convolution"]
    out_numel = 2 * 4 * 5 * 6
    assert count == 1
    assert nbytes == 4 * (x.numel() + w.numel() + out_numel)
    assert flops == 2 * out_numel * 8 * 3 * 3
    assert secs == max(nbytes, flops)
    with _mode(cost_model, tf32=True) as fast:
        F.conv2d(x, w, padding=1)
    assert fast.ops["convolution"][3] == max(nbytes, flops / 4)


def test_gemm_with_broadcast_operand_and_views(cost_model):
    with torch.device("meta"):
        a = torch.empty(3, 5, 7)
        w = torch.empty(5, 5)
    mode = _mode(cost_model)
    with mode:
        wb = w.expand(3, 5, 5)          # a view: no kernel
        out = torch.bmm(wb, a)          # the broadcast weight is read once
    assert set(mode.ops) == {"bmm"}
    count, nbytes, flops, _ = mode.ops["bmm"]
    assert nbytes == 4 * (w.numel() + a.numel() + out.numel())
    assert flops == 2 * 3 * 5 * 5 * 7
