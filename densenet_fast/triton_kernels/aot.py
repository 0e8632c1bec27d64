"""Ahead-of-time compilation of the package's Triton kernels, without a GPU (a developer tool).

The kernels are tested on CPU through triton's interpreter, which never runs the compiler: a
tl.dot on a tile narrower than 16, an illegal cast or a config whose shared memory does not fit
the device only shows when a kernel is really compiled. Triton compiles for a named target with
no driver (ptxas ships with triton), so this module

1. runs the real launchers (``channel_stats_triton``, ``bn_relu_conv1x1_triton``, ...) on fake
   CUDA tensors (``FakeTensorMode``) of DenseNet-sized problems, for a pretend H100 (sm90) or
   A100 (sm80), with ``JITFunction.run`` and ``Autotuner.run`` replaced by a recorder: every
   launch is recorded with the arguments, tensor dtypes, constexprs, num_warps and candidate
   configs the launchers really pass (nothing is copied by hand from the launchers, so the check
   follows them when they change);
2. compiles each recorded launch for each of its candidate configs (the autotuner's list for that
   architecture; the first is the one used with DENSENET_FAST_TRITON_AUTOTUNE=0) with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90 | 80, 32))``, in two modes:
     generic      every int argument an unspecialised i32 and no pointer alignment assumed,
     specialized  as triton's launcher specialises the recorded values at run time (ints equal
                  to 1 become constexprs, ints divisible by 16 and 16-byte aligned pointers get
                  tt.divisibility=16), which is what really runs: vectorised loads change the
                  pipelining and so the shared memory a config needs (done for the
                  DenseNet-121 and DenseNet-BC-100 cases, the ones whose values are realistic);
3. reports compile errors, shared memory above the device's per-block opt-in limit,
   asynchronous copies into an unswizzled shared buffer across its fastest dimension
   (``unswizzled_staging``: a 32-way bank conflict on every copy, see NCHW_FP32 in __init__.py),
   and, where the launcher promised contiguous rows (ROW_RUN > 1: NCHW), global accesses through
   a row offset whose warps walk the other dimension of the tile (``row_walks``: one cache line
   per thread, see indexing.py).

The interpreter's fixed 16-wide configs (INTERPRET_CONFIG, ...) are not compiled: they only run
under TRITON_INTERPRET=1, never on a GPU.

It must run in a process where TRITON_INTERPRET is unset (the interpreter replaces @triton.jit's
JITFunction by an object triton.compile cannot take): scripts/triton_aot_check.py is the command
line, tests/test_triton_compile.py runs it in a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pkgutil
import re
import subprocess
import tempfile
import time
import traceback
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["Device", "DEVICES", "Case", "CASES", "Launch", "Unit", "Result", "capture", "units", "launch_units",
           "unit_key", "compile_unit", "compile_units", "kernel_modules", "uncovered_kernels",
           "global_accesses", "row_walks", "triton_can_compile",
           "unswizzled_staging"]


@dataclasses.dataclass(frozen=True)
class Device:
    """What the launchers ask of a device, and its per-block shared-memory limit (opt-in)."""
    arch: str            # the launchers' config list: "sm90" or "sm80"
    capability: int      # GPUTarget's arch
    sms: int             # multi_processor_count
    smem_optin: int      # shared_memory_per_block_optin, bytes


DEVICES: Dict[str, Device] = {
    "sm90": Device("sm90", 90, 132, 232448),   # H100 SXM: 227 KiB per block
    "sm80": Device("sm80", 80, 108, 166912),   # A100: 163 KiB per block
}
# sm86 / sm89 (RTX 30xx/40xx, A10, L4, L40) also get the sm80 lists but have 99 KiB per block.
SM86_SMEM_OPTIN = 101376

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                    torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}
# Keyword arguments of a launch that are compile options, not kernel arguments.
_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# --------------------------------------------------------------------------------------------
# Recording the launches
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of a launch: a pointer (type "*fp16", aligned = 16-byte aligned data), an int,
    a float or a constexpr (type "constexpr")."""
    type: str
    value: Any = None
    aligned: bool = False


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it."""
    case: str
    device: Device
    kernel: Any                                   # the JITFunction
    args: Dict[str, Arg]                          # by parameter name, constexprs included
    configs: List[Tuple[Dict[str, Any], Dict[str, Any]]]   # (constexprs, options) candidates
    autotuned: bool
    full: bool = True                             # its case checks every config (Case.full)


def _jit_function(fn):
    """The JITFunction under Autotuner / Heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise TypeError(f"{fn!r} is not a triton.jit function (TRITON_INTERPRET=1 in this process?)")
        fn = fn.fn
    return fn


