"""The cost of one iteration as the number of examples N grows (issue 14).

    python -m benchmarks.scaling [--case small] [--rank 20] [--n 2500 5000 ...] [--repeats 7] [--quick] [--out DIR]

The blocks keep the case's rows (``small``: 3 x 256 pixels, 2048, 1024 and 64 rows, 3904 in all;
``--quick``: a quarter of each, and N = 2500, 5000, 10000); the data of every N is the first N
columns of one synthetic draw at the largest N (``cases.make_blocks``), copied to the device; the
factors are ``cases.init_factors`` at rank 20. Timed: one call of the jitted pure step a fit
iterates, ``jaxnmf.mu_step`` and ``jaxnmf.hals_step`` (``solvers.jax_step``: ||X_b||^2
precomputed, as ``fit`` passes it), round-robin, median of ``--repeats`` after a warm-up call that
compiles; each timed call is preceded by an untimed one when shorter than 0.25 s
(``timing.round_robin``). Reported per N and step: seconds per iteration, seconds per iteration
per 1,000 columns, and the normalised ratio (t_N / N) / (t_N0 / N0), N0 the smallest N: 1.0 is
linear. A point above 1.25 is flagged with what may make it super-linear: the data or F
crossing a cache level between N0 and N (sizes from /sys), or load from other processes.

Writes results.json and results.md (the table, also printed) to ``--out``, each atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

import jax
import numpy as np

import jaxnmf

from . import solvers
from .cases import CASES, Case, init_factors, make_blocks
from .report import log, publish
from .timing import median, round_robin

LINEAR_LIMIT = 1.25  # normalised ratio above which a point is flagged
NS, QUICK_NS = (2500, 5000, 10000, 20000, 40000), (2500, 5000, 10000)
QUICK_ROWS = 4  # quick mode divides every block's rows by this
STEPS = {"MU": jaxnmf.mu_step, "HALS": jaxnmf.hals_step}


def caches() -> dict[str, int]:
    """Data and unified cache sizes of CPU 0 in bytes, by level ("L1d", "L2", "L3"), from /sys
    (per instance: an L2 per core, an L3 shared); empty where /sys does not tell."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    out = {}
    for index in sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            number, unit = (size[:-1], size[-1]) if size[-1] in units else (size, "")
            out[f"L{level}{'d' if kind == 'Data' else ''}"] = int(number) * units.get(unit, 1)
    return out


def normalised(seconds: list[float], ns: list[int]) -> list[float]:
    """(t_N / N) / (t_N0 / N0) for every point, N0 the first: 1.0 where the cost grows linearly in N."""
    base = seconds[0] / ns[0]
    return [t / n / base for t, n in zip(seconds, ns)]


def reasons(n0: int, n: int, per_column: dict[str, int], cache: dict[str, int], load: float) -> list[str]:
    """Why the cost at N may grow faster than linearly from N0: a cache level that held an array at
    N0 but not at N (``per_column``: bytes per column of each array, e.g. the data and F), and the
    load from other processes."""
    out = []
    for level, size in sorted(cache.items()):
        for what, b in per_column.items():
            if b * n0 <= size < b * n:
                out.append(f"{what} ({b * n / 1e6:.1f} MB) exceeds the {level} cache ({mib(size)}) "
                           f"that held it at N = {n0}")
    if load > (os.cpu_count() or 1) / 2:
        out.append(f"load from other processes (1-minute load average {load:.2f} on {os.cpu_count()} cores)")
    return out or ["no cache level is crossed between N0 and N: timing noise or a different XLA GEMM tiling"]


def columns(full: list[np.ndarray], n: int) -> list[np.ndarray]:
    """The first n columns of every block, as contiguous NumPy arrays."""
    return [np.ascontiguousarray(x[:, :n]) for x in full]


def mib(size: int) -> str:
    """A cache size in MiB, or KiB below 1 MiB."""
    return f"{size / 2**20:g} MiB" if size >= 2**20 else f"{size / 2**10:g} KiB"


def measure(case: Case, ns: list[int], rank: int, repeats: int) -> list[dict]:
    """Seconds per step (median of ``repeats``) of every step at every N."""
    full = list(make_blocks(dataclasses.replace(case, n=max(ns))).values())
    points = []
    for n in ns:
        log(f"N = {n}: {4 * sum(case.rows) * n / 1e6:.0f} MB of data")
        host = columns(full, n)
        F0, W0 = init_factors(dict(enumerate(host)), rank)
        dev = [jax.block_until_ready(jax.device_put(x)) for x in host]
        del host
        fns = {name: solvers.jax_step(step, dev, F0, W0) for name, step in STEPS.items()}
        samples, _ = round_robin(fns, repeats)
        points.append(dict(n=n, data_bytes=4 * sum(case.rows) * n, f_bytes=4 * rank * n, load=os.getloadavg()[0],
                           samples=samples, seconds={name: median(s) for name, s in samples.items()}))
        del dev, fns
    return points


