"""The compiled extension is optional and its absence is explained: the guarded import in
densenet_fast/_ext.py, the kernels it registers, and setup.py's decision to build it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from densenet_fast import _ext
from helpers import load_file_module

ROOT = Path(__file__).resolve().parents[1]
NOT_BUILT = str(_ext.IMPORT_ERROR)


def test_import_state_is_consistent():
    assert isinstance(_ext.HAS_C, bool)
    assert (_ext.IMPORT_ERROR is None) == _ext.HAS_C


def test_require_extension_explains_how_to_build():
    if _ext.HAS_C:
        _ext.require_extension("backend='cuda'")  # no error
        return
    with pytest.raises(RuntimeError) as info:
        _ext.require_extension("backend='cuda'")
    assert "backend='cuda'" in str(info.value) and _ext.BUILD_COMMAND in str(info.value)


def test_package_works_when_extension_is_missing():
    # A fresh interpreter in which densenet_fast._C cannot be imported, whether or not it is built.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["densenet_fast._C"] = None  # makes 'import densenet_fast._C' fail
        import torch
        from densenet_fast import _ext
        from densenet_fast.ops.channel_stats import channel_stats
        from densenet_fast.reference import channel_stats_ref
        assert not _ext.HAS_C and "densenet_fast._C" in _ext.IMPORT_ERROR, _ext.IMPORT_ERROR
        assert not _ext.has_cuda_kernels() and _ext.kernel_devices("channel_stats") == frozenset()
        try:
            _ext.require_extension("backend='cuda'")
        except RuntimeError as exc:
            assert {_ext.BUILD_COMMAND!r} in str(exc), str(exc)
        else:
            raise AssertionError("require_extension did not raise")
        x = torch.randn(2, 40, 5, 7)[:, 13:25]
        for got, want in zip(channel_stats(x), channel_stats_ref(x)):
            torch.testing.assert_close(got, want.float())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_no_extension_switch_leaves_it_unloaded():
    """DENSENET_FAST_NO_EXTENSION=1: the extension stays unloaded (its ops unregistered) and
    IMPORT_ERROR names the switch; the plain-PyTorch path serves channel_stats."""
    script = textwrap.dedent("""
        import torch
        from densenet_fast import _ext
        from densenet_fast.ops.channel_stats import channel_stats
        assert not _ext.HAS_C and "DENSENET_FAST_NO_EXTENSION=1" in _ext.IMPORT_ERROR, _ext.IMPORT_ERROR
        assert not hasattr(torch.ops.densenet_fast, "channel_stats") or not _ext.kernel_devices("channel_stats")
        mean, var = channel_stats(torch.randn(2, 3, 4, 4))
        assert mean.shape == (3,) and var.shape == (3,)
    """)
    env = {**os.environ, "DENSENET_FAST_NO_EXTENSION": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not _ext.HAS_C, reason=NOT_BUILT)
def test_every_compiled_op_has_its_fake_impl_once_the_package_is_imported():
    """torch.compile traces the compiled ops with fake tensors: after a bare `import densenet_fast`
    (a fresh interpreter) each op of the namespace has its fake implementation registered. The
    H200's fullgraph compile of the cuda backend found none for channel_affine."""
    script = textwrap.dedent("""
        import torch
        import densenet_fast
        from torch._library.simple_registry import singleton
        names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("densenet_fast::"))
        missing = [n for n in names if singleton.find(n).fake_impl.kernel is None]
        assert len(names) >= 8 and not missing, f"ops {names}; without a fake impl: {missing}"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch")
@pytest.mark.parametrize("mode", ["train", "train-dropout", "eval"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_fullgraph_compile_traces_on_fake_cuda_tensors(backend, mode):
    """Dynamo's fullgraph capture of a DenseNet's forward on CUDA, without a GPU: the model and
    input are fake CUDA tensors (FakeTensorMode), the compiled graph runs on them. In a fresh
    interpreter, so that only `import densenet_fast` has registered anything. This reproduces both
    causes of the H200's failed test_gpu.py::test_compile_fullgraph[cuda] (the dispatcher query in
    the forward, then channel_affine's unimported fake implementation), which no CPU-device test
    met: on the CPU the backends take other paths. Eval mode and dropout each failed to trace on
    every backend until this session (CPU inductor tests in test_block.py)."""
    if backend == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip(f"the extension's CUDA kernels are not loaded: {_ext.IMPORT_ERROR or 'built without them'}")
    if backend == "triton":
        pytest.importorskip("triton")
    script = textwrap.dedent(f"""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        import densenet_fast
        model = densenet_fast.DenseNet(growth_rate=12, block_config=(3, 2), num_init_features=20, bn_size=4,
                                       num_classes=7, small_inputs=True, backend={backend!r},
                                       drop_rate={0.2 if mode == "train-dropout" else 0.0})
        model.train({mode != "eval"})
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to("cuda", memory_format=torch.channels_last)
            x = torch.randn(6, 3, 13, 11, device="cuda").contiguous(memory_format=torch.channels_last)
            out = torch.compile(model, fullgraph=True, backend="eager")(x.requires_grad_(True))
            # one step further: AOT autograd's functionalization of the captured graph (the custom
            # ops' declared mutations of the block buffer); without grad, as the joint graph's
            # backward needs a CUDA context (the autograd engine), which no fake tensor gives
            with torch.no_grad():
                functional = torch.compile(model, fullgraph=True, backend="aot_eager")(x.detach())
        assert out.shape == (6, 7) and out.device.type == "cuda" and out.requires_grad, (out.shape, out.device)
        assert functional.shape == (6, 7) and functional.device.type == "cuda", (functional.shape, functional.device)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Dynamo traces through an lru_cache-wrapped function and warns that it may be silently wrong
    # (the H200's compile test warned so of cuda_block's device lookup): the forward must have none
    assert "lru_cache" not in result.stderr, result.stderr[-3000:]


def test_kernel_queries_trace_under_torch_compile():
    """The backends ask has_cuda_kernels / kernel_devices inside a model's forward, which
    torch.compile(fullgraph=True) traces: the answers must be plain Python values by then (the
    dispatcher query itself broke the graph on an H200, torch 2.11). Same result as eager."""
    def pick(x):
        cuda = _ext.has_cuda_kernels()
        cpu = "cpu" in _ext.kernel_devices("channel_stats")
        return x * (1 + 2 * int(cuda) + 4 * int(cpu))

    x = torch.arange(3.0)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(pick, fullgraph=True, backend="eager")(x), pick(x))