def _describe(value: Any, constexpr: bool) -> Arg:
    if constexpr:
        return Arg("constexpr", value)
    if isinstance(value, torch.Tensor):
        aligned = (value.storage_offset() * value.element_size()) % 16 == 0
        return Arg("*" + _TORCH_TO_TRITON[value.dtype], None, aligned)
    if isinstance(value, bool):
        return Arg("u1", value)
    if isinstance(value, int):
        return Arg("i32" if -2**31 <= value < 2**31 else "i64", value)
    if isinstance(value, float):
        return Arg("fp32", value)
    if value is None:
        return Arg("constexpr", None)
    raise TypeError(f"cannot describe a kernel argument of type {type(value).__name__}")


class _Recorder:
    def __init__(self, device: Device) -> None:
        self.device = device
        self.case = ""
        self.launches: List[Launch] = []

    def add(self, fn, configs, args: Sequence[Any], kwargs: Dict[str, Any]) -> None:
        kernel = _jit_function(fn)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_NAMES}
        values = dict(zip(kernel.arg_names, args))
        values.update(kwargs)
        if configs is None:
            configs = [({}, options)]
            autotuned = False
        else:
            configs = [(dict(c.kwargs), {k: v for k, v in c.all_kwargs().items() if k in _OPTION_NAMES})
                       for c in configs]
            autotuned = True
        tuned_names = set(configs[0][0])
        described = {}
        for p in kernel.params:
            if p.name in values:
                described[p.name] = _describe(values[p.name], p.is_constexpr)
            elif p.name not in tuned_names and not p.is_constexpr:
                raise TypeError(f"{kernel.__name__}: argument {p.name} was not passed")
        self.launches.append(Launch(self.case, self.device, kernel, described, configs, autotuned))


class _FakeProps(types.SimpleNamespace):
    pass


