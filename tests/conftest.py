"""pytest configuration shared by the whole suite."""

import os

import pytest
import torch

# The tests use tiny tensors: with several intra-op threads the OpenMP start-up and spinning cost
# more than the work (15x slower per op on a loaded 2-core machine), and one thread also makes
# every CPU reduction order fixed, so repeated runs give bit-identical numbers.
torch.set_num_threads(1)

# The Triton kernels (densenet_fast.triton_kernels) run on CPU tensors only through triton's
# interpreter, and @triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when the
# kernel module is first imported: set it here, before pytest imports any test module. Only
# without a GPU (where compiled Triton kernels cannot run anyway); an explicit setting wins.
# Inductor's CPU code generation does not use Triton, so the other tests are unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def ieee_fp32():
    """cuDNN's float32 convolutions, and with them our float32 GEMMs and Triton dots
    (densenet_fast.ops.precision), in full IEEE precision for the test: the Triton kernel tests
    hold float32 results to IEEE tolerances.  On the CPU (the interpreter) nothing changes."""
    # The legacy setter: torch.backends.cudnn.allow_tf32's getter (which inductor still reads) raises
    # after conv's precision has been set to "ieee" through the new API.
    cudnn = torch.backends.cudnn
    saved = cudnn.allow_tf32
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32 = saved


# DENSENET_FAST_FAILURE_LOG=PATH: each failure is appended to PATH (test id, phase, the end of its
# report) as soon as it happens. A GPU lease runs test groups under a time limit, and
# pytest-xdist prints failures only in its final summary, which a killed group never reaches (the
# 2026-11-27 lease: three F's in the progress dots and no names). Under xdist each worker writes
# its own tests; the controller adds only reports no worker wrote (a crashed worker's).
FAILURE_LOG = os.environ.get("DENSENET_FAST_FAILURE_LOG", "")
# DENSENET_FAST_SLOW_LOG=PATH: each test whose call took more than DENSENET_FAST_SLOW_S seconds
# (default 5) is appended to PATH as "<seconds> <test id>" when it ends, for the same reason:
# pytest's --durations table is part of the summary that a group cut by its time limit never prints.
SLOW_LOG = os.environ.get("DENSENET_FAST_SLOW_LOG", "")
SLOW_S = float(os.environ.get("DENSENET_FAST_SLOW_S", "5"))


def pytest_runtest_logreport(report):
    from_worker = getattr(report, "node", None) is not None  # set by xdist's controller on forwarded reports
    if SLOW_LOG and not from_worker and report.when == "call" and report.duration > SLOW_S:
        with open(SLOW_LOG, "a") as f:
            f.write(f"{report.duration:7.1f} {report.nodeid}\n")
    if not FAILURE_LOG or not report.failed:
        return
    if from_worker and "crashed" not in report.longreprtext:
        return
    where = os.environ.get("PYTEST_XDIST_WORKER", "controller" if from_worker else "main")
    with open(FAILURE_LOG, "a") as f:
        f.write(f"FAILED {report.nodeid} ({report.when}, {where})\n{report.longreprtext[-4000:]}\n\n")
