"""Which C++ exceptions this machine survives, one probe after another in one process.

The first H200 run (torch 2.11, Python 3.12, the extension built there) died with "Fatal Python
error: Segmentation fault" at tests/test_channel_stats.py::test_bad_inputs_raise_naming_x
[cpu-kernel-3d]: the first time a C++ exception (ops.cpp's CHECK_DIM, a c10::ValueError) was
thrown through densenet_fast._C in that process, under torch's Python autograd kernel
(torch/_library/autograd.py -> OpOverload.redispatch). The same test passes on the CPU machines.
Each probe prints a line before and after it, so a crash names the first probe that does not
survive, and the order separates the candidate causes:

  torch-internal          an exception thrown inside libtorch itself (no extension involved)
  extension-direct        thrown by densenet_fast._C's CPU kernel, called below the autograd key
  extension-autograd      the same through the public op, i.e. the test that crashed
  extension-cuda          the CUDA kernel's check, after a first good CUDA call
  fused-bn-cuda           a fused_bn op's check (no Python autograd kernel) on CUDA tensors

Run: python3 scripts/exception_probe.py   (exit 0 when every probe raised its expected error)
"""

from __future__ import annotations

import faulthandler
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's densenet_fast


def _probes():
    for module in ("densenet_fast.ops.channel_stats", "densenet_fast.ops.fused_bn"):
        importlib.import_module(module)  # loads the extension and the ops' Python kernels

    ops = torch.ops.densenet_fast
    cpu_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    yield "torch-internal", RuntimeError, lambda: torch.ones(2).view(3)
    yield ("extension-direct", ValueError,
           lambda: ops.channel_stats.default.redispatch(cpu_keys, torch.randn(3, 4, 5)))
    yield "extension-autograd", ValueError, lambda: ops.channel_stats.default(torch.randn(3, 4, 5))
    if torch.cuda.is_available():
        def cuda_check():
            good = torch.randn(2, 40, 5, 7, device="cuda")[:, 13:25]
            ops.channel_stats.default(good)
            torch.cuda.synchronize()
            ops.channel_stats.default(torch.randn(3, 4, 5, device="cuda"))

        def fused_bn_check():
            x = torch.randn(2, 5, 3, 4, device="cuda")
            ops.bn_relu_out(x, torch.ones(4, device="cuda"), torch.ones(5, device="cuda"), torch.empty_like(x))

        yield "extension-cuda", ValueError, cuda_check
        yield "fused-bn-cuda", ValueError, fused_bn_check


def main() -> int:
    faulthandler.enable()
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, CUDA available: {torch.cuda.is_available()}",
          flush=True)
    failures = 0
    for name, expected, call in _probes():
        print(f"probe {name}: calling", flush=True)
        try:
            call()
        except expected as exc:
            print(f"probe {name}: raised {type(exc).__name__} as expected", flush=True)
        except Exception as exc:  # a different error still means the process survived the throw
            failures += 1
            print(f"probe {name}: raised {type(exc).__name__}, expected {expected.__name__}: {exc}", flush=True)
        else:
            failures += 1
            print(f"probe {name}: raised nothing, expected {expected.__name__}", flush=True)
    print(f"exception probes: {'all survived' if failures == 0 else f'{failures} unexpected'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
