"""The benchmark suite (densenet_fast.bench, densenet_fast.cli): the planner agrees with the
measured peak, the CSV carries its metadata, tables are regenerated from the CSV, and bad
requests end with one line and exit status 2."""

from __future__ import annotations

import csv
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from densenet_fast import cli, triton_kernels
from densenet_fast.bench import harness, memory, plan, report as reporting
from densenet_fast.bench.harness import Case
from helpers import load_file_module

# A model small enough that a real step takes well under a second: DenseNet-BC depth 10 has one
# layer per block; 8x8 inputs survive the two transitions' pooling.
TINY = "densenet_bc_10_4"


@pytest.mark.parametrize("provider, model, batch, size", [
    ("naive", "densenet_bc_40_12", 8, 32), ("torch", "densenet_bc_40_12", 64, 32),
    ("naive", "fc_densenet56", 2, 32), ("torch", "fc_densenet56", 2, 32)])
def test_planned_peak_matches_measured_cpu_peak(provider, model, batch, size):
    # The planner runs the step on fake tensors; the measurement runs it for real under the
    # profiler.  DenseNet-BC-40 is deep enough for naive's quadratic concatenations and ours'
    # shared buffers to differ by 3x, so agreement on both is not a coincidence.  Ours is checked
    # at batch 64: at batch 8 its peak (23.2 MiB measured, 20.2 planned) is set inside the CPU
    # convolution's backward, whose workspaces (mkldnn's, or im2col's: 27.5 MiB with mkldnn
    # off) no meta kernel allocates; at batch 64 the block's own tensors set it (126.0 MiB, both).
    # FC-DenseNet56 (per-pixel labels and loss) takes the segmentation paths of the harness.
    case = Case(provider, model, batch, size)
    planned = plan.planned_peak_bytes(case)
    measured = harness.measure_peak(harness.prepare(case, "cpu"), "cpu")
    assert measured > 0
    assert abs(planned - measured) <= 0.10 * measured, (provider, planned, measured)


def test_cpu_peak_counts_frees_of_memory_allocated_in_setup():
    # The backward frees what the forward saved; with the forward profiled as setup the frees are
    # known, so the backward's peak is not inflated by memory it released.
    keep = {}

    def setup():
        keep["a"] = torch.empty(1 << 20, dtype=torch.uint8)

    def fn():
        del keep["a"]
        keep["b"] = torch.empty(1 << 19, dtype=torch.uint8)

    assert memory.cpu_peak_bytes(fn, setup) == 0
    assert memory.cpu_peak_bytes(lambda: torch.empty(1 << 20, dtype=torch.uint8)) == 1 << 20


