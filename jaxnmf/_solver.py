"""Coupled non-negative matrix factorisation with multiplicative updates, in JAX.

The objective (paper Eq. 3.1, with the weights and penalties this library adds):

    J(F, W) = sum_b w_b ||X_b - W_b F||_F^2
              + l2_F ||F||_F^2 + sum_b l2_b ||W_b||_F^2
              + 2 l1_F sum(F) + 2 sum_b l1_b sum(W_b)
              + 2 sum_k sum_g group_F_g ||F[k, g]||_2

X_b: (rows_b, N) data blocks (pixels of one channel, or one layer's activations), W_b: (rows_b, d)
block factors, F: (d, N) the example factor shared by every block, g the example groups of the
group-sparse penalty (the whole row of F when no groups are given), group_F_g its weight per group
(``fit`` maps its user-facing penalties to these raw values, see ``fit``'s ``penalty_units``).

One step (paper Eq. 3.2, Gauss-Seidel: F first, then every W_b with the new F):

    F   <- F   * (sum_b w_b W_b^T X_b) / (sum_b w_b W_b^T W_b F + l2_F F + l1_F + group_F_g F / ||F[k, g]||)
    W_b <- W_b * (w_b X_b F^T) / (w_b W_b F F^T + l2_b W_b + l1_b)

Each update is the minimiser of a separable quadratic majoriser of J (Lee & Seung; the group
norm is majorised by ||f|| <= ||f||^2 / (2 ||f_t||) + ||f_t|| / 2), so J never increases.
Denominators are floored at the dtype's smallest normal number, which only turns 0/0 into 0.
With ``unit_columns`` (the authors' code) every column of every W_b is rescaled to a fixed L2
norm after its update, F untouched: J can then rise.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST
_EXACT_SVD_MAX_SIZE = 1_000_000  # stacked matrices up to this many entries get an exact SVD at init


class MUState(NamedTuple):
    """Factors of a coupled NMF. F: (d, N); factors: one W_b (rows_b, d) per block."""

    F: jax.Array
    factors: tuple[jax.Array, ...]


class Params(NamedTuple):
    """Weights and penalties of J, as arrays so that new values never recompile.

    weights, l2, l1: (B,) per block; l2_F, l1_F: () scalars; group_F: (n_groups,) the weight of
    each example group's norm ((1,) when the groups are the rows of F); data_scale: (B,) the
    step factorises X_b / data_scale_b (``fit`` uses it to keep any data range in floating
    point; 1 otherwise); column_norm: (B,) the column norm kept by ``unit_columns``.
    """

    weights: jax.Array
    l2: jax.Array
    l1: jax.Array
    l2_F: jax.Array
    l1_F: jax.Array
    group_F: jax.Array
    data_scale: jax.Array
    column_norm: jax.Array


def make_params(n_blocks: int, *, weights=None, l2=0.0, l1=0.0, l2_F=0.0, l1_F=0.0, group_F=0.0,
                data_scale=1.0, column_norm=1.0, dtype=jnp.float32) -> Params:
    """Build ``Params`` from numbers (scalars broadcast to every block; a scalar ``group_F`` is one
    weight, (1,), for every group, else one per example group)."""
    vec = lambda v: jnp.broadcast_to(jnp.asarray(v, dtype), (n_blocks,))
    sca = lambda v: jnp.asarray(v, dtype)
    return Params(vec(1.0 if weights is None else weights), vec(l2), vec(l1), sca(l2_F), sca(l1_F),
                  jnp.atleast_1d(jnp.asarray(group_F, dtype)), vec(data_scale), vec(column_norm))


def _dot(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST, preferred_element_type=jnp.promote_types(a.dtype, b.dtype))


def _group_norms(F: jax.Array, groups: jax.Array | None, n_groups: int) -> jax.Array:
    """||F[k, g]||_2 per factor and group: (d, n_groups), or (d, 1) when the groups are rows of F."""
    if groups is None:
        return jnp.sqrt(jnp.sum(F * F, axis=1, keepdims=True))
    return jnp.sqrt(jax.ops.segment_sum((F * F).T, groups, num_segments=n_groups)).T


def _floor(x: jax.Array) -> jax.Array:
    return jnp.maximum(x, jnp.finfo(x.dtype).tiny)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["bits"], meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class NarrowBlock:
    """A block (rows, N) held in a 16-bit float dtype (bfloat16, float16), stored as its bit
    pattern ``bits`` (uint16). XLA's CPU backend cannot slice a bfloat16 array: it would convert
    the whole block to float32 first (a full-size copy each call), so tiles are cut from the bits
    and converted one by one (``row_slice``, ``fold_row_tiles``)."""

    bits: jax.Array
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    def astype(self, dtype) -> jax.Array:
        """The values as ``dtype``: a full-size array, for tiles and small blocks only."""
        return lax.bitcast_convert_type(self.bits, self.dtype).astype(dtype)


def pack_narrow(x: jax.Array, dtype) -> NarrowBlock:
    """``x`` rounded to the 16-bit float ``dtype``, as a ``NarrowBlock``."""
    return NarrowBlock(lax.bitcast_convert_type(x.astype(dtype), jnp.uint16), np.dtype(dtype))


def row_slice(x, start, size: int):
    """Rows [start, start + size) of a block (a JAX array or a ``NarrowBlock``); ``size`` static."""
    if isinstance(x, NarrowBlock):
        return NarrowBlock(lax.dynamic_slice_in_dim(x.bits, start, size), x.dtype)
    return lax.dynamic_slice_in_dim(x, start, size)


TILE_BYTES = 8 << 20  # tiles of the explicit residuals, device statistics and narrow-block products: 8 MB was
#                       as fast as 32 MB on the paper-like case, with a quarter of the temporaries


def tile_rows(x, itemsize: int, tile_bytes: int = TILE_BYTES) -> int:
    """Rows per tile of block x (rows, N) so that a tile of ``itemsize``-byte entries is about ``tile_bytes``."""
    return int(max(1, min(x.shape[0], tile_bytes // (itemsize * x.shape[1]))))


def fold_row_tiles(x, tile: int, fn, init):
    """acc = fn(start, rows [start, start + size) of x, acc) over the row tiles of block x, in order.

    Full tiles run under ``fori_loop`` (one compiled body), the last, shorter tile after it; the
    tile passed to ``fn`` has the block's type (convert it with ``.astype``)."""
    rows = x.shape[0]
    n_full = rows // tile
    acc = lax.fori_loop(0, n_full, lambda i, acc: fn(i * tile, row_slice(x, i * tile, tile), acc), init)
    if n_full * tile < rows:
        acc = fn(n_full * tile, row_slice(x, n_full * tile, rows - n_full * tile), acc)
    return acc


