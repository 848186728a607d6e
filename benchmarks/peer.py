"""jaxnmf against the peer a user would pick instead, on the coupled problem itself: scikit-learn's
coordinate-descent NMF (issue 14).

    python -m benchmarks.peer [--cases small] [--rank 20] [--n N] [--quick] [--out DIR]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.peer --cases paper --n 3000

The problem. With unit weights and no penalties the coupled objective J = sum_b ||X_b - W_b F||^2
is one Frobenius fit of the blocks stacked by rows, X (M x N, M = sum_b rows_b), by W_stack F
(W_stack the W_b stacked, M x d). scikit-learn factorises X_sk (n_samples, n_features) ~ W H: it
gets X_sk = X^T (N x M, a transposed view, no copy), W = F^T and H = W_stack^T, so that it minimises
0.5 ||X^T - F^T W_stack^T||^2 = J / 2, and, as jaxnmf, updates F first, then the W_b. jaxnmf.fit
gets the blocks with ``block_weights="none"`` (its default: w_b = 1) and no penalties. Both start
from the same factors (``cases.init_factors``).

Measured per case:

- scikit-learn ``NMF(solver="cd", init="custom", beta_loss="frobenius", tol=1e-4, max_iter=300)``:
  wall time of whole ``fit_transform`` calls (validation, iterations, its final reconstruction
  error), median of ``--repeats`` (fewer once they took ``--budget`` seconds; at least one); its
  iterations; its objective J_sk, by explicit residuals in float64 (``objective64``), and the
  relative difference to scikit-learn's own ``reconstruction_err_ ** 2`` (the same J).
- jaxnmf HALS and MU (``fit(tol=0)``, blocks already on the device as JAX arrays): one untimed call
  of ``--max-iter`` iterations gives the per-iteration objective trace ``.losses``; i is the first
  iteration with J <= J_sk (``first_reaching``). A call of exactly i iterations
  (``fit(max_iter=i, tol=0, check_every=1)``) is checked by explicit float64 residuals (the trace
  is accurate to about 1e-4 relative; i is raised by 2% until the check holds) and timed: the
  median of round-robin repeats together with a 1-iteration call, after a warm-up call of each that
  compiles (compilation is excluded). The 1-iteration call is the fixed cost of a call plus one
  step: validation, block statistics, the initial scaling and balancing, the final explicit
  objective and relative errors. Seconds per iteration = (t_i - t_1) / (i - 1).
- transfer: copying the NumPy blocks to the device (``jax.device_put`` of each, blocked), what a
  call from NumPy arrays adds (on a CPU a copy, unless the array is 64-byte aligned).
- ratio = jaxnmf's time to J_sk / scikit-learn's time, without and with the transfer. Target (on
  the paper-like case): at most 0.1. ``--rtol r`` makes jaxnmf's target (1 + r) J_sk instead.

Writes results.json and results.md (the table, also printed) to ``--out``, each atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import time
import warnings

import jax
import numpy as np

import jaxnmf

from .cases import CASES, Case, init_factors, make_blocks
from .report import Target, log, publish
from .timing import median, round_robin

RATIO_TARGET = 0.1  # jaxnmf's time to scikit-learn's objective / scikit-learn's time, paper-like case
SKLEARN_TOL, SKLEARN_MAX_ITER = 1e-4, 300
MAX_ITER = {"hals": 500, "mu": 2000}  # jaxnmf's trace call: iterations to look for J <= J_sk in
QUICK_MAX_ITER = {"hals": 200, "mu": 500}
_CHUNK_BYTES = 32 << 20  # objective64 works in row chunks of about this size (float64)
_BUMP = 0.02  # i grows by this share (at least 1) while the explicit J of i iterations is above J_sk
_BUMPS = 10


def stacked_data(case: Case) -> np.ndarray:
    """The case's blocks (``cases.make_blocks``, float32) stacked by rows into one (M, N) array;
    the blocks are its row ranges (``split_rows``), so the data is held once."""
    blocks = make_blocks(case)
    stacked = np.concatenate(list(blocks.values()), axis=0)
    blocks.clear()
    return stacked


def split_rows(stacked: np.ndarray, rows: list[int]) -> list[np.ndarray]:
    """The row ranges of ``stacked`` (M, ...) of the given sizes, as views."""
    edges = np.cumsum([0, *rows])
    return [stacked[a:b] for a, b in zip(edges[:-1], edges[1:])]


def objective64(blocks: list[np.ndarray], F, factors) -> float:
    """J = sum_b ||X_b - W_b F||^2 by explicit residuals in float64, in row chunks of about 32 MB.
    F: (d, N); factors: W_b (rows_b, d)."""
    F = np.asarray(F, np.float64)
    total = 0.0
    for x, w in zip(blocks, factors):
        w = np.asarray(w, np.float64)
        chunk = max(1, _CHUNK_BYTES // (8 * x.shape[1]))
        for start in range(0, x.shape[0], chunk):
            r = np.asarray(x[start:start + chunk], np.float64) - w[start:start + chunk] @ F
            total += float(np.vdot(r, r))
    return total


def first_reaching(losses, target: float) -> int | None:
    """The number of iterations after which the trace first has J <= target (1-based: losses[i - 1]
    is J after iteration i), or None when it never does."""
    hit = np.flatnonzero(np.asarray(losses) <= target)
    return int(hit[0]) + 1 if hit.size else None


def sklearn_cd(stacked: np.ndarray, F0: np.ndarray, W0: list[np.ndarray], *, tol: float = SKLEARN_TOL,
               max_iter: int = SKLEARN_MAX_ITER):
    """A call of scikit-learn's CD NMF of X_sk = stacked^T ~ (F^T)(W_stack^T) from (F0, W0), as a
    zero-argument function returning (F (d, N), W_stack (M, d), n_iter, its own objective
    ``reconstruction_err_ ** 2``). Each call starts from fresh copies of the initial factors
    (scikit-learn updates contiguous inputs in place)."""
    from sklearn.decomposition import NMF

    def run():
        model = NMF(n_components=F0.shape[0], solver="cd", init="custom", beta_loss="frobenius", tol=tol,
                    max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning when max_iter is reached: n_iter says so
            w = model.fit_transform(stacked.T, W=np.ascontiguousarray(F0.T),
                                    H=np.ascontiguousarray(np.concatenate(W0).T))
        return w.T, model.components_.T, int(model.n_iter_), float(model.reconstruction_err_) ** 2
    return run


def jax_fit(dev: list, rank: int, init: tuple, solver: str, max_iter: int):
    """A ``jaxnmf.fit`` call of exactly ``max_iter`` iterations (tol=0, check_every=1: no discarded
    iterations up to 50, at most ceil(max_iter / 50) - 1 beyond) from the explicit ``init``."""
    return lambda: jaxnmf.fit(dev, rank, key=jax.random.key(0), init=init, solver=solver, max_iter=max_iter,
                              tol=0, check_every=1)


def measure_sklearn(stacked, blocks, F0, W0, repeats: int, budget: float, max_iter: int) -> dict:
    """scikit-learn's time (median of the repeats), iterations and objective (float64 and its own)."""
    samples, outputs = round_robin({"sk": sklearn_cd(stacked, F0, W0, max_iter=max_iter)}, repeats, budget=budget,
                                   warmup=False)
    F, W, n_iter, own = outputs["sk"]
    j = objective64(blocks, F, split_rows(W, [x.shape[0] for x in blocks]))
    return dict(seconds=median(samples["sk"]), samples=samples["sk"], n_iter=n_iter, tol=SKLEARN_TOL,
                max_iter=max_iter, objective=j, own_objective=own, own_rel_diff=abs(own - j) / j)


