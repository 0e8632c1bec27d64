"""Build script of densenet_fast.

The package metadata lives in pyproject.toml; this file only decides whether to build the
compiled extension ``densenet_fast._C`` (CPU and CUDA kernels of the custom ops) and how.
Install with ``pip install --no-build-isolation -e .`` so that the build sees the torch it will
run against.

Environment variables:
  DENSENET_FAST_SKIP_CUDA_BUILD=1   never build the extension (pure-Python install)
  DENSENET_FAST_FORCE_CUDA_BUILD=1  build it even if a check below fails; fail loudly when it
                                    cannot be built at all (no silent pure-Python fallback)
  CUDA_HOME                         CUDA toolkit root; else CUDA_PATH, torch's lookup,
                                    /usr/local/cuda
  TORCH_CUDA_ARCH_LIST              GPU architectures to compile for (default "8.0;9.0+PTX")
  MAX_JOBS                          parallel compile jobs (read by torch's ninja build)

The extension is built when torch is a CUDA build and nvcc is found with torch's CUDA major
version. The decision never calls torch.cuda.is_available(): build machines often have no GPU.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from typing import Callable, Mapping, NamedTuple, Optional

from setuptools import setup

EXTENSION = "densenet_fast._C"
SOURCES = ["csrc/ops.cpp", "csrc/channel_stats_cpu.cpp", "csrc/channel_stats.cu", "csrc/bn_relu_cpu.cpp",
           "csrc/bn_relu.cu", "csrc/dense_block.cpp"]
SKIP_ENV = "DENSENET_FAST_SKIP_CUDA_BUILD"
FORCE_ENV = "DENSENET_FAST_FORCE_CUDA_BUILD"
# The C++ runtime must stay the shared libstdc++ that torch uses, even where the compiler links
# its own copy in statically. The H200 machines' /opt/gcc/bin/g++ does: its extension had no
# libstdc++.so.6 in NEEDED and exported ~2,000 std:: symbols of its own copy, and the first C++
# exception thrown from it killed Python with a segfault (2026-11-26/27 leases; the system g++
# build raised). Reproduced on Debian's g++ 12 with -static-libstdc++: numbers formatted into the
# error messages vanished ("got " for "got 3"), and with -static-libgcc too a throw aborted. A plain
# -lstdc++ after the objects cures -static-libstdc++, but not that image (fourth lease, 2026-11-27):
# there "-lstdc++" itself still found a static archive, as it does wherever a search directory
# holding only libstdc++.a comes first. So the build links the very libstdc++.so that this process
# (Python with torch imported) has loaded, by its path; -lstdc++ only where none is mapped.


def loaded_libstdcxx(maps: str = "/proc/self/maps") -> Optional[str]:
    """Path of the libstdc++.so mapped into this process, or None (not Linux, or not loaded)."""
    try:
        with open(maps) as f:
            paths = [line.split()[-1] for line in f if len(line.split()) >= 6]
    except OSError:
        return None
    return next((p for p in paths if os.path.basename(p).startswith("libstdc++.so")), None)


def link_args() -> list[str]:
    """Linked after the objects (setuptools' extra_link_args): the shared C++ runtime, see above."""
    if not sys.platform.startswith("linux"):
        return []
    lib = loaded_libstdcxx()
    return [lib] if lib else ["-lstdc++"]


# Ampere and Hopper SASS; the +PTX lets newer GPUs JIT-compile the Hopper code.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
FALLBACK_CUDA_HOME = "/usr/local/cuda"


class Toolchain(NamedTuple):
    torch_version: Optional[str]  # None when torch cannot be imported
    torch_cuda: Optional[str]  # torch.version.cuda: None for a CPU-only torch
    cuda_home: Optional[str]  # a directory with bin/nvcc, or None
    nvcc_version: Optional[str]  # "13.0"


class BuildPlan(NamedTuple):
    build: bool
    reason: str
    cuda_home: Optional[str] = None


def env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home(env: Mapping[str, str], torch_cuda_home: Optional[str]) -> Optional[str]:
    """The first candidate root that holds bin/nvcc, or None."""
    for root in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), torch_cuda_home, FALLBACK_CUDA_HOME):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def nvcc_version(cuda_home: str) -> Optional[str]:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def probe_toolchain(env: Mapping[str, str]) -> Toolchain:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return Toolchain(None, None, None, None)
    cuda_home = find_cuda_home(env, cpp_extension.CUDA_HOME)
    return Toolchain(torch.__version__, torch.version.cuda, cuda_home,
                     nvcc_version(cuda_home) if cuda_home else None)