@contextlib.contextmanager
def _pretend_device(recorder: _Recorder) -> Iterator[None]:
    """Replace the launch entry points by the recorder and torch.cuda's device queries by the
    pretend device's answers, for the duration of the block."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from . import _device_info

    dev = recorder.device
    props = _FakeProps(name=f"pretend {dev.arch}", major=dev.capability // 10, minor=dev.capability % 10,
                       multi_processor_count=dev.sms, shared_memory_per_block_optin=dev.smem_optin)

    def jit_run(self, *args, grid=None, warmup=False, **kwargs):
        recorder.add(self, None, args, kwargs)

    def autotuner_run(self, *args, **kwargs):
        recorder.add(self.fn, self.configs, args, kwargs)
        self.best_config = self.configs[0]

    saved = [(JITFunction, "run", JITFunction.run), (Autotuner, "run", Autotuner.run)]
    saved += [(torch.cuda, name, getattr(torch.cuda, name))
              for name in ("get_device_properties", "get_device_capability", "device")]
    JITFunction.run = jit_run
    Autotuner.run = autotuner_run
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.get_device_capability = lambda device=None: (props.major, props.minor)
    torch.cuda.device = lambda device=None: contextlib.nullcontext()
    _device_info.cache_clear()  # the launchers' cached device queries: this device's answers from here
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        _device_info.cache_clear()


# --------------------------------------------------------------------------------------------
# The launcher calls: DenseNet-sized problems (fake tensors, nothing is allocated)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """A group of launcher calls; ``full``: compile every candidate config of its launches (else
    the default, first, config only); ``dtypes``: the data dtypes it is run with."""
    name: str
    run: Callable[[torch.dtype, bool], None]    # (data dtype, channels_last)
    full: bool
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    layouts: Tuple[bool, ...] = (False, True)


def _buf(n: int, c: int, h: int, w: int, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, c, h, w), dtype=dtype, device="cuda", memory_format=fmt)


def _vec(c: int) -> torch.Tensor:
    return torch.empty((c,), dtype=torch.float32, device="cuda")


def _dense_layer(dtype: torch.dtype, channels_last: bool, *, n: int, hw: int, c_buf: int, c_l: int,
                 growth: int, bn_size: int, train: bool, swap_grads: bool = False) -> None:
    """One dense layer's forward and backward, as the triton block runs them (block_kernels.py):
    F (N, c_buf, H, W) in `dtype` and its gradient buffer G (float32 when F is half precision),
    the layer reading F[:, :c_l] and writing F[:, c_l:c_l+growth]. The conv3x3 backward reads
    grad_out from G, the conv1x1 backward reads the conv3x3 backward's d_bt (F's dtype);
    ``swap_grads`` passes the other dtype each launcher accepts (F's dtype, float32) instead."""
    from . import channel_stats, bn_relu_conv1x1, conv1x1_backward, conv3x3

    b = bn_size * growth
    half = dtype != torch.float32
    fbuf = _buf(n, c_buf, hw, hw, dtype, channels_last)
    gbuf = _buf(n, c_buf, hw, hw, torch.float32, channels_last)
    x = fbuf[:, :c_l]
    w1 = torch.empty((b, c_l, 1, 1), dtype=dtype, device="cuda")
    w2 = torch.empty((growth, b, 3, 3), dtype=dtype, device="cuda")
    channel_stats.channel_stats_triton(x)
    bt, _, _ = bn_relu_conv1x1.bn_relu_conv1x1_triton(x, _vec(c_l), _vec(c_l), w1)
    bn_relu_conv1x1.bn_relu_conv1x1_triton(x, _vec(c_l), _vec(c_l), w1, stats=False)  # the backward's recompute
    conv3x3.bn_relu_conv3x3_triton(bt, _vec(b), _vec(b), w2, out=fbuf[:, c_l:c_l + growth])
    g3 = gbuf[:, c_l:c_l + growth]
    if swap_grads and half:
        g3 = g3.to(dtype)
    d_bt, _, _, _ = conv3x3.bn_relu_conv3x3_backward_triton(
        g3, bt, w2, _vec(b), _vec(b), _vec(b), _vec(b), train)
    if swap_grads and half:
        d_bt = d_bt.float()
    conv1x1_backward.bn_relu_conv1x1_backward_triton(
        d_bt, x, w1, _vec(c_l), _vec(c_l), _vec(c_l), _vec(c_l), train, gbuf[:, :c_l])


def _transition(dtype: torch.dtype, channels_last: bool, *, n: int, hw: int, c: int, train: bool,
                grad_dtype: Optional[torch.dtype] = None) -> None:
    from . import transition

    x = _buf(n, c, hw, hw, dtype, channels_last)
    w = torch.empty((c // 2, c, 1, 1), dtype=dtype, device="cuda")
    out = transition.bn_relu_pool_conv1x1_triton(x, _vec(c), _vec(c), w)
    grad = out if grad_dtype is None else out.to(grad_dtype)
    transition.bn_relu_pool_conv1x1_backward_triton(grad, x, w, _vec(c), _vec(c), _vec(c), _vec(c), train)


def _stats_small(dtype: torch.dtype, channels_last: bool) -> None:
    """channel_stats of narrow tensors (the host picks BLOCK_C = next_pow2(C) below 64 / 16)."""
    from . import channel_stats
    for c in (3, 12, 24, 48):
        channel_stats.channel_stats_triton(_buf(64, c, 32, 32, dtype, channels_last))


# DenseNet-121 at batch 64, 224x224: block 1 at 56x56 (C_0 = 64, growth 32, bottleneck 128,
# buffer 256 channels), its 4th layer (C_l = 160); the first transition (256 -> 128, 56x56); and a
# DenseNet-BC-100 layer at batch 64, 32x32 (growth 12 -> 16-wide tiles). These get every candidate
# config. The other cases cover the other constexpr values the hosts pick (growth 48 / bottleneck
# 192 -> 64 / 256), the eval-mode and float32-gradient variants and odd image sizes (the
# transition's dropped-pixel kernel), with their default config only.
CASES: List[Case] = [
    Case("densenet121 layer (train)", lambda dt, cl: _dense_layer(
        dt, cl, n=64, hw=56, c_buf=256, c_l=160, growth=32, bn_size=4, train=True), full=True),
    Case("densenet121 transition (train)", lambda dt, cl: _transition(
        dt, cl, n=64, hw=56, c=256, train=True), full=True),
    Case("densenet121 layer (eval backward)", lambda dt, cl: _dense_layer(
        dt, cl, n=64, hw=56, c_buf=256, c_l=160, growth=32, bn_size=4, train=False), full=False),
    Case("densenet121 layer (the other grad_out dtypes)", lambda dt, cl: _dense_layer(
        dt, cl, n=64, hw=56, c_buf=256, c_l=160, growth=32, bn_size=4, train=True, swap_grads=True), full=False,
        dtypes=(torch.float16, torch.bfloat16)),
    Case("densenet-bc-100 k=12 layer, CIFAR", lambda dt, cl: _dense_layer(
        dt, cl, n=64, hw=32, c_buf=216, c_l=60, growth=12, bn_size=4, train=True), full=True),
    Case("densenet161 k=48 layer", lambda dt, cl: _dense_layer(
        dt, cl, n=32, hw=28, c_buf=768, c_l=480, growth=48, bn_size=4, train=True), full=False),
    Case("transition, odd 15x15 (eval backward)", lambda dt, cl: _transition(
        dt, cl, n=8, hw=15, c=512, train=False), full=False),
    Case("transition, odd 15x15, float32 grad_out", lambda dt, cl: _transition(
        dt, cl, n=8, hw=15, c=512, train=True, grad_dtype=torch.float32), full=False,
        dtypes=(torch.float16, torch.bfloat16)),
    Case("channel_stats, narrow tensors", _stats_small, full=False),
]


@contextlib.contextmanager
def _conv_precision(precision: str) -> Iterator[None]:
    """cuDNN's float32 convolution precision set to `precision` ("" leaves it alone)."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    if precision:
        conv.fp32_precision = precision
    try:
        yield
    finally:
        conv.fp32_precision = saved


def capture(device: Device, cases: Sequence[Case] = CASES,
            dtypes: Optional[Sequence[torch.dtype]] = None) -> List[Launch]:
    """Run the launchers of ``cases`` for ``device`` on fake tensors; returns every launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from . import INTERPRET, AUTOTUNE

    if INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 was set when densenet_fast.triton_kernels was imported: "
                           "AOT compilation needs the JITFunctions, run in a process without it")
    if not AUTOTUNE:
        raise RuntimeError("DENSENET_FAST_TRITON_AUTOTUNE=0: the config lists were cut to their first "
                           "config at import; unset it to check every config")
    recorder = _Recorder(device)
    with _pretend_device(recorder), FakeTensorMode():
        for case in cases:
            for dt in case.dtypes:
                if dtypes is not None and dt not in dtypes:
                    continue
                for cl in case.layouts:
                    # float32 dots use TF32 or IEEE as cuDNN's convolutions would (ops.precision):
                    # both kinds of launch are recorded.
                    for precision in (("tf32", "ieee") if dt == torch.float32 else ("",)):
                        layout = "channels_last" if cl else "NCHW"
                        recorder.case = f"{case.name} [{_TORCH_TO_TRITON[dt]}{precision and ' ' + precision}, {layout}]"
                        with _conv_precision(precision):
                            case.run(dt, cl)
    full = {c.name for c in cases if c.full}
    for launch in recorder.launches:
        if launch.case.split(" [")[0] not in full:
            launch.configs = launch.configs[:1]
            launch.full = False
    return recorder.launches


# --------------------------------------------------------------------------------------------
# Compilation units
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """One compilation: a kernel, a signature, constexprs, attributes, options and a target."""
    kernel: Any
    device: Device
    mode: str                                   # "generic" or "specialized"
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[str, Any], ...]
    attrs: Tuple[int, ...]                      # parameter indices with tt.divisibility=16
    options: Tuple[Tuple[str, Any], ...]
    default: bool                               # the first config of its list (autotune off)
    autotuned: bool
    case: str                                   # the first case that launched it

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def config_str(self) -> str:
        tuned = [f"{k}={v}" for k, v in self.constexprs if k.startswith("BLOCK") or k in ("STORE_DX",)]
        opts = [f"{k}={v}" for k, v in self.options]
        return " ".join(tuned + opts)

    def dtype_str(self) -> str:
        return ",".join(f"{k}:{t[1:]}" for k, t in self.signature if t.startswith("*"))


def _unit(launch: Launch, constexprs: Dict[str, Any], options: Dict[str, Any], mode: str,
          default: bool) -> Unit:
    sig, ce, attrs = [], {}, []
    for i, p in enumerate(launch.kernel.params):
        if p.name in constexprs:
            ce[p.name] = constexprs[p.name]
            sig.append((p.name, "constexpr"))
            continue
        a = launch.args[p.name]
        if a.type == "constexpr":
            ce[p.name] = a.value
            sig.append((p.name, "constexpr"))
        elif mode == "specialized" and a.type in ("i32", "i64") and a.value == 1:
            ce[p.name] = 1
            sig.append((p.name, "constexpr"))
        else:
            sig.append((p.name, a.type))
            if mode == "specialized" and ((a.type.startswith("*") and a.aligned)
                                          or (a.type in ("i32", "i64") and a.value % 16 == 0)):
                attrs.append(i)
    return Unit(launch.kernel, launch.device, mode, tuple(sig), tuple(sorted(ce.items())), tuple(attrs),
                tuple(sorted(options.items())), default, launch.autotuned, launch.case)


def unit_key(u: Unit) -> tuple:
    """What makes two units the same compilation."""
    return (id(u.kernel), u.device.arch, u.mode, u.signature, u.constexprs, u.attrs, u.options)


def launch_units(launch: Launch, mode: str) -> List[Unit]:
    """The units of one launch's candidate configs, in its autotune list's order."""
    return [_unit(launch, c, o, mode, i == 0) for i, (c, o) in enumerate(launch.configs)]


def units(launches: Sequence[Launch], modes: Sequence[str] = ("generic", "specialized"),
          default_only: bool = False) -> List[Unit]:
    """The distinct compilations of ``launches`` (a unit launched by several cases appears once;
    it counts as a default config if it is the default of any of them). The specialized mode
    covers the launches of the ``full`` cases only (the realistic DenseNet-121 and DenseNet-BC-100
    problems: their values are what gets specialised); the generic mode covers every launch."""
    out: Dict[tuple, Unit] = {}
    for launch in launches:
        configs = launch.configs[:1] if default_only else launch.configs
        for i, (constexprs, options) in enumerate(configs):
            for mode in modes:
                if mode == "specialized" and not launch.full:
                    continue
                u = _unit(launch, constexprs, options, mode, i == 0)
                key = unit_key(u)
                if key not in out:
                    out[key] = u
                elif u.default and not out[key].default:
                    out[key] = dataclasses.replace(out[key], default=True)
    return list(out.values())


# --------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    unit: Unit
    ok: bool
    error: str = ""
    shared: int = 0              # dynamic shared memory per block, bytes (metadata.shared)
    regs: Optional[int] = None   # registers per thread (cuobjdump), None when unavailable
    stack: Optional[int] = None  # per-thread stack bytes (register spills), None when unavailable
    seconds: float = 0.0
    async_copies: int = 0        # ttg.async_copy_global_to_local ops in the ttgir
    staging: Tuple[str, ...] = ()  # unswizzled_staging's findings
    row_accesses: int = 0        # global accesses through a contiguous row offset (row_walks), NCHW units
    row_walk: Tuple[str, ...] = ()  # row_walks' findings: those whose warps walk the other dimension
    accesses: Tuple[str, ...] = ()  # global_accesses, described (one line each)

    @property
    def fits(self) -> bool:
        return self.ok and self.shared <= self.unit.device.smem_optin


_LAYOUT = re.compile(r"^#(\w+) = #ttg\.(\w+)<\{(.*)\}>", re.M)
_ASYNC_COPY = re.compile(r"ttg\.async_copy_global_to_local .*?: tensor<([\dx]+)x!tt\.ptr<(\w+)>, #(\w+)> -> "
                         r"(?:!ttg\.memdesc)?<[\dx]+x\w+, #(\w+)")


def _ints(body: str, name: str) -> Optional[List[int]]:
    m = re.search(name + r" = \[([\d, ]+)\]", body)
    return [int(v) for v in m.group(1).split(",")] if m else None


def unswizzled_staging(ttgir: str) -> Tuple[int, List[str]]:
    """(number of asynchronous global-to-shared copies, the bank-conflicting ones) of a kernel's
    ttgir. A copy conflicts when its destination is a swizzled_shared buffer without swizzling
    (maxPhase 1) whose fastest dimension is not the one the copy's threads walk along: adjacent
    threads then write a whole buffer row apart, into one bank (32-way for rows of 32 words)."""
    layouts = {}
    for name, kind, body in _LAYOUT.findall(ttgir):
        phase = re.search(r"maxPhase = (\d+)", body)
        layouts[name] = (kind, _ints(body, "order"), _ints(body, "threadsPerWarp"),
                         int(phase.group(1)) if phase else None)
    copies, found = 0, []
    for shape, elem, src, dst in _ASYNC_COPY.findall(ttgir):
        copies += 1
        s_kind, s_order, threads, _ = layouts.get(src, (None, None, None, None))
        d_kind, d_order, _, phase = layouts.get(dst, (None, None, None, None))
        if s_kind != "blocked" or d_kind != "swizzled_shared" or phase != 1 or not s_order or not d_order:
            continue
        walk = s_order[0]  # the dimension a warp's adjacent threads walk along
        if threads[walk] > 1 and d_order[0] != walk:
            found.append(f"{shape}x{elem} tile copied by threads along dim {walk} (threadsPerWarp {threads}) "
                         f"into an unswizzled buffer with order {d_order}")
    return copies, found


# A global access of a tile (any rank) and the location of its source line.
_ACCESS = re.compile(r"(tt\.load|tt\.store|ttg\.async_copy_global_to_local) [^\n]*?: "
                     r"tensor<([\dx]+)x!tt\.ptr<(\w+)>, #(\w+)>[^\n]*? loc\((#loc\d*)\)")
_LOC = re.compile(r"^(#loc\d*) = (loc\(.*\))$", re.M)
# The kernels' convention (indexing.contiguous_rows): a variable named *_row or row_off holds the
# element offsets of a tile's rows, broadcast with [:, None] (rows along dim 0) or [None, :] (dim 1).
_ROW_OFFSET = re.compile(r"\b(?:\w+_row|row_off)\b")
_BROADCAST = re.compile(r"\[(:, None|None, :)\]")


def _source_lines(ttgir: str) -> Dict[str, Tuple[str, int]]:
    """{#locN: (file, line)}, following named and fused locations down to a file location."""
    raw = dict(_LOC.findall(ttgir))
    out: Dict[str, Tuple[str, int]] = {}
    for name in raw:
        seen, cur = set(), name
        while cur in raw and cur not in seen:
            seen.add(cur)
            m = re.match(r'loc\("([^"]+)":(\d+):\d+\)', raw[cur])
            if m:
                out[name] = (m.group(1), int(m.group(2)))
                break
            ref = re.search(r"(#loc\d*)", raw[cur])
            cur = ref.group(1) if ref else None
    return out


@dataclasses.dataclass(frozen=True)
class Access:
    """One global load, store or asynchronous copy of a tile in a kernel's ttgir."""
    op: str                       # "load", "store" or "async_copy_global_to_local"
    shape: str                    # "128x32"
    elem: str                     # "f32"
    order: Optional[Tuple[int, ...]]    # the blocked layout's order (None: not a blocked layout)
    threads: Optional[Tuple[int, ...]]  # its threadsPerWarp
    per_thread: Optional[Tuple[int, ...]]  # its sizePerThread (elements per thread and access)
    path: str                     # the source file and line the access comes from ("" if unknown)
    line: int
    source: str

    def describe(self) -> str:
        where = f"{os.path.basename(self.path)}:{self.line}" if self.path else "?"
        layout = (f"sizePerThread {list(self.per_thread)} threadsPerWarp {list(self.threads)} order {list(self.order)}"
                  if self.order else "not blocked")
        return f"{self.op:10.10s} {self.shape + 'x' + self.elem:12s} {layout:66s} {where}: {self.source[:70]}"


_KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))


