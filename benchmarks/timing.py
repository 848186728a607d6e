"""Timing helpers: every timed call is blocked until its result is ready.

Two effects distort back-to-back timings of different libraries on a small CPU: worker threads of
the previous library (OpenBLAS, XLA) keep spinning for up to ~0.1 s after their work, and the
previous call evicts the data from the caches. ``round_robin`` therefore brings the machine to
the state of a fit in mid-run before each timed call.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

SETTLE_S = 0.25  # calls shorter than this are settled by a call, longer ones by a pause this long


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call of ``fn``, its (JAX or NumPy) result blocked until ready."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def round_robin(fns: Mapping[str, Callable[[], Any]], repeats: int, *, budget: float = math.inf,
                warmup: bool = True) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Timings of every function, round-robin (a, b, c, a, b, c, ...), so that load from other
    processes falls on all of them alike.

    ``repeats`` rounds, or fewer once the rounds so far took ``budget`` seconds (at least one).
    ``warmup``: one untimed call of each first (compilation); leave it to the caller when a
    function shares its compilation with another. Before each timed call, a function whose last
    call took less than SETTLE_S gets an untimed call of itself (threads and caches as in the
    previous iteration of a fit), any other a pause of SETTLE_S (other libraries' spinning
    threads go to sleep). Returns the samples and each function's last result.
    """
    last_time: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    if warmup:
        for name, fn in fns.items():
            last_time[name], outputs[name] = timed(fn)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for _ in range(repeats):
        for name, fn in fns.items():
            if last_time.get(name, math.inf) < SETTLE_S:
                timed(fn)
            else:
                time.sleep(SETTLE_S)
            last_time[name], outputs[name] = timed(fn)
            samples[name].append(last_time[name])
        if time.perf_counter() - start >= budget:
            break
    return samples, outputs


def median(samples: list[float]) -> float:
    return float(statistics.median(samples))


def marginal(short: float, n_short: int, long: float, n_long: int) -> tuple[float, float]:
    """(seconds per iteration, fixed seconds per call) from two calls of n_short < n_long
    iterations: the line through both. Timing noise can make the slope negative at toy sizes;
    it is then clamped at 0."""
    per_iter = max(0.0, (long - short) / (n_long - n_short))
    return per_iter, short - n_short * per_iter


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return None if a is None or not b else a / b
