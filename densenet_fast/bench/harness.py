"""The one benchmark harness: a Case names a provider, a model configuration and a mode; run_case
builds the provider's model, measures the step's peak memory in one run and its time in others,
and returns one CSV row.  The method is written down in densenet_fast/bench/__init__.py.

Providers (the model that runs the step):
  naive       densenet_fast.reference.DenseNet: torch.cat per layer, torchvision's computation
  checkpoint  the same reference model with checkpoint=True (torchvision's memory_efficient=True)
  compile     torch.compile of the naive model (compiled before anything is measured; GPU default)
  torch, cuda densenet_fast's model (get_model(name, backend=...)), bottleneck recomputed
  <backend>-saved   the same with save_bottleneck=True (e.g. torch-saved)
  <provider>+graph  the training step captured in one CUDA graph and replayed (GPU, mode full)
  <backend>+compile torch.compile of densenet_fast's model (e.g. torch+compile; compiled before
                    anything is measured, like compile)
Every provider of a run gets the same weights (loaded from one state_dict), so they compute the
same function.
"""

from __future__ import annotations

import csv
import functools
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference
from ..backends import available_backends, resolve_backend
from ..models import get_model, is_segmentation_model
from ..ops.precision import conv_tf32_allowed, with_conv_precision
from . import memory

MODES: Tuple[str, ...] = ("forward", "backward", "full")
REFERENCE_PROVIDERS: Tuple[str, ...] = ("naive", "checkpoint", "compile")
# torch.compile of the naive model: on by default on a GPU only (compiling DenseNet-BC-100 takes
# minutes of CPU time, and inductor's CPU code is not what the GPU targets are about).
GPU_ONLY_PROVIDERS: Tuple[str, ...] = ("compile",)
SAVED_SUFFIX = "-saved"
# "<provider>+graph": the same model, its training step captured in a CUDA graph and replayed
# (densenet_fast.graphs.GraphedStep); GPU and mode "full" only.  Memory is the eager step's.
GRAPH_SUFFIX = "+graph"
# "<backend>+compile": torch.compile of densenet_fast's model, against "compile" (of naive).
COMPILE_SUFFIX = "+compile"
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BenchError(Exception):
    """A bad request (unknown model or provider, no GPU): the CLI prints it as one line, exit 2."""


@dataclass(frozen=True)
class Case:
    """One measurement: `provider` runs `model` on (batch, 3, image_size, image_size) inputs.

    mode: forward (training-mode forward with autograd recording, loss included), backward
    (loss.backward() of a graph built just before, untimed) or full (both: one training step
    without the optimizer).  dtype: float32, or bfloat16/float16 through torch.autocast.
    """

    provider: str
    model: str
    batch: int
    image_size: int
    mode: str = "full"
    dtype: str = "float32"
    channels_last: bool = False


CASE_FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(Case))
METRIC_FIELDS: Tuple[str, ...] = (
    "status", "peak_mem_bytes", "peak_mem_mib", "median_ms", "min_ms", "images_per_s",
    "mem_vs_naive", "time_vs_naive", "images_per_s_vs_naive",
    "step_gflop", "tflops", "ceiling_tflops", "pct_of_ceiling", "repeats", "warmup",
)
# fp32_convs: "tf32" or "ieee", what cuDNN's float32 convolutions, and so our GEMMs and Triton dots
# (ops.precision), may use in a GPU run; "ieee" on the CPU, which computes IEEE float32 either way.
# cudnn_benchmark: "on" when cuDNN chose each convolution's algorithm by timing them
# (torch.backends.cudnn.benchmark, `--cudnn-benchmark`), "off" for its heuristics; "n/a" on the CPU.
META_FIELDS: Tuple[str, ...] = ("device", "device_name", "torch", "triton", "cuda", "git_sha", "date", "threads",
                                "run", "fp32_convs", "cudnn_benchmark")
