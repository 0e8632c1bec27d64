"""Per-op benchmarks: achieved GB/s of each kernel against the measured device-to-device copy bandwidth.

    python benchmarks/bench_ops.py [--out CSV] [--dtype float32,bfloat16] [--ops NAME,...]

Every op reads a channel slice of a realistic block buffer (DenseNet-BC-100 block 1 at batch 64:
N=64, 32x32, the last layer's prefix of 204 channels; DenseNet-121 block 1 at batch 64: 56x56, 224
channels; DenseNet-BC-100 block 3: 8x8, 330 channels) and is timed with triton.testing.do_bench
(CUDA events, median).  "Bytes" is the fewest bytes the op must move (every input read once, every
output written once); GB/s = bytes / median time; pct_of_copy divides by the copy ceiling measured
in the same run (a large D2D copy, bytes read plus bytes written). GEMM-like ops also report
TFLOP/s. Rows go to a CSV with the device, versions and git sha
(densenet_fast.bench.harness.environment); ops whose kernels are missing in this installation are
skipped with a status.

Needs a GPU.  Shapes are per (model, dtype); inputs are random (never zeros).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

FIELDS = ("op", "provider", "shape", "dtype", "layout", "status", "median_ms", "gbytes", "gb_per_s", "copy_gb_per_s",
          "pct_of_copy", "tflops", "device", "device_name", "torch", "triton", "cuda", "git_sha", "date")


@dataclass
class Shape:
    name: str
    n: int
    c: int        # channels of the prefix the op reads
    c_buf: int    # channels of the buffer it is a slice of
    h: int
    w: int
    b: int        # bottleneck width
    k: int        # growth rate

    def __post_init__(self):
        # The new channels are written at [c, c + k) of the buffer: they must fit in it.
        if self.c + self.k > self.c_buf:
            raise ValueError(f"Shape {self.name}: prefix {self.c} + growth {self.k} exceeds the buffer's {self.c_buf} "
                             "channels")


# The last layer of each model's first block at batch 64: BC-100 24 + 15*12 = 204 of 216 channels,
# DenseNet-121 64 + 5*32 = 224 of 256. Then BC-100's third block (8x8, M = 4,096 rows; 150 + 15*12 =
# 330 of 342 channels), where the 2026-11-27 lease's autotuning timed the Triton backward kernels
# at several times their byte floor (benchmarks/NOTES-gpu.md).
SHAPES = [Shape("bc100-b1", 64, 204, 216, 32, 32, 48, 12), Shape("d121-b1", 64, 224, 256, 56, 56, 128, 32),
          Shape("bc100-b3", 64, 330, 342, 8, 8, 48, 12)]


def copy_bandwidth(device: str) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    import triton.testing

    src = torch.randn(2 ** 28, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _buffer(s: Shape, dtype: torch.dtype, layout: str, device: str, channels: int) -> torch.Tensor:
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return torch.randn(s.n, channels, s.h, s.w, device=device, dtype=dtype).contiguous(memory_format=fmt)


def _stats(x: torch.Tensor):
    m = x.float().mean(dim=(0, 2, 3))
    v = x.float().var(dim=(0, 2, 3), unbiased=False)
    return m, v


def cases(s: Shape, dtype: torch.dtype, layout: str, device: str) -> Dict[str, Dict[str, Callable]]:
    """{op: {provider: (fn, bytes, flop)}} for the providers available in this installation."""
    from densenet_fast import _ext
    from densenet_fast.ops import bn_relu as torch_ops
    from densenet_fast.ops.conv1x1 import conv1x1

    es = torch.tensor([], dtype=dtype).element_size()
    fbuf = _buffer(s, dtype, layout, device, s.c_buf)
    x = fbuf[:, :s.c]
    m = s.n * s.h * s.w
    mean, var = _stats(x)
    gamma = torch.rand(s.c, device=device) + 0.5
    beta = torch.randn(s.c, device=device)
    invstd = torch.rsqrt(var + 1e-5)
    scale = gamma * invstd
    shift = beta - mean * scale
    w1 = torch.randn(s.b, s.c, 1, 1, device=device, dtype=dtype) * 0.05
    bt = _buffer(s, dtype, layout, device, s.b)
    m2, v2 = _stats(bt)
    g2 = torch.rand(s.b, device=device) + 0.5
    b2 = torch.randn(s.b, device=device)
    inv2 = torch.rsqrt(v2 + 1e-5)
    sc2 = g2 * inv2
    sh2 = b2 - m2 * sc2
    w2 = torch.randn(s.k, s.b, 3, 3, device=device, dtype=dtype) * 0.05
    new = fbuf[:, s.c:s.c + s.k]
    stats = torch_ops.NormStats(mean, var, True, m)
    out: Dict[str, Dict[str, tuple]] = {}

    def add(op, provider, fn, nbytes, flop=0):
        out.setdefault(op, {})[provider] = (fn, nbytes, flop)

    # --- per-channel statistics of the prefix: read it once
    nb = m * s.c * es
    add("channel_stats", "torch", lambda: torch_ops.batch_stats(x), nb)
    if _ext.has_cuda_kernels():
        from densenet_fast.ops.channel_stats import channel_stats
        add("channel_stats", "cuda", lambda: channel_stats(x), nb)
    tk = _triton_module("channel_stats")
    if tk is not None:
        add("channel_stats", "triton", lambda tk=tk: tk.channel_stats_triton(x), nb)

    # --- BN-ReLU of the prefix into a scratch buffer: read + write
    nb = 2 * m * s.c * es
    add("bn_relu", "torch", lambda: torch_ops.bn_relu(x, stats, gamma, beta, 1e-5), nb)
    fb = _optional("densenet_fast.ops.fused_bn")
    if fb is not None and _ext.has_cuda_kernels():
        scratch = torch.empty_like(x, memory_format=new_fmt(layout))
        add("bn_relu", "cuda", lambda: fb.bn_relu_out(x, scale, shift, scratch), nb)

    # --- BN-ReLU-Conv1x1 (the bottleneck): read the prefix, write Bt
    nb = m * (s.c + s.b) * es
    flop = 2 * m * s.c * s.b
    add("bn_relu_conv1x1", "torch",
        lambda: conv1x1(torch_ops.bn_relu(x, stats, gamma, beta, 1e-5), w1), nb, flop)
    tk = _triton_module("bn_relu_conv1x1")
    if tk is not None:
        add("bn_relu_conv1x1", "triton", lambda tk=tk: tk.bn_relu_conv1x1_triton(x, scale, shift, w1), nb, flop)

    # --- BN-ReLU-Conv3x3 into the buffer slice: read Bt, write k channels
    nb = m * (s.b + s.k) * es
    flop = 2 * m * s.b * 9 * s.k
    st2 = torch_ops.NormStats(m2, v2, True, m)
    add("bn_relu_conv3x3", "torch",
        lambda: new.copy_(torch.nn.functional.conv2d(torch_ops.bn_relu(bt, st2, g2, b2, 1e-5), w2, padding=1)),
        nb, flop)
    tk = _triton_module("conv3x3")
    if tk is not None:
        add("bn_relu_conv3x3", "triton", lambda tk=tk: tk.bn_relu_conv3x3_triton(bt, sc2, sh2, w2, out=new), nb, flop)

    # --- backward of BN-ReLU-Conv3x3: read dOut (fp32 slice of G) and Bt, write dBt
    g_out = torch.randn(s.n, s.k, s.h, s.w, device=device).contiguous(memory_format=new_fmt(layout))
    nb = m * (4 * s.k + 2 * s.b * es)
    flop = 2 * 2 * m * s.b * 9 * s.k
    tk = _triton_module("conv3x3")
    if tk is not None:
        add("bn_relu_conv3x3_bwd", "triton",
            lambda tk=tk: tk.bn_relu_conv3x3_backward_triton(g_out, bt, w2, m2, inv2, g2, b2, True), nb, flop)

    # --- backward of the bottleneck: read dBt and the prefix, read + write G[:, :C_l] (fp32)
    d_bt = torch.randn_like(bt)
    gacc = torch.zeros(s.n, s.c, s.h, s.w, device=device, dtype=torch.float32).contiguous(
        memory_format=new_fmt(layout))
    nb = m * (s.b * es + s.c * es + 8 * s.c)
    flop = 2 * 2 * m * s.c * s.b
    tk = _triton_module("conv1x1_backward")
    if tk is not None:
        add("bn_relu_conv1x1_bwd", "triton",
            lambda tk=tk: tk.bn_relu_conv1x1_backward_triton(d_bt, x, w1, mean, invstd, gamma, beta, True, gacc), nb, flop)

    # --- transition (pool before conv): read the whole buffer, write the pooled half-width output
    cout = s.c_buf // 2
    wt = torch.randn(cout, s.c_buf, 1, 1, device=device, dtype=dtype) * 0.05
    fm, fv = _stats(fbuf)
    gt = torch.rand(s.c_buf, device=device) + 0.5
    bt_ = torch.randn(s.c_buf, device=device)
    f_inv = torch.rsqrt(fv + 1e-5)
    fsc = gt * f_inv
    fsh = bt_ - fm * fsc
    nb = m * s.c_buf * es + (m // 4) * cout * es
    flop = 2 * (m // 4) * s.c_buf * cout
    tk = _triton_module("transition")
    if tk is not None:
        add("transition", "triton", lambda tk=tk: tk.bn_relu_pool_conv1x1_triton(fbuf, fsc, fsh, wt), nb, flop)

    # --- transition backward: read dOut (pooled, the buffer's dtype) and the buffer, write dX
    g_pool = torch.randn(s.n, cout, s.h // 2, s.w // 2, device=device, dtype=dtype).contiguous(
        memory_format=new_fmt(layout))
    nb = 2 * m * s.c_buf * es + (m // 4) * cout * es
    flop = 2 * 2 * (m // 4) * s.c_buf * cout
    if tk is not None:
        add("transition_bwd", "triton",
            lambda tk=tk: tk.bn_relu_pool_conv1x1_backward_triton(g_pool, fbuf, wt, fm, f_inv, gt, bt_, True), nb, flop)

    # --- BN backward reductions over the prefix (ReLU mask recomputed): read grad + x
    gz = torch.randn_like(x)
    nb = 2 * m * s.c * es
    if fb is not None and _ext.has_cuda_kernels():
        add("bn_backward_reduce", "cuda", lambda: fb.bn_relu_backward_reduce(gz, x, scale, shift, mean), nb)
        a = torch.randn(s.c, device=device) * 1e-3
        b = torch.randn(s.c, device=device) * 1e-3
        gacc = torch.zeros(s.n, s.c, s.h, s.w, device=device, dtype=torch.float32).contiguous(
            memory_format=new_fmt(layout))
        # read grad_z, x, G; write G (fp32)
        add("bn_backward_apply", "cuda", lambda: fb.bn_backward_apply(gz, x, scale, shift, mean, a, b, gacc, True),
            2 * m * s.c * es + 8 * m * s.c)
    return out


def new_fmt(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "nhwc" else torch.contiguous_format


def _optional(module: str):
    try:
        import importlib
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a missing kernel module means "not in this installation"
        return None


def _triton_module(name: str):
    from densenet_fast import triton_kernels
    if not triton_kernels.HAS_TRITON:
        return None
    return _optional(f"densenet_fast.triton_kernels.{name}")


def _measure(fn: Callable, nbytes: int, flop: int, ceiling: float) -> dict:
    """Median time (do_bench) and the rates derived from it, or an error status."""
    import triton.testing
    try:
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - one failing op must not lose the rest
        return {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    gbs = nbytes / (ms * 1e-3) / 1e9
    return dict(status="ok", median_ms=round(ms, 4), gb_per_s=round(gbs, 1), pct_of_copy=round(100 * gbs / ceiling, 1),
                tflops=round(flop / (ms * 1e-3) / 1e12, 2) if flop else "")


def _line(r: dict) -> str:
    head = f"{r['op']:<20} {r['provider']:<7} {r['shape']:<9} {r['dtype']:<8} {r['layout']:<4}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    return f"{head} {r['median_ms']:>8.4f} {r['gb_per_s']:>7.0f} {r['pct_of_copy']:>6.1f} {str(r['tflops']):>6}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--layout", default="nhwc,nchw")
    ap.add_argument("--ops", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops: needs a GPU (no CUDA device here)", file=sys.stderr)
        return 2
    from densenet_fast.bench import harness

    device = "cuda"
    meta = harness.environment(device)
    ceiling = copy_bandwidth(device)
    print(f"copy ceiling: {ceiling:.0f} GB/s (read + write) on {meta.get('device_name')}")
    out = args.out or str(harness.default_csv_path("ops", device))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    new = not os.path.exists(out)
    rows = []
    wanted = set(filter(None, args.ops.split(",")))
    # Each row is written and printed as soon as it is measured: a run cut short by a time limit
    # (a GPU lease's) keeps what it measured.
    header = ("op", "prov", "shape", "dtype", "lay", "ms", "GB/s", "%copy", "TF/s")
    print("{:<20} {:<7} {:<9} {:<8} {:<4} {:>8} {:>7} {:>6} {:>6}".format(*header), flush=True)
    with open(out, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            wr.writeheader()
        for dt_name in args.dtype.split(","):
            dtype = harness.DTYPES[dt_name]
            for layout in args.layout.split(","):
                for s in SHAPES:
                    for op, provs in cases(s, dtype, layout, device).items():
                        if wanted and op not in wanted:
                            continue
                        for prov, (fn, nbytes, flop) in provs.items():
                            row = dict(op=op, provider=prov, shape=s.name, dtype=dt_name, layout=layout,
                                       copy_gb_per_s=round(ceiling, 1), gbytes=round(nbytes / 1e9, 4), **meta)
                            row.update(_measure(fn, nbytes, flop, ceiling))
                            rows.append(row)
                            wr.writerow(row)
                            f.flush()
                            print(_line(row), flush=True)
    print(f"wrote {out}; median of medians {statistics.median([r['median_ms'] for r in rows if r['status'] == 'ok'] or [0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