def reach(dev, blocks, rank, init, solver, target, i: int, max_iter: int) -> tuple[int, float]:
    """The smallest tried i (from the trace's, raised by 2% at a time, at most ``max_iter``) whose
    call's explicit float64 J is <= target, and that J (the last one tried when none is)."""
    for _ in range(_BUMPS):
        res = jax_fit(dev, rank, init, solver, i)()  # also compiles this length for the timed calls
        j = objective64(blocks, res.F, res.factors)
        if j <= target or i >= max_iter:
            break
        i = min(max_iter, i + max(1, math.ceil(_BUMP * i)))
    return i, j


def measure_jaxnmf(dev, blocks, rank, init, solver, target, max_iter: int, repeats: int) -> dict:
    """jaxnmf's time to J <= target: the trace, the iteration that reaches it, the timed calls."""
    trace = jax_fit(dev, rank, init, solver, max_iter)().losses
    found = first_reaching(trace, target)
    i, j = reach(dev, blocks, rank, init, solver, target, found, max_iter) if found else (max_iter, None)
    samples, outputs = round_robin({"to": jax_fit(dev, rank, init, solver, i),
                                    "one": jax_fit(dev, rank, init, solver, 1)}, repeats)
    if j is None:
        j = objective64(blocks, outputs["to"].F, outputs["to"].factors)
    t_i, t_1 = median(samples["to"]), median(samples["one"])
    per_iter = (t_i - t_1) / (i - 1) if i > 1 else t_1
    return dict(iterations=i, reached=j <= target, seconds=t_i, samples=samples["to"], objective=j,
                trace_min=float(np.min(trace)), one_iteration_seconds=t_1, seconds_per_iter=per_iter,
                fixed_seconds=t_1 - per_iter)


