"""Triton kernels of the dense block (the "triton" backend, work in progress).

Importing this package never fails: without triton (a CPU-only install, macOS) HAS_TRITON is False
and IMPORT_ERROR says why; the kernel modules themselves (``channel_stats``,
``bn_relu_conv1x1``) import triton and are only imported by callers that checked HAS_TRITON.

  HAS_TRITON     True when ``import triton`` worked
  IMPORT_ERROR   a one-line reason when it did not, else None
  INTERPRET      TRITON_INTERPRET=1 was set when this package was imported: the kernels then run
                 on CPU tensors through triton's interpreter (tests), with one fixed small config
                 instead of autotuning.  It must be set before the kernel modules are imported,
                 because @triton.jit reads it when it decorates a kernel.

Kernels and launchers (strides are passed in elements, so channel slices of a wider NCHW or
channels_last buffer are read in place):

  channel_stats.channel_stats_triton(x) -> (mean, var)
  bn_relu_conv1x1.bn_relu_conv1x1_triton(x, scale, shift, weight, stats=True) -> (out, mean, var)
  (and conv3x3, conv1x1_backward, transition: the other kernels of the block, see block_kernels.py)

Each is also a torch.library custom op (``densenet_fast::triton_channel_stats``,
``densenet_fast::triton_bn_relu_conv1x1``) with a fake implementation, so torch.compile traces it.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    HAS_TRITON = False
    IMPORT_ERROR: Optional[str] = f"triton is not importable: {type(exc).__name__}: {exc}"
else:
    HAS_TRITON = True
    IMPORT_ERROR = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["HAS_TRITON", "IMPORT_ERROR", "INTERPRET", "NCHW_FP32", "autotune", "autotune_lists", "cdiv",
           "config_list", "device_arch", "device_sms", "device_smem_optin", "nchw_fp32_list", "next_power_of_2",
           "single_stage_first"]


# The launchers' host-side integer arithmetic.  triton.cdiv and triton.next_power_of_2 are
# ConstexprFunctions in triton 3.6 and 3.8, whose call from host code costs about 3 us (it unwraps
# constexpr arguments) against 0.03 us for the expression: with ~1,500 calls in a DenseNet-BC-100
# training step that was ~4 ms of host time per step (scripts/host_overhead.py).
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for ints n >= 1."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> Tuple[str, int, int]:
    """(autotune-list key, SM count, opt-in shared memory per block) of CUDA device `index`.

    Cached: the launchers ask on every launch (about ten times per dense layer and step), and
    torch.cuda.get_device_properties costs microseconds of host time per call.  aot.py, which
    pretends to be one device and then another, clears the cache around its pretence."""
    import torch
    props = torch.cuda.get_device_properties(index)
    return ("sm90" if props.major >= 9 else "sm80"), props.multi_processor_count, props.shared_memory_per_block_optin


def _index(device) -> int:
    import torch
    return device.index if device.index is not None else torch.cuda.current_device()


def device_arch(device) -> str:
    """The key of the kernels' autotune lists for a CUDA device: "sm90" (Hopper and newer) or "sm80"."""
    return _device_info(_index(device))[0]


def device_sms(device) -> int:
    """The CUDA device's multiprocessor count."""
    return _device_info(_index(device))[1]


def device_smem_optin(device) -> int:
    """The CUDA device's opt-in shared memory per block, in bytes."""
    return _device_info(_index(device))[2]


def config_list(x, precision: str) -> str:
    """Which config list a GEMM kernel reading x runs with: "fma" for float32 data with IEEE dots
    (TF32 off: tl.dot lowers to FMAs on registers, where the pipelined tiles of the other lists
    spill), else device_arch(x.device)."""
    import torch
    return "fma" if precision == "ieee" and x.dtype == torch.float32 else device_arch(x.device)


# Float32 NCHW operands and software pipelining. With num_stages > 1 triton stages a kernel's
# loads through shared memory with asynchronous copies. For some float32 tiles read from NCHW data
# (rows contiguous, channels strided) it picks a staging buffer that is not swizzled and whose
# fastest dimension is not the one the copying threads walk along, so a warp's 32 four-byte copies
# land one row of the buffer apart, in one bank: a 32-way conflict on every copy (the ttgir's
# ttg.async_copy_global_to_local into #ttg.swizzled_shared<{vec = 1, perPhase = 1, maxPhase = 1}>;
# aot.unswizzled_staging finds it, triton 3.6 and 3.8, sm_90 and sm_80). Single-stage tiles load
# into registers and go through a swizzled buffer instead. The 3x3 forward was the first kernel
# found so: its single-stage tiles took triton+graph on DenseNet-BC-100 from 34.9 to 26.5 ms
# (H200, benchmarks/NOTES-gpu.md). The kernels with such operands get a list with single-stage
# tiles first (NCHW_FP32 below): the 3x3 wgrad, the 1x1 backward's first pass, the transition's
# forward and wgrad (and the wgrad's float32 gradient tile of DenseNet-BC under AMP with triton
# 3.8, conv3x3.wgrad_config_list). Their default configs are single-stage
# (tests/test_triton_compile.py checks that no default config stages through one bank);
# autotuning times the pipelined ones as well.
NCHW_FP32 = "_nchw_fp32"