def plan_cuda_build(env: Mapping[str, str], probe: Callable[[Mapping[str, str]], Toolchain]) -> BuildPlan:
    """Decide whether to build the extension. Raises SystemExit when forced but impossible."""
    force = env_flag(env, FORCE_ENV)
    if env_flag(env, SKIP_ENV):
        if force:
            raise SystemExit(f"densenet_fast: {SKIP_ENV} and {FORCE_ENV} are both set; unset one.")
        return BuildPlan(False, f"{SKIP_ENV} is set")
    tc = probe(env)
    fatal = True  # a problem that forcing cannot get around
    if tc.torch_version is None:
        problem = ("torch cannot be imported at build time (install torch first, then use "
                   "pip install --no-build-isolation)")
    elif tc.torch_cuda is None:
        problem = f"torch {tc.torch_version} is a CPU-only build (torch.version.cuda is None)"
    elif tc.cuda_home is None:
        problem = f"nvcc was not found (set CUDA_HOME to the CUDA toolkit root, e.g. {FALLBACK_CUDA_HOME})"
    elif tc.nvcc_version is None or tc.nvcc_version.split(".")[0] != tc.torch_cuda.split(".")[0]:
        problem = (f"nvcc {tc.nvcc_version} in {tc.cuda_home} does not match the CUDA {tc.torch_cuda} "
                   f"that torch {tc.torch_version} was built with")
        fatal = False
    else:
        return BuildPlan(True, f"nvcc {tc.nvcc_version} in {tc.cuda_home}, torch {tc.torch_version}", tc.cuda_home)
    if not force:
        return BuildPlan(False, problem)
    if fatal:
        raise SystemExit(f"densenet_fast: {FORCE_ENV} is set but the extension cannot be built: {problem}.")
    return BuildPlan(True, f"{problem}; building anyway because {FORCE_ENV} is set", tc.cuda_home)


def nvidia_include_dirs() -> list[str]:
    """Headers of the pip CUDA packages (cusparse.h, cublas_v2.h, ...) that ATen's CUDA headers
    include and that an nvcc-only toolkit may lack: site-packages/nvidia/cu13/include."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return [path for root in roots for path in [os.path.join(root, "cu13", "include")] if os.path.isdir(path)]


def cuda_extension(cuda_home: str):
    from torch.utils import cpp_extension

    # torch looked for CUDA_HOME when it was imported; use the toolkit the plan found.
    cpp_extension.CUDA_HOME = cuda_home
    # Without an arch list torch asks the visible GPUs, and a build machine may have none.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    ext = cpp_extension.CUDAExtension(
        name=EXTENSION,
        sources=SOURCES,
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        extra_link_args=link_args(),
        py_limited_api=True,  # no pybind11: one .abi3.so serves every Python >= 3.10
    )
    # After CUDA_HOME/include, so the toolkit's own headers win where both have a file.
    ext.include_dirs.extend(nvidia_include_dirs())
    return ext, cpp_extension.BuildExtension


def main() -> None:
    plan = plan_cuda_build(os.environ, probe_toolchain)
    if plan.build:
        ext, build_ext = cuda_extension(plan.cuda_home)
        print(f"densenet_fast: building {EXTENSION} ({plan.reason}; "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}; C++ runtime linked: "
              f"{' '.join(ext.extra_link_args) or 'the compiler default'})", file=sys.stderr)
        setup(ext_modules=[ext], cmdclass={"build_ext": build_ext},
              options={"bdist_wheel": {"py_limited_api": "cp310"}})
    else:
        # An editable install builds in place, so an earlier build's library stays importable.
        stale = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "densenet_fast", "_C*.so"))
        note = f" (delete {', '.join(stale)} from an earlier build, or it is still imported)" if stale else ""
        print(f"densenet_fast: not building {EXTENSION} because {plan.reason}; "
              f"installing the pure-Python package{note}.", file=sys.stderr)
        setup()


if __name__ == "__main__":
    main()
