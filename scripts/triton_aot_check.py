#!/usr/bin/env python
"""Compile every Triton kernel of densenet_fast ahead of time for sm90 and sm80, without a GPU.

For every launch the launchers make on DenseNet-sized problems (densenet_fast/triton_kernels/aot.py
records them on fake tensors), every candidate config of the architecture's autotune list (the
first is the one used with DENSENET_FAST_TRITON_AUTOTUNE=0), every data dtype (fp32, fp16, bf16)
and both modes (generic: unspecialised ints and pointers; specialized: as triton specialises the
recorded values at run time), it runs triton.compile for GPUTarget("cuda", 90 | 80, 32) and reports:

  FAIL     a compile error (what a GPU would raise on the first launch)
  NOFIT    a launch's default config needs more shared memory than the device has per block
           (227 KiB on sm90, 163 KiB on sm80): with autotuning off, that launch cannot run
  NONE     a launch whose autotune list has no config that fits
  over     (a warning) a non-default config that does not fit: the autotuner prunes it at run
           time (OutOfResources), it only costs a compile
  sm86     (a note) a default sm80-list config above 99 KiB, the limit of sm86/sm89 GPUs, which
           also get the sm80 lists
  BANK     a default config whose pipelining copies a tile into an unswizzled shared buffer across
           its fastest dimension, a 32-way bank conflict per copy (aot.unswizzled_staging; "bank"
           notes the same for a non-default config, which autotuning times against the others).
           Specialized mode only: the generic mode does not know which strides are 1, so to it
           every layout looks like NCHW
  ROWS     a default config where the launcher promised contiguous rows (NCHW, ROW_RUN > 1) and a
           global access through a row offset has its warps walking the other dimension of the
           tile (aot.row_walks: one cache line per thread; "rows" notes a non-default config)

Exit status 1 on any FAIL / NOFIT / NONE / BANK / ROWS (or a kernel no case launches), else 0.

  python scripts/triton_aot_check.py                      # everything (long: ~1500 compiles)
  python scripts/triton_aot_check.py --default-only       # the autotune-off configs only
  python scripts/triton_aot_check.py --arch sm90 --dtypes fp16 --default-only --one-per-kernel
                                                          # what tests/test_triton_compile.py runs
  python scripts/triton_aot_check.py --arch sm90 --dtypes fp32 --default-only --modes specialized \
      --kernel _bn_relu_conv1x1_kernel --layouts -q       # each access's layout and source line
  PYTHONPATH=/path/to/triton-3.6:. python scripts/triton_aot_check.py ...   # another triton

TRITON_INTERPRET must not be set (the script clears it for itself); the compiled kernels go to
triton's cache (TRITON_CACHE_DIR), so a second run is fast.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

# Before anything imports densenet_fast.triton_kernels: compiled kernels, every autotune config.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["DENSENET_FAST_TRITON_AUTOTUNE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from densenet_fast.triton_kernels import aot  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm90,sm80", help="comma-separated: sm90, sm80 (default both)")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="data dtypes of the cases (default all three)")
    p.add_argument("--modes", default="generic,specialized", help="generic, specialized (default both)")
    p.add_argument("--default-only", action="store_true", help="only the first (autotune-off) config of each list")
    p.add_argument("--one-per-kernel", action="store_true",
                   help="one unit per kernel and architecture: its first specialized one, else its first "
                        "generic one (a quick smoke check)")
    p.add_argument("--kernel", default="", help="only kernels whose name contains this (comma-separated: any of these)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    p.add_argument("--json", default="", help="write every result to this JSON file")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per compile")
    p.add_argument("--layouts", action="store_true",
                   help="after each compile, its global loads/stores/async copies: register layout and source line")
    args = p.parse_args(argv)
    for option, value, known in (("--arch", args.arch, aot.DEVICES), ("--dtypes", args.dtypes, DTYPES),
                                 ("--modes", args.modes, ("generic", "specialized"))):
        unknown = [v for v in value.split(",") if v and v not in known]
        if unknown:
            p.error(f"{option}: unknown {', '.join(unknown)} (expected a comma-separated list of {', '.join(known)})")
    return args


def _result_dict(r: aot.Result) -> dict:
    u = r.unit
    return {"kernel": u.name, "arch": u.device.arch, "mode": u.mode, "default": u.default,
            "autotuned": u.autotuned, "config": u.config_str(), "dtypes": u.dtype_str(), "case": u.case,
            "ok": r.ok, "error": r.error, "shared": r.shared, "limit": u.device.smem_optin, "fits": r.fits,
            "regs": r.regs, "stack": r.stack, "async_copies": r.async_copies, "staging": list(r.staging),
            "row_accesses": r.row_accesses, "row_walk": list(r.row_walk),
            "seconds": round(r.seconds, 2)}


def main(argv=None) -> int:
    args = _parse(argv)
    import triton

    ok, why = aot.triton_can_compile()
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), torch {torch.__version__}")
    if not ok:
        print(f"cannot AOT-compile here: {why}")
        return 2
    dtypes = [DTYPES[d] for d in args.dtypes.split(",") if d]
    modes = tuple(m for m in args.modes.split(",") if m)
    all_units, launches_by_arch, problems = [], {}, []
    for arch in [a for a in args.arch.split(",") if a]:
        launches = aot.capture(aot.DEVICES[arch], dtypes=dtypes)
        missing = aot.uncovered_kernels(launches)
        if missing and not args.kernel:
            problems.append(f"{arch}: kernels no case launches (add a case to aot.CASES): {', '.join(missing)}")
        wanted = [k for k in args.kernel.split(",") if k] or [""]  # "" is in every name
        launches = [launch for launch in launches if any(k in launch.kernel.__name__ for k in wanted)]
        launches_by_arch[arch] = launches
        us = aot.units(launches, modes=modes, default_only=args.default_only)
        if args.one_per_kernel:
            # The first specialized unit of each kernel (what really runs, and the quickest to
            # compile), else its first generic one (kernels only the generic cases launch).
            first = {}
            for u in sorted(us, key=lambda u: u.mode != "specialized"):
                first.setdefault(u.name, u)
            us = list(first.values())
        all_units += us
    print(f"{len(all_units)} compilations, {args.jobs} at a time")

    t0 = time.time()
    done = [0]

    def progress(r: aot.Result) -> None:
        done[0] += 1
        if args.layouts:
            u = r.unit
            print(f"{u.device.arch} {u.mode} {u.name} [{u.config_str()}] {u.dtype_str()} ({u.case})\n"
                  + "".join(f"    {line}\n" for line in r.accesses), end="", flush=True)
        if args.quiet:
            return
        u = r.unit
        status = "ok" if r.fits else ("FAIL" if not r.ok else "over")
        spill = f" stack={r.stack}" if r.stack else ""
        print(f"[{done[0]:4d}/{len(all_units)}] {status:4s} {u.device.arch} {u.mode[:4]} {u.name:30s} "
              f"{'D' if u.default else ' '} {u.config_str():58s} {u.dtype_str():.50s} shared={r.shared} "
              f"regs={r.regs}{spill} {r.seconds:.1f}s", flush=True)
        if not r.ok:
            print("      " + r.error.replace("\n", "\n      ")[:3000], flush=True)

    results = aot.compile_units(all_units, jobs=args.jobs, progress=progress)
    by_key = {aot.unit_key(r.unit): r for r in results}

    # Findings per launch: its default config must fit, and some config of its list must.
    warnings, notes = [], []
    for r in results:
        u = r.unit
        if not r.ok:
            problems.append(f"FAIL  {u.device.arch} {u.mode} {u.name} [{u.config_str()}] {u.dtype_str()} "
                            f"({u.case}): {r.error.splitlines()[0] if r.error else ''}")
        elif not r.fits:
            msg = (f"{u.device.arch} {u.mode} {u.name} [{u.config_str()}] {u.dtype_str()}: shared {r.shared} > "
                   f"{u.device.smem_optin}")
            (problems if u.default else warnings).append(("NOFIT " if u.default else "over  ") + msg)
        elif u.default and u.device.arch == "sm80" and r.shared > aot.SM86_SMEM_OPTIN:
            notes.append(f"sm86  {u.mode} {u.name} [{u.config_str()}] {u.dtype_str()}: shared {r.shared} > "
                         f"{aot.SM86_SMEM_OPTIN}")
        if r.staging and u.mode == "specialized":  # generic: strides of 1 unknown, so every layout looks NCHW
            msg = f"{u.device.arch} {u.mode} {u.name} [{u.config_str()}] ({u.case}): {'; '.join(r.staging)}"
            (problems if u.default else notes).append(("BANK  " if u.default else "bank  ") + msg)
        if r.row_walk:
            msg = f"{u.device.arch} {u.mode} {u.name} [{u.config_str()}] ({u.case}): {'; '.join(r.row_walk)}"
            (problems if u.default else notes).append(("ROWS  " if u.default else "rows  ") + msg)
    for arch, launches in launches_by_arch.items():
        for launch in launches:
            if not launch.autotuned or len(launch.configs) < 2:
                continue
            for mode in modes:
                rs = [by_key.get(aot.unit_key(u)) for u in aot.launch_units(launch, mode)]
                rs = [r for r in rs if r is not None]
                if len(rs) == len(launch.configs) and not any(r.fits for r in rs):
                    problems.append(f"NONE  {arch} {mode} {launch.kernel.__name__} ({launch.case}): "
                                    f"no config of {len(rs)} fits")

    # Summary per kernel and architecture.
    print(f"\n{len(results)} compilations in {time.time() - t0:.0f} s")
    print(f"{'kernel':32s} {'arch':5s} {'mode':11s} {'compiled':>9s} {'failed':>6s} {'over':>5s} "
          f"{'default cfg shared (max)':>24s} {'max regs':>8s} {'spills':>6s} {'bank':>4s} {'rows':>4s}")
    groups = collections.defaultdict(list)
    for r in results:
        groups[(r.unit.name, r.unit.device.arch, r.unit.mode)].append(r)
    for (name, arch, mode), rs in sorted(groups.items()):
        defaults = [r.shared for r in rs if r.unit.default and r.ok]
        regs = [r.regs for r in rs if r.regs is not None]
        spills = sum(1 for r in rs if r.stack)
        print(f"{name:32s} {arch:5s} {mode:11s} {sum(r.ok for r in rs):9d} {sum(not r.ok for r in rs):6d} "
              f"{sum(r.ok and not r.fits for r in rs):5d} {max(defaults) if defaults else '-':>24} "
              f"{max(regs) if regs else '-':>8} {spills:6d} {sum(1 for r in rs if r.staging):4d} "
              f"{sum(1 for r in rs if r.row_walk):4d}")
    for title, lines in (("notes", notes), ("warnings", warnings), ("PROBLEMS", problems)):
        if lines:
            print(f"\n{title} ({len(lines)}):")
            for line in lines:
                print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__,
                       "results": [_result_dict(r) for r in results], "problems": problems,
                       "warnings": warnings, "notes": notes}, f, indent=1)
    print("\nOK" if not problems else f"\n{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
