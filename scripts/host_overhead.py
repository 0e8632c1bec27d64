"""Host cost of one training step on the CPU, at shapes so small that the arithmetic is cheap
(a developer tool).

An eager GPU step of a small DenseNet is bound by the host issuing its kernels, not by the GPU
running them (benchmarks/NOTES-gpu.md: DenseNet-BC-100, batch 64, cuda backend, 90 ms eager
against 22 ms replayed from a CUDA graph).  This script times the step of each variant on the CPU
with a tiny input, where most of the time is the same per-op host work (Python, the dispatcher,
allocation), and counts the ops each variant issues from Python (a TorchDispatchMode sees those;
it does not see the ops a C++ op issues inside itself).

Variants: naive (the torchvision-style model), torch (backend "torch"), and the "cuda" backend's
code in both forms -- cuda-layers (the per-layer Python methods of CudaBlockKernels) and
cuda-whole (the C++ layer loop, dense_block_forward/backward).  The cuda backend proper needs CUDA
tensors; here the model's blocks are handed CudaBlockKernels directly, which run the extension's
CPU kernels of the same ops (as tests/test_cuda_backend.py does).  "triton" is the triton backend's
host side alone: its kernels are launched through triton's interpreter (TRITON_INTERPRET=1, set
here before anything imports triton), whose launch is replaced by a no-op that only counts, so
the time is our Python and the ATen ops around the kernels, without the kernels and without
triton's own launch cost on a GPU (the launch count is printed; its outputs are garbage, which
the host side never reads).  Rounds interleave the variants, so a change of machine load hits all
of them alike.

    python scripts/host_overhead.py --depth 100 --batch 2 --image-size 4 --rounds 5 --steps 10
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the "triton" variant)

import argparse  # noqa: E402
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import densenet_fast.models.densenet as densenet_module
import densenet_fast.modules as modules
from densenet_fast import _ext
from densenet_fast.models.densenet import densenet_bc

VARIANTS = ("naive", "torch", "cuda-layers", "cuda-whole", "triton")
LAUNCHES = [0]  # Triton launches seen by the no-op launcher


def _stub_triton_launches() -> None:
    """Replace the interpreter's kernel launch by a counter (the "triton" variant's host side)."""
    from triton.runtime import interpreter

    def run(self, *args, grid, warmup, **kwargs):
        LAUNCHES[0] += 1
    interpreter.InterpretedFunction.run = run


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _use_kernels(variant: str) -> None:
    """Point the model modules' kernels_for at the variant's kernel set (restored by "torch")."""
    from densenet_fast.backends import kernels_for
    if variant == "triton":
        from densenet_fast.triton_kernels.block_kernels import TritonBlockKernels

        def pick(name, device, group=None):
            return TritonBlockKernels(group=group)
    elif variant.startswith("cuda"):
        from densenet_fast.ops.cuda_block import CudaBlockKernels
        whole = variant == "cuda-whole"

        def pick(name, device, group=None):
            return CudaBlockKernels(group=group, whole=whole)
    else:
        pick = kernels_for
    modules.kernels_for = pick
    densenet_module.kernels_for = pick


def make_step(variant: str, depth: int, batch: int, size: int, state: Dict[str, torch.Tensor]) -> Callable[[], None]:
    model = densenet_bc(depth, memory_efficient=False) if variant == "naive" else densenet_bc(depth, backend="torch")
    model.load_state_dict(state)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        _use_kernels(variant)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "naive" not in variants:
        raise SystemExit(f"--variants: naive and any of {', '.join(VARIANTS)}, got {args.variants!r}")
    if any(v.startswith("cuda") for v in variants) and not _ext.HAS_C:
        raise SystemExit(f"the cuda variants need the compiled extension ({_ext.IMPORT_ERROR})")
    if "triton" in variants:
        if os.environ["TRITON_INTERPRET"] != "1":
            raise SystemExit("the triton variant runs under TRITON_INTERPRET=1; unset TRITON_INTERPRET or set it to 1")
        _stub_triton_launches()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    state = densenet_bc(args.depth, backend="torch").state_dict()
    steps = {v: make_step(v, args.depth, args.batch, args.image_size, state) for v in variants}
    ops = {}
    for v, step in steps.items():
        step()  # warm-up (allocator, first-call initialisation)
        counter = _OpCount()
        LAUNCHES[0] = 0
        with counter:
            step()
        ops[v] = f"{counter.count:,}" + (f" + {LAUNCHES[0]:,} Triton launches" if LAUNCHES[0] else "")
    times: Dict[str, List[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[v].append((time.perf_counter() - t0) / args.steps * 1e3)
    _use_kernels("torch")
    naive = statistics.median(times["naive"])
    print(f"DenseNet-BC-{args.depth}, batch {args.batch}, {args.image_size}x{args.image_size}, CPU, "
          f"{args.threads} thread(s), torch {torch.__version__}; median of {args.rounds} rounds of {args.steps} steps")
    print("| variant | ops issued from Python | ms per step | vs naive |")
    print("|---|---:|---:|---:|")
    for v in variants:
        ms = statistics.median(times[v])
        print(f"| {v} | {ops[v]} | {ms:.1f} | {ms / naive:.2f}x |")


if __name__ == "__main__":
    main()
