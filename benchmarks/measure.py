"""The measurements: each function runs one section of the benchmark and returns plain data.

Every solver in a section starts from the same initial factors (``cases.init_factors``).
"""
from __future__ import annotations

import jax
import numpy as np

import jaxnmf

from . import solvers
from .cases import bytes_read, floor_flops, init_factors, mu_flops
from .timing import marginal, median, ratio, round_robin, timed

FIT_CHUNK = 50  # jaxnmf.fit compiles a scan of 50 iterations: calls of 50 and of k*50 share it


def _on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def steps(blocks_dev: dict, blocks_host: dict, rank: int, repeats: int, *, sklearn_iters: int = 0) -> dict:
    """Seconds per iteration (median of ``repeats``, round-robin) of every step, the GEMM floor,
    and one read of the data (the memory-bandwidth bound of one of the floor's two passes).

    jaxnmf steps are the jitted pure steps a fit iterates (the plain two-pass steps, and the
    one-pass steps of ``fit(one_pass=True)``, on float32 blocks and on bfloat16 blocks); the
    NumPy reference is ``reference.mu_step``. With ``sklearn_iters`` (single block only) scikit-learn's MU is timed
    as whole calls of 1 and 1 + sklearn_iters iterations: its seconds per iteration is the slope,
    its fixed cost per call (validation, final loss) the intercept.
    """
    F0, W0 = init_factors(blocks_host, rank)
    dev, host = list(blocks_dev.values()), list(blocks_host.values())
    fns = {name: solvers.jax_step(step, dev, F0, W0) for name, step in solvers.jax_steps().items()}
    fns.update(solvers.jax_one_pass_steps(dev, F0, W0))
    fns["NumPy reference MU"] = solvers.reference_step(host, F0, W0)
    fns["GEMM floor (JAX)"] = solvers.floor_jax(dev, F0, W0)
    fns["GEMM floor (NumPy)"] = solvers.floor_numpy(host, F0, W0)
    fns["one data pass (JAX)"] = solvers.data_pass(dev)
    if sklearn_iters:
        fns["sklearn short"] = solvers.sklearn_mu(host[0], F0, W0[0], 1)
        fns["sklearn long"] = solvers.sklearn_mu(host[0], F0, W0[0], 1 + sklearn_iters)
    samples = round_robin(fns, repeats)[0]

    rows, n = [x.shape[0] for x in host], host[0].shape[1]
    out = {}
    for name, times in samples.items():
        if name.startswith("sklearn"):
            continue
        seconds = median(times)
        if name == "one data pass (JAX)":
            out[name] = dict(seconds=seconds, gb_per_s=bytes_read(rows, n) / 2 / seconds / 1e9, samples=times)
            continue
        flops = floor_flops(rows, n, rank) if name.startswith("GEMM floor") else mu_flops(rows, n, rank)
        out[name] = dict(seconds=seconds, gflops=flops / seconds / 1e9, samples=times)
        if _on_gpu() and (name.startswith("jaxnmf") or name == "GEMM floor (JAX)"):
            passes = 1 if "one pass" in name else 2
            width = 2 if "bfloat16" in name else 4
            out[name]["gb_per_s"] = bytes_read(rows, n) * passes * width / 8 / seconds / 1e9
    if sklearn_iters:
        short, long = samples["sklearn short"], samples["sklearn long"]
        per_iter, fixed = marginal(median(short), 1, median(long), 1 + sklearn_iters)
        out["scikit-learn MU"] = dict(seconds=per_iter, fixed_seconds=fixed, samples_short=short, samples_long=long,
                                      gflops=ratio(mu_flops(rows, n, rank) / 1e9, per_iter))
    return out


def restarts(blocks_dev: dict, blocks_host: dict, rank: int, n_restarts: int, iters: int, repeats: int,
             budget: float) -> dict:
    """Restarts under ``vmap`` against the same number run one after another.

    Whole fits: ``fit(n_restarts=n, init="random")`` against n calls ``fit(init="random")``, each
    ``iters`` iterations, after a warm-up call of each; ``repeats`` rounds within ``budget``
    seconds (at least one). Per iteration: the jitted MU step of n states under ``vmap``
    against n times the single step (the long-fit limit, fixed costs left out).
    """
    dev = list(blocks_dev.values())
    fits = {"vmap": solvers.jaxnmf_fit(dev, rank, iters, n_restarts=n_restarts)}
    fits.update({f"single {i}": solvers.jaxnmf_fit(dev, rank, iters, seed=i) for i in range(n_restarts)})
    timed(fits["vmap"])  # compiles the program of n restarts
    timed(fits["single 0"])  # compiles the program of one, which the other single fits share
    fit_samples = round_robin(fits, repeats, budget=budget, warmup=False)[0]
    t_together = median(fit_samples.pop("vmap"))
    t_apart = [median(v) for v in fit_samples.values()]

    inits = [init_factors(blocks_host, rank, seed=1 + i) for i in range(n_restarts)]
    samples = round_robin({"vmap": solvers.jax_vmap_step(jaxnmf.mu_step, dev, inits),
                           "single": solvers.jax_step(jaxnmf.mu_step, dev, *inits[0])}, repeats)[0]
    step_vmap, step_single = median(samples["vmap"]), median(samples["single"])
    return dict(rank=rank, n_restarts=n_restarts, iters=iters, fit_vmap_seconds=t_together, fit_single_seconds=t_apart,
                fit_ratio=t_together / sum(t_apart), step_vmap_seconds=step_vmap, step_single_seconds=step_single,
                step_ratio=step_vmap / (n_restarts * step_single))