CSV_FIELDS: Tuple[str, ...] = CASE_FIELDS + METRIC_FIELDS + META_FIELDS


# ------------------------------------------------------------------------------------------
# Providers and models
# ------------------------------------------------------------------------------------------


def split_suffix(provider: str) -> Tuple[str, str]:
    """'triton+graph' -> ('triton', '+graph'); 'torch+compile' -> ('torch', '+compile'); 'naive' -> ('naive', '')."""
    for suffix in (GRAPH_SUFFIX, COMPILE_SUFFIX):
        if provider.endswith(suffix):
            return provider[: -len(suffix)], suffix
    return provider, ""


def split_graph(provider: str) -> Tuple[str, bool]:
    """'triton+graph' -> ('triton', True); 'naive' -> ('naive', False)."""
    base, suffix = split_suffix(provider)
    return (base, True) if suffix == GRAPH_SUFFIX else (provider, False)


def is_compiled(provider: str) -> bool:
    """True for the providers whose model runs under torch.compile (compile, <backend>+compile)."""
    return provider == "compile" or split_suffix(provider)[1] == COMPILE_SUFFIX


def split_provider(provider: str) -> Tuple[str, bool]:
    """'torch-saved' -> ('torch', True); 'naive' -> ('naive', False) ('+graph', '+compile' are ignored here)."""
    provider, _ = split_suffix(provider)
    if provider.endswith(SAVED_SUFFIX):
        return provider[: -len(SAVED_SUFFIX)], True
    return provider, False


def default_providers(device: str) -> List[str]:
    """naive, checkpoint (and compile on a GPU), then every backend that runs on `device`."""
    refs = [p for p in REFERENCE_PROVIDERS if torch.device(device).type == "cuda" or p not in GPU_ONLY_PROVIDERS]
    return refs + list(available_backends(device))


def check_provider(provider: str, device: str) -> None:
    """Raise BenchError unless `provider` can run on `device` in this installation."""
    if split_graph(provider)[1] and torch.device(device).type != "cuda":
        raise BenchError(f"provider {provider!r}: CUDA graphs need --device cuda")
    base, saved = split_provider(provider)
    if split_suffix(provider)[1] == COMPILE_SUFFIX and base in REFERENCE_PROVIDERS:
        raise BenchError(f"provider {provider!r}: '+compile' is for densenet_fast's backends (torch.compile of the "
                         "naive model is the provider 'compile')")
    if base in REFERENCE_PROVIDERS and not saved:
        return
    if base in REFERENCE_PROVIDERS:
        raise BenchError(f"provider {provider!r}: save_bottleneck only exists for densenet_fast's backends")
    try:
        resolve_backend(base, torch.device(device))
        if base not in available_backends(device):
            # e.g. triton on CPU tensors: only triton's interpreter (tests) runs it there
            raise ValueError(f"backend {base!r} does not run natively on {torch.device(device).type} "
                             f"(available: {', '.join(available_backends(device))})")
    except (ValueError, RuntimeError) as exc:
        known = ", ".join(list(REFERENCE_PROVIDERS) + ["torch", "cuda", "triton", "<backend>-saved",
                                                       "<backend>+compile", "<provider>+graph"])
        raise BenchError(f"provider {provider!r}: {exc} (providers: {known})") from None


def check_model(name: str) -> None:
    """Raise BenchError for a name get_model does not know (checked on the meta device: no work)."""
    try:
        with torch.device("meta"):
            get_model(name)
    except ValueError as exc:
        raise BenchError(str(exc)) from None


def bc_depth(name: str) -> Optional[Tuple[int, int]]:
    """(depth, growth) of a 'densenet_bc_<depth>_<k>' name ('densenet_bc' is 100, 12), else None."""
    if name == "densenet_bc":
        return 100, 12
    parts = name.split("_")
    if name.startswith("densenet_bc_") and len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():
        return int(parts[2]), int(parts[3])
    return None