def measure_transfer(blocks: list[np.ndarray], repeats: int) -> tuple[float, list]:
    """Median seconds to put the NumPy blocks on the device, and the device arrays (last copy)."""
    samples, outputs = round_robin({"put": lambda: [jax.device_put(x) for x in blocks]}, repeats)
    return median(samples["put"]), outputs["put"]


def measure_case(case: Case, args) -> dict:
    """Everything for one case: scikit-learn, then jaxnmf HALS and MU from the same start."""
    log(f"{case.name}: building {case.nbytes / 1e9:.2f} GB of data (N = {case.n})")
    stacked = stacked_data(case)
    blocks = split_rows(stacked, case.rows)
    F0, W0 = init_factors(dict(zip([b for b, _ in case.blocks], blocks)), args.rank)
    log(f"{case.name}: scikit-learn CD (tol {SKLEARN_TOL}, max_iter {args.sklearn_max_iter})")
    sk = measure_sklearn(stacked, blocks, F0, W0, args.repeats, args.budget, args.sklearn_max_iter)
    transfer, dev = measure_transfer(blocks, args.repeats)
    target = sk["objective"] * (1 + args.rtol)
    out = dict(n=case.n, rows=case.rows, rank=args.rank, data_bytes=case.nbytes, sklearn=sk,
               transfer_seconds=transfer, rtol=args.rtol, target=target, jaxnmf={})
    for solver in args.solvers:
        log(f"{case.name}: jaxnmf {solver.upper()} to (1 + {args.rtol:g}) J_sk = {target:.6g}")
        res = measure_jaxnmf(dev, blocks, args.rank, (F0, W0), solver, target, args.max_iter[solver], args.repeats)
        res["ratio"] = res["seconds"] / sk["seconds"]
        res["ratio_with_transfer"] = (res["seconds"] + transfer) / sk["seconds"]
        out["jaxnmf"][solver] = res
    return out


def targets(name: str, case: dict) -> list[Target]:
    """Time to scikit-learn's objective over scikit-learn's time, per jaxnmf solver (a lower bound
    when the solver never reached it)."""
    goal = "scikit-learn's objective" if not case["rtol"] else f"(1 + {case['rtol']:g}) x scikit-learn's objective"
    return [Target(f"{name}: jaxnmf {solver.upper()} time to {goal} / scikit-learn's time",
                   r["ratio"], RATIO_TARGET, lower_bound=not r["reached"]) for solver, r in case["jaxnmf"].items()]