def analyse(points: list[dict], cache: dict[str, int]) -> dict:
    """Per step: seconds per 1,000 columns, normalised ratios and the flagged points with reasons."""
    ns = [p["n"] for p in points]
    per_column = {"the data": points[0]["data_bytes"] // ns[0], "F": points[0]["f_bytes"] // ns[0]}
    out = {}
    for name in STEPS:
        seconds = [p["seconds"][name] for p in points]
        ratios = normalised(seconds, ns)
        flags = [dict(n=p["n"], ratio=r, reasons=reasons(ns[0], p["n"], per_column, cache, p["load"]))
                 for p, r in zip(points, ratios) if r > LINEAR_LIMIT]
        out[name] = dict(seconds=seconds, per_1000_columns=[1000 * t / n for t, n in zip(seconds, ns)],
                         normalised=ratios, flags=flags)
    return out


def markdown(results: dict) -> str:
    """The table, the flagged points and a PASS/MISS line per step."""
    a, points = results["analysis"], results["points"]
    cache = ", ".join(f"{k} {mib(v)}" for k, v in results["caches"].items())
    lines = [f"## One iteration against N ({results['date']})", "",
             f"`{results['command']}`; rows {results['rows']} ({sum(results['rows'])}), d = {results['rank']}; "
             f"caches (CPU 0, per instance): {cache}; load average {results['load_start']:.2f} -> "
             f"{results['load_end']:.2f}; {results['total_seconds']:.0f} s in all", "",
             "| N | data MB | " + " | ".join(f"{s} s/it | {s} s/it per 1000 cols | {s} normalised" for s in STEPS)
             + " |", "|---:|---:|" + "---:|---:|---:|" * len(STEPS)]
    for i, p in enumerate(points):
        cells = [f"{a[s]['seconds'][i]:.4f} | {a[s]['per_1000_columns'][i]:.5f} | {a[s]['normalised'][i]:.2f}"
                 for s in STEPS]
        lines.append(f"| {p['n']} | {p['data_bytes'] / 1e6:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in STEPS:
        for f in a[s]["flags"]:
            lines.append(f"- FLAG {s} at N = {f['n']}: normalised {f['ratio']:.2f} > {LINEAR_LIMIT}; may be: "
                         + "; ".join(f["reasons"]))
    for s in STEPS:
        worst = max(range(1, len(points)), key=lambda i: a[s]["normalised"][i])
        r = a[s]["normalised"][worst]
        lines.append(f"- {s}: largest normalised ratio {r:.2f} at N = {points[worst]['n']} (limit {LINEAR_LIMIT}): "
                     + ("PASS" if r <= LINEAR_LIMIT else f"MISS ({r / LINEAR_LIMIT:.2f}x the limit)"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(CASES), default="small", help="whose rows (default: small)")
    parser.add_argument("--rank", type=int, default=20, help="factors d (default: 20)")
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help=f"the N, ascending (default: {' '.join(map(str, NS))}; quick: "
                             f"{' '.join(map(str, QUICK_NS))})")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per step and N (default: 15; quick: 3)")
    parser.add_argument("--quick", action="store_true", help=f"rows / {QUICK_ROWS}, N up to 10000, 3 repeats")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "scaling",
                        help="output folder (default: benchmarks/results/scaling/)")
    args = parser.parse_args(argv)
    args.n = sorted(args.n or (QUICK_NS if args.quick else NS))
    if len(args.n) < 2:
        parser.error("--n: give at least two N (the first is the reference)")
    if args.quick:
        args.repeats = 3
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    case = CASES[args.case]
    if args.quick:
        case = dataclasses.replace(case, blocks=tuple((b, max(1, r // QUICK_ROWS)) for b, r in case.blocks))
    results = dict(command=" ".join(["python -m benchmarks.scaling"] + (sys.argv[1:] if argv is None else argv)),
                   date=time.strftime("%Y-%m-%d"), case=args.case, rows=case.rows, rank=args.rank,
                   load_start=os.getloadavg()[0], caches=caches())
    results["points"] = measure(case, args.n, args.rank, args.repeats)
    results["analysis"] = analyse(results["points"], results["caches"])
    results["load_end"], results["total_seconds"] = os.getloadavg()[0], time.perf_counter() - start
    return publish(args.out, results, markdown)


if __name__ == "__main__":
    main()
