"""densenet_fast's benchmark suite: one harness for every benchmark (the CLI's `bench`, `sweep` and
`plan`, benchmarks/bench_model.py), results in CSV, tables and plots generated from the CSV.

What is measured
  A Case is (provider, model, batch, image_size, mode, dtype, channels_last).
  Providers: naive (reference.DenseNet, torch.cat per layer, torchvision's computation),
  checkpoint (the same with checkpoint=True: torchvision's memory_efficient=True), torch / cuda
  (densenet_fast's model with that backend, bottleneck recomputed in backward), and
  <backend>-saved (save_bottleneck=True).  All providers of a model get the same weights.
  Modes, on (N, 3, S, S) standard-normal inputs with cross-entropy loss on random labels:
    forward   the training-mode forward with autograd recording, loss included;
    backward  loss.backward() alone: each repeat first runs a forward, untimed, outside the
              measured region (a fresh graph per repeat rather than retain_graph, so that the
              saved tensors are freed as in a real step);
    full      forward + backward: a training step without the optimizer.
  dtype float32, or bfloat16/float16 through torch.autocast (parameters stay float32).

Time
  GPU: CUDA events around the step, median over --repeats after --warmup untimed steps.
  CPU: time.perf_counter around the step, median likewise.  Gradients are set to None before
  every step (untimed), so each step allocates its gradients as a first training step would.

Peak memory (densenet_fast.bench.memory)
  Measured in a separate step, run first (it also warms up), never in a timed one: the
  profiler's overhead would distort the time.  Gradients are set to None before it, so their
  memory counts.  The result is the peak ABOVE the memory allocated when the step starts
  (parameters and inputs excluded; activations, gradients and temporaries included); for
  'backward' that baseline already holds the saved activations, so the number is the extra
  working memory of the backward pass.
    GPU: reset_peak_memory_stats(); max_memory_allocated() minus memory_allocated() before.
    CPU: torch.profiler with profile_memory=True records every allocation and free of c10's CPU
         allocator with its size; the running sum in time order is the live total, its maximum
         the peak.  This is a real measurement, not an estimate from tensor sizes.
  A case that runs out of memory is recorded with status 'oom' instead of stopping the run.

Derived metrics
  images/s = batch / median time.  Ratios vs naive (mem_vs_naive, time_vs_naive,
  images_per_s_vs_naive) divide by the naive row of the same run and configuration.
  step_gflop: the model's own FLOPs in the step (torch.utils.flop_counter on the meta device,
  naive model: convolutions and the classifier; recomputation not counted), tflops = that over
  the median time, pct_of_ceiling = tflops over a square matmul's TFLOP/s measured in the same
  run, same device and dtype.

Planning (densenet_fast.bench.plan): the same step run on fake tensors under a dispatch mode that
tracks live storage bytes predicts the peak without computing anything; tests/test_bench.py
holds it to within 10% of the measured CPU peak.

CSV columns: the Case fields, the metrics above, status, and device, device_name (the CPU model
from /proc/cpuinfo or torch.cuda.get_device_name), torch, triton, cuda versions, git_sha
(`git rev-parse --short HEAD`, '+dirty' with uncommitted changes, 'unknown' outside git), date
(UTC ISO 8601), threads (torch.get_num_threads()) and run (one id per invocation).
"""

from .harness import (CSV_FIELDS, MODES, BenchError, Case, default_providers, read_csv, run_case, run_cases,
                      write_csv)
from .memory import cpu_peak_bytes, format_size, parse_size
from .plan import planned_peak_bytes


def __getattr__(name: str):
    # report/plot are imported on first use, so that `python -m densenet_fast.bench.report` does
    # not find its module already imported by the package (runpy warns about that).
    if name in ("report", "plot"):
        from . import report as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Case", "MODES", "CSV_FIELDS", "BenchError", "default_providers", "run_case", "run_cases", "write_csv",
           "read_csv", "cpu_peak_bytes", "planned_peak_bytes", "parse_size", "format_size", "report", "plot"]
