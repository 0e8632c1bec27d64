"""A roofline estimate of one training step's GPU time, without a GPU (a developer tool).

The step runs on the meta device (nothing is computed or allocated) under a dispatch mode that
sees every aten op and custom op the model issues.  Each op that launches a kernel (views and
allocations do not) is charged

    max(bytes / bandwidth, flops / peak, launch)

where bytes are its tensor operands and results (a broadcast operand counted once), flops are
counted for GEMMs and convolutions (2 per multiply-add), peak is the TF32 rate for float32 GEMMs
and convolutions when cuDNN may use TF32 (densenet_fast.ops.precision: our GEMMs follow that
setting too) else the IEEE float32 rate, and launch is a floor per kernel.  The sum is a lower
bound of the step's GPU time under those rates, not a measurement: it serves to compare providers
and changes before a GPU is lent (benchmarks/NOTES-gpu.md says what it predicted and what was
then measured).  Host-side launch overhead (what bounds small eager steps) is not modelled.

    python scripts/cost_model.py --model densenet121 --batch 64 --image-size 224 naive cuda torch
"""

from __future__ import annotations

import argparse
import collections
import math
from typing import Any, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import densenet_fast.ops.fused_bn  # noqa: F401  (the fake kernels of the extension's ops)
from densenet_fast.bench.harness import build_model, split_provider
from densenet_fast.ops.precision import conv_tf32_allowed

# Ops that launch no kernel: views, metadata, allocation.
NO_KERNEL = {"view", "_unsafe_view", "slice", "alias", "expand", "permute", "t", "transpose", "select", "as_strided",
             "detach", "unsqueeze", "squeeze", "reshape", "narrow", "split", "split_with_sizes", "unbind", "chunk",
             "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias",
             "_to_copy_meta", "set_", "resize_"}
GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}
CONVS = {"convolution", "convolution_backward"}


def _tensors(x: Any) -> List[torch.Tensor]:
    """The tensors among x's leaves (nested tuples, lists, dicts)."""
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def _bytes(t: torch.Tensor) -> int:
    """Bytes of t's distinct elements (a stride-0, broadcast dimension counts once)."""
    distinct = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1
    return distinct * t.element_size()


def _flops(name: str, args: tuple, out: Any) -> int:
    if name in GEMMS:
        a, b = _tensors(args)[-2:]
        return 2 * a.numel() * b.shape[-1]
    if name == "convolution":
        w = args[1]
        return 2 * out.numel() * w[0].numel()
    if name == "convolution_backward":
        grad_out, w = args[0], args[2]
        return 2 * 2 * grad_out.numel() * w[0].numel()  # dgrad and wgrad
    if name.startswith("triton_") and "conv" in name:  # the Triton backend's fused BN-ReLU-conv ops
        if name.endswith("backward"):  # (grad_out, x, weight, ...): dgrad and wgrad
            g, w = args[0], args[2]
            return 2 * 2 * g.shape[0] * g.shape[2] * g.shape[3] * w.numel()
        # (x, scale, shift, weight) -> (out, ...), or (x, scale, shift, weight, out) for "_out" ops
        y, w = (args[4] if name.endswith("_out") else _tensors(out)[0]), args[3]
        return 2 * y.shape[0] * y.shape[2] * y.shape[3] * w.numel()
    return 0