def factor_statistics(blocks: Sequence[jax.Array], factors: Sequence[jax.Array], params: Params
                      ) -> tuple[jax.Array, jax.Array]:
    """What the F update needs from the data, one pass: R = sum_b (w_b / s_b) W_b^T X_b (d, N) and
    G = sum_b w_b W_b^T W_b (d, d); a ``NarrowBlock`` is read tile by tile."""
    R, G = 0, 0
    for b, (x, w) in enumerate(zip(blocks, factors)):
        R = R + (params.weights[b] / params.data_scale[b]) * _t_times(x, w).T
        G = G + params.weights[b] * _dot(w.T, w)
    return R, G


def mu_update_F_from(F: jax.Array, R: jax.Array, G: jax.Array, params: Params, groups: jax.Array | None = None,
                     n_groups: int = 1) -> jax.Array:
    """Eq. 3.2, first line, given R = sum_b w_b W_b^T X_b (d, N) and G = sum_b w_b W_b^T W_b (d, d)."""
    den = _dot(G, F) + params.l2_F * F + params.l1_F
    norms = _group_norms(F, groups, n_groups)
    if groups is None:
        den = den + params.group_F[None, :] * F / _floor(norms)
    else:
        den = den + params.group_F[groups][None, :] * F / _floor(norms[:, groups])
    return F * R / _floor(den)


def update_F(blocks: Sequence[jax.Array], F: jax.Array, factors: Sequence[jax.Array], params: Params,
             groups: jax.Array | None = None, n_groups: int = 1) -> jax.Array:
    """One multiplicative update of F (d, N) with the block factors held fixed (Eq. 3.2, first line)."""
    R, G = factor_statistics(blocks, factors, params)
    return mu_update_F_from(F, R, G, params, groups, n_groups)


