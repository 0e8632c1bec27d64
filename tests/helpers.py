"""Test helpers shared by the test files (``from helpers import ...``: pytest's default "prepend"
import mode puts tests/ on sys.path, since tests/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


ROOT = Path(__file__).resolve().parents[1]


# ---- the Triton kernels' test modules ---------------------------------------------------------

def skip_module_unless_triton_runs() -> None:
    """Skip the calling test module, at its import, unless the Triton kernels can run here: triton
    installed, and either its interpreter on (TRITON_INTERPRET=1, reading CPU tensors) or a GPU."""
    from densenet_fast import triton_kernels
    if not triton_kernels.HAS_TRITON:
        pytest.skip(f"the Triton kernels need triton ({triton_kernels.IMPORT_ERROR})", allow_module_level=True)
    if not triton_kernels.INTERPRET and not torch.cuda.is_available():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run here",
                    allow_module_level=True)


def triton_device() -> str:
    """Where the Triton tests put their tensors: the interpreter reads CPU tensors, compiled kernels CUDA ones."""
    from densenet_fast import triton_kernels
    return "cpu" if triton_kernels.INTERPRET else "cuda"


def triton_gpu_only():
    """The mark of a Triton test that needs compiled kernels on a GPU (bf16 and autotuning, which
    the interpreter does not run)."""
    from densenet_fast import triton_kernels
    return pytest.mark.skipif(triton_kernels.INTERPRET or not torch.cuda.is_available(),
                              reason="needs a GPU and compiled kernels (bf16 and autotuning do not run "
                                     "under TRITON_INTERPRET)")


def load_file_module(name: str, relative_path: str):
    """The repository file at `relative_path` (setup.py, a script, a benchmark) imported as module
    `name`, registered in sys.modules (dataclasses look their module up there). Importing runs no
    `if __name__ == "__main__"` block."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class DispatchLog(TorchDispatchMode):
    """Records the ops dispatched inside the context: `entries` holds record(func, args) for each
    (func an OpOverload, args as passed) where it is not None; by default the op's name
    ("aten::copy_", "densenet_fast::channel_stats")."""

    def __init__(self, record: Optional[Callable[[Any, tuple], Any]] = None):
        super().__init__()
        self.record = record or (lambda func, args: func.name())
        self.entries = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entry = self.record(func, args)
        if entry is not None:
            self.entries.append(entry)
        return func(*args, **(kwargs or {}))


def _nonfinite(t: Tensor) -> str:
    return f"{int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} Inf"


def assert_close_report(actual: Tensor, expected: Tensor, atol: float, rtol: float, name: str) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise (NaN never passes).

    Both are compared in float64 on the CPU, so an fp16 result can be checked against a float64
    reference. On failure the message says where and by how much they differ: the number of
    mismatches, the worst element's index and values, the largest absolute and relative errors,
    and the NaN/Inf count of each side.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    err = (a - e).abs()
    allowed = atol + rtol * e.abs()
    bad = ~(err <= allowed)  # also true where either side is NaN
    if not bool(bad.any()):
        return
    # Rank the elements by how far past their tolerance they are, NaN first.
    excess = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err - allowed)
    flat = int(excess.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    finite = torch.isfinite(err)
    max_abs = float(err[finite].max()) if bool(finite.any()) else float("nan")
    rel = err / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    max_rel = float(rel[finite].max()) if bool(finite.any()) else float("nan")
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {a.numel()} elements differ beyond atol={atol:g}, rtol={rtol:g}\n"
        f"  worst at index {index}: actual {a.flatten()[flat].item()!r}, expected {e.flatten()[flat].item()!r}\n"
        f"  max abs err {max_abs:.6g}, max rel err {max_rel:.6g}\n"
        f"  actual ({actual.dtype}): {_nonfinite(a)}; expected ({expected.dtype}): {_nonfinite(e)}"
    )


def elf_needed(path: str) -> list:
    """The DT_NEEDED entries (shared libraries a loader must bring in) of an ELF shared object, read
    with the standard library (no readelf on every machine)."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    is64, order = data[4] == 2, "<" if data[5] == 1 else ">"
    # e_shoff, e_shentsize and e_shnum; the section header and dynamic entry layouts
    if is64:
        (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 0x3A)
        section, entry = order + "IIQQQQIIQQ", order + "qQ"
    else:
        (shoff,) = struct.unpack_from(order + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 0x2E)
        section, entry = order + "IIIIIIIIII", order + "iI"
    headers = [struct.unpack_from(section, data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in headers:
        if kind != 6:  # SHT_DYNAMIC; its sh_link is the string table (.dynstr)
            continue
        strings = headers[link][4]
        for pos in range(offset, offset + size, entsize or struct.calcsize(entry)):
            tag, value = struct.unpack_from(entry, data, pos)
            if tag == 0:  # DT_NULL ends the table
                break
            if tag == 1:  # DT_NEEDED
                start = strings + value
                needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def gpu_tiles(*config_lists) -> list:
    """The distinct tile shapes (a config's kwargs: BLOCK_M, ...) of triton.Config lists, in a
    fixed order. Configs that differ only in num_warps or num_stages share a tile: the interpreter
    computes the same either way."""
    seen = {}
    for configs in config_lists:
        for config in configs:
            seen.setdefault(tuple(sorted(config.kwargs.items())), dict(config.kwargs))
    return [seen[key] for key in sorted(seen)]


def tile_id(tile: dict) -> str:
    """A pytest id for a tile: {"BLOCK_M": 64, "BLOCK_K": 32} -> "M64-K32"."""
    return "-".join(f"{name.replace('BLOCK_', '')}{size}" for name, size in tile.items())


def paired_tiles(*tile_lists) -> list:
    """One case per index of the longest list, each list's tile at that index (cycling the shorter
    lists): every tile of every list runs once, in as many cases as the longest list has tiles."""
    longest = max(len(tiles) for tiles in tile_lists)
    return [tuple(tiles[i % len(tiles)] for tiles in tile_lists) for i in range(longest)]


def paired_tile_ids(cases: list, kernels: tuple) -> list:
    """pytest ids of paired_tiles cases: "fwd_M64-K32-dgrad_M64-N64-..." for kernels ("fwd", "dgrad", ...)."""
    return ["-".join(f"{kernel}_{tile_id(tile)}" for kernel, tile in zip(kernels, case)) for case in cases]


def set_attrs(monkeypatch, module, **values) -> None:
    """monkeypatch.setattr(module, name, value) for each name=value (undone after the test; a name
    module lacks raises)."""
    for name, value in values.items():
        monkeypatch.setattr(module, name, value)


def every_tile_test(argnames: str, cases: list, ids: list):
    """Decorates a test of the GPU tiles run in triton's interpreter: each case of `argnames`
    (tiles) in both layouts and in float32 and float16 (the interpreter has no bfloat16); skipped
    where the kernels run compiled (a GPU: there the autotuned tests run the configs)."""
    import pytest
    from densenet_fast import triton_kernels

    def decorate(test):
        test = pytest.mark.parametrize(argnames, cases, ids=ids)(test)
        test = pytest.mark.parametrize("layout", ["nchw", "channels_last"])(test)
        test = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])(test)
        return pytest.mark.skipif(not triton_kernels.INTERPRET, reason="sets the interpreter's tiles; on a GPU "
                                  "the autotuned tests run the configs")(test)
    return decorate
