"""The `densenet-fast` command (also `python -m densenet_fast`).

  densenet-fast bench   measure peak memory and time of naive / checkpoint / our model -> CSV, table
  densenet-fast sweep   DenseNet-BC depth sweep: memory and time against depth -> CSV, table, PNG
  densenet-fast plan    predict peak training memory without running the arithmetic; the largest
                        batch (and DenseNet-BC depth) that fits a budget
  densenet-fast train   train a model (densenet_fast/train/): AMP, channels_last, compile, DDP, resume

The method is in densenet_fast/bench/__init__.py.  A bad request (unknown model or provider,
--device cuda without a GPU, an unparsable size, a count out of range, an --image-size the model's
poolings cannot take, an --out that is a directory) prints one line and exits with status 2; a run
in which a case failed (other than running out of memory) exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ._paths import path_problem
from .bench import harness
from .bench import plan as planning
from .bench import sweep as sweeping
from .bench.report import HEADER, conditions, group_rows, markdown, plot, table_rows
from .bench.harness import BenchError, Case
from .bench.memory import format_size, parse_size
from .models import is_segmentation_model

DEFAULT_MODEL = {"cpu": "densenet_bc_100_12", "cuda": "densenet121"}
# `bench` with no --model: DenseNet-BC-100 at 32x32 and DenseNet-121 at 224x224, each at a batch
# that keeps the whole default CPU run within about 3 minutes on 2 cores.
DEFAULT_BENCH = {"cpu": (("densenet_bc_100_12", 64), ("densenet121", 4)),
                 "cuda": (("densenet_bc_100_12", 64), ("densenet121", 64))}
DEFAULT_BATCH = 64
DEFAULT_REPEATS = {"cpu": 3, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 0, "cuda": 3}  # the memory step runs first and already warms up
DEFAULT_SWEEP_BATCH = {"cpu": 16, "cuda": 64}
DEFAULT_SWEEP_REPEATS = {"cpu": 1, "cuda": 10}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a BenchError (one line, exit status 2) like every other."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""  # "densenet-fast bench" -> "bench"
        raise BenchError(f"{command}: {message}" if command else message)


# ------------------------------------------------------------------------------------------
# Terminal output: rich when installed, plain text otherwise
# ------------------------------------------------------------------------------------------


class Display:
    """Progress on stderr and result tables on stdout."""

    def __init__(self, plain: bool = False) -> None:
        try:
            if plain:
                raise ImportError
            from rich.console import Console
        except ImportError:
            self.rich = None
        else:
            self.rich = Console(stderr=True)
            self.out = Console()
            if not self.out.is_terminal:  # a pipe or file: rich would wrap the table at 80 columns
                self.out = Console(width=160)
        self.progress = None
        self.task = None
        self.running = False
        self.label = ""
        self.steps_per_case = 0

    def start(self, cases: int, steps_per_case: int) -> None:
        self.steps_per_case = steps_per_case
        if self.rich is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
                TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=self.rich)
            self.progress.start()
            self.task = self.progress.add_task("starting", total=cases * steps_per_case)

    def case(self, index: int, count: int, case: Case) -> None:
        self.running = False  # a case that failed part-way leaves steps unreported
        if self.progress is not None:
            self.progress.update(self.task, completed=index * self.steps_per_case)
        self.label = (f"[{index + 1}/{count}] {case.provider} {case.mode} {case.model} batch {case.batch} "
                      f"{case.image_size}px {case.dtype}")
        if self.progress is None:
            print(self.label, file=sys.stderr, flush=True)

    def step(self, phase: str, i: int, n: int) -> None:
        """A step of the current case starts (phase: memory, warm-up or timing)."""
        if self.progress is not None:
            self._finish_step()
            self.progress.update(self.task, description=f"{self.label}: {phase} {i + 1}/{n}")
            self.running = True

    def case_done(self, row: dict) -> None:
        """One line on stderr per measured case, as soon as it is measured (the table comes at the
        end of the run, which a run killed by a time limit never reaches)."""
        if row.get("status") != "ok":
            text = f"{self.label}: {row.get('status')}"
        else:
            text = (f"{self.label}: {row['median_ms']:.2f} ms median (min {row['min_ms']:.2f}), "
                    f"{row['peak_mem_mib']:,.1f} MiB peak")
            if "time_vs_naive" in row:
                text += f"; vs naive: time {row['time_vs_naive']:.2f}x, memory {row['mem_vs_naive']:.2f}x"
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def _finish_step(self) -> None:
        if self.progress is not None and self.running:
            self.progress.advance(self.task)
        self.running = False

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self._finish_step()
            self.progress.stop()
            self.progress = None

    def results(self, rows: List[dict]) -> None:
        """The results of a run, from its CSV rows."""
        if self.rich is None:
            sys.stdout.write(markdown(rows))
            return
        from rich.table import Table

        for members in group_rows(rows).values():
            table = Table(caption=conditions(members[0]), caption_justify="left")
            for i, name in enumerate(HEADER):
                table.add_column(name, justify="left" if i < 3 else "right")
            for cells in table_rows(members):
                table.add_row(*cells)
            self.out.print(table)

    def text(self, md: str) -> None:
        if self.rich is None:
            print(md)
        else:
            from rich.markdown import Markdown

            self.out.print(Markdown(md))


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch, a size, a count of steps or threads)."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def check_device(device: str, need_gpu: bool = True) -> str:
    """`device` if it names the cpu or cuda (and, with need_gpu, a GPU is visible for cuda); else BenchError."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BenchError(f"unknown device {device!r}; expected cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {device!r}; expected cpu or cuda")
    if need_gpu and dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device} requested but no GPU is visible (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__} built with CUDA {torch.version.cuda or 'none'})")
    return device