def reference_config(model: nn.Module) -> dict:
    """reference.DenseNet keyword arguments that rebuild `model`'s architecture.

    Read from the module tree (the names are torchvision's, shared by every DenseNet of the
    package), so any model get_model builds has its naive and checkpoint twins without a table.
    """
    feats = model.features
    blocks = [m for n, m in feats.named_children() if n.startswith("denseblock")]
    first = next(iter(blocks[0].children()))
    plain = not reference.has_bottleneck(first)  # bn_size=0
    growth = (first.conv1 if plain else first.conv2).out_channels
    compression = 0.5
    if hasattr(feats, "transition1"):
        c_in, c_out = feats.transition1.conv.in_channels, feats.transition1.conv.out_channels
        compression = 0.5 if c_out == c_in // 2 else c_out / c_in
    return dict(growth_rate=growth, block_config=tuple(len(b) for b in blocks),
                num_init_features=feats.conv0.out_channels, bn_size=0 if plain else first.conv1.out_channels // growth,
                drop_rate=first.drop_rate, num_classes=model.classifier.out_features,
                small_inputs=not hasattr(feats, "norm0"), compression=compression,
                in_channels=feats.conv0.in_channels)


@functools.lru_cache(maxsize=64)
def reference_config_for(name: str) -> Tuple[Tuple[str, object], ...]:
    """reference_config of get_model(name), read from a model built on the meta device (no work)."""
    with torch.device("meta"):
        return tuple(reference_config(get_model(name)).items())


def build_model(provider: str, name: str) -> nn.Module:
    """The provider's model for `name`, on the CPU, float32, freshly initialised."""
    base, saved = split_provider(provider)
    if is_segmentation_model(name):  # one class for all providers: memory_efficient=False is the naive twin
        if saved:
            raise BenchError(f"provider {provider!r}: {name}'s layers have no bottleneck to save")
        if base in REFERENCE_PROVIDERS:
            return get_model(name, memory_efficient=False, checkpoint=base == "checkpoint")
        return get_model(name, backend=base)
    if base in REFERENCE_PROVIDERS:
        # "compile" is the naive model here; prepare() wraps it in torch.compile once it has
        # its weights and device.
        return reference.DenseNet(**dict(reference_config_for(name)), checkpoint=base == "checkpoint")
    return get_model(name, backend=base, save_bottleneck=saved)


@functools.lru_cache(maxsize=8)
def _shared_weights(name: str) -> Dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return get_model(name).state_dict()


def load_shared_weights(model: nn.Module, name: str) -> nn.Module:
    """Give `model` the weights every provider of `name` gets (strict: also checks that the
    naive/checkpoint twin has exactly our model's architecture)."""
    model.load_state_dict(_shared_weights(name), strict=True)
    return model


def num_classes_of(model: nn.Module) -> int:
    head = model.classifier
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels  # FC-DenseNet: a 1x1 conv


# ------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------