class _FirstCallWorkspace(torch.nn.Module):
    """A linear model whose first forward allocates a 4 MiB buffer it keeps (as cuBLAS and cuDNN
    keep their workspaces after their first call)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 10)
        self.workspace = None

    def forward(self, x):
        if self.workspace is None:
            self.workspace = torch.empty(4 << 20, dtype=torch.uint8)
        return self.fc(x.flatten(1)[:, :16])


def test_settle_keeps_first_call_allocations_out_of_the_peak():
    # Without the settling step the memory step counts the 4 MiB workspace; with it, only the step.
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    fresh = _FirstCallWorkspace()
    first = harness.measure_peak(harness.Step(fresh, x, y, "full", None), "cpu")
    settled = _FirstCallWorkspace()
    harness.settle(settled, x, y, None, "cpu")
    after = harness.measure_peak(harness.Step(settled, x, y, "full", None), "cpu")
    assert first >= 4 << 20 and after < 1 << 20, (first, after)


def test_storage_tracker_counts_views_and_in_place_results_once():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1024)  # existed before: not counted
        with memory.StorageTracker() as tracker:
            y = x * 2           # 4 KiB
            y.add_(1)           # in place: nothing new
            v = y[:10]          # a view: nothing new
            del y, v
            z = x + 1           # 4 KiB; y died first, so the peak stays 4 KiB
    assert tracker.peak == 4096
    del z


@pytest.mark.parametrize("text, expected", [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("2GB", 2 * 10 ** 9),
                                            ("1.5G", 3 << 29), ("1000", 1000), ("64 kb", 64000)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "8XB", "-1GiB", "GiB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        memory.parse_size(text)


def test_search_largest_finds_the_boundary_from_any_guess():
    for true in (0, 1, 7, 250):
        for guess in (1, 5, 240, 1000):
            found = plan.search_largest(lambda i: i <= true, guess)
            assert found == (true or None)


def test_reference_twin_has_our_architecture():
    # load_shared_weights is strict: it fails if the config read from our model is wrong.
    for name in ("densenet121", "densenet_bc_40_12", "densenet_bc_250_24"):
        with torch.device("meta"):
            ours = harness.build_model("torch", name)
            twin = harness.build_model("checkpoint", name)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}


@pytest.fixture(scope="module")
def bench_csv(tmp_path_factory):
    """One real run of every mode for three providers of the tiny model, written to a CSV."""
    cases = [Case(p, TINY, 2, 8, mode) for mode in harness.MODES for p in ("naive", "checkpoint", "torch")]
    rows = harness.run_cases(cases, "cpu", repeats=1, warmup=0)
    path = tmp_path_factory.mktemp("bench") / "bench.csv"
    harness.write_csv(rows, path)
    return path


def test_csv_has_metadata_and_metrics(bench_csv):
    rows = harness.read_csv(bench_csv)
    assert len(rows) == 9
    assert tuple(rows[0]) == harness.CSV_FIELDS
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert r["device"] == "cpu" and r["device_name"]
        assert r["torch"] == torch.__version__
        assert r["triton"] and r["cuda"] and r["git_sha"]
        assert datetime.fromisoformat(r["date"]).tzinfo is not None  # UTC ISO 8601
        assert int(r["threads"]) == torch.get_num_threads()
        assert int(r["peak_mem_bytes"]) >= 0 and float(r["median_ms"]) > 0 and float(r["images_per_s"]) > 0
        assert float(r["ceiling_tflops"]) > 0
    naive = [r for r in rows if r["provider"] == "naive"]
    assert all(float(r["mem_vs_naive"]) == 1.0 and float(r["time_vs_naive"]) == 1.0 for r in naive)
    assert len({r["run"] for r in rows}) == 1


def test_report_regenerates_the_table_from_the_csv(bench_csv, capsys):
    text = reporting.report(bench_csv)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | provider | mode | peak MiB")
    assert len(table) == 1 + 9
    assert "| densenet_bc_10_4 | checkpoint | backward |" in text
    assert reporting.main([str(bench_csv), "--latest"]) == 0
    assert capsys.readouterr().out == reporting.report(bench_csv, latest=True)


def test_plot_writes_a_png(bench_csv, tmp_path):
    pytest.importorskip("matplotlib")
    png = reporting.plot(bench_csv, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_runs_and_appends_to_the_csv(tmp_path, capsys):
    out = tmp_path / "cli.csv"
    args = ["bench", "--model", TINY, "--batch", "2", "--image-size", "8", "--repeats", "1", "--out", str(out),
            "--plain"]
    assert cli.main(args) == 0
    progress = capsys.readouterr().err.splitlines()
    assert cli.main(args + ["--providers", "naive,torch-saved", "--mode", "forward"]) == 0
    rows = harness.read_csv(out)
    assert [r["provider"] for r in rows] == harness.default_providers("cpu") + ["naive", "torch-saved"]
    assert len({r["run"] for r in rows}) == 2
    # each case's numbers were printed the moment it was measured (a run killed by a time limit
    # keeps them), and they are the CSV's
    first_run = rows[:len(harness.default_providers("cpu"))]
    for i, r in enumerate(first_run):
        done = [line for line in progress if line.startswith(f"[{i + 1}/{len(first_run)}] {r['provider']} full ")
                and " ms median " in line]
        assert len(done) == 1, progress
        assert f": {float(r['median_ms']):.2f} ms median (min {float(r['min_ms']):.2f}), " in done[0], done[0]
        assert f"time {float(r['time_vs_naive']):.2f}x, memory {float(r['mem_vs_naive']):.2f}x" in done[0], done[0]


def test_cli_bench_segmentation_model(tmp_path):
    """An FC-DenseNet benches against its naive and checkpointed twins (per-pixel labels); its
    layers have no bottleneck to save, which the provider check says in one line."""
    out = tmp_path / "seg.csv"
    args = ["bench", "--model", "fc_densenet56", "--batch", "2", "--image-size", "32", "--repeats", "1",
            "--providers", "naive,checkpoint,torch", "--out", str(out), "--plain"]
    assert cli.main(args) == 0
    rows = {r["provider"]: r for r in harness.read_csv(out)}
    assert all(r["status"] == "ok" for r in rows.values())
    assert int(rows["torch"]["peak_mem_bytes"]) < int(rows["checkpoint"]["peak_mem_bytes"]) \
        < int(rows["naive"]["peak_mem_bytes"])
    with pytest.raises(harness.BenchError, match="layers have no bottleneck to save"):
        harness.build_model("torch-saved", "fc_densenet56")


@pytest.mark.parametrize("provider, base, suffix, compiled", [
    ("naive", "naive", "", False), ("compile", "compile", "", True), ("torch+compile", "torch", "+compile", True),
    ("triton-saved+compile", "triton-saved", "+compile", True), ("cuda+graph", "cuda", "+graph", False)])
def test_provider_suffixes(provider, base, suffix, compiled):
    assert harness.split_suffix(provider) == (base, suffix)
    assert harness.is_compiled(provider) == compiled
    assert harness.split_graph(provider) == ((base, True) if suffix == "+graph" else (provider, False))
    assert harness.split_provider(provider)[0] == base.replace("-saved", "")


def test_compile_suffix_only_for_our_backends():
    harness.check_provider("torch+compile", "cpu")
    for provider in ("naive+compile", "checkpoint+compile"):
        with pytest.raises(harness.BenchError, match="'compile'"):
            harness.check_provider(provider, "cpu")


def _one_line_error(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("densenet-fast: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--model", "densenet_9000"], "unknown model"),
    (["bench", "--providers", "naive,triton"], "triton"),
    (["bench", "--mode", "sideways"], "unknown mode"),
    (["bench", "--batch", "many"], "invalid int value"),
    (["plan", "--budget", "lots"], "cannot parse size"),
    (["sweep", "--depths", "41"], "6*n + 4"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_errors_are_one_line_with_status_2(capsys, argv, needle):
    assert needle in _one_line_error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_without_gpu_is_one_line_with_status_2(capsys):
    assert "no GPU" in _one_line_error(capsys, ["bench", "--device", "cuda"])


def test_python_dash_m_exit_status_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "densenet_fast", "bench", "--model", "nope"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "unknown model 'nope'" in proc.stderr


def test_rows_record_the_fp32_conv_precision_ieee_on_the_cpu():
    """fp32_convs says what a GPU run's float32 convolutions (and our GEMMs, ops.precision) may
    use; the CPU computes IEEE float32 whatever cuDNN's setting says."""
    from densenet_fast.bench import harness

    assert "fp32_convs" in harness.CSV_FIELDS
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    try:
        for setting in ("tf32", "ieee"):
            conv.fp32_precision = setting
            assert harness.environment("cpu")["fp32_convs"] == "ieee"
    finally:
        conv.fp32_precision = saved


