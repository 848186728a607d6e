"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--large] [--out DIR]``.

Writes results.json, results.md (also printed) and objective_vs_time.png to ``--out``
(default benchmarks/results/). Fair NumPy on this machine (OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE
slow OpenBLAS down):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.run

See benchmarks/README.md for the cases, the measurements and how to read the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import sys
import time
from dataclasses import dataclass

import jax
import numpy as np

from . import measure, memory, report, solvers
from .cases import CASES, Case, host_views, init_factors, make_blocks, to_device

SECTIONS = ("memory", "steps", "single", "restarts", "traces")
# Nominal memory bandwidth (GB/s) of some accelerators, by a substring of jax's device_kind.
PEAK_BANDWIDTH_GB_S = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555,
                       "L4": 300, "T4": 320, "V100": 900}


@dataclass(frozen=True)
class Settings:
    """How much of each measurement a case gets."""

    ranks: tuple[int, ...]
    repeats: int  # timed repeats of every step (the median is reported)
    fit_repeats: int  # rounds of the timed whole fits (objective against time, restarts)
    trace_rank: int  # rank of the objective-against-time runs, restarts and memory
    mu_iters: int  # MU iterations of the coupled objective-against-time run (HALS's target)
    single_iters: int  # jaxnmf iterations of the single-block objective-against-time run
    budget_s: float  # most seconds for the NumPy reference and scikit-learn in those runs, and for
    #                  repeating the restarts' whole fits (at least one round is always run)
    restart_iters: int  # iterations of each fit in the restarts comparison
    memory_solvers: tuple[str, ...] = memory.SOLVERS
    memory_iters: int = 10
    sklearn_iters: int = 10  # scikit-learn is timed as calls of 1 and 1 + sklearn_iters iterations
    n_restarts: int = 8


QUICK = Settings(ranks=(10,), repeats=3, fit_repeats=3, trace_rank=10, mu_iters=100, single_iters=100,
                 budget_s=5.0, restart_iters=50, sklearn_iters=4)
DEFAULT = Settings(ranks=(10, 20, 50), repeats=5, fit_repeats=3, trace_rank=20, mu_iters=500, single_iters=100,
                   budget_s=120.0, restart_iters=10)
# ResNet-18 stages, ~5 GB: fewer repeats and iterations, and no NumPy-reference or scikit-learn
# memory runs (their float64 objective temporaries would exceed this machine's memory).
LARGE = dataclasses.replace(DEFAULT, repeats=3, fit_repeats=1, mu_iters=100,
                            memory_solvers=tuple(s for s in memory.SOLVERS if s.startswith("jaxnmf")))