def _current_source(path: str) -> str:
    """This package's copy of a kernel module named in a ttgir location. A compilation from
    triton's cache names the file it was first compiled from, perhaps another checkout's, since
    gone: the cache key holds the kernel's source and line numbers, not its path."""
    local = os.path.join(_KERNEL_DIR, os.path.basename(path))
    if os.path.basename(os.path.dirname(path)) == os.path.basename(_KERNEL_DIR) and os.path.exists(local):
        return local
    return path


def global_accesses(ttgir: str) -> List[Access]:
    """The global loads, stores and asynchronous copies of tiles in a kernel's ttgir, with their
    register layouts and source lines (``triton_aot_check.py --layouts`` prints them)."""
    import linecache

    layouts = {name: (tuple(_ints(body, "order") or ()), tuple(_ints(body, "threadsPerWarp") or ()),
                      tuple(_ints(body, "sizePerThread") or ()))
               for name, kind, body in _LAYOUT.findall(ttgir) if kind == "blocked"}
    lines = _source_lines(ttgir)
    out = []
    for op, shape, elem, layout, loc in _ACCESS.findall(ttgir):
        order, threads, per_thread = layouts.get(layout, (None, None, None))
        path, line = lines.get(loc, ("", 0))
        source = linecache.getline(_current_source(path), line).strip() if path else ""
        out.append(Access(op.split(".")[-1], shape, elem, order, threads, per_thread, path, line, source))
    return out