def test_cudnn_benchmark_flag_holds_for_the_run_only(monkeypatch):
    """--cudnn-benchmark turns torch.backends.cudnn.benchmark on while the cases run and back off
    after; rows record it ("n/a" on the CPU, where cuDNN does not run)."""
    assert "cudnn_benchmark" in harness.CSV_FIELDS
    assert harness.environment("cpu")["cudnn_benchmark"] == "n/a"
    seen = []

    def measure(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        raise KeyboardInterrupt  # stop before anything runs: main() returns 130

    monkeypatch.setattr(cli, "measure", measure)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    base = ["bench", "--model", TINY, "--batch", "2", "--image-size", "8", "--plain"]
    assert cli.main(base + ["--cudnn-benchmark"]) == 130
    assert cli.main(base) == 130
    assert seen == [True, False]
    assert torch.backends.cudnn.benchmark is False


def test_csv_written_by_an_older_version_gets_the_new_columns(tmp_path):
    """Appending to a CSV whose header lacks this version's newer columns rewrites it first with
    the current header (old rows keep their values, new columns empty), so rows line up; a CSV
    with a column this version does not know is refused with its name."""
    old_fields = [f for f in harness.CSV_FIELDS if f != "cudnn_benchmark"]
    old_fields[-1], old_fields[-2] = old_fields[-2], old_fields[-1]  # another order, too
    path = tmp_path / "old.csv"
    old_row = {f: f"old-{f}" for f in old_fields}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow(old_row)
    new_row = {f: f"new-{f}" for f in harness.CSV_FIELDS}
    harness.write_csv([new_row], path)
    rows = harness.read_csv(path)
    assert tuple(rows[0]) == harness.CSV_FIELDS
    assert rows[0] == {**{f: f"old-{f}" for f in old_fields}, "cudnn_benchmark": ""}
    assert rows[1] == new_row

    alien = tmp_path / "alien.csv"
    alien.write_text(",".join(harness.CSV_FIELDS) + ",gpu_watts\n")
    with pytest.raises(harness.BenchError, match="columns gpu_watts are not this version's"):
        harness.write_csv([new_row], alien)
    assert alien.read_text() == ",".join(harness.CSV_FIELDS) + ",gpu_watts\n"


@pytest.mark.parametrize("name", ["densenet_bc_40_12", "densenet_40_12", "densenet121"])
def test_reference_config_rebuilds_the_architecture(name):
    """The bench's naive and checkpoint twins are built from reference_config: the same
    state_dict keys and shapes as the model, with and without bottlenecks (bn_size=0) and
    compression (0.5, or 1 for densenet_<depth>_<k>)."""
    from densenet_fast import reference
    from densenet_fast.models import get_model

    with torch.device("meta"):
        model = get_model(name)
        twin = reference.DenseNet(**harness.reference_config(model))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in twin.state_dict().items()} == want