_START = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, with the seconds since the suite started."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import psutil
    import sklearn
    import threadpoolctl

    device = jax.devices()[0]
    peak = next((v for k, v in PEAK_BANDWIDTH_GB_S.items() if k in device.device_kind), None)
    return dict(cpu=_cpu_name(), cores=os.cpu_count(), memory_gb=psutil.virtual_memory().total / 1e9,
                device=f"{device.platform} ({device.device_kind})",
                device_peak_gb_per_s=peak if device.platform == "gpu" else None,
                python=platform.python_version(), jax=jax.__version__, numpy=np.__version__, sklearn=sklearn.__version__,
                blas=[b for b in threadpoolctl.threadpool_info() if b.get("user_api") == "blas"],
                openblas_env={k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
                xla_flags=os.environ.get("XLA_FLAGS"), load_start=os.getloadavg()[0])


def traces(dev: dict, host: dict, case: Case, settings: Settings, sklearn_timing: dict | None) -> dict:
    """Objective against time of every solver, coupled and on the single block, at the trace rank.

    The NumPy reference and scikit-learn get the time jaxnmf MU took (at most budget_s)."""
    rank = settings.trace_rank
    hals_iters = max(2 * measure.FIT_CHUNK, settings.mu_iters // 2)
    init = init_factors(host, rank)
    repeats, budget = settings.fit_repeats, settings.budget_s
    alongside = {"NumPy reference MU": solvers.reference_step(list(host.values()), *init),
                 "GEMM floor (JAX)": solvers.floor_jax(list(dev.values()), *init)}
    coupled = {"jaxnmf MU": measure.fit_trace(dev, init, "mu", settings.mu_iters, repeats, alongside),
               "jaxnmf HALS": measure.fit_trace(dev, init, "hals", hals_iters, repeats)}
    coupled["NumPy reference MU"] = measure.reference_trace(dev, host, init,
                                                            min(coupled["jaxnmf MU"]["times"][-1], budget))

    name = case.single_block
    sdev, shost = {name: dev[name]}, {name: host[name]}
    sinit = init_factors(shost, rank)
    single = {"jaxnmf MU": measure.fit_trace(sdev, sinit, "mu", settings.single_iters, repeats),
              "jaxnmf HALS": measure.fit_trace(sdev, sinit, "hals", settings.single_iters, repeats)}
    same_time = min(single["jaxnmf MU"]["times"][-1], budget)
    single["NumPy reference MU"] = measure.reference_trace(sdev, shost, sinit, same_time)
    if sklearn_timing:
        per_iter, fixed = sklearn_timing["seconds"], sklearn_timing["fixed_seconds"]
        n_iter = int((same_time - fixed) / per_iter) if per_iter else settings.single_iters
        single["scikit-learn MU"] = measure.sklearn_trace(sdev[name], shost[name], sinit,
                                                          min(max(1, n_iter), 10 * settings.single_iters),
                                                          per_iter, fixed)
    return dict(rank=rank, single_block=name, coupled=coupled, single=single,
                hals_target=measure.hals_target(coupled["jaxnmf MU"], coupled["jaxnmf HALS"]))


def run_case(case: Case, settings: Settings, sections: set[str]) -> dict:
    """Every section of one case; the data is built once, after the memory runs (own processes)."""
    out = dict(description=case.description, n=case.n, blocks=dict(case.blocks), data_bytes=case.nbytes,
               settings=dataclasses.asdict(settings))
    if "memory" in sections:
        out["memory"] = []
        for solver in settings.memory_solvers:
            log(f"{case.name}: peak memory of {solver}")
            out["memory"].append(memory.measure(case.name, solver, settings.trace_rank, settings.memory_iters))
    log(f"{case.name}: building {case.nbytes / 1e9:.2f} GB of data")
    dev = to_device(make_blocks(case))
    host = host_views(dev)
    single = case.single_block
    if "steps" in sections:
        out["coupled"] = {}
        for rank in settings.ranks:
            log(f"{case.name}: coupled steps, d={rank}")
            out["coupled"][rank] = measure.steps(dev, host, rank, settings.repeats)
    if "single" in sections:
        out["single"] = dict(block=single, rows=dict(case.blocks)[single], per_rank={})
        for rank in settings.ranks:
            log(f"{case.name}: single-block steps ({single}), d={rank}")
            out["single"]["per_rank"][rank] = measure.steps({single: dev[single]}, {single: host[single]}, rank,
                                                            settings.repeats, sklearn_iters=settings.sklearn_iters)
    if "restarts" in sections:
        log(f"{case.name}: {settings.n_restarts} restarts, d={settings.trace_rank}")
        out["restarts"] = measure.restarts(dev, host, settings.trace_rank, settings.n_restarts,
                                           settings.restart_iters, settings.fit_repeats, settings.budget_s)
    if "traces" in sections:
        log(f"{case.name}: objective against time, d={settings.trace_rank}")
        sk = out.get("single", {}).get("per_rank", {}).get(settings.trace_rank, {}).get("scikit-learn MU")
        out["traces"] = traces(dev, host, case, settings, sk)
    return out


def plan(args: argparse.Namespace) -> list[tuple[Case, Settings]]:
    """The cases of the mode (or ``--cases``) with their settings."""
    settings = QUICK if args.quick else DEFAULT
    names = args.cases or (["small"] if args.quick else ["small", "paper"])
    chosen = [(CASES[n], LARGE if n == "resnet18" else settings) for n in names]
    if args.large and "resnet18" not in names:
        chosen.append((CASES["resnet18"], LARGE))
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small case, one rank: about a minute")
    parser.add_argument("--large", action="store_true",
                        help="add the ResNet-18-stages case (about 5 GB of float32 data; needs ~12 GB of memory)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="run these cases instead of the mode's")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="sections to leave out")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results",
                        help="output folder (default: benchmarks/results/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    results = dict(command=" ".join(["python -m benchmarks.run"] + (sys.argv[1:] if argv is None else argv)),
                   mode="quick" if args.quick else "default", machine=machine_info(), cases={})
    sections = set(SECTIONS) - set(args.skip)
    for case, settings in plan(args):
        results["cases"][case.name] = run_case(case, settings, sections)
    results["machine"]["load_end"] = os.getloadavg()[0]
    results["total_seconds"] = time.perf_counter() - start
    print(report.write(results, args.out))
    log(f"wrote {args.out / 'results.json'}, results.md, objective_vs_time.png")
    return results


if __name__ == "__main__":
    main()