def mu_update_rows(w: jax.Array, xft: jax.Array, FFt: jax.Array, weight, l2, l1) -> jax.Array:
    """Eq. 3.2 for rows of one W_b (rows, d), given their X F^T / s_b (rows, d) and F F^T (d, d):
    W <- W * (w_b X F^T) / (w_b W F F^T + l2_b W + l1_b). Rows are independent."""
    return w * (weight * xft) / _floor(weight * _dot(w, FFt) + l2 * w + l1)


def _update_factor(x, w, F, FFt, b, params, unit_columns):
    """W_b update with its X_b F^T (rows_b, d), returned for the cheap objective."""
    xft = _dot(x.astype(F.dtype), F.T) / params.data_scale[b]
    w = mu_update_rows(w, xft, FFt, params.weights[b], params.l2[b], params.l1[b])
    if unit_columns:
        norms = jnp.sqrt(jnp.sum(w * w, axis=0, keepdims=True))
        w = w * (params.column_norm[b] / _floor(norms))
    return w, xft


def _penalties(F, factors, params, groups, n_groups):
    """The penalty terms of J at (F, factors)."""
    pen = params.l2_F * jnp.sum(F * F) + 2 * params.l1_F * jnp.sum(F)
    pen = pen + 2 * jnp.sum(_group_norms(F, groups, n_groups) * params.group_F[None, :])
    for b, w in enumerate(factors):
        pen = pen + params.l2[b] * jnp.sum(w * w) + 2 * params.l1[b] * jnp.sum(w)
    return pen


def mu_step(blocks: Sequence[jax.Array], state: MUState, params: Params, data_sq_norms: jax.Array | None = None,
            *, unit_columns: bool = False, groups: jax.Array | None = None, n_groups: int = 1
            ) -> tuple[MUState, jax.Array]:
    """One coupled multiplicative-update step; pure, usable under ``jit``, ``lax.scan`` and ``vmap``.

    Args:
      blocks: B arrays X_b (rows_b, N), non-negative.
      state: current factors, F (d, N) and W_b (rows_b, d).
      params: weights and penalties (see ``make_params``).
      data_sq_norms: (B,) ||X_b / data_scale||_F^2; computed here (one extra pass) when None.
      unit_columns: rescale the columns of every W_b to ``params.column_norm`` (authors' code).
      groups, n_groups: example groups of the group-sparse penalty, (N,) ints in [0, n_groups),
        or None for groups = rows of F.
    Returns:
      the new state and J at the new state (Eq. 3.1 with penalties), computed from the products
      the updates already formed: ||X - WF||^2 = ||X||^2 - 2 <W, X F^T> + <W^T W, F F^T>.
    """
    F = update_F(blocks, state.F, state.factors, params, groups, n_groups)
    FFt = _dot(F, F.T)
    if data_sq_norms is None:
        data_sq_norms = jnp.stack([jnp.sum(jnp.square(x.astype(F.dtype) / params.data_scale[b]))
                                   for b, x in enumerate(blocks)])
    factors, fit = [], jnp.zeros((), F.dtype)
    for b, (x, w) in enumerate(zip(blocks, state.factors)):
        w, xft = _update_factor(x, w, F, FFt, b, params, unit_columns)
        factors.append(w)
        fit = fit + params.weights[b] * (data_sq_norms[b] - 2 * jnp.sum(w * xft) + jnp.sum(_dot(w.T, w) * FFt))
    factors = tuple(factors)
    return MUState(F, factors), fit + _penalties(F, factors, params, groups, n_groups)


def _residual_sq(x, w: jax.Array, F: jax.Array, data_scale: jax.Array) -> jax.Array:
    """||X / data_scale - W F||_F^2 over tiles of contiguous rows, so no (rows, N) temporary is formed."""
    tile = tile_rows(x, F.dtype.itemsize)

    def tile_sq(start, x_t, acc):
        r = x_t.astype(F.dtype) / data_scale - _dot(lax.dynamic_slice_in_dim(w, start, x_t.shape[0]), F)
        return acc + jnp.sum(r * r)

    return fold_row_tiles(x, tile, tile_sq, jnp.zeros((), F.dtype))