class Step:
    """One measured step of `mode` on `model` with inputs x: (N, 3, S, S), labels y: (N,).

    setup() does the untimed part (gradients set to None, so that their memory counts in the
    step; for mode 'backward' also the forward pass), run() the measured part, teardown() drops
    what the step left (the graph of a forward-only step).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
                 autocast_dtype: Optional[torch.dtype]) -> None:
        if mode not in MODES:
            raise BenchError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        self.model, self.x, self.y, self.mode = model, x, y, mode
        self.autocast_dtype = autocast_dtype
        self.loss: Optional[torch.Tensor] = None

    def forward_loss(self) -> torch.Tensor:
        if self.autocast_dtype is None:  # no autocast context at all: it rejects the meta device
            out = self.model(self.x)
        else:
            with torch.autocast(self.x.device.type, dtype=self.autocast_dtype):
                out = self.model(self.x)
        return F.cross_entropy(out.float(), self.y)

    def setup(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        if self.mode == "backward":
            self.loss = self.forward_loss()

    def run(self) -> None:
        if self.mode == "forward":
            self.loss = self.forward_loss()
        elif self.mode == "backward":
            self.loss.backward()
        else:
            self.forward_loss().backward()

    def teardown(self) -> None:
        self.loss = None


def make_inputs(case: Case, num_classes: int, device: str, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: (batch, 3, S, S) standard normal (channels_last if asked), y: (batch,) labels, or
    (batch, S, S) per-pixel labels for a segmentation model."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=gen)
    labels = (case.batch, case.image_size, case.image_size) if is_segmentation_model(case.model) else (case.batch,)
    y = torch.randint(0, num_classes, labels, generator=gen)
    x = x.to(device)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


def prepare(case: Case, device: str) -> Step:
    """Build the case's model (shared weights) and inputs on `device`, ready to step."""
    model = load_shared_weights(build_model(case.provider, case.model), case.model).to(device).train()
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = make_inputs(case, num_classes_of(model), device)
    autocast = None if case.dtype == "float32" else DTYPES[case.dtype]
    if is_compiled(case.provider):
        model = torch.compile(model)
    # One full step first, outside every measurement, for every provider: compilation, and the
    # first-call allocations that stay for the process (cuBLAS's and cuDNN's workspaces, Triton
    # autotuning) would otherwise count in the memory step of whichever provider a process
    # measures first (the likely reason why an H200 run gave the cuda backend, first in its
    # process, 45 MiB more than the torch backend measured after naive; not yet re-measured).
    settle(model, x, y, autocast, device)
    if split_graph(case.provider)[1]:
        return _graphed_step(model, x, y, case.mode, autocast, device)
    return Step(model, x, y, case.mode, autocast)


def settle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: Optional[torch.dtype], device: str) -> None:
    """Run one untimed, unmeasured training step (forward and backward) and drop its gradients."""
    Step(model, x, y, "full", autocast).run()
    for p in model.parameters():
        p.grad = None
    synchronize(device)


class _GraphStep(Step):
    """A Step whose run() replays a captured training step; measured_peak is the eager step's."""

    def __init__(self, graphed, model, x, y, measured_peak: int) -> None:
        super().__init__(model, x, y, "full", None)
        self.graphed, self.measured_peak = graphed, measured_peak

    def setup(self) -> None:  # the graph owns the gradients; nothing to reset
        pass

    def run(self) -> None:
        self.graphed()


def _graphed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
                  autocast: Optional[torch.dtype], device: str) -> Step:
    from ..graphs import GraphedStep

    if mode != "full":
        raise BenchError("CUDA-graph providers measure mode 'full' only")
    eager = Step(model, x, y, "full", autocast)
    peak = memory.step_peak_bytes(eager.run, device, setup=eager.setup)
    eager.teardown()
    for p in model.parameters():
        p.grad = None
    graphed = GraphedStep(model, F.cross_entropy, x, y, autocast_dtype=autocast)
    return _GraphStep(graphed, model, x, y, peak)


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    """Seconds one call of fn takes: CUDA events on a GPU, time.perf_counter on the CPU."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_peak(step: Step, device: str) -> int:
    """Peak bytes above the pre-step baseline of one step.run() (see memory.step_peak_bytes)."""
    if isinstance(step, _GraphStep):
        return step.measured_peak
    try:
        return memory.step_peak_bytes(step.run, device, setup=step.setup)
    finally:
        step.teardown()


def time_step(step: Step, device: str, repeats: int, warmup: int,
              on_step: Callable[[str, int, int], None] = lambda phase, i, n: None) -> List[float]:
    """Seconds of `repeats` timed step.run() calls after `warmup` untimed ones (setup untimed)."""
    times = []
    for i in range(warmup + repeats):
        if i < warmup:
            on_step("warm-up", i, warmup)
        else:
            on_step("timing", i - warmup, repeats)
        step.setup()
        t = timed(step.run, device)
        step.teardown()
        if i >= warmup:
            times.append(t)
    return times


@functools.lru_cache(maxsize=64)
def step_flop(model: str, batch: int, image_size: int, mode: str) -> int:
    """FLOPs of the model's own math in one step (convolutions and the classifier, counted by
    torch.utils.flop_counter on the meta device with the naive model): what every provider
    must compute; recomputation (checkpoint, our recomputed bottleneck) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_model("naive", model)
    step = Step(net, *make_inputs(Case("naive", model, batch, image_size), num_classes_of(net), "meta"),
                mode="full", autocast_dtype=None)
    counter = FlopCounterMode(display=False)
    step.setup()
    with counter:
        loss = step.forward_loss()
    forward = counter.get_total_flops()
    with counter:
        loss.backward()
    total = counter.get_total_flops()
    return {"forward": forward, "backward": total - forward, "full": total}[mode]