def row_walks(ttgir: str) -> Tuple[int, List[str]]:
    """(global accesses through a row offset, the ones whose warps do not walk the rows) of a
    kernel compiled with contiguous rows promised (ROW_RUN > 1). An access goes through a row
    offset when its source line uses one (a *_row / row_off variable, the kernels' convention)
    broadcast along one dimension; a warp walks the dimension its layout's order puts first.
    Walking the channels instead reads one cache line per thread (32 per warp-wide access)."""
    return _row_walks(global_accesses(ttgir))


def _row_walks(accesses: Sequence[Access]) -> Tuple[int, List[str]]:
    checked, found = 0, []
    for a in accesses:
        if a.order is None or a.shape.count("x") != 1:
            continue
        name = _ROW_OFFSET.search(a.source)
        bcast = _BROADCAST.search(a.source, name.end()) if name else None
        if bcast is None:
            continue
        row_dim = 0 if bcast.group(1) == ":, None" else 1
        checked += 1
        if a.order[0] != row_dim:
            found.append(f"{a.op} of a {a.shape}x{a.elem} tile at line {a.line} ({a.source[:60]}...): "
                         f"rows along dim {row_dim}, threads along dim {a.order[0]} "
                         f"(threadsPerWarp {list(a.threads)})")
    return checked, found