def case_markdown(name: str, case: dict) -> list[str]:
    """The table of one case and its notes."""
    sk = case["sklearn"]
    goal = "J_sk" if not case["rtol"] else f"(1 + {case['rtol']:g}) J_sk"
    lines = [f"### {name}: N = {case['n']}, rows {case['rows']}, d = {case['rank']}, "
             f"{case['data_bytes'] / 1e6:.0f} MB float32; jaxnmf's target {goal}", "",
             "| solver | iterations | seconds | J (float64) | J / J_sk | 1-iteration call (s) | s/it | "
             "ratio to scikit-learn | with transfer |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| scikit-learn CD (tol {sk['tol']:g}, max_iter {sk['max_iter']}) | {sk['n_iter']} | "
             f"{sk['seconds']:.3f} | {sk['objective']:.6g} | 1 | | {sk['seconds'] / sk['n_iter']:.4f} | 1 | |"]
    for solver, r in case["jaxnmf"].items():
        mark = "" if r["reached"] else ">"
        lines.append(f"| jaxnmf {solver.upper()} to {goal} | {mark}{r['iterations']} | {mark}{r['seconds']:.3f} | "
                     f"{r['objective']:.6g} | {r['objective'] / sk['objective']:.6f} | "
                     f"{r['one_iteration_seconds']:.4f} | {r['seconds_per_iter']:.4f} | {mark}{r['ratio']:.3f} | "
                     f"{mark}{r['ratio_with_transfer']:.3f} |")
    stop = "max_iter" if sk["n_iter"] >= sk["max_iter"] else "its tol"
    lines += ["", f"- Transfer of the NumPy blocks to the device: {case['transfer_seconds']:.3f} s.",
              f"- scikit-learn stopped at {stop}; its own objective (reconstruction_err_^2) against J_sk: relative "
              f"difference {sk['own_rel_diff']:.1e}; samples {', '.join(f'{s:.2f}' for s in sk['samples'])} s."]
    for solver, r in case["jaxnmf"].items():
        lines.append(f"- jaxnmf {solver.upper()}: fixed cost of a call (1-iteration call - one step) "
                     f"{r['fixed_seconds']:.4f} s = {r['fixed_seconds'] / r['seconds']:.0%} of its time to {goal}"
                     + ("" if r["reached"] else f"; did not reach {goal} within {r['iterations']} iterations "
                        f"(lowest trace J {r['trace_min']:.6g} = {r['trace_min'] / sk['objective']:.5f} J_sk)") + ".")
    return lines


def markdown(results: dict) -> str:
    """All the cases' tables and the PASS/MISS lines."""
    lines = [f"## jaxnmf against scikit-learn's CD NMF on the coupled problem ({results['date']})", "",
             f"`{results['command']}`; OPENBLAS env {results['openblas_env']}; load average "
             f"{results['load_start']:.2f} -> {results['load_end']:.2f}", ""]
    for name, case in results["cases"].items():
        lines += case_markdown(name, case) + [""]
    lines += [f"- {t.name} = {'>' if t.lower_bound else ''}{t.measured:.3f} (limit {t.limit:g}, "
              f"the target is about the paper-like case): {t.verdict}"
              for name, case in results["cases"].items() for t in targets(name, case)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["small"],
                        help="cases of benchmarks.cases (default: small; paper is 1.1 GB, several minutes)")
    parser.add_argument("--n", type=int, default=None, help="examples N instead of the case's (e.g. 3000)")
    parser.add_argument("--rank", type=int, default=20, help="factors d (default: 20)")
    parser.add_argument("--solvers", nargs="+", choices=list(MAX_ITER), default=list(MAX_ITER),
                        help="jaxnmf solvers (default: hals mu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each call (default: 3; quick: 1)")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds after which scikit-learn is not repeated (default: 120)")
    parser.add_argument("--sklearn-max-iter", type=int, default=SKLEARN_MAX_ITER, help="(default: 300)")
    parser.add_argument("--max-iter", type=int, default=None,
                        help=f"jaxnmf iterations to look for J_sk in (default: {MAX_ITER}; quick: {QUICK_MAX_ITER})")
    parser.add_argument("--rtol", type=float, default=0.0,
                        help="jaxnmf's target is (1 + rtol) J_sk (default: 0, scikit-learn's objective itself)")
    parser.add_argument("--quick", action="store_true", help="one repeat, fewer jaxnmf iterations")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "peer",
                        help="output folder (default: benchmarks/results/peer/)")
    args = parser.parse_args(argv)
    limits = QUICK_MAX_ITER if args.quick else MAX_ITER
    args.max_iter = {s: args.max_iter or limits[s] for s in MAX_ITER}
    if args.quick:
        args.repeats = 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = dict(command=" ".join(["python -m benchmarks.peer"] + (sys.argv[1:] if argv is None else argv)),
                   date=time.strftime("%Y-%m-%d"), load_start=os.getloadavg()[0],
                   openblas_env={k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}, cases={})
    for name in args.cases:
        case = CASES[name] if args.n is None else dataclasses.replace(CASES[name], n=args.n)
        label = name if args.n is None else f"{name}, N={args.n}"
        results["cases"][label] = measure_case(case, args)
    results["load_end"] = os.getloadavg()[0]
    return publish(args.out, results, markdown)


if __name__ == "__main__":
    main()
