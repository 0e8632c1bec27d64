"""Memory measurement: the measured peak of a step (CPU and GPU) and the live-storage tracker the
planner runs on fake tensors; plus size parsing and formatting ("8GiB", "512MiB", "2GB").

Measured peak, bytes above what was allocated when the step started:
  GPU: torch.cuda.reset_peak_memory_stats(), then max_memory_allocated() - memory_allocated()
       taken before the step (the caching allocator's allocated bytes, rounded to its 512-byte
       blocks; not what it reserves).
  CPU: the PyTorch profiler's allocation events (profile_memory=True), which record every
       allocation and free of c10's CPU allocator with its size; a running sum in time order
       gives the live bytes, its maximum the peak.  Frees of memory allocated before the step
       count negatively, so the result is the peak above the pre-step baseline.
Planned peak (no arithmetic, no memory): StorageTracker, a TorchDispatchMode that sees every op's
outputs, adds the bytes of each storage it has not seen (an output sharing an input's storage,
a view or an in-place result, allocates nothing) and drops a storage when a weak reference to
it expires (the last tensor or autograd saved-variable holding it died).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# What Kineto (the profiler's C++ backend) writes to stderr on every profile: start/stop banners
# and, on a machine without a GPU, a failed device probe.  KINETO_LOG_LEVEL does not silence them.
_KINETO_NOISE = re.compile(r"^(USDT:|\S+ \S+ \d+:\d+ \S+\.cpp:\d+\]|ERROR:.*gpuGetDeviceCount)")


@contextlib.contextmanager
def _filtered_stderr():
    """Capture file descriptor 2 (C++ writes bypass sys.stderr) and pass on all but Kineto's noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not _KINETO_NOISE.match(line)]
            sys.stderr.write("".join(kept))

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this many bytes


# ------------------------------------------------------------------------------------------
# Measured peak
# ------------------------------------------------------------------------------------------


_MEASURED = "densenet_fast.bench.measured"


def cpu_peak_bytes(fn: Callable[[], object], setup: Optional[Callable[[], object]] = None) -> int:
    """Peak bytes of c10's CPU allocator while fn() runs, above the bytes live when it starts.

    Counts activations, gradients and every temporary that ATen allocates (oneDNN/BLAS internal
    scratch that bypasses c10 is not seen).  setup() runs first, under the profiler too but
    outside the measured region: the profiler only knows the size of a block it saw allocated, so
    a measured region that frees memory allocated before it (the backward freeing the forward's
    saved tensors) must have those allocations recorded.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with _filtered_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if setup is not None:
            setup()
        with record_function(_MEASURED):
            fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    start = next(n.start_time_ns for n in nodes if n.name == _MEASURED)
    allocs = sorted((n for n in nodes if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    current = peak = 0
    base = None  # live bytes when the measured region starts
    for node in allocs:
        if base is None and node.start_time_ns >= start:
            base = current
        current += node.extra_fields.alloc_size  # negative for a free
        if base is not None:
            peak = max(peak, current - base)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], setup: Optional[Callable[[], object]] = None) -> int:
    """max_memory_allocated() during fn(), minus memory_allocated() before it (after setup())."""
    if setup is not None:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def step_peak_bytes(fn: Callable[[], object], device: str, setup: Optional[Callable[[], object]] = None) -> int:
    """The measured peak of fn() on `device`, after an unmeasured setup() (cuda_peak_bytes or
    cpu_peak_bytes)."""
    if torch.device(device).type == "cuda":
        return cuda_peak_bytes(fn, setup)
    return cpu_peak_bytes(fn, setup)


# ------------------------------------------------------------------------------------------
# Planned peak
# ------------------------------------------------------------------------------------------


def _placeholder_scalar(t: torch.Tensor):
    # .item() of a fake tensor has no value; the only .item() in a step is the dropout seed
    # draw, whose value changes no tensor size.
    if t.dtype.is_floating_point:
        return 0.0
    return False if t.dtype == torch.bool else 0


class StorageTracker(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created while it is active, and their peak.

    Use it above a FakeTensorMode (enter it second) to plan a step without running it:
    `peak` is the highest live total seen, in bytes above what existed when it was entered;
    `current` the live total at the last allocation check.  granularity rounds each storage up
    (CUDA_BLOCK models the CUDA caching allocator's blocks).
    """

    def __init__(self, granularity: int = 1) -> None:
        super().__init__()
        self.granularity = granularity
        self.live: Dict[int, Tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def sweep(self) -> None:
        """Forget the storages that died since the last sweep."""
        dead = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in dead:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], torch._subclasses.FakeTensor):
            return _placeholder_scalar(args[0])
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            # The weak reference keeps the StorageImpl's address reserved, so a cdata still in
            # `live` always names the same storage.
            if ref.cdata in inputs or ref.cdata in self.live:
                continue
            nbytes = -(-storage.nbytes() // self.granularity) * self.granularity
            self.live[ref.cdata] = (ref, nbytes)
            self.current += nbytes
            if self.current > self.peak:
                # current counts dead storages until a sweep, so it can only overstate: sweeping
                # only when it passes the peak keeps the peak exact at a fraction of the cost.
                self.sweep()
                self.peak = max(self.peak, self.current)
        return out


# ------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size(text: str) -> int:
    """Bytes in '8GiB', '512MiB', '2GB', '1.5G', '1000000': KiB/MiB/GiB/TiB and bare K/M/G/T are
    powers of 1024, KB/MB/GB/TB powers of 1000.  Raises ValueError for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 8GiB, 512MiB, 2GB or a byte count")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value)


def format_size(nbytes: float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant digits."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.3g} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.3g} TiB"