def _cuobjdump() -> Optional[str]:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def _resource_usage(cubin: bytes) -> Tuple[Optional[int], Optional[int]]:
    """(registers, stack bytes) of the one function in ``cubin``, from cuobjdump -res-usage."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = stack = None
    for tok in out.split():
        if tok.startswith("REG:"):
            regs = int(tok[4:])
        elif tok.startswith("STACK:"):
            stack = int(tok[6:])
    return regs, stack


def compile_unit(u: Unit) -> Result:
    """Compile one unit for its target; never raises (a failure is a Result with ok=False)."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    try:
        target = GPUTarget("cuda", u.device.capability, 32)
        backend = triton.compiler.compiler.make_backend(target)
        div = backend.parse_attr("D")
        src = triton.compiler.ASTSource(fn=u.kernel, signature=dict(u.signature), constexprs=dict(u.constexprs),
                                        attrs={(i,): div for i in u.attrs})
        kernel = triton.compile(src, target=target, options=dict(u.options))
        regs, stack = _resource_usage(kernel.asm["cubin"]) if "cubin" in kernel.asm else (None, None)
        ttgir = kernel.asm.get("ttgir", "")
        copies, staging = unswizzled_staging(ttgir)
        accesses = global_accesses(ttgir)
        rows, walk = _row_walks(accesses) if dict(u.constexprs).get("ROW_RUN", 1) > 1 else (0, [])
        return Result(u, True, shared=int(kernel.metadata.shared), regs=regs, stack=stack,
                      seconds=time.perf_counter() - t0, async_copies=copies, staging=tuple(staging),
                      row_accesses=rows, row_walk=tuple(walk),
                      accesses=tuple(a.describe() for a in accesses))
    except Exception as exc:  # a compile error is the finding, whatever its type
        msg = f"{type(exc).__name__}: {exc}".strip()
        if len(msg) > 4000:
            msg = msg[:4000] + " ..."
        return Result(u, False, error=msg or traceback.format_exc(limit=3), seconds=time.perf_counter() - t0)


