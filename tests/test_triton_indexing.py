"""row_run, the host's promise behind the Triton kernels' coalescing hints (triton_kernels/indexing.py).

A kernel tells triton (tl.max_contiguous / tl.multiple_of) that each aligned group of row_run(...)
rows of its tensors is that many consecutive elements, starting at a multiple of it. Triton
vectorises on that promise, so a promise one row too long reads across an image's end on a GPU:
silently wrong results that no CPU test of the kernels can see (the interpreter ignores the hints).
These tests check the promise itself, on the strides, for every layout the kernels meet: they
compute each row's element offset n * s_n + h * s_h + w * s_w and check every aligned group.
They also pin the runs the coalescing needs (NCHW block buffers, DenseNet's image sizes): a
row_run that returned 1 everywhere would be safe and useless.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from densenet_fast.triton_kernels.indexing import ROW_RUN_MAX, row_run  # noqa: E402


def _row_offsets(t: torch.Tensor) -> torch.Tensor:
    """Element offset (from t's storage offset) of row m = (n * H + h) * W + w, for every m."""
    n, _, h, w = t.shape
    s_n, _, s_h, s_w = t.stride()
    nn = torch.arange(n).view(n, 1, 1)
    hh = torch.arange(h).view(1, h, 1)
    ww = torch.arange(w).view(1, 1, w)
    return (nn * s_n + hh * s_h + ww * s_w).reshape(-1)


def _assert_promise_holds(t: torch.Tensor, run: int, base: int = 0) -> None:
    """base: t's first element's offset from the pointer the kernel indexes from."""
    off = _row_offsets(t) + base
    m = off.numel()
    for start in range(0, m, run):
        group = off[start:start + run]
        assert int(group[0]) % run == 0, f"group at row {start} starts at {int(group[0])}, not a multiple of {run}"
        expected = group[0] + torch.arange(group.numel())
        assert torch.equal(group, expected), f"rows {start}..{start + run - 1} are not consecutive elements"


def _nchw(n, c, h, w):
    return torch.empty(n, c, h, w)


def _cl(n, c, h, w):
    return torch.empty(n, c, h, w).to(memory_format=torch.channels_last)


# (tensor, rows_per_program, the run row_run must find)
CASES = {
    # DenseNet block buffers, a layer's channel slices at unaligned offsets (growth 12 / 32)
    "nchw 8x8 slice": (lambda: _nchw(4, 60, 8, 8)[:, 24:36], (), 64),
    "nchw 32x32 slice": (lambda: _nchw(2, 40, 32, 32)[:, 12:28], (), ROW_RUN_MAX),
    "nchw 56x56 slice": (lambda: _nchw(2, 8, 56, 56)[:, 3:5], (), 64),
    "nchw 28x28": (lambda: _nchw(2, 5, 28, 28), (), 16),
    "nchw 14x14": (lambda: _nchw(2, 5, 14, 14), (), 4),
    "nchw 7x7": (lambda: _nchw(3, 5, 7, 7), (), 1),
    "nchw odd 5x6": (lambda: _nchw(3, 4, 5, 6), (), 2),
    "nchw H = 1": (lambda: _nchw(3, 4, 1, 12), (), 4),
    "nchw W = 1": (lambda: _nchw(3, 4, 12, 1), (), 4),
    "nchw 1x1": (lambda: _nchw(3, 4, 1, 1), (), 1),
    # programs starting every 200 rows: groups of 8 stay aligned to them
    "nchw 8x8, 200 rows per program": (lambda: _nchw(4, 6, 8, 8), (200,), 8),
    "nchw 8x8, 256 rows per program": (lambda: _nchw(4, 6, 8, 8), (256,), 64),
    # channels_last: consecutive rows are C elements apart
    "channels_last slice": (lambda: _cl(2, 40, 8, 8)[:, 12:28], (), 1),
    "channels_last one channel": (lambda: _cl(2, 1, 8, 8), (), 64),   # C = 1: rows are contiguous
    # batch stride not a multiple of the image: images start at odd offsets
    "nchw, odd batch stride": (lambda: torch.empty(3 * 4 * 64 + 5)[:3 * 4 * 64].as_strided(
        (3, 4, 8, 8), (4 * 64 + 1, 64, 8, 1)), (), 1),
    "nchw, batch stride 2 mod 4": (lambda: torch.empty(3 * 1000).as_strided((3, 4, 8, 8), (258, 64, 8, 1)), (), 2),
    "nchw, N = 1, odd batch stride": (lambda: torch.empty(1000).as_strided((1, 4, 8, 8), (999, 64, 8, 1)), (), 64),
    # a row stride that is not W (a crop, every other row): groups within a row of pixels, each
    # row starting at a multiple of the run
    "nchw crop of a wider image": (lambda: _nchw(2, 4, 8, 10)[:, :, :, :8], (), 2),
    "nchw crop, row stride 16": (lambda: _nchw(2, 4, 8, 16)[:, :, :, :8], (), 8),
    # offsets count from the tensor's first element, whose alignment triton learns from the pointer
    "nchw crop at an odd column": (lambda: _nchw(2, 4, 8, 16)[:, :, :, 1:9], (), 8),
    "nchw crop, odd row stride": (lambda: _nchw(2, 4, 8, 9)[:, :, :, :8], (), 1),
    "nchw every other row, 56x56": (lambda: _nchw(2, 4, 56, 56)[:, :, ::2], (), 8),
    "nchw every other row, 32x32": (lambda: _nchw(2, 4, 32, 32)[:, 1:3, ::2], (), 32),
    "nchw every other row, 14x14": (lambda: _nchw(2, 4, 14, 14)[:, :, ::2], (), 2),
    # H and W swapped in memory (a transpose): neither W nor H steps by one element
    "transposed H and W": (lambda: _nchw(2, 4, 8, 8).transpose(2, 3), (), 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_row_run_promise_holds_and_is_found(name):
    make, rows_per_program, expected = CASES[name]
    t = make()
    run = row_run(t, rows_per_program=rows_per_program)
    assert run == expected, f"{name}: row_run = {run}, expected {expected}"
    _assert_promise_holds(t, run)
    for rows in rows_per_program:
        assert rows % run == 0


def test_row_run_of_several_tensors_holds_for_each():
    """The kernels pass all their row-major tensors: the run is one that every tensor keeps."""
    x = _nchw(2, 60, 8, 8)[:, 24:36]   # run 64
    g = _nchw(2, 30, 8, 8)[:, 2:3]     # run 64
    odd = torch.empty(3000).as_strided((2, 1, 8, 8), (66, 64, 8, 1))  # batch stride 66: run 2
    assert row_run(x, g) == 64
    run = row_run(x, g, odd)
    assert run == 2
    for t in (x, g, odd):
        _assert_promise_holds(t, run)
    assert row_run(x, _cl(2, 12, 8, 8)) == 1


# (full-resolution tensor, pooled rows per program, the window run the transition kernels get)
WINDOW_CASES = {
    "densenet121 56x56": (lambda: _nchw(2, 8, 56, 56), (), 8),
    "densenet121 28x28": (lambda: _nchw(2, 8, 28, 28), (), 4),
    "densenet121 14x14: a run of 2, below WINDOW_RUN_MIN": (lambda: _nchw(2, 8, 14, 14), (), 1),
    "densenet-bc 32x32, a channel slice": (lambda: _nchw(2, 40, 32, 32)[:, 12:28], (), 32),
    "densenet-bc 16x16, 200 pooled rows per program": (lambda: _nchw(4, 6, 16, 16), (200,), 16),
    "odd 9x10: last row dropped": (lambda: _nchw(2, 3, 9, 10), (), 1),   # 2 * WO = 10: run 2
    "odd 9x12: last row dropped": (lambda: _nchw(2, 3, 9, 12), (), 4),
    "odd W 8x9: rows 9 apart": (lambda: _nchw(2, 3, 8, 9), (), 1),
    # a crop 56 wide of rows 60 apart: runs of 8 on the top rows, but the bottom rows start 60 on
    "crop 8x56 of rows 60 apart": (lambda: _nchw(2, 3, 8, 60)[:, :, :, :56], (), 4),
    "channels_last": (lambda: _cl(2, 8, 56, 56), (), 1),
}


@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_window_run_promise_holds_on_the_windows(name):
    """transition.window_run: the run of the 2x2 windows' pixels, which the transition kernels walk
    as the rows of x[:, :, 0:2HO:2, 0:2WO] and x[:, :, 1:2HO:2, 0:2WO] (two per pooled row,
    _window_pairs), offsets counted from x's first element."""
    from densenet_fast.triton_kernels.transition import WINDOW_RUN_MIN, window_run
    make, rows_per_program, expected = WINDOW_CASES[name]
    x = make()
    run = window_run(x, rows_per_program=rows_per_program)
    assert run == expected, f"{name}: window_run = {run}, expected {expected}"
    assert run == 1 or run >= WINDOW_RUN_MIN
    ho, wo = x.shape[2] // 2, x.shape[3] // 2
    _assert_promise_holds(x[:, :, 0:2 * ho:2, 0:2 * wo], run)
    _assert_promise_holds(x[:, :, 1:2 * ho:2, 0:2 * wo], run, base=x.stride(2))
    for rows in rows_per_program:
        assert (2 * rows) % run == 0


def test_row_hints_off_withdraws_the_promise(monkeypatch):
    """DENSENET_FAST_TRITON_ROW_HINTS=0 (indexing.ROW_HINTS False): every run is 1, as before the hints."""
    from densenet_fast.triton_kernels import indexing
    t = _nchw(4, 60, 8, 8)[:, 24:36]
    assert row_run(t) == 64
    monkeypatch.setattr(indexing, "ROW_HINTS", False)
    assert row_run(t) == 1