def split_list(text: Optional[str]) -> List[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_modes(text: str) -> List[str]:
    modes = list(harness.MODES) if text == "all" else split_list(text)
    for mode in modes:
        if mode not in harness.MODES:
            raise BenchError(f"unknown mode {mode!r}; expected one of {', '.join(harness.MODES)} or all")
    return modes


def parse_budget(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise BenchError(f"--budget: {exc}") from None


def parse_depths(text: str) -> List[int]:
    try:
        depths = [int(d) for d in split_list(text)]
    except ValueError:
        raise BenchError(f"--depths must be a comma-separated list of integers, got {text!r}") from None
    if not depths:
        raise BenchError(f"--depths must list at least one DenseNet-BC depth (e.g. 40,100), got {text!r}")
    for d in depths:
        if d < 10 or (d - 4) % 6:
            raise BenchError(f"--depths: DenseNet-BC depth must be 6*n + 4 with n >= 1 (e.g. 40, 100), got {d}")
    return depths


def check_output_path(path: Optional[str], flag: str) -> Optional[Path]:
    """`path` as a Path (None stays None) if a file can be written there: not a directory, and its
    nearest existing ancestor is a directory (write_csv creates the missing ones); else BenchError.
    Checked before measuring, so a bad path does not cost the run."""
    if path is None:
        return None
    problem = path_problem(path, directory=False)
    if problem is not None:
        raise BenchError(f"{flag} {path}: {problem}")
    return Path(path)


def check_image_size(model: str, size: int) -> None:
    """BenchError naming --image-size when `model` cannot take size x size inputs (its poolings
    would leave nothing): a forward pass of its naive twin in eval mode on the meta device, no
    arithmetic.  The message gives the smallest size that works, found the same way."""

    def fits(s: int) -> bool:
        try:
            net(torch.empty(1, 3, s, s, device="meta"))
        except (RuntimeError, ValueError):
            return False
        return True

    with torch.device("meta"):
        net = harness.build_model("naive", model).eval()
    if fits(size):
        return
    bad, good = size, None
    for s in (2 ** i for i in range(1, 13)):  # up to 4096: no model here needs more
        if s > size and fits(s):
            good = s
            break
        bad = max(bad, s)
    if good is None:
        raise BenchError(f"--image-size {size}: {model} cannot run on {size}x{size} inputs")
    while good - bad > 1:  # smallest size that fits, in (bad, good]
        mid = (bad + good) // 2
        bad, good = (bad, mid) if fits(mid) else (mid, good)
    raise BenchError(f"--image-size {size}: too small for {model}, whose poolings need inputs of at least "
                     f"{good}x{good}")


def resolve_providers(text: Optional[str], device: str, default: Sequence[str]) -> List[str]:
    providers = split_list(text) or list(default)
    for p in providers:
        harness.check_provider(p, device)
    return providers


def default_image_size(model: str) -> int:
    """32 for CIFAR-stem models (DenseNet-BC), 224 for the ImageNet ones and the FC-DenseNets."""
    if is_segmentation_model(model):
        return 224
    return 32 if dict(harness.reference_config_for(model))["small_inputs"] else 224


def ours(device: str) -> str:
    """The provider name of our model's default backend on `device`."""
    from .backends import resolve_backend
    return resolve_backend("auto", torch.device(device))


# ------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------


def measure(cases: List[Case], device: str, repeats: int, warmup: int, display: Display) -> List[dict]:
    """Run the cases with a progress display; returns the CSV rows."""
    display.start(len(cases), 1 + warmup + repeats)
    try:
        return harness.run_cases(cases, device, repeats, warmup,
                                 on_case=lambda i, case: display.case(i, len(cases), case), on_step=display.step,
                                 on_row=display.case_done)
    finally:
        display.stop()


def save_and_show(rows: List[dict], out: Path, display: Display) -> List[dict]:
    """Append rows to the CSV, read this run back and print its table (tables come from the CSV)."""
    harness.write_csv(rows, out)
    this_run = [r for r in harness.read_csv(out) if r["run"] == rows[0]["run"]]
    display.results(this_run)
    print(f"results: {out}", file=sys.stderr)
    return this_run


def write_plot(csv_path: Path, png: Optional[str]) -> None:
    path = Path(png) if png else csv_path.with_suffix(".png")
    try:
        print(f"plot: {plot(csv_path, path)}", file=sys.stderr)
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)


def failed(rows: List[dict]) -> bool:
    return any(r["status"] not in ("ok", "oom") for r in rows)


def cmd_bench(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    kind = torch.device(device).type
    if args.model:
        models = [(m, DEFAULT_BATCH if args.batch is None else args.batch) for m in args.model]
    else:
        models = [(m, b if args.batch is None else args.batch) for m, b in DEFAULT_BENCH[kind]]
    for model, _ in models:
        harness.check_model(model)
    providers = resolve_providers(args.providers, device, harness.default_providers(device))
    sizes = {m: default_image_size(m) if args.image_size is None else args.image_size for m, _ in models}
    for model, size in sizes.items():
        check_image_size(model, size)
    modes = parse_modes(args.mode)
    repeats = args.repeats if args.repeats is not None else DEFAULT_REPEATS[kind]
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[kind]
    cases = [Case(p, m, batch, sizes[m], mode, args.dtype, args.channels_last)
             for m, batch in models for mode in modes for p in providers]
    out = check_output_path(args.out or None, "--out") or harness.default_csv_path("bench", device)
    check_output_path(args.plot or None, "--plot")
    display = Display(args.plain)
    t0 = time.perf_counter()
    rows = measure(cases, device, repeats, warmup, display)
    this_run = save_and_show(rows, out, display)
    if args.plot is not None:
        write_plot(out, args.plot)
    print(f"{len(cases)} cases in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if failed(this_run) else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    kind = torch.device(device).type
    depths = parse_depths(args.depths)
    budget = parse_budget(args.budget)
    providers = resolve_providers(args.providers, device, ["naive", ours(device)])
    batch = DEFAULT_SWEEP_BATCH[kind] if args.batch is None else args.batch
    repeats = args.repeats if args.repeats is not None else DEFAULT_SWEEP_REPEATS[kind]
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[kind]
    cases = sweeping.sweep_cases(depths, args.growth, batch, providers, args.dtype, args.channels_last)
    out = check_output_path(args.out or None, "--out") or harness.default_csv_path("sweep", device)
    check_output_path(args.plot or None, "--plot")
    display = Display(args.plain)
    t0 = time.perf_counter()
    rows = measure(cases, device, repeats, warmup, display)
    this_run = save_and_show(rows, out, display)
    display.text(sweeping.budget_summary(this_run, budget))
    write_plot(out, args.plot)
    print(f"{len(cases)} cases in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if failed(this_run) else 0


def _fit_text(fit: Optional[planning.Fit], what: str) -> str:
    if fit is None:
        return "n/a"
    if fit.value is None:
        return f"none (smallest {what}: {format_size(fit.peak)})"
    how = "planned" if fit.verified else "fit, extrapolated"
    return f"{fit.value} ({format_size(fit.peak)}, {how})"


def cmd_plan(args: argparse.Namespace) -> int:
    device = check_device(args.device, need_gpu=False)  # the cuda allocator is modelled, not used
    harness.check_model(args.model)
    budget = parse_budget(args.budget)
    providers = split_list(args.providers) or ["naive", "torch"]
    for p in providers:
        harness.check_provider(p, "cpu" if harness.split_provider(p)[0] != "cuda" else device)
    size = default_image_size(args.model) if args.image_size is None else args.image_size
    check_image_size(args.model, size)
    display = Display(args.plain)
    t0 = time.perf_counter()
    results = []
    for p in providers:
        case = Case(p, args.model, args.batch, size, "full")
        try:
            results.append(planning.plan_case(case, budget, device, on_plan=lambda c: display.note(
                f"planning {c.provider} {c.model} batch {c.batch}")))
        except ValueError as exc:  # the model refuses the shape, e.g. batch norm on one value per channel
            raise BenchError(f"provider {p}: {args.model} at --batch {args.batch}, --image-size {size}: "
                             f"{' '.join(str(exc).split())}") from None
    header = (f"Planned peak memory of one training step of {args.model} at {size}x{size} (meta tensors, no "
              f"arithmetic; {device} allocator model), budget {format_size(budget)}:")
    lines = [header, "", "| provider | peak at batch %d | largest batch in budget | largest DenseNet-BC depth at "
             "batch %d |" % (args.batch, args.batch), "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['case'].provider} | {format_size(r['peak'])} | {_fit_text(r['batch'], 'batch 1')} | "
                     f"{_fit_text(r['depth'], 'depth 10')} |")
    display.text("\n".join(lines))
    print(f"planned in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, repeats: dict) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(harness.DTYPES),
                   help="float32, or bfloat16/float16 through torch.autocast")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    p.add_argument("--repeats", type=positive_int, help="timed steps per case (default: cpu %d, cuda %d)"
                   % (repeats["cpu"], repeats["cuda"]))
    p.add_argument("--warmup", type=nonnegative_int, help="untimed steps before timing, after the memory step "
                   "(default: cpu %d, cuda %d)" % (DEFAULT_WARMUP["cpu"], DEFAULT_WARMUP["cuda"]))
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time the algorithms of each convolution shape and keep the fastest "
                        "(torch.backends.cudnn.benchmark = True, as training scripts usually set; timed in the "
                        "unmeasured settling step); default: cuDNN's heuristics")
    p.add_argument("--plain", action="store_true", help="plain-text output even when rich is installed")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="densenet-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("bench", help="memory and time of naive / checkpoint / ours -> CSV and table",
                       description="Measure peak memory and median time of a training step (or its forward or "
                                   "backward) for each provider; append to a CSV and print the table.")
    b.add_argument("--model", action="append", help="model name, repeatable (default: %s)"
                   % " and ".join(m for m, _ in DEFAULT_BENCH["cpu"]))
    b.add_argument("--batch", type=positive_int, help="batch size (default %d; without --model: %s)" % (
        DEFAULT_BATCH, ", ".join(f"{m} {b} on {d}" for d, pairs in DEFAULT_BENCH.items() for m, b in pairs)))
    b.add_argument("--image-size", type=positive_int,
                   help="input height = width (default 32 for DenseNet-BC, else 224)")
    b.add_argument("--providers", help="comma-separated: naive, checkpoint, compile, torch, cuda, triton, "
                   "<backend>-saved, <provider>+graph (CUDA graph, GPU only) (default: naive, checkpoint, compile "
                   "on a GPU, and the backends available on the device)")
    b.add_argument("--mode", default="full", help="forward, backward, full, a comma list, or all (default full)")
    b.add_argument("--out", help="CSV to append to (default benchmarks/results/bench-<device>-<date>.csv)")
    b.add_argument("--plot", nargs="?", const="", help="also draw a PNG (default path: the CSV's, .png)")
    _common(b, DEFAULT_REPEATS)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("sweep", help="DenseNet-BC depth sweep: memory and time vs depth, budget fit",
                       description="Measure DenseNet-BC training steps at several depths; plot peak memory and "
                                   "time against depth; report the largest depth and batch within --budget.")
    s.add_argument("--depths", default=",".join(map(str, sweeping.DEFAULT_DEPTHS)), help="comma-separated depths")
    s.add_argument("--growth", type=positive_int, default=12, help="growth rate k (default 12)")
    s.add_argument("--batch", type=positive_int, help="batch size (default: cpu %d, cuda %d)"
                   % (DEFAULT_SWEEP_BATCH["cpu"], DEFAULT_SWEEP_BATCH["cuda"]))
    s.add_argument("--providers", help="comma-separated (default: naive and our default backend)")
    s.add_argument("--budget", default="8GiB", help="memory budget, e.g. 8GiB, 512MiB, 2GB (default 8GiB)")
    s.add_argument("--out", help="CSV to append to (default benchmarks/results/sweep-<device>-<date>.csv)")
    s.add_argument("--plot", help="PNG path (default: the CSV's, .png)")
    _common(s, DEFAULT_SWEEP_REPEATS)
    s.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plan", help="predict peak training memory; largest batch/depth within a budget",
                       description="Run one training step on meta tensors (fake tensors under autocast: no arithmetic, no "
                                   "memory) while tracking live storage bytes, and predict its peak; search the "
                                   "largest batch and, for DenseNet-BC, depth that fit --budget.")
    p.add_argument("--model", default=DEFAULT_MODEL["cpu"], help="model name (default %s)" % DEFAULT_MODEL["cpu"])
    p.add_argument("--batch", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--image-size", type=positive_int,
                   help="input height = width (default 32 for DenseNet-BC, else 224)")
    p.add_argument("--budget", default="8GiB", help="memory budget, e.g. 8GiB, 512MiB, 2GB (default 8GiB)")
    p.add_argument("--providers", help="comma-separated (default naive,torch)")
    p.add_argument("--device", default="cpu", help="allocator to model: cpu (exact bytes) or cuda (512-byte "
                   "blocks); no GPU needed")
    p.add_argument("--plain", action="store_true", help="plain-text output even when rich is installed")
    p.set_defaults(func=cmd_plan)

    from . import train as training  # the trainer imports nothing heavy at module level

    t = sub.add_parser("train", help="train a DenseNet (CIFAR, ImageFolder, digits, synthetic; AMP, DDP)",
                       description=training.DESCRIPTION)
    training.add_train_arguments(t)
    t.set_defaults(func=training.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `densenet-fast` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("bench", "sweep") and args.threads is not None:  # train sets (and restores) its own
            torch.set_num_threads(args.threads)
        saved_benchmark = torch.backends.cudnn.benchmark
        try:  # restored: tests call main() in their own process
            if getattr(args, "cudnn_benchmark", False):
                torch.backends.cudnn.benchmark = True
            return args.func(args)
        finally:
            torch.backends.cudnn.benchmark = saved_benchmark
    except BenchError as exc:
        print(f"densenet-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("densenet-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