def _bench_ops():
    return load_file_module("bench_ops", "benchmarks/bench_ops.py")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bench_ops_cases_have_consistent_shapes(layout):
    """bench_ops' GPU shapes, at batch 1 and 4x4 pixels on the CPU: each plain-PyTorch case runs (the
    2026-11-27 lease's DenseNet-121 shape wrote 32 new channels into a 24-channel slice and failed)."""
    import dataclasses

    bench_ops = _bench_ops()
    for shape in bench_ops.SHAPES:
        small = dataclasses.replace(shape, n=1, h=4, w=4)
        torch.manual_seed(0)
        cases = bench_ops.cases(small, torch.float32, layout, "cpu")
        for op, providers in cases.items():
            if "torch" in providers:
                providers["torch"][0]()
        assert {"channel_stats", "bn_relu", "bn_relu_conv1x1", "bn_relu_conv3x3"} <= set(cases)
        if "transition_bwd" in cases and triton_kernels.INTERPRET and shape.name == "bc100-b3":
            # the Triton transition backward's call, once, in the interpreter
            grad_x, _, _, grad_w = cases["transition_bwd"]["triton"][0]()
            assert grad_x.shape == (1, small.c_buf, 4, 4) and grad_w.shape == (small.c_buf // 2, small.c_buf, 1, 1)


def test_bench_ops_shape_must_fit_its_buffer():
    bench_ops = _bench_ops()
    with pytest.raises(ValueError, match="exceeds the buffer"):
        bench_ops.Shape("bad", 1, 232, 256, 4, 4, 128, 32)


def test_profile_step_device_busy_is_the_union_of_device_intervals():
    """scripts/profile_step.py's GPU-busy time per step (the number that tells a GPU-bound eager
    step from a host-bound one): overlapping device events count once, gaps not at all, host
    events never."""
    profile_step = load_file_module("profile_step", "scripts/profile_step.py")

    def event(i, start, end, device=DeviceType.CUDA):
        return FunctionEvent(id=i, name=f"e{i}", thread=0, start_us=start, end_us=end, device_type=device)

    events = [event(0, 5, 12), event(1, 0, 10), event(2, 20, 25), event(3, 11, 12), event(4, 0, 100, DeviceType.CPU)]
    assert profile_step.device_busy_ms(events, steps=2) == pytest.approx((12 + 5) / 2 / 1e3)
    assert profile_step.device_busy_ms([event(0, 0, 100, DeviceType.CPU)], steps=1) is None