_POOL_UNITS: List[Unit] = []


def _compile_index(i: int) -> Dict[str, Any]:
    r = compile_unit(_POOL_UNITS[i])  # the unit holds a JITFunction, which does not pickle
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "unit"}


def compile_units(us: Sequence[Unit], jobs: int = 1,
                  progress: Optional[Callable[[Result], None]] = None) -> List[Result]:
    """Compile every unit, ``jobs`` at a time (forked worker processes); results in order."""
    if jobs <= 1 or len(us) <= 1:
        results = []
        for u in us:
            results.append(compile_unit(u))
            if progress:
                progress(results[-1])
        return results
    import multiprocessing as mp
    global _POOL_UNITS
    _POOL_UNITS = list(us)
    results: List[Optional[Result]] = [None] * len(us)
    # Fork: the workers inherit the imported kernels (JITFunctions do not pickle).
    with mp.get_context("fork").Pool(jobs) as pool:
        for i, fields in enumerate(pool.imap(_compile_index, range(len(us)))):
            results[i] = Result(us[i], **fields)
            if progress:
                progress(results[i])
    _POOL_UNITS = []
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Coverage and environment
# --------------------------------------------------------------------------------------------


def kernel_modules() -> List[types.ModuleType]:
    """The modules of densenet_fast.triton_kernels that define triton.jit functions."""
    from triton.runtime.jit import JITFunction
    from .. import triton_kernels as pkg

    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("aot", "block_kernels"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if any(isinstance(v, JITFunction) for v in vars(mod).values()):
            mods.append(mod)
    return mods


def uncovered_kernels(launches: Sequence[Launch]) -> List[str]:
    """Triton functions of the kernel modules that no case launches and no launched kernel calls
    (so a new kernel without a case is noticed)."""
    from triton.runtime.jit import JITFunction

    launched = {id(launch.kernel) for launch in launches}
    sources = [launch.kernel.src for launch in launches]
    missing = []
    for mod in kernel_modules():
        for name, obj in vars(mod).items():
            if not isinstance(obj, JITFunction) or obj.__module__ != mod.__name__ or id(obj) in launched:
                continue
            if not any(f"{name}(" in src for src in sources):
                missing.append(f"{mod.__name__}.{name}")
    return missing


def triton_can_compile() -> Tuple[bool, str]:
    """Whether triton can AOT-compile for sm90 here (triton importable, ptxas runnable); the reason
    when not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable: {exc}"
    try:
        import triton.language as tl

        @triton.jit
        def _probe(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], dtype=tl.float32))

        src = triton.compiler.ASTSource(fn=_probe, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                                        constexprs={"BLOCK": 32})
        triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]  # ptxas errors run to pages
        return False, f"triton {triton.__version__} cannot compile for sm90 here: {type(exc).__name__}: {first}"
    return True, ""