@pytest.mark.skipif(not _ext.HAS_C, reason=NOT_BUILT)
def test_extension_registers_cpu_kernel():
    assert "cpu" in _ext.kernel_devices("channel_stats")


@pytest.mark.skipif(not _ext.HAS_C, reason=NOT_BUILT)
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build")
def test_extension_built_with_cuda_registers_cuda_kernel():
    # setup.py builds the extension only with nvcc, so a loaded _C must carry the CUDA kernels.
    assert _ext.has_cuda_kernels()
    assert "cuda" in _ext.kernel_devices("channel_stats")


@pytest.mark.skipif(not _ext.HAS_C, reason=NOT_BUILT)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects: Linux only")
def test_extension_uses_the_shared_cxx_runtime():
    """The built extension loads libstdc++.so like torch does, not a static copy of its own (with
    which a C++ exception thrown from it killed the process on the H200 machines)."""
    from helpers import elf_needed
    from densenet_fast import _C

    needed = elf_needed(_C.__file__)
    assert any(lib.startswith("libstdc++.so") for lib in needed), needed


# --- setup.py's build decision -----------------------------------------------------------------


# Importing setup.py does not run setup(): that only happens under __name__ == "__main__".
setup_py = load_file_module("densenet_fast_setup", "setup.py")
Toolchain = setup_py.Toolchain
GOOD = Toolchain("2.14.1+cu130", "13.0", "/usr/local/cuda", "13.0")
SKIP = {"DENSENET_FAST_SKIP_CUDA_BUILD": "1"}
FORCE = {"DENSENET_FAST_FORCE_CUDA_BUILD": "1"}

# (env, toolchain found, expected: True = build, False = pure-Python, SystemExit = refuse)
PLANS = [
    pytest.param({}, GOOD, True, id="cuda-torch-and-nvcc"),
    pytest.param(SKIP, GOOD, False, id="skip-flag"),
    pytest.param({**SKIP, **FORCE}, GOOD, SystemExit, id="skip-and-force"),
    pytest.param({}, Toolchain("2.14.1+cpu", None, "/usr/local/cuda", "13.0"), False, id="cpu-torch"),
    pytest.param(FORCE, Toolchain("2.14.1+cpu", None, "/usr/local/cuda", "13.0"), SystemExit, id="cpu-torch-forced"),
    pytest.param({}, Toolchain("2.14.1+cu130", "13.0", None, None), False, id="no-nvcc"),
    pytest.param(FORCE, Toolchain("2.14.1+cu130", "13.0", None, None), SystemExit, id="no-nvcc-forced"),
    pytest.param({}, Toolchain(None, None, None, None), False, id="no-torch"),
    pytest.param({}, Toolchain("2.14.1+cu130", "13.0", "/opt/cuda12", "12.8"), False, id="nvcc-major-mismatch"),
    pytest.param(FORCE, Toolchain("2.14.1+cu130", "13.0", "/opt/cuda12", "12.8"), True, id="mismatch-forced"),
]


