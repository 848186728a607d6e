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

Signed blocks (semi-NMF, ``signed``): a block marked signed may hold negative data and its W_b is
unconstrained (F stays >= 0). Its update is the exact minimiser over W_b (l1_b must be 0),

    W_b <- w_b X_b F^T (w_b F F^T + l2_b I)^+                       (rows_b, d), pseudo-inverse,

and, since R = sum_b w_b W_b^T X_b and G = sum_b w_b W_b^T W_b then have entries of both signs,
F takes the semi-NMF rule of Ding, Li & Jordan (2010, Theorem 2), with R = R+ - R-, G = G+ - G-
split into their positive and negative parts:

    F <- F * sqrt((R+ + G- F) / (R- + G+ F + l2_F F + l1_F + group_F_g F / ||F[k, g]||)),

the minimiser of an auxiliary function of J (the group term majorised as above), so J still never
increases. Without signed blocks R, G >= 0 and the plain rule above is used.
Denominators are floored at the dtype's smallest normal number, which only turns 0/0 into 0.
With ``unit_columns`` (the authors' code) every column of every W_b is rescaled to a fixed L2
norm after its update, F untouched: J can then rise.

This module: the state, the parameters, the MU step, J by explicit residuals. The loop is in
``_loop``, the initialisation in ``_init``, HALS in ``_hals``, how blocks are read in ``_tiles``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ._tiles import dot as _dot, fold_row_tiles, t_times, tile_rows


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



def _group_norms(F: jax.Array, groups: jax.Array | None, n_groups: int) -> jax.Array:
    """||F[k, g]||_2 per factor and group: (d, n_groups), or (d, 1) when the groups are rows of F."""
    if groups is None:
        return jnp.sqrt(jnp.sum(F * F, axis=1, keepdims=True))
    return jnp.sqrt(jax.ops.segment_sum((F * F).T, groups, num_segments=n_groups)).T


def is_signed(signed: tuple[bool, ...], b: int) -> bool:
    """Whether block b is signed, ``signed`` a tuple of bools or () for none."""
    return bool(signed) and bool(signed[b])


def _floor(x: jax.Array) -> jax.Array:
    return jnp.maximum(x, jnp.finfo(x.dtype).tiny)


def factor_statistics(blocks: Sequence[jax.Array], factors: Sequence[jax.Array], params: Params
                      ) -> tuple[jax.Array, jax.Array]:
    """What the F update needs from the data, one pass: R = sum_b (w_b / s_b) W_b^T X_b (d, N) and
    G = sum_b w_b W_b^T W_b (d, d); a ``NarrowBlock`` is read tile by tile."""
    R, G = 0, 0
    for b, (x, w) in enumerate(zip(blocks, factors)):
        R = R + (params.weights[b] / params.data_scale[b]) * t_times(x, w).T
        G = G + params.weights[b] * _dot(w.T, w)
    return R, G


def mu_update_F_from(F: jax.Array, R: jax.Array, G: jax.Array, params: Params, groups: jax.Array | None = None,
                     n_groups: int = 1, *, signed: bool = False) -> jax.Array:
    """Eq. 3.2, first line, given R = sum_b w_b W_b^T X_b (d, N) and G = sum_b w_b W_b^T W_b (d, d).
    ``signed`` (some W_b signed, so R and G have both signs): the semi-NMF rule of the module docstring."""
    den = params.l2_F * F + params.l1_F
    norms = _group_norms(F, groups, n_groups)
    if groups is None:
        den = den + params.group_F[None, :] * F / _floor(norms)
    else:
        den = den + params.group_F[groups][None, :] * F / _floor(norms[:, groups])
    if signed:
        num = jnp.maximum(R, 0) + _dot(jnp.maximum(-G, 0), F)
        ratio = num / _floor(jnp.maximum(-R, 0) + _dot(jnp.maximum(G, 0), F) + den)
        return jnp.where(F > 0, F * jnp.sqrt(ratio), 0)  # a zero stays zero (ratio may overflow where F = 0)
    return F * R / _floor(_dot(G, F) + den)


def update_F(blocks: Sequence[jax.Array], F: jax.Array, factors: Sequence[jax.Array], params: Params,
             groups: jax.Array | None = None, n_groups: int = 1, *, signed: bool = False) -> jax.Array:
    """One multiplicative update of F (d, N) with the block factors held fixed (Eq. 3.2, first line;
    the semi-NMF rule when ``signed``)."""
    R, G = factor_statistics(blocks, factors, params)
    return mu_update_F_from(F, R, G, params, groups, n_groups, signed=signed)


def mu_update_rows(w: jax.Array, xft: jax.Array, FFt: jax.Array, weight, l2, l1) -> jax.Array:
    """Eq. 3.2 for rows of one W_b (rows, d), given their X F^T / s_b (rows, d) and F F^T (d, d):
    W <- W * (w_b X F^T) / (w_b W F F^T + l2_b W + l1_b). Rows are independent."""
    return w * (weight * xft) / _floor(weight * _dot(w, FFt) + l2 * w + l1)


def least_squares_rows(w: jax.Array, xft: jax.Array, FFt: jax.Array, weight, l2, l1=None) -> jax.Array:
    """The exact minimiser over a signed W (rows, d) of w_b ||X - W F||^2 + l2_b ||W||^2, given X F^T / s_b
    (rows, d) and F F^T (d, d): W = w_b X F^T (w_b F F^T + l2_b I)^+, the pseudo-inverse by eigenvalues
    (those below d eps of the largest count as zero: the minimum-norm minimiser when F F^T is singular).
    ``w`` and ``l1`` are unused (l1 must be 0 on a signed block); the signature is ``mu_update_rows``'s."""
    d = FFt.shape[0]
    e, V = jnp.linalg.eigh(weight * FFt + l2 * jnp.eye(d, dtype=FFt.dtype))
    inverse = jnp.where(e > d * jnp.finfo(e.dtype).eps * jnp.max(e), 1 / jnp.where(e > 0, e, 1), 0)
    return _dot(_dot(weight * xft, V) * inverse[None, :], V.T)


def _update_factor(x, w, F, FFt, b, params, unit_columns, signed=False):
    """W_b update with its X_b F^T (rows_b, d), returned for the cheap objective."""
    xft = _dot(x.astype(F.dtype), F.T) / params.data_scale[b]
    rows_update = least_squares_rows if signed else mu_update_rows
    w = rows_update(w, xft, FFt, params.weights[b], params.l2[b], params.l1[b])
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
            *, unit_columns: bool = False, groups: jax.Array | None = None, n_groups: int = 1,
            signed: tuple[bool, ...] = ()) -> tuple[MUState, jax.Array]:
    """One coupled multiplicative-update step; pure, usable under ``jit``, ``lax.scan`` and ``vmap``.

    Args:
      blocks: B arrays X_b (rows_b, N), non-negative.
      state: current factors, F (d, N) and W_b (rows_b, d).
      params: weights and penalties (see ``make_params``).
      data_sq_norms: (B,) ||X_b / data_scale||_F^2; computed here (one extra pass) when None.
      unit_columns: rescale the columns of every W_b to ``params.column_norm`` (authors' code).
      groups, n_groups: example groups of the group-sparse penalty, (N,) ints in [0, n_groups),
        or None for groups = rows of F.
      signed: (B,) bools (static), the blocks whose W_b is unconstrained (semi-NMF, module
        docstring); () for none.
    Returns:
      the new state and J at the new state (Eq. 3.1 with penalties), computed from the products
      the updates already formed: ||X - WF||^2 = ||X||^2 - 2 <W, X F^T> + <W^T W, F F^T>.
    """
    F = update_F(blocks, state.F, state.factors, params, groups, n_groups, signed=any(signed))
    FFt = _dot(F, F.T)
    if data_sq_norms is None:
        data_sq_norms = jnp.stack([jnp.sum(jnp.square(x.astype(F.dtype) / params.data_scale[b]))
                                   for b, x in enumerate(blocks)])
    factors, fit = [], jnp.zeros((), F.dtype)
    for b, (x, w) in enumerate(zip(blocks, state.factors)):
        w, xft = _update_factor(x, w, F, FFt, b, params, unit_columns, is_signed(signed, b))
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



@jax.jit
def relative_errors(blocks, state: MUState, data_scale, sq_norms) -> jax.Array:
    """||X_b - W_b F||_F / ||X_b||_F per block (B,) by explicit residuals (absolute when X_b = 0)."""
    r2 = jnp.stack([_residual_sq(x, w, state.F, s) for x, w, s in zip(blocks, state.factors, data_scale)])
    return jnp.sqrt(r2 / jnp.where(sq_norms > 0, sq_norms, 1))