@functools.lru_cache(maxsize=8)
def matmul_ceiling_tflops(device: str, dtype: str) -> float:
    """The measured ceiling: median TFLOP/s of a square matmul in `dtype` on `device`
    (4096 on a GPU, 2048 on the CPU), the reference that pct_of_ceiling divides by.  A float32
    GPU matmul may use TF32 exactly when cuDNN's convolutions may (torch's default: they may),
    so that the ceiling and the convolutions play by the same rules."""
    n = 4096 if torch.device(device).type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])

    def matmul() -> None:  # TF32 exactly when cuDNN's convolutions may use it (ops.precision)
        with_conv_precision(a, torch.mm, a, b)

    timed(matmul, device)
    secs = statistics.median(timed(matmul, device) for _ in range(5))
    return 2 * n ** 3 / secs / 1e12


# ------------------------------------------------------------------------------------------
# Running cases, rows
# ------------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc) \
        or "out of memory" in str(exc).lower()


def run_case(case: Case, device: str, repeats: int, warmup: int,
             on_step: Callable[[str, int, int], None] = lambda phase, i, n: None) -> dict:
    """Measure one case: a memory run (one step, first), then `warmup` untimed and `repeats`
    timed steps.  Returns the metrics part of a row; status is 'ok', 'oom' or 'error: ...'."""
    row: dict = {"repeats": repeats, "warmup": warmup}
    step = None
    try:
        step = prepare(case, device)
        on_step("memory", 0, 1)
        peak = measure_peak(step, device)
        times = time_step(step, device, repeats, warmup, on_step)
    except Exception as exc:  # one failing case (OOM, a backend error) must not lose the others
        row["status"] = "oom" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    finally:
        del step
        release_memory(device)
    median = statistics.median(times)
    flop = step_flop(case.model, case.batch, case.image_size, case.mode)
    tflops = flop / median / 1e12
    ceiling = matmul_ceiling_tflops(device, case.dtype)
    row.update(status="ok", peak_mem_bytes=peak, peak_mem_mib=round(peak / 2 ** 20, 2),
               median_ms=round(median * 1e3, 3), min_ms=round(min(times) * 1e3, 3),
               images_per_s=round(case.batch / median, 2), step_gflop=round(flop / 1e9, 3), tflops=round(tflops, 4),
               ceiling_tflops=round(ceiling, 3), pct_of_ceiling=round(100 * tflops / ceiling, 2))
    return row


def release_memory(device: str) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def add_ratios(rows: List[dict]) -> List[dict]:
    """Fill mem_vs_naive, time_vs_naive, images_per_s_vs_naive from the naive row measured in the
    same run for the same (model, batch, image_size, mode, dtype, channels_last)."""
    def key(r):
        return tuple(r[f] for f in CASE_FIELDS if f != "provider")

    naive = {key(r): r for r in rows if r["provider"] == "naive" and r.get("status") == "ok"}
    for r in rows:
        base = naive.get(key(r))
        if base is None or r.get("status") != "ok":
            continue
        r["mem_vs_naive"] = round(r["peak_mem_bytes"] / base["peak_mem_bytes"], 4)
        r["time_vs_naive"] = round(r["median_ms"] / base["median_ms"], 4)
        r["images_per_s_vs_naive"] = round(r["images_per_s"] / base["images_per_s"], 4)
    return rows


