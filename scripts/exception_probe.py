"""Which C++ exceptions this machine survives: each probe in its own process.

On the H200 machines (torch 2.11, Python 3.12, the extension built there by the image's compiler,
$CXX = /opt/gcc/bin/g++) the process died with "Fatal Python error: Segmentation fault" the first
time a C++ exception was thrown through densenet_fast._C (tests/test_channel_stats.py::
test_bad_inputs_raise_naming_x[cpu-kernel-3d], 2026-11-26 first lease; this probe's
"extension-direct" in the second). The same tests pass on the CPU machines (torch 2.14, Debian
gcc 12). The probes separate the candidate causes:

  torch-internal          thrown inside libtorch itself (no extension involved)
  extension-libc10-throw  a plain TORCH_CHECK of the extension's CPU kernel (given a CUDA tensor):
                          the throw happens in libc10 (c10::detail::torchCheckFail), the
                          unwinding passes through the extension's frames
  extension-direct        a TORCH_CHECK_VALUE of the extension: the throw itself is compiled into
                          the extension (c10::ValueError constructed and thrown there)
  extension-autograd      the same through the public op (torch's Python autograd kernel first)
  extension-cuda          the CUDA kernel's check, after a first good CUDA call
  fused-bn-cuda           a fused_bn op's check (no Python autograd kernel) on CUDA tensors

Run: python3 scripts/exception_probe.py [--root DIR]   (exit 0 when every probe raised its
expected error). DIR: the folder holding the densenet_fast package to load (default: this
checkout), e.g. a copy with an extension built by another compiler.
`python3 scripts/exception_probe.py --one NAME` runs one probe in this process.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def _probes(cuda: bool):
    import torch

    def ops():
        for module in ("densenet_fast.ops.channel_stats", "densenet_fast.ops.fused_bn"):
            importlib.import_module(module)  # loads the extension and the ops' Python kernels
        return torch.ops.densenet_fast

    def cpu_keys():
        return torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

    yield "torch-internal", RuntimeError, lambda: torch.ones(2).view(3)
    if cuda:
        yield ("extension-libc10-throw", RuntimeError,
               lambda: ops().channel_stats.default.redispatch(cpu_keys(), torch.randn(2, 3, 4, 4, device="cuda")))
    yield ("extension-direct", ValueError,
           lambda: ops().channel_stats.default.redispatch(cpu_keys(), torch.randn(3, 4, 5)))
    yield "extension-autograd", ValueError, lambda: ops().channel_stats.default(torch.randn(3, 4, 5))
    if cuda:
        def cuda_check():
            good = torch.randn(2, 40, 5, 7, device="cuda")[:, 13:25]
            ops().channel_stats.default(good)
            torch.cuda.synchronize()
            ops().channel_stats.default(torch.randn(3, 4, 5, device="cuda"))

        def fused_bn_check():
            x = torch.randn(2, 5, 3, 4, device="cuda")
            ops().bn_relu_out(x, torch.ones(4, device="cuda"), torch.ones(5, device="cuda"), torch.empty_like(x))

        yield "extension-cuda", ValueError, cuda_check
        yield "fused-bn-cuda", ValueError, fused_bn_check


def run_one(name: str) -> int:
    import torch
    faulthandler.enable()
    expected, call = {n: (e, c) for n, e, c in _probes(torch.cuda.is_available())}[name]
    try:
        call()
    except expected as exc:
        print(f"probe {name}: raised {type(exc).__name__} as expected", flush=True)
        return 0
    except Exception as exc:  # a different error still means the process survived the throw
        print(f"probe {name}: raised {type(exc).__name__}, expected {expected.__name__}: {exc}", flush=True)
        return 1
    print(f"probe {name}: raised nothing, expected {expected.__name__}", flush=True)
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(CHECKOUT), help="folder holding the densenet_fast package")
    parser.add_argument("--one", help="run only this probe, in this process")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.root)
    if args.one:
        return run_one(args.one)
    import torch
    from densenet_fast import _ext
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, CUDA available: {torch.cuda.is_available()}; "
          f"package {args.root}, extension loaded: {_ext.HAS_C} {_ext.IMPORT_ERROR or ''}", flush=True)
    failures = 0
    for name, _, _ in _probes(torch.cuda.is_available()):
        proc = subprocess.run([sys.executable, __file__, "--root", args.root, "--one", name], capture_output=True,
                              text=True, timeout=120)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("probe ")]
        if proc.returncode < 0 or not lines:
            failures += 1
            fatal = [ln for ln in proc.stderr.splitlines() if "Fatal Python error" in ln]
            print(f"probe {name}: process died (exit {proc.returncode}) {fatal[:1]}", flush=True)
        else:
            failures += proc.returncode != 0
            print(lines[-1], flush=True)
    print(f"exception probes: {'all survived' if failures == 0 else f'{failures} unexpected'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