def fit_trace(blocks_dev: dict, init: tuple, solver: str, iters: int, repeats: int,
              alongside: dict | None = None) -> dict:
    """Objective against time of ``jaxnmf.fit`` for ``iters`` (>= 2 FIT_CHUNK) iterations, tol=0.

    The objective is the per-iteration trace (``.losses``) of one call of ``iters`` iterations.
    The time axis is t_i = fixed + i * per_iter, the line through the median times of calls of
    FIT_CHUNK and 2 FIT_CHUNK iterations (``repeats`` rounds), after a warm-up call that compiles
    the program all these calls share. ``alongside``: other calls (one iteration of another
    solver, the GEMM floor) timed in the same rounds, so that the fit's seconds per iteration is
    compared with them under the same load.
    """
    dev, rank = list(blocks_dev.values()), init[0].shape[0]
    calls = {"short": solvers.jaxnmf_fit(dev, rank, FIT_CHUNK, solver=solver, init=init),
             "double": solvers.jaxnmf_fit(dev, rank, 2 * FIT_CHUNK, solver=solver, init=init), **(alongside or {})}
    for name in ["short", *(alongside or {})]:
        timed(calls[name])  # compile
    samples, outputs = round_robin(calls, repeats, warmup=False)
    t_short, t_double = median(samples.pop("short")), median(samples.pop("double"))
    per_iter, fixed = marginal(t_short, FIT_CHUNK, t_double, 2 * FIT_CHUNK)
    if iters == 2 * FIT_CHUNK:
        t_full, result = t_double, outputs["double"]
    else:
        t_full, result = timed(solvers.jaxnmf_fit(dev, rank, iters, solver=solver, init=init))
    losses = [float(v) for v in np.asarray(result.losses)]
    return dict(iterations=list(range(1, len(losses) + 1)), times=[fixed + i * per_iter for i in range(1, len(losses) + 1)],
                objective=losses, seconds_per_iter=per_iter, fixed_seconds=fixed, full_call_seconds=t_full,
                final_objective=float(result.loss), alongside={name: median(v) for name, v in samples.items()})


def reference_trace(blocks_dev: dict, blocks_host: dict, init: tuple, budget: float) -> dict:
    """Objective against time of the NumPy reference's MU steps, run until ``budget`` seconds.

    Only the steps are timed; the objective (explicit residuals, in JAX) is evaluated between
    them at about geometrically spaced iterations.
    """
    dev, host = list(blocks_dev.values()), list(blocks_host.values())
    F, Ws = init
    iterations, times, objective = [], [], []
    elapsed, it, next_point = 0.0, 0, 1
    while elapsed < budget:
        dt, (F, Ws) = timed(solvers.reference_step(host, F, Ws))
        elapsed, it = elapsed + dt, it + 1
        if it == next_point or elapsed >= budget:
            iterations.append(it)
            times.append(elapsed)
            objective.append(solvers.objective(dev, F, Ws))
            next_point = max(it + 1, int(it * 1.3))
    return dict(iterations=iterations, times=times, objective=objective)


def sklearn_trace(block_dev: jax.Array, block_host: np.ndarray, init: tuple, n_iter: int,
                  per_iter: float, fixed: float) -> dict:
    """Objective against time of scikit-learn's MU on one block for ``n_iter`` iterations.

    scikit-learn reports no per-iteration objective, so the iterations run as a chain of calls
    of geometrically growing length, each from the previous call's factors (MU's state is only
    (W, H): the chain computes the same iterates as one long call), the objective evaluated
    between calls. The time axis is that of one long call: fixed + i * per_iter, both measured
    in ``steps``.
    """
    F, (W,) = init
    iterations, objective, done, length = [], [], 0, 1
    while done < n_iter:
        length = min(length, n_iter - done)
        W, F = solvers.sklearn_mu(block_host, F, W, length)()
        done += length
        iterations.append(done)
        objective.append(solvers.objective([block_dev], F, [W]))
        length *= 2
    return dict(iterations=iterations, times=[fixed + i * per_iter for i in iterations], objective=objective,
                seconds_per_iter=per_iter, fixed_seconds=fixed)


def hals_target(mu: dict, hals: dict) -> dict:
    """Time for HALS to reach the objective MU has after its last iteration, against MU's time,
    both on their fit's time axis (``fit_trace``). When HALS never gets there, its time for all
    its iterations is a lower bound."""
    target, t_mu = mu["objective"][-1], mu["times"][-1]
    reached = [i for i, j in enumerate(hals["objective"]) if j <= target]
    i = reached[0] if reached else -1
    return dict(target_objective=target, mu_iterations=len(mu["objective"]), mu_seconds=t_mu, reached=bool(reached),
                hals_iterations=hals["iterations"][i], hals_seconds=hals["times"][i], ratio=hals["times"][i] / t_mu)