def objective(blocks: Sequence[jax.Array], F: jax.Array, factors: Sequence[jax.Array], params: Params,
              groups: jax.Array | None = None, n_groups: int = 1) -> jax.Array:
    """J(F, W) of Eq. 3.1 with the weights and penalties in ``params``, by explicit residuals."""
    fit = sum(params.weights[b] * _residual_sq(x, w, F, params.data_scale[b])
              for b, (x, w) in enumerate(zip(blocks, factors)))
    return fit + _penalties(F, tuple(factors), params, groups, n_groups)


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
         exact_checks: bool = True):
    """``length`` (a multiple of ``check_every``) iterations of ``step_fn`` under ``lax.scan``.

    ``step_fn``: ``mu_step`` or any step with its signature and contract (``_hals.hals_step``).

    Iterations past ``max_iter``, after convergence or after a non-finite step leave the carry
    unchanged. Every ``check_every`` iterations J is evaluated from explicit residuals (the
    per-step J, from the updates' products, loses digits to cancellation in float32) and the fit
    has converged when it decreased by less than ``tol`` relative to the previous check.
    ``exact_checks=False`` (for ``tol = 0``) skips those evaluations.
    Returns (carry, per-iteration J of shape (length,)).
    """

    def step(c: _Carry, t):
        active = (~c.converged) & c.finite & (t < max_iter)
        state, loss = step_fn(blocks, c.state, params, sq_norms, unit_columns=unit_columns,
                              groups=groups, n_groups=n_groups)
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
                                             "exact_checks"), donate_argnames=("carry",))
def _run_restarts(blocks, carry, params, sq_norms, tol, max_iter, start, groups, *, length, check_every,
                  unit_columns, n_groups, step_fn=mu_step, exact_checks=True):
    """``_run`` under ``vmap`` over restarts (the leading axis of ``carry``, donated); data shared.
    ``step_fn`` (static): the step, ``mu_step`` or ``_hals.hals_step``.

    A single restart runs without ``vmap``: a size-1 batch axis made ``fit`` on the benchmark's
    paper-like case about 40% slower per iteration on the CPU (0.30 s against 0.21 s)."""
    run = functools.partial(_run, length=length, check_every=check_every, unit_columns=unit_columns,
                            n_groups=n_groups, step_fn=step_fn, exact_checks=exact_checks)
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


@functools.partial(jax.jit, static_argnames=("length", "check_every", "n_groups"))
def _run_transform(blocks, F, factors, params, tol, groups, *, length, check_every, n_groups):
    """MU on F only (W_b fixed), a convex problem: NNLS per column, coupling the columns of a group when
    the group penalty is on. Returns (F, n_iter)."""

    def body(c, _):
        F, prev, n, done = c
        F_new = update_F(blocks, F, factors, params, groups, n_groups)
        F = jnp.where(done, F, F_new)
        n = n + (~done).astype(jnp.int32)
        check = (~done) & (n % check_every == 0)
        change = jnp.linalg.norm(F - prev) / jnp.maximum(jnp.linalg.norm(prev), jnp.finfo(F.dtype).tiny)
        done = done | (check & (tol > 0) & (change < tol))
        prev = jnp.where(check, F, prev)
        return (F, prev, n, done), None

    (F, _, n, _), _ = lax.scan(body, (F, F, jnp.zeros((), jnp.int32), jnp.zeros((), bool)), None, length=length)
    return F, n


# ---------------------------------------------------------------------------------------------
# Initialisation (in the units of the scaled problem X_b / data_scale)
# ---------------------------------------------------------------------------------------------

def _times(x, M: jax.Array) -> jax.Array:
    """X M (rows, k) for a block X (rows, N); a ``NarrowBlock`` tile by tile (no full-size copy)."""
    if not isinstance(x, NarrowBlock):
        return _dot(x.astype(M.dtype), M)
    tile = tile_rows(x, M.dtype.itemsize)
    out = jnp.zeros((x.shape[0], M.shape[1]), M.dtype)
    return fold_row_tiles(x, tile, lambda start, x_t, out: lax.dynamic_update_slice_in_dim(
        out, _dot(x_t.astype(M.dtype), M), start, 0), out)


def _t_times(x, Q: jax.Array) -> jax.Array:
    """X^T Q (N, k) for a block X (rows, N) and Q (rows, k); a ``NarrowBlock`` tile by tile."""
    if not isinstance(x, NarrowBlock):
        return _dot(x.astype(Q.dtype).T, Q)
    tile = tile_rows(x, Q.dtype.itemsize)
    return fold_row_tiles(x, tile, lambda start, x_t, acc: acc + _dot(
        x_t.astype(Q.dtype).T, lax.dynamic_slice_in_dim(Q, start, x_t.shape[0])),
        jnp.zeros((x.shape[1], Q.shape[1]), Q.dtype))


