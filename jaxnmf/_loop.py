"""The iteration loop: steps under ``lax.scan``, convergence checks, restarts under ``vmap``, and the
F-only loop of ``transform``.

A fit runs in chunks (``_fit``): each chunk is one jitted ``_run_restarts`` call of ``length``
iterations; inside it, every ``check_every`` iterations J is evaluated by explicit residuals and
the relative decrease compared with ``tol``. Iterations past ``max_iter``, after convergence or
after a non-finite step leave the state unchanged, so every restart can stop on its own.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._mu import MUState, mu_step, objective, update_F


class _Carry(NamedTuple):
    state: MUState
    loss: jax.Array  # J at ``state`` (from the step's products)
    check_loss: jax.Array  # J by explicit residuals at the last convergence check
    n_iter: jax.Array  # iterations taken
    converged: jax.Array
    finite: jax.Array  # False once a step produced a non-finite J (that step is discarded)


def _initial_carry(blocks, state, params, groups, n_groups, exact: bool = True):
    """The carry before the first step. ``exact=False`` (no convergence checks, ``tol = 0``) leaves
    out J at the start, which nothing then reads: its pass over the data is saved."""
    if exact:
        loss = objective(blocks, state.F, state.factors, params, groups, n_groups)
        finite = jnp.isfinite(loss)
    else:
        loss, finite = jnp.array(jnp.inf, state.F.dtype), jnp.array(True)
    return _Carry(state, loss, loss, jnp.zeros((), jnp.int32), jnp.zeros((), bool), finite)


def _run(blocks, carry: _Carry, params, sq_norms, tol, max_iter, start, groups, *,
         length: int, check_every: int, unit_columns: bool, n_groups: int, step_fn=mu_step,
         exact_checks: bool = True, signed: tuple[bool, ...] = ()):
    """``length`` (a multiple of ``check_every``) iterations of ``step_fn`` under ``lax.scan``.

    ``step_fn``: ``mu_step`` or any step with its signature and contract (``_hals.hals_step``).

    Iterations past ``max_iter``, after convergence or after a non-finite step leave the carry
    unchanged. Every ``check_every`` iterations J is evaluated from explicit residuals (the
    per-step J, from the updates' products, loses digits to cancellation in float32) and the fit
    has converged when it decreased by less than ``tol`` relative to the previous check.
    ``exact_checks=False`` (for ``tol = 0``) skips those evaluations. ``signed``: the step's signed blocks.
    Returns (carry, per-iteration J of shape (length,)).
    """

    def step(c: _Carry, t):
        active = (~c.converged) & c.finite & (t < max_iter)
        state, loss = step_fn(blocks, c.state, params, sq_norms, unit_columns=unit_columns,
                              groups=groups, n_groups=n_groups, signed=signed)
        ok = jnp.isfinite(loss)
        take = active & ok
        state = jax.tree.map(lambda new, old: jnp.where(take, new, old), state, c.state)
        loss = jnp.where(take, loss, c.loss)
        return c._replace(state=state, loss=loss, n_iter=c.n_iter + take.astype(jnp.int32),
                          finite=c.finite & (ok | ~active)), loss

    def check(c: _Carry, ts):
        n_before = c.n_iter
        c, losses = lax.scan(step, c, ts)
        if not exact_checks:
            return c, losses
        exact = objective(blocks, c.state.F, c.state.factors, params, groups, n_groups)
        due = (c.n_iter > n_before) & (c.n_iter % check_every == 0)
        rel = jnp.where(c.check_loss > 0, (c.check_loss - exact) / jnp.where(c.check_loss > 0, c.check_loss, 1), 0)
        converged = c.converged | (due & (tol > 0) & (rel < tol))
        return c._replace(converged=converged, check_loss=jnp.where(due, exact, c.check_loss)), losses

    ts = (start + jnp.arange(length)).reshape(length // check_every, check_every)
    carry, losses = lax.scan(check, carry, ts)
    return carry, losses.reshape(length)


@functools.partial(jax.jit, static_argnames=("length", "check_every", "unit_columns", "n_groups", "step_fn",
                                             "exact_checks", "signed"), donate_argnames=("carry",))
def _run_restarts(blocks, carry, params, sq_norms, tol, max_iter, start, groups, *, length, check_every,
                  unit_columns, n_groups, step_fn=mu_step, exact_checks=True, signed=()):
    """``_run`` under ``vmap`` over restarts (the leading axis of ``carry``, donated); data shared.
    ``step_fn`` (static): the step, ``mu_step`` or ``_hals.hals_step``.

    A single restart runs without ``vmap``: a size-1 batch axis made ``fit`` on the benchmark's
    paper-like case about 40% slower per iteration on the CPU (0.30 s against 0.21 s)."""
    run = functools.partial(_run, length=length, check_every=check_every, unit_columns=unit_columns,
                            n_groups=n_groups, step_fn=step_fn, exact_checks=exact_checks, signed=signed)
    if carry.n_iter.shape[0] == 1:
        out = run(blocks, jax.tree.map(lambda a: a[0], carry), params, sq_norms, tol, max_iter, start, groups)
        return jax.tree.map(lambda a: a[None], out)
    return jax.vmap(run, in_axes=(None, 0) + (None,) * 6)(blocks, carry, params, sq_norms, tol, max_iter, start,
                                                          groups)


@functools.partial(jax.jit, static_argnames=("n_groups", "exact"))
def _initial_carry_restarts(blocks, states, params, groups, n_groups, exact=True):
    """``_initial_carry`` of every restart (leading axis of ``states``), one after another
    (``lax.map``): J under ``vmap`` was twice as slow per restart on the CPU."""
    return lax.map(lambda s: _initial_carry(blocks, s, params, groups, n_groups, exact), states)


@functools.partial(jax.jit, static_argnames=("n_groups",))
def objective_restarts(blocks, states, params, groups, n_groups):
    """J by explicit residuals for every restart (leading axis of ``states``), one after another: (R,)."""
    return lax.map(lambda s: objective(blocks, s.F, s.factors, params, groups, n_groups), states)


@functools.partial(jax.jit, static_argnames=("length", "check_every", "n_groups", "signed"))
def _run_transform(blocks, F, factors, params, tol, groups, *, length, check_every, n_groups, signed=False):
    """MU on F only (W_b fixed), a convex problem: NNLS per column, coupling the columns of a group when
    the group penalty is on; ``signed``: some W_b are signed (the semi-NMF rule). Returns (F, n_iter)."""

    def body(c, _):
        F, prev, n, done = c
        F_new = update_F(blocks, F, factors, params, groups, n_groups, signed=signed)
        F = jnp.where(done, F, F_new)
        n = n + (~done).astype(jnp.int32)
        check = (~done) & (n % check_every == 0)
        change = jnp.linalg.norm(F - prev) / jnp.maximum(jnp.linalg.norm(prev), jnp.finfo(F.dtype).tiny)
        done = done | (check & (tol > 0) & (change < tol))
        prev = jnp.where(check, F, prev)
        return (F, prev, n, done), None

    (F, _, n, _), _ = lax.scan(body, (F, F, jnp.zeros((), jnp.int32), jnp.zeros((), bool)), None, length=length)
    return F, n
