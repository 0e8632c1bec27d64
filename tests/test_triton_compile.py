"""The Triton kernels compile for a real GPU, checked without one.

The other Triton tests run the kernels in triton's interpreter, which never compiles them: a tl.dot
on a tile narrower than 16, an illegal cast or a default config that needs more shared memory than
the device has only shows when triton really compiles. Triton compiles ahead of time for a named
target without a driver, so this test compiles each kernel's default (autotune-off) config for
sm90 (H100/H200) in fp16, once, as the launchers launch it on a DenseNet-121 problem (specialised
as triton specialises it at run time; generically for the kernel only odd image sizes launch),
and checks that it compiled and fits the 227 KiB of shared memory a block may have (~35 s on two
cores). scripts/triton_aot_check.py does the same for every config, dtype, both modes and sm80.

It runs that script in a subprocess: conftest sets TRITON_INTERPRET=1 on a machine without a GPU,
and under it @triton.jit makes InterpretedFunctions, which triton.compile rejects ("Unsupported
function referenced"), while the kernel modules cannot be imported twice in one process (they
register torch.library custom ops).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "triton_aot_check.py")
CANNOT_COMPILE = 2  # the script's exit status when triton cannot AOT-compile here (e.g. no ptxas)


def _aot_check(tmp_path, *args):
    """Run scripts/triton_aot_check.py for sm90 with `args` (skips where triton cannot compile
    ahead of time); returns (its results, the tail of its output, its exit status)."""
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, SCRIPT, "--arch", "sm90", *args, "--quiet", "--jobs", "2", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    if proc.returncode == CANNOT_COMPILE:
        why = [line for line in proc.stdout.splitlines() if line.startswith("cannot AOT-compile here")]
        pytest.skip(why[-1] if why else f"triton cannot compile ahead of time on this machine:\n{log}")
    assert out.exists(), f"the AOT check did not finish (exit {proc.returncode}):\n{log}"
    return json.loads(out.read_text())["results"], log, proc.returncode


@pytest.mark.parametrize("option, value, message", [
    ("--dtypes", "fp16,float32", "--dtypes: unknown float32 (expected a comma-separated list of fp32, fp16, bf16)"),
    ("--arch", "sm70", "--arch: unknown sm70 (expected a comma-separated list of sm90, sm80)"),
    ("--modes", "spec", "--modes: unknown spec (expected a comma-separated list of generic, specialized)"),
])
def test_script_names_an_unknown_option_value(option, value, message):
    """A misspelt value is a usage error naming it and the known ones, before anything compiles."""
    proc = subprocess.run([sys.executable, SCRIPT, option, value], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode != 0 and message in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_default_configs_compile_for_sm90_fp16(tmp_path):
    results, log, returncode = _aot_check(tmp_path, "--dtypes", "fp16", "--default-only", "--one-per-kernel")
    kernels = {r["kernel"] for r in results}
    # Every kernel of the package, launched by the launchers on DenseNet-121-sized problems.
    assert len(kernels) >= 14, f"only {sorted(kernels)} were compiled:\n{log}"
    failed = [f"{r['kernel']} [{r['config']}]: {r['error'][:500]}" for r in results if not r["ok"]]
    assert not failed, "kernels that do not compile for sm90:\n" + "\n".join(failed)
    over = [f"{r['kernel']} [{r['config']}]: {r['shared']} > {r['limit']} bytes" for r in results if not r["fits"]]
    assert not over, "default configs that need more shared memory than sm90 has:\n" + "\n".join(over)
    assert returncode == 0, log


GEMM_KERNELS = ("_bn_relu_conv1x1_kernel", "_conv1x1_bwd_reduce_kernel", "_conv1x1_bwd_dx_kernel",
                "_bn_relu_conv3x3_fwd_kernel", "_conv3x3_dgrad_kernel", "_conv3x3_wgrad_kernel",
                "_bn_relu_pool_conv1x1_kernel", "_pool_conv1x1_wgrad_kernel", "_pool_conv1x1_dgrad_kernel")
# Every kernel that reads or writes tiles through row offsets (indexing.contiguous_rows).
ROW_KERNELS = GEMM_KERNELS + ("_channel_stats_partial_kernel", "_bn_backward_dx_kernel")


@pytest.fixture(scope="module")
def gemm_defaults(tmp_path_factory):
    """The row-tiled kernels' default configs (the GEMMs, channel statistics and the BN backward)
    compiled for sm90 on the DenseNet-121 and DenseNet-BC-100 problems, specialised, in float32
    (TF32 and IEEE dots) and fp16, both layouts: (results, log)."""
    results, log, _ = _aot_check(tmp_path_factory.mktemp("aot"), "--dtypes", "fp32,fp16", "--default-only",
                                 "--modes", "specialized", "--kernel", ",".join(ROW_KERNELS))
    return results, log


def test_float32_gemm_defaults_do_not_spill(gemm_defaults):
    """The GEMM kernels' default configs keep their tiles in registers for float32 data, in TF32
    and in IEEE. The 128-row tiles spilled 100-1,000 bytes of local memory per thread in NCHW with
    4 warps (they run 8 now); with TF32 off, tl.dot lowers to FMAs, where the pipelined tiles
    spilled up to 13 KB (the "fma" config lists). Compiled for sm90 on the DenseNet-121 problems in
    both layouts, no default may use stack (~60 s on two cores, with the next test's fp16 and
    DenseNet-BC-100). On DenseNet-BC-100's layer a few IEEE defaults keep 8-16 bytes in
    channels_last (triton 3.6: the 1x1 forward; 3.8: the 3x3 wgrad), which this does not check."""
    results, log = gemm_defaults
    results = [r for r in results if "fp32" in r["case"] and "densenet121" in r["case"] and r["kernel"] in GEMM_KERNELS]
    for precision in ("tf32", "ieee"):
        assert {r["kernel"] for r in results if precision in r["case"]} == set(GEMM_KERNELS), (precision, log)
    assert {"NCHW" in r["case"] for r in results} == {True, False}, "both layouts"
    if any(r["stack"] is None for r in results):
        pytest.skip("cuobjdump (shipped with triton) is not available: no register/stack counts")
    spills = [f"{r['kernel']} [{r['config']}] {r['case']}: {r['stack']} bytes" for r in results if r["stack"] != 0]
    assert not spills, "float32 default configs with local-memory stack:\n" + "\n".join(spills)


def test_gemm_defaults_do_not_stage_through_one_bank(gemm_defaults):
    """No default config copies a tile into an unswizzled shared buffer across its fastest dimension
    (aot.unswizzled_staging; triton_kernels.NCHW_FP32): the pipelined float32 NCHW tiles of the 3x3
    wgrad, the 1x1 backward's first pass and the transition's forward and wgrad did, in float32 and
    (the wgrad's float32 gradient tile) fp16, and those kernels were the slow ones of the
    2026-11-27 lease's autotuning log. The copies the check parses must exist in this triton's
    output: the pipelined fp16 defaults make some. DenseNet-BC-100's layer (growth 12: 16-wide
    gradient tiles) adds the case that conv3x3.wgrad_config_list handles."""
    results, log = gemm_defaults
    results = [r for r in results if r["kernel"] in GEMM_KERNELS]
    assert {r["kernel"] for r in results if "fp16" in r["case"]} == set(GEMM_KERNELS), log
    assert sum(r["async_copies"] for r in results) > 0, "no ttg.async_copy_global_to_local parsed:\n" + log
    staged = [f"{r['kernel']} [{r['config']}] {r['case']}: {'; '.join(r['staging'])}" for r in results if r["staging"]]
    assert not staged, "default configs that stage through one shared-memory bank:\n" + "\n".join(staged)


def test_nchw_defaults_walk_the_rows(gemm_defaults):
    """In NCHW a tile's rows (pixels) are consecutive elements and its channels a plane apart. The
    kernels' row offsets come from integer divisions (indexing.row_nhw) that hide this from triton,
    which then spread each warp along the channels: 32 cache lines per warp-wide load or store
    instead of one, in every kernel, unless W was a multiple of 16 (DenseNet-BC's 32x32 and 16x16,
    not 8x8 or DenseNet-121's sizes). The launchers now promise the contiguous runs (row_run) and
    the kernels pass them on (contiguous_rows). Checked on DenseNet-121's 56x56 layer and first
    transition, both dtypes: every access through a row offset (aot.row_walks) has its warps
    walking the rows, and every kernel has such accesses (so the promise reached it)."""
    results, log = gemm_defaults
    nchw = [r for r in results if "NCHW" in r["case"] and "densenet121" in r["case"]]
    assert {r["kernel"] for r in nchw} == set(ROW_KERNELS), log
    unhinted = sorted(k for k in ROW_KERNELS if not any(r["row_accesses"] for r in nchw if r["kernel"] == k))
    assert not unhinted, f"kernels compiled without contiguous rows promised (ROW_RUN 1) or none checked: {unhinted}"
    across = [f"{r['kernel']} ({r['case']}): {w}" for r in nchw for w in r["row_walk"]]
    assert not across, "row-offset accesses whose warps walk the channels:\n" + "\n".join(across)
    # channels_last: rows are C elements apart, so nothing is promised and the channels are walked
    assert not any(r["row_accesses"] for r in results if "NCHW" not in r["case"])


# Asynchronous copies as triton 3.6 and 3.8 print them (the 3x3 wgrad's pipelined float32 NCHW tile on
# sm_90: 3.6 walks the channels, 3.8 the rows, each across its buffer's fastest dimension).
_TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [32, 1], warpsPerCTA = [2, 4], order = [0, 1]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [4, 2], order = [1, 0]}>
#shared = #ttg.nvmma_shared<{swizzlingByteWidth = 128, transposed = true, elementBitWidth = 32}>
#shared1 = #ttg.swizzled_shared<{vec = 1, perPhase = 1, maxPhase = 1, order = [1, 0]}>
#shared2 = #ttg.swizzled_shared<{vec = 1, perPhase = 1, maxPhase = 1, order = [0, 1]}>
#shared3 = #ttg.swizzled_shared<{vec = 4, perPhase = 1, maxPhase = 8, order = [0, 1]}>
    %a = ttg.async_copy_global_to_local %p, %q mask %m other %c : tensor<64x64x!tt.ptr<f32>, #SRC> -> \
<64x64xf32, #DST, #smem, mutable> loc(#loc1)
"""


@pytest.mark.parametrize("src, dst, conflict", [
    ("blocked", "shared1", True),    # threads along dim 0, buffer rows along dim 1 (triton 3.6)
    ("blocked1", "shared2", True),   # threads along dim 1, buffer rows along dim 0 (triton 3.8)
    ("blocked", "shared2", False),   # threads along the buffer's fastest dimension
    ("blocked1", "shared1", False),
    ("blocked1", "shared3", False),  # swizzled
    ("blocked1", "shared", False),   # an MMA operand buffer, swizzled by 128 bytes
])
def test_unswizzled_staging_finds_the_conflicting_copies(src, dst, conflict):
    from densenet_fast.triton_kernels.aot import unswizzled_staging
    copies, found = unswizzled_staging(_TTGIR.replace("SRC", src).replace("DST", dst))
    assert copies == 1 and len(found) == int(conflict), found


_ROWS_TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [8, 1], order = [1, 0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [4, 1], threadsPerWarp = [32, 1], warpsPerCTA = [1, 8], order = [0, 1]}>
module {
    %a = tt.load %p, %m, %o : tensor<128x32x!tt.ptr<f32>, #A> loc(#loc3)
    tt.store %q, %v, %m : tensor<128x32x!tt.ptr<f32>, #B> loc(#loc4)
    %c = tt.load %r : tensor<64x!tt.ptr<f32>, #blocked2> loc(#loc5)
}
#loc1 = loc("SRC":1:5)
#loc2 = loc("SRC":2:5)
#loc3 = loc("a"(#loc1))
#loc4 = loc(#loc2)
#loc5 = loc("SRC":3:5)
"""


@pytest.mark.parametrize("load_layout, store_layout, walks_across", [
    ("blocked1", "blocked", []),                # both walk their rows
    ("blocked", "blocked", ["load"]),           # load: rows along dim 0 ([:, None]), threads along dim 1
    ("blocked1", "blocked1", ["store"]),        # store: rows along dim 1 ([None, :]), threads along dim 0
    ("blocked", "blocked1", ["load", "store"]),
])
def test_row_walks_reads_the_row_dimension_from_the_source(tmp_path, load_layout, store_layout, walks_across):
    from densenet_fast.triton_kernels.aot import global_accesses, row_walks
    src = tmp_path / "kernel.py"
    src.write_text("a = tl.load(x_ptr + x_row[:, None] + ks[None, :] * sx_c, mask=m)\n"
                   "tl.store(out_ptr + c_off[:, None] + (g_row + 1)[None, :], v)\n"
                   "c = tl.load(ptr + offs)\n")
    ttgir = _ROWS_TTGIR.replace("SRC", str(src)).replace("#A", "#" + load_layout).replace("#B", "#" + store_layout)
    accesses = global_accesses(ttgir)
    assert [(a.op, a.shape, a.line, a.order is None) for a in accesses] == [
        ("load", "128x32", 1, False), ("store", "128x32", 2, False), ("load", "64", 3, True)]
    assert accesses[0].source.startswith("a = tl.load(x_ptr + x_row[:, None]")
    checked, found = row_walks(ttgir)
    assert checked == 2, found  # the 1-D load has no row offset
    assert [f.split(" ")[0] for f in found] == walks_across, found