class CostModel(TorchDispatchMode):
    def __init__(self, bandwidth: float, fp32_peak: float, fast_peak: float, launch: float, tf32: bool,
                 ieee_gemms: bool = False) -> None:
        super().__init__()
        self.bandwidth, self.fp32_peak, self.fast_peak, self.launch, self.tf32 = \
            bandwidth, fp32_peak, fast_peak, launch, tf32
        self.ieee_gemms = ieee_gemms
        self.ops: Dict[str, List[float]] = collections.defaultdict(lambda: [0, 0, 0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        if name in NO_KERNEL:
            return out
        nbytes = sum(_bytes(t) for t in _tensors((args, kwargs, out)))
        flops = _flops(name, args, out)
        half = any(t.dtype in (torch.float16, torch.bfloat16) for t in _tensors(args))
        tf32 = self.tf32 and not (self.ieee_gemms and (name in GEMMS or name.startswith("triton_")))
        peak = self.fast_peak if half or tf32 else self.fp32_peak
        secs = max(nbytes / self.bandwidth, flops / peak, self.launch)
        row = self.ops[name]
        row[0] += 1
        row[1] += nbytes
        row[2] += flops
        row[3] += secs
        return out


def _force_kernels(name: str) -> None:
    """Make every block of the model use the `name` backend's BlockKernels on the meta device."""
    import densenet_fast.models.densenet as models_densenet
    import densenet_fast.modules as modules
    from densenet_fast.ops.cuda_block import CudaBlockKernels
    from densenet_fast.ops.dense_block import BlockKernels

    def kernels_for(*args, **kwargs):
        if name == "triton":
            from densenet_fast.triton_kernels import block_kernels
            # As when torch.compile traces: every kernel through its torch op, whose fake kernel
            # the meta device runs (the launchers would refuse meta tensors).
            block_kernels._compiling = lambda: True
            return block_kernels.TritonBlockKernels()
        return CudaBlockKernels() if name == "cuda" else BlockKernels(name="torch")

    models_densenet.kernels_for = modules.kernels_for = kernels_for


def estimate(provider: str, model: str, batch: int, image_size: int, args: argparse.Namespace) -> CostModel:
    base, saved = split_provider(provider)  # "<backend>-saved": save_bottleneck=True
    if base not in ("naive", "torch", "cuda", "triton") or (saved and base == "naive"):
        raise SystemExit(f"provider must be naive, torch, cuda or triton, the last three optionally with -saved, "
                         f"got {provider!r}")
    if base == "cuda":
        from densenet_fast import _ext
        if not _ext.HAS_C:
            raise SystemExit(f"provider cuda needs the compiled extension's ops: {_ext.IMPORT_ERROR}")
    if base != "naive":
        _force_kernels(base)
    with torch.device("meta"):
        net = build_model("naive" if base == "naive" else ("torch-saved" if saved else "torch"), model).train()
        x = torch.randn(batch, 3, image_size, image_size)
    mode = CostModel(args.bandwidth_tbs * 1e12, args.fp32_tflops * 1e12, args.tf32_tflops * 1e12,
                     args.launch_us * 1e-6, conv_tf32_allowed() and not args.ieee, args.ieee_gemms)
    with mode:
        net(x).sum().backward()
    return mode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("providers", nargs="+", help="naive, torch, cuda, triton; <backend>-saved: save_bottleneck=True")
    p.add_argument("--model", default="densenet121")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--bandwidth-tbs", type=float, default=3.5, help="achieved HBM bandwidth, TB/s")
    p.add_argument("--fp32-tflops", type=float, default=45.0, help="IEEE float32 GEMM/conv rate")
    p.add_argument("--tf32-tflops", type=float, default=300.0, help="TF32 (and fp16/bf16) GEMM/conv rate")
    p.add_argument("--launch-us", type=float, default=4.0, help="GPU time floor per kernel")
    p.add_argument("--ieee", action="store_true", help="float32 GEMMs and convs without TF32")
    p.add_argument("--ieee-gemms", action="store_true",
                   help="our float32 GEMMs without TF32 while convolutions keep it (before ops.precision)")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    print(f"{args.model}, batch {args.batch}, {args.image_size}x{args.image_size}, float32; "
          f"{args.bandwidth_tbs} TB/s, {args.fp32_tflops}/{args.tf32_tflops} TFLOP/s, {args.launch_us} us per kernel")
    for provider in args.providers:
        mode = estimate(provider, args.model, args.batch, args.image_size, args)
        total = [sum(r[i] for r in mode.ops.values()) for i in range(4)]
        print(f"{provider:11s} kernels {int(total[0]):5d}  GB {total[1] / 1e9:6.1f}  GFLOP {total[2] / 1e9:6.0f}  "
              f"estimate {total[3] * 1e3:6.1f} ms")
        for name, r in sorted(mode.ops.items(), key=lambda kv: -kv[1][3])[:args.top]:
            print(f"    {name:30s} x{int(r[0]):5d}  GB {r[1] / 1e9:6.2f}  GFLOP {r[2] / 1e9:6.0f}  {r[3] * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