def nchw_fp32_list(x, precision: str, *operands) -> str:
    """config_list(x, precision), with NCHW_FP32 appended when x or one of `operands` is float32
    data not stored channels_last and the dots are TF32 (the lists of single_stage_first)."""
    import torch
    from .channel_stats import is_channels_last
    name = config_list(x, precision)
    if name != "fma" and any(t.dtype == torch.float32 and not is_channels_last(t) for t in (x, *operands)):
        return name + NCHW_FP32
    return name


def single_stage_first(configs, count: int = 2):
    """`configs` with single-stage copies of its first `count` tiles in front (an NCHW_FP32 list:
    the first of them, the default with autotuning off, is the list's default tile unpipelined)."""
    import triton as _triton
    front = [_triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=1)
             for c in list(configs)[:count] if c.num_stages != 1]
    return front + list(configs)


# DENSENET_FAST_TRITON_AUTOTUNE=0: every autotuned kernel runs its first (default) configuration
# without benchmarking the others (a quick first step, e.g. on a short GPU lease); default 1.
AUTOTUNE = os.environ.get("DENSENET_FAST_TRITON_AUTOTUNE", "1") != "0"


# Timing of each candidate configuration while autotuning, in milliseconds of warm-up and of
# repetitions (triton's defaults are 25 and 100).  A model autotunes each kernel for every block
# and channel bucket, i.e. dozens of keys of 4-7 configurations each: with the defaults that is a
# minute or more of timing alone before the first step (an H200 lease timed out in it), while the
# kernels take 10-500 us, so 25 ms still averages 50-2500 runs per configuration.
AUTOTUNE_WARMUP_MS = float(os.environ.get("DENSENET_FAST_TRITON_AUTOTUNE_WARMUP_MS", "5"))
AUTOTUNE_REP_MS = float(os.environ.get("DENSENET_FAST_TRITON_AUTOTUNE_REP_MS", "25"))


def _time_config(kernel_call, quantiles):
    """The autotuner's timing of one configuration (triton.testing.do_bench, shorter)."""
    from triton.testing import do_bench
    return do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


# DENSENET_FAST_TRITON_AUTOTUNE_LOG=PATH: each autotuning's timings are appended to PATH as a
# JSON line {"kernel", "key", "best", "ms": {config: time}} (a GPU lease's record of which configs
# win; a choice read from triton's disk cache comes with the timings stored there, one left alone
# by the pruning with "ms": null).
AUTOTUNE_LOG = os.environ.get("DENSENET_FAST_TRITON_AUTOTUNE_LOG", "")


def _logged(tuner, path: str):
    """Give one triton Autotuner a run that appends each new tuning's timings to `path`."""
    import json

    def run(*args, **kwargs):
        seen = set(tuner.cache)
        tuner.configs_timings = None  # set again only by a tuning that times the configs
        out = type(tuner).run(tuner, *args, **kwargs)  # the class's run, as patched (aot.py) or not
        timings = tuner.configs_timings
        for key in set(tuner.cache) - seen:
            record = {"kernel": tuner.base_fn.__name__, "key": [str(k) for k in key], "best": str(tuner.cache[key]),
                      "ms": None if timings is None else {str(c): t for c, t in timings.items()}}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return out
    tuner.run = run
    return tuner


def autotune(configs, key, **kwargs):
    """triton.autotune over `configs`, or over configs[:1] only when AUTOTUNE is off.

    On a GPU each configuration is timed by `_time_config`, and the choice per key is kept in
    triton's on-disk cache (cache_results), so a second process with the same kernels and shapes
    (the next training run, the benchmark after the tests) does not time them again. With
    AUTOTUNE_LOG set, each tuning's timings are logged (_logged)."""
    import triton as _triton
    if not INTERPRET:
        kwargs.setdefault("do_bench", _time_config)
        kwargs.setdefault("cache_results", True)
    decorate = _triton.autotune(configs=list(configs) if AUTOTUNE else list(configs)[:1], key=key, **kwargs)
    if not AUTOTUNE_LOG:
        return decorate
    return lambda fn: _logged(decorate(fn), AUTOTUNE_LOG)


def autotune_lists(kernel, key, sm90, sm80, fma=None, nchw_fp32=False):
    """{"sm90": ..., "sm80": ..., "fma": ...}: `kernel` autotuned over each config list, indexed as
    config_list names the lists (without an fma list, index by device_arch); with nchw_fp32 also
    "sm90_nchw_fp32" and "sm80_nchw_fp32" (single_stage_first's, indexed as nchw_fp32_list names them)."""
    lists = {"sm90": sm90, "sm80": sm80, **({} if fma is None else {"fma": fma})}
    if nchw_fp32:
        lists.update({arch + NCHW_FP32: single_stage_first(lists[arch]) for arch in ("sm90", "sm80")})
    return {name: autotune(configs=configs, key=key)(kernel) for name, configs in lists.items()}