@pytest.mark.parametrize("env, toolchain, expected", PLANS)
def test_setup_build_plan(env, toolchain, expected):
    probe = lambda _env: toolchain  # noqa: E731
    if expected is SystemExit:
        with pytest.raises(SystemExit, match="DENSENET_FAST"):
            setup_py.plan_cuda_build(env, probe)
        return
    plan = setup_py.plan_cuda_build(env, probe)
    assert plan.build is expected, plan.reason
    assert plan.reason
    if plan.build:
        assert plan.cuda_home == toolchain.cuda_home


def _throwing_library_needs(tmp_path, flags):
    """Link a small throwing C++ library with g++ and `flags`; its libstdc++ NEEDED entries."""
    from helpers import elf_needed

    src = tmp_path / "throw.cpp"
    src.write_text('#include <stdexcept>\n#include <string>\nextern "C" void probe(int x) '
                   '{ if (x) throw std::runtime_error("x = " + std::to_string(x)); }\n')
    out = tmp_path / f"probe{abs(hash(tuple(flags)))}.so"
    cmd = ["g++", "-shared", "-fPIC", str(src), "-o", str(out), *flags]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"{' '.join(flags[:2])}: g++ cannot link here: {result.stderr.strip()[:200]}")
    return [lib for lib in elf_needed(str(out)) if lib.startswith("libstdc++.so")]


linux_gxx = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                               reason="links ELF shared objects with g++: Linux with g++ on PATH only")


@linux_gxx
def test_setup_link_args_keep_the_cxx_runtime_shared_under_static_libstdcxx(tmp_path):
    """A compiler that links libstdc++ statically (here g++ -static-libstdc++, as the H200 image's
    wrapper does) still gives a library that needs the shared libstdc++ with setup.py's link
    arguments after the objects, as setuptools places extra_link_args."""
    assert _throwing_library_needs(tmp_path, ["-static-libstdc++"]) == [], \
        "g++ -static-libstdc++ linked the shared runtime anyway: nothing to check"
    assert _throwing_library_needs(tmp_path, ["-static-libstdc++", *setup_py.link_args()]) != []


@linux_gxx
def test_setup_link_args_keep_the_cxx_runtime_shared_when_only_an_archive_is_found(tmp_path):
    """Where the first library directory holds only libstdc++.a, "-lstdc++" links that archive (no
    libstdc++.so in NEEDED: what the H200 image's /opt/gcc build still did with -lstdc++);
    setup.py's link arguments name the libstdc++.so this process loaded, and the library needs it."""
    archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive) or not os.path.exists(archive):
        pytest.skip(f"no static libstdc++ for g++ here ({archive!r})")
    only_archive = tmp_path / "lib"
    only_archive.mkdir()
    (only_archive / "libstdc++.a").symlink_to(archive)
    search = [f"-L{only_archive}"]
    assert _throwing_library_needs(tmp_path, [*search, "-lstdc++"]) == [], \
        "-lstdc++ found a shared libstdc++ despite the archive-only directory: nothing to check"
    args = setup_py.link_args()
    assert args != ["-lstdc++"], "no libstdc++.so is mapped into this process (torch is imported)"
    assert _throwing_library_needs(tmp_path, [*search, *args]) != []


def test_loaded_libstdcxx_reads_the_maps_file(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f0000-7f1000 r--p 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f1000-7f2000 r-xp 00001000 08:01 13 /opt/x/lib/libstdc++.so.6.0.33\n"
                    "7f2000-7f3000 rw-p 00000000 00:00 0 \n")
    assert setup_py.loaded_libstdcxx(str(maps)) == "/opt/x/lib/libstdc++.so.6.0.33"
    maps.write_text("7f0000-7f1000 r--p 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert setup_py.loaded_libstdcxx(str(maps)) is None
    assert setup_py.loaded_libstdcxx(str(tmp_path / "missing")) is None


def test_setup_skip_flag_never_probes_torch():
    def probe(_env):
        raise AssertionError("probed the toolchain although the skip flag is set")

    assert not setup_py.plan_cuda_build(SKIP, probe).build


def test_find_cuda_home_prefers_cuda_home_env(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    assert setup_py.find_cuda_home({"CUDA_HOME": str(tmp_path)}, None) == str(tmp_path)
    # A CUDA_HOME without nvcc is passed over for the next candidate.
    assert setup_py.find_cuda_home({"CUDA_HOME": str(tmp_path / "none"), "CUDA_PATH": str(tmp_path)},
                                   None) == str(tmp_path)


def test_setup_explains_a_skipped_extension_in_one_line():
    env = {"PATH": "/usr/bin:/bin", **SKIP}
    result = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("densenet_fast:")]
    assert len(lines) == 1 and lines[0].startswith(
        "densenet_fast: not building densenet_fast._C because DENSENET_FAST_SKIP_CUDA_BUILD is set; "
        "installing the pure-Python package"), result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0.1.0"