def _truncated_svd(blocks, coefs, rank, key, dtype):
    """Top-``rank`` SVD of the stacked matrix [c_b X_b] (M, N): exact when small, else randomised
    (Halko et al. 2011: oversampling 10, four power iterations), one block at a time."""
    rows = [x.shape[0] for x in blocks]
    m, n = sum(rows), blocks[0].shape[1]
    if m * n <= _EXACT_SVD_MAX_SIZE:
        y = jnp.concatenate([c * x.astype(dtype) for c, x in zip(coefs, blocks)], axis=0)
        u, s, vt = jnp.linalg.svd(y, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    k = min(rank + 10, m, n)
    split = lambda q: jnp.split(q, np.cumsum(rows)[:-1], axis=0)
    q, _ = jnp.linalg.qr(jnp.concatenate([c * _times(x, jax.random.normal(key, (n, k), dtype))
                                          for c, x in zip(coefs, blocks)], axis=0))
    for _ in range(4):
        z, _ = jnp.linalg.qr(sum(c * _t_times(x, qb) for c, x, qb in zip(coefs, blocks, split(q))))
        q, _ = jnp.linalg.qr(jnp.concatenate([c * _times(x, z) for c, x in zip(coefs, blocks)], axis=0))
    small = sum(c * _t_times(x, qb).T for c, x, qb in zip(coefs, blocks, split(q)))  # (k, N)
    ub, s, vt = jnp.linalg.svd(small, full_matrices=False)
    return _dot(q, ub)[:, :rank], s[:rank], vt[:rank]


def _nndsvd(u, s, vt):
    """NNDSVD (Boutsidis & Gallopoulos 2008) from X ~ U diag(s) V^T: W (M, r), H (r, N).

    Each singular pair keeps the dominant of its positive and negative parts, so the result does
    not depend on the SVD's sign convention."""
    tiny = jnp.finfo(u.dtype).tiny
    up, un, vp, vn = jnp.maximum(u, 0), jnp.maximum(-u, 0), jnp.maximum(vt, 0), jnp.maximum(-vt, 0)
    nup, nun = jnp.linalg.norm(up, axis=0), jnp.linalg.norm(un, axis=0)
    nvp, nvn = jnp.linalg.norm(vp, axis=1), jnp.linalg.norm(vn, axis=1)
    pos = (nup * nvp >= nun * nvn)
    sigma = jnp.where(pos, nup * nvp, nun * nvn)
    uu = jnp.where(pos[None, :], up / jnp.maximum(nup, tiny)[None, :], un / jnp.maximum(nun, tiny)[None, :])
    vv = jnp.where(pos[:, None], vp / jnp.maximum(nvp, tiny)[:, None], vn / jnp.maximum(nvn, tiny)[:, None])
    lam = jnp.sqrt(s * sigma)
    return uu * lam[None, :], vv * lam[:, None]


def init_nndsvd(blocks, weights, data_scale, means, rank, key, *, fill_zeros, dtype) -> MUState:
    """NNDSVD of the weighted stacked matrix [sqrt(w_b) X_b / s_b]; W_b = its rows / sqrt(w_b).

    ``fill_zeros`` (NNDSVDa) replaces the exact zeros, which MU could never move, by
    sqrt(mean / rank) of the stacked matrix: the scale of a random init, so that the init is the
    same (up to a scalar balance between W and F) whatever the scale of the data."""
    weights = np.maximum(weights, 1e-12)  # a block of negligible weight still gets a usable init
    coefs = [float(np.sqrt(w) / s) for w, s in zip(weights, data_scale)]
    u, s, vt = _truncated_svd(blocks, coefs, rank, key, dtype)
    w_stack, F = _nndsvd(u, s, vt)
    rows = [x.shape[0] for x in blocks]
    if fill_zeros:
        avg = np.sqrt(sum(np.sqrt(w) * m * r for w, m, r in zip(weights, means, rows)) / sum(rows) / rank)
        w_stack = jnp.where(w_stack > 0, w_stack, avg)
        F = jnp.where(F > 0, F, avg)
    parts = jnp.split(w_stack, np.cumsum(rows)[:-1], axis=0)
    return MUState(F.astype(dtype), tuple((p / np.sqrt(w)).astype(dtype) for p, w in zip(parts, weights)))


def init_random(key, n_examples, rows, means, rank, *, dtype) -> MUState:
    """Scaled half-normal factors: F ~ sqrt(mean/d) |N(0,1)|, W_b ~ sqrt(mean_b/d) |N(0,1)|,
    with means of the scaled blocks (scikit-learn's rule, per block)."""
    keys = jax.random.split(key, len(rows) + 1)
    total = sum(m * r for m, r in zip(means, rows)) / sum(rows)
    F = jnp.sqrt(total / rank) * jnp.abs(jax.random.normal(keys[0], (rank, n_examples), dtype))
    Ws = tuple(jnp.sqrt(m / rank) * jnp.abs(jax.random.normal(k, (r, rank), dtype))
               for k, r, m in zip(keys[1:], rows, means))
    return MUState(F.astype(dtype), tuple(w.astype(dtype) for w in Ws))


@functools.partial(jax.jit, static_argnames=("n_groups",))
def _balance_coefficients(state: MUState, params: Params, groups: jax.Array | None, n_groups: int):
    """Per component k (d,) of the penalty terms' coefficients under F_k -> c F_k, W_bk -> W_bk / c:
    (A2, A1, B2, B1) with penalties(c) = A2 c^2 + A1 c + B2 / c^2 + B1 / c (see ``balance``)."""
    F = state.F
    A2 = params.l2_F * jnp.sum(F * F, axis=1)
    group = jnp.sum(_group_norms(F, groups, n_groups) * params.group_F[None, :], axis=1)
    A1 = 2 * params.l1_F * jnp.sum(F, axis=1) + 2 * group
    B2 = sum(params.l2[b] * jnp.sum(w * w, axis=0) for b, w in enumerate(state.factors))
    B1 = sum(2 * params.l1[b] * jnp.sum(w, axis=0) for b, w in enumerate(state.factors))
    return A2, A1, B2, B1


def balance_scales(A2, A1, B2, B1) -> np.ndarray:
    """argmin_{c > 0} A2 c^2 + A1 c + B2 / c^2 + B1 / c, elementwise (float64 NumPy, any shape).

    The function is strictly convex in c where both sides are penalised (A2 + A1 > 0 and
    B2 + B1 > 0), so its derivative times c^3, p(c) = 2 A2 c^4 + A1 c^3 - B1 c - 2 B2, changes sign
    once; c is found by bisection on log c in [-100, 100] (80 halvings). c = 1 elsewhere: a side
    without penalty gives no finite minimiser."""
    A2, A1, B2, B1 = (np.asarray(a, np.float64) for a in (A2, A1, B2, B1))
    ok = (A2 + A1 > 0) & (B2 + B1 > 0)
    lo, hi = np.full(A2.shape, -100.0), np.full(A2.shape, 100.0)
    for _ in range(80):
        t = (lo + hi) / 2
        c = np.exp(t)
        rising = 2 * A2 * c ** 4 + A1 * c ** 3 - B1 * c - 2 * B2 > 0
        hi, lo = np.where(rising, t, hi), np.where(rising, lo, t)
    return np.where(ok, np.exp((lo + hi) / 2), 1.0)


def balance(states: MUState, params: Params, groups: jax.Array | None, n_groups: int) -> MUState:
    """Rescale every component between F and the W_b so that the penalties are smallest.

    For each restart (leading axis of ``states``) and component k, F_k -> c_k F_k and
    W_b[:, k] -> W_b[:, k] / c_k for every block leave every product W_b F, hence the fit term of
    J, unchanged; c_k = ``balance_scales`` minimises the penalties over that rescaling, so J never
    rises. Without it a component's fate under a group penalty depends on how the initialisation
    happened to split its scale between W and F, which ignores the penalties."""
    coefs = jax.vmap(_balance_coefficients, in_axes=(0, None, None, None))(states, params, groups, n_groups)
    c = jnp.asarray(balance_scales(*jax.device_get(coefs)), states.F.dtype)  # (R, d)
    return MUState(states.F * c[:, :, None], tuple(w / c[:, None, :] for w in states.factors))


@jax.jit
def relative_errors(blocks, state: MUState, data_scale, sq_norms) -> jax.Array:
    """||X_b - W_b F||_F / ||X_b||_F per block (B,) by explicit residuals (absolute when X_b = 0)."""
    r2 = jnp.stack([_residual_sq(x, w, state.F, s) for x, w, s in zip(blocks, state.factors, data_scale)])
    return jnp.sqrt(r2 / jnp.where(sq_norms > 0, sq_norms, 1))
