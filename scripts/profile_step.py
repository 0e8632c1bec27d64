"""Where one eager training step spends its host and device time: torch.profiler over a few steps
of bench providers (a developer tool for a GPU lease; it runs on the CPU too).

The 2026-11-27 H200 lease found DenseNet-BC-100's eager steps host-bound: the cuda backend's step
took 46.5 ms eager and 16.8 ms replayed as a CUDA graph, naive's 34.0 and 18.8 ms. Which ops cost
that host time on the GPU machine (dispatch, cuDNN's plan lookups, allocations, our C++ layer
loop's calls) cannot be read on the CPU machines, whose kernels are other code. This prints, per
provider, the wall time per step, the host time per step, the number of ops, and the ops with the
most host time (self CPU) and the most device time (self CUDA), the same bench case and weights as
`densenet-fast bench` (densenet_fast.bench.harness.prepare).

    python scripts/profile_step.py --device cuda --model densenet_bc_100_12 --batch 64 \\
        --providers naive,cuda --steps 3 [--top 20] [--out profile.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Dict, List, Optional

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from densenet_fast.bench import harness
from densenet_fast.bench.harness import Case
from densenet_fast.cli import default_image_size


def _rows(events, key: str, top: int) -> List[Dict[str, object]]:
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"op": e.key, "count": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1),
             "self_device_us": round(getattr(e, "self_device_time_total", 0.0), 1)} for e in ranked]


def device_busy_ms(events, steps: int) -> Optional[float]:
    """Milliseconds per step in which the GPU ran something: the union of the device events'
    intervals (kernels, copies, fills), so that overlapping work on two streams counts once.
    Against the wall time per step this says whether the step is bound by the GPU (busy ~ wall)
    or by the host that feeds it (busy well under wall). None when no device event was recorded."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    if not spans:
        return None
    busy, (start, end) = 0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy / steps / 1e3


def profile_provider(provider: str, args: argparse.Namespace) -> Dict[str, object]:
    case = Case(provider, args.model, args.batch, args.image_size, "full", args.dtype, args.channels_last)
    step = harness.prepare(case, args.device)
    cuda = args.device.startswith("cuda")
    for _ in range(2):  # beyond prepare's settling step: warm caches, allocator pools
        step.setup()
        step.run()
    harness.synchronize(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step.setup()
            step.run()
        harness.synchronize(args.device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    events = prof.key_averages()
    host_us = sum(e.self_cpu_time_total for e in events) / args.steps
    busy = device_busy_ms(prof.events(), args.steps)
    return {"provider": provider, "wall_ms_per_step": round(wall_ms, 2),
            "host_self_ms_per_step": round(host_us / 1e3, 2),
            "device_busy_ms_per_step": None if busy is None else round(busy, 2),
            "ops_per_step": round(sum(e.count for e in events) / args.steps),
            "by_host": _rows(events, "self_cpu_time_total", args.top),
            "by_device": _rows(events, "self_device_time_total", args.top) if cuda else []}


def _print(result: Dict[str, object], steps: int) -> None:
    busy = result["device_busy_ms_per_step"]
    busy_text = "" if busy is None else (f", device busy {busy} ms "
                                         f"({100 * busy / result['wall_ms_per_step']:.0f}% of the wall time)")
    print(f"== {result['provider']}: {result['wall_ms_per_step']} ms per step (profiled), host self time "
          f"{result['host_self_ms_per_step']} ms{busy_text}, {result['ops_per_step']} profiler events per step")
    for title, rows in (("most host time", result["by_host"]), ("most device time", result["by_device"])):
        if not rows:
            continue
        print(f"  {title} (per step):  count  self CPU us  self device us")
        for r in rows:
            print(f"  {r['op'][:60]:60s} {r['count'] / steps:7.0f} {r['self_cpu_us'] / steps:10.0f} "
                  f"{r['self_device_us'] / steps:10.0f}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="densenet_bc_100_12")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=0, help="default: the model's (32 CIFAR, 224 ImageNet)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--providers", default="naive,cuda")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if not args.image_size:
        args.image_size = default_image_size(args.model)
    results = []
    for provider in [p for p in args.providers.split(",") if p]:
        result = profile_provider(provider, args)
        _print(result, args.steps)
        results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"case": vars(args), **harness.environment(args.device), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