def run_cases(cases: Sequence[Case], device: str, repeats: int, warmup: int,
              on_case: Callable[[int, Case], None] = lambda i, case: None,
              on_step: Callable[[str, int, int], None] = lambda phase, i, n: None,
              on_row: Callable[[dict], None] = lambda row: None) -> List[dict]:
    """Run every case (in order) and return full CSV rows (case, metrics, metadata, ratios).

    on_row receives each case's row as soon as it is measured, with its ratios to a naive row
    measured before it in this run (naive comes first in the default order): a run cut short by
    a time limit (a GPU lease) has then reported every case it finished."""
    meta = environment(device)
    rows = []
    for i, case in enumerate(cases):
        on_case(i, case)
        rows.append({**asdict(case), **run_case(case, device, repeats, warmup, on_step), **meta})
        on_row(add_ratios(rows)[-1])
    return add_ratios(rows)


# ------------------------------------------------------------------------------------------
# Metadata and CSV
# ------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()


def git_sha() -> str:
    """Short sha of the checkout this package runs from, '+dirty' with uncommitted tracked
    changes outside benchmarks/results (the results being rewritten do not change what ran),
    'unknown' outside a git repository (or before its first commit).  DENSENET_FAST_GIT_SHA, when
    set, wins: a copy of the tree without .git (a remote GPU machine) still names its commit."""
    if os.environ.get("DENSENET_FAST_GIT_SHA"):
        return os.environ["DENSENET_FAST_GIT_SHA"]
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":(exclude)benchmarks/results"],
                               cwd=root, capture_output=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def environment(device: str) -> dict:
    """The metadata columns every row carries."""
    now = datetime.now(timezone.utc)
    kind = torch.device(device).type
    return {"device": kind, "device_name": device_name(device), "torch": torch.__version__,
            "triton": package_version("triton"), "cuda": torch.version.cuda or "none", "git_sha": git_sha(),
            "date": now.isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
            "run": now.strftime("%Y%m%dT%H%M%S.%f") + f"-{os.getpid()}",
            "fp32_convs": "tf32" if kind == "cuda" and conv_tf32_allowed() else "ieee",
            "cudnn_benchmark": ("on" if torch.backends.cudnn.benchmark else "off") if kind == "cuda" else "n/a"}


def default_csv_path(kind: str, device: str, root: Path = Path("benchmarks/results")) -> Path:
    """benchmarks/results/<kind>-<device>-<UTC date>.csv."""
    return root / f"{kind}-{torch.device(device).type}-{datetime.now(timezone.utc):%Y-%m-%d}.csv"


def write_csv(rows: Iterable[dict], path: os.PathLike) -> Path:
    """Append rows to `path` (header written when the file is new); returns the path.

    A file written by an earlier version, whose columns are a subset of CSV_FIELDS in another
    order or with some missing, is first rewritten with CSV_FIELDS (its rows keep their values,
    the new columns stay empty), so that appended rows line up with the header. A file with
    columns this version does not know raises BenchError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        _upgrade_header(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def _upgrade_header(path: Path) -> None:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        if header == list(CSV_FIELDS):
            return
        unknown = [name for name in header if name not in CSV_FIELDS]
        if unknown:
            raise BenchError(f"{path}: columns {', '.join(unknown)} are not this version's ({len(CSV_FIELDS)} "
                             "columns); write to another file with --out")
        old_rows = list(reader)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(old_rows)


def read_csv(path: os.PathLike) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
