"""Coupled HALS (hierarchical alternating least squares) for the objective of ``_mu``, in JAX.

Same objective, factors and ``Params`` as the multiplicative updates (``_mu``):

    J(F, W) = sum_b w_b ||X_b - W_b F||_F^2
              + l2_F ||F||_F^2 + sum_b l2_b ||W_b||_F^2
              + 2 l1_F sum(F) + 2 sum_b l1_b sum(W_b)
              + 2 sum_k sum_g group_F_g ||F[k, g]||_2,      F >= 0, W_b >= 0,

X_b: (rows_b, N) (``X_b / data_scale_b`` in ``fit``'s internal units), W_b: (rows_b, d), F: (d, N).

HALS (Cichocki & Phan 2009; Gillis & Glineur 2012) is block coordinate descent in which a block is
one row of F or one column of one W_b; each block update is the exact minimiser of J over that
block, the others held fixed. One step, Gauss-Seidel, as MU (F first, then every W_b):

1. Rows of F, all blocks at once, from one pass over the data:
       G = sum_b w_b W_b^T W_b  (d, d),   R = sum_b w_b W_b^T X_b  (d, N).
   For k = 1..d in turn (the other rows at their latest values), J restricted to the row f_k (N,) is
       (G_kk + l2_F) ||f_k||^2 - 2 <f_k, R_k - sum_{j != k} G_kj f_j - l1_F> + 2 sum_g group_F_g ||f_k[g]||
       = a ||f_k - u||^2 + 2 sum_g group_F_g ||f_k[g]|| + const,
       a = G_kk + l2_F,   u = (R_k - sum_{j != k} G_kj f_j - l1_F) / a,
   whose minimiser over f_k >= 0 is, group by group (each example group g; g = the whole row when
   no groups are given),
       f_k[g] = max(0, u[g]) * max(0, 1 - (group_F_g / a) / ||max(0, u[g])||),
   i.e. f_k = max(0, u) when group_F = 0. Why the non-negative part then the group soft threshold
   is exact: write u = u+ - u- (u+ = max(0, u), u- = max(0, -u), u+ . u- = 0). For f >= 0,
   ||f - u||^2 = ||f - u+||^2 + 2 <f, u-> + ||u-||^2 >= ||f - u+||^2 + ||u-||^2, so the constrained
   minimum is at least the unconstrained minimum of ||f - u+||^2 + 2 (group_F_g / a) ||f||, which is
   the group soft threshold (the proximal map of tau ||.||, tau = group_F_g / a) of u+ above. That
   point is >= 0 and is zero where u- > 0, so <f, u-> = 0 and it attains the bound.

2. Columns of each W_b, from a second pass over the data:
       P_b = X_b F^T  (rows_b, d),   Q = F F^T  (d, d),
       W_b[:, k] = max(0, (w_b (P_b[:, k] - sum_{j != k} W_b[:, j] Q_jk) - l1_b) / (w_b Q_kk + l2_b)),
   the exact minimiser of w_b ||X_b - W_b F||^2 + l2_b ||W_b||^2 + 2 l1_b sum(W_b) over column k.

Signed blocks (semi-NMF, ``signed``; see ``_mu``): the W_b of a signed block is unconstrained and is
set to its exact minimiser over the whole block, W_b = w_b P_b (w_b Q + l2_b I)^+
(``_mu.least_squares_rows``), instead of column sweeps; the F rows need nothing new (step 1 is
exact for R and G of any sign).

Every block update minimises J exactly over its block, so J never increases (up to rounding),
with every penalty, group_F and example groups included. Both updates are the same operation on a
(d, n) matrix V, row by row: ``_rows_sweep`` (F: V = F, W_b: V = W_b^T).

Inner sweeps (Gillis & Glineur 2012, "accelerated HALS"): a sweep over the d rows of F costs
O(d^2 N) given G and R, a sweep over the columns of the W_b O(d^2 M) given P_b and Q, while forming
R or P_b costs O(M N d): a pass over the data. Each step therefore repeats the sweeps over F
``sweeps`` times before the W pass, and the sweeps over W as many times; each repeated sweep is
still exact block minimisation (J never increases) and the step still reads the data twice. At
d = 20, M = 5000, N = 2000 a sweep costs about 1% of the two passes on the CPU, and 4 sweeps
reached MU's 500-iteration objective in about a quarter of the iterations 1 sweep needed (33
against 126 from a random init, 14 against 54 from NNDSVDa). 8 sweeps halved the iterations
again from the random init but saved no time from NNDSVDa; 4 (``SWEEPS``) also keeps the sweeps'
share small at larger d and on a GPU, where every row update is a small sequential kernel. A
fixed count, rather than their adaptive stopping rule, keeps the step deterministic, the same
under ``vmap`` for every restart, and identical to the NumPy reference.

Numerics and decisions:
- The sum over j != k is formed with the diagonal entry masked out (not as (A V)_k - A_kk v_k),
  so a row whose data are all zero (dead neurons, an all-zero block) becomes exactly 0.
- Zero denominators: a = A_kk + l2 below the dtype's smallest normal number (so l2 = 0) means
  the column of W (or row of F) that row k multiplies is zero; J then does not depend on the row except through
  its own penalties, and the row is set to 0 when l1 or group_F > 0 (the minimiser) and left as it
  is otherwise (every value is a minimiser).
- No floor on the factors: exact zeros are the minimisers HALS finds (sparse solutions under l1
  and group_F) and, unlike MU, HALS moves an entry away from zero as soon as that lowers J. Only
  a whole component k whose row of F and columns of every W_b are all zero stays dead: that is a
  stationary point of J (both gradients vanish), as in scikit-learn's coordinate-descent solver,
  which skips a coordinate whose Hessian is zero; a floor like 1e-16 would move J off its exact
  minimiser and break the exact zeros the penalties ask for.
- ``unit_columns`` (the authors' normalisation): each W_b is rescaled to the column norm in
  ``params.column_norm`` after its update, F untouched, as in ``mu_step``; J may then rise.
  Supported for parity with MU (each update is still the exact minimiser given the factors it
  sees), not because HALS needs it.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._mu import MUState, Params, _penalties, factor_statistics, is_signed, least_squares_rows
from ._tiles import dot as _dot

SWEEPS = 4  # sweeps over F's rows (W's columns) per pass over the data: see "Inner sweeps" above


def _group_shrink(u: jax.Array, tau: jax.Array, groups: jax.Array | None, n_groups: int) -> jax.Array:
    """Group soft threshold of u >= 0 (n,): u * max(0, 1 - tau_g / ||u[g]||) per group g (the whole
    vector when ``groups`` is None), tau (n_groups,) ((1,) for the whole vector); 0 where
    ||u[g]|| = 0. Exactly u when tau = 0."""
    sq = u * u
    if groups is None:
        norms = jnp.sqrt(jnp.sum(sq, keepdims=True))  # (1,)
    else:
        norms = jnp.sqrt(jax.ops.segment_sum(sq, groups, num_segments=n_groups))  # (n_groups,)
    shrink = jnp.where(norms > tau, 1 - tau / jnp.where(norms > 0, norms, 1), 0)
    return u * (shrink if groups is None else shrink[groups])


def _rows_sweep(V: jax.Array, A: jax.Array, B: jax.Array, l2: jax.Array, l1: jax.Array, scale: jax.Array | None = None,
                group: jax.Array | None = None, groups: jax.Array | None = None, n_groups: int = 1, *,
                sweeps: int = 1) -> jax.Array:
    """``sweeps`` HALS sweeps over the rows of V (d, n), k = 0..d-1 in turn, each row update the
    exact minimiser over row k (the other rows fixed at their latest values) of

        sum_m c_m (V[:, m]^T A V[:, m] - 2 B[:, m] . V[:, m]) + sum_m (l2_m ||V[:, m]||^2 + 2 l1_m sum V[:, m])
        + 2 sum_{k,g} group_g ||V[k, g]||,      V >= 0,

    A (d, d) symmetric PSD, B (d, n), c = ``scale`` (n,) (1 when None), l2, l1 scalars or (n,):
        a = c A_kk + l2,  u = (c (B_k - sum_{j != k} A_kj V_j) - l1) / a       (all (n,)),
        V_k = group_shrink(max(0, u), group / a)      (per example group; see the module docstring).
    ``group`` ((n_groups,), one weight per example group, (1,) for whole rows) needs a scalar a
    (``scale`` None, scalar l2). Entries with a < tiny are set
    to 0 where l1 > 0 or group > 0 and kept otherwise. ``group`` None: no group term.
    """
    d = V.shape[0]
    tiny = jnp.finfo(V.dtype).tiny
    diag = jnp.diagonal(A)
    index = jnp.arange(d)
    penalised = l1 > 0 if group is None else (l1 > 0) | jnp.any(group > 0)

    def row(k, V):
        a_k = jnp.where(index == k, 0, lax.dynamic_index_in_dim(A, k, 0, keepdims=False))  # (d,) off-diagonal
        num = lax.dynamic_index_in_dim(B, k, 0, keepdims=False) - _dot(a_k, V)
        den = diag[k] + l2 if scale is None else scale * diag[k] + l2
        if scale is not None:
            num = scale * num
        ok = den >= tiny
        den = jnp.where(ok, den, 1)
        u = jnp.maximum((num - l1) / den, 0)
        if group is not None:
            u = _group_shrink(u, group / den, groups, n_groups)
        old = lax.dynamic_index_in_dim(V, k, 0, keepdims=False)
        return lax.dynamic_update_index_in_dim(V, jnp.where(ok, u, jnp.where(penalised, 0, old)), k, 0)

    return lax.fori_loop(0, sweeps * d, lambda i, V: row(i % d, V), V)


def hals_update_F(blocks: Sequence[jax.Array], F: jax.Array, factors: Sequence[jax.Array], params: Params,
                  groups: jax.Array | None = None, n_groups: int = 1, *, sweeps: int = SWEEPS) -> jax.Array:
    """``sweeps`` HALS sweeps over the rows of F (d, N), block factors W_b (rows_b, d) fixed (step 1).

    G = sum_b w_b W_b^T W_b and R = sum_b w_b W_b^T X_b / s_b (one pass over the data), then the
    exact row minimisers with l2_F, l1_F and the group-lasso threshold group_F / (G_kk + l2_F).
    """
    R, G = factor_statistics(blocks, factors, params)
    return hals_update_F_from(F, R, G, params, groups, n_groups, sweeps=sweeps)


def hals_update_F_from(F: jax.Array, R: jax.Array, G: jax.Array, params: Params, groups: jax.Array | None = None,
                       n_groups: int = 1, *, sweeps: int = SWEEPS) -> jax.Array:
    """Step 1 given R = sum_b w_b W_b^T X_b / s_b (d, N) and G = sum_b w_b W_b^T W_b (d, d)."""
    return _rows_sweep(F, G, R, params.l2_F, params.l1_F, group=params.group_F, groups=groups, n_groups=n_groups,
                       sweeps=sweeps)


def hals_update_rows(w: jax.Array, xft: jax.Array, FFt: jax.Array, weight, l2, l1, *, sweeps: int = SWEEPS
                     ) -> jax.Array:
    """Step 2 for rows of one W_b (rows, d), given their X F^T / s_b (rows, d) and F F^T: ``sweeps``
    sweeps over its columns. Rows are independent (each is its own least-squares problem)."""
    return _rows_sweep(w.T, FFt, xft.T, l2, l1, scale=weight, sweeps=sweeps).T


def _per_row(values: jax.Array, rows: Sequence[int]) -> jax.Array:
    """(B,) per-block values repeated to one per row of the stacked factors: (sum rows_b,)."""
    return jnp.concatenate([jnp.broadcast_to(values[b], (r,)) for b, r in enumerate(rows)])


def hals_update_W(blocks: Sequence[jax.Array], factors: Sequence[jax.Array], F: jax.Array, params: Params,
                  unit_columns: bool = False, FFt: jax.Array | None = None, *, sweeps: int = SWEEPS,
                  signed: tuple[bool, ...] = ()) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """``sweeps`` HALS sweeps over the columns of every W_b (rows_b, d), F (d, N) fixed (step 2).

    The column updates of different blocks are independent, so all blocks run as one sweep over
    the stacked factor [W_1; ...; W_B] (M, d) with per-row weights and penalties. A ``signed``
    block is set to its exact least-squares minimiser instead. With ``unit_columns`` the columns
    are rescaled once, after the last sweep.
    Returns (the new W_b, the P_b = X_b F^T / s_b (rows_b, d) it formed).
    """
    FFt = _dot(F, F.T) if FFt is None else FFt
    xfts = tuple(_dot(x.astype(F.dtype), F.T) / params.data_scale[b] for b, x in enumerate(blocks))
    swept = [b for b in range(len(factors)) if not is_signed(signed, b)]
    new = {b: least_squares_rows(factors[b], xfts[b], FFt, params.weights[b], params.l2[b])
           for b in range(len(factors)) if is_signed(signed, b)}
    if swept:
        rows = [factors[b].shape[0] for b in swept]
        pick = lambda values: jnp.stack([values[b] for b in swept])
        V = jnp.concatenate([factors[b] for b in swept], axis=0).T  # (d, M)
        V = _rows_sweep(V, FFt, jnp.concatenate([xfts[b] for b in swept], axis=0).T, _per_row(pick(params.l2), rows),
                        _per_row(pick(params.l1), rows), scale=_per_row(pick(params.weights), rows), sweeps=sweeps)
        new.update(zip(swept, jnp.split(V.T, np.cumsum(rows)[:-1], axis=0)))
    out = []
    for b in range(len(factors)):
        w = new[b]
        if unit_columns:
            norms = jnp.sqrt(jnp.sum(w * w, axis=0, keepdims=True))
            w = w * (params.column_norm[b] / jnp.maximum(norms, jnp.finfo(w.dtype).tiny))
        out.append(w)
    return tuple(out), xfts


def hals_step(blocks: Sequence[jax.Array], state: MUState, params: Params, data_sq_norms: jax.Array | None = None,
              *, unit_columns: bool = False, groups: jax.Array | None = None, n_groups: int = 1,
              sweeps: int = SWEEPS, signed: tuple[bool, ...] = ()) -> tuple[MUState, jax.Array]:
    """One coupled HALS step (rows of F, then the columns of every W_b); same contract as ``mu_step``.

    Pure, usable under ``jit``, ``lax.scan`` and ``vmap``. Two passes over the data (W^T X for F,
    X F^T for the W_b), as MU; ``sweeps`` (static) sweeps over the rows of F, then as many over the
    columns of the W_b, reuse the products of each pass (see the module docstring).

    Args:
      blocks: B arrays X_b (rows_b, N), non-negative.
      state: F (d, N) and W_b (rows_b, d).
      params: weights and penalties (see ``make_params``).
      data_sq_norms: (B,) ||X_b / data_scale||_F^2; computed here (one extra pass) when None.
      unit_columns: rescale the columns of every W_b to ``params.column_norm`` after its update.
      groups, n_groups: example groups of the group-sparse penalty, (N,) ints in [0, n_groups),
        or None for groups = rows of F.
      signed: (B,) bools (static), the blocks whose W_b is unconstrained; () for none.
    Returns:
      the new state and J at it, from the products the updates formed:
      ||X_b - W_b F||^2 = ||X_b||^2 - 2 <W_b, X_b F^T> + <W_b^T W_b, F F^T>.
    """
    F = hals_update_F(blocks, state.F, state.factors, params, groups, n_groups, sweeps=sweeps)
    FFt = _dot(F, F.T)
    if data_sq_norms is None:
        data_sq_norms = jnp.stack([jnp.sum(jnp.square(x.astype(F.dtype) / params.data_scale[b]))
                                   for b, x in enumerate(blocks)])
    factors, xfts = hals_update_W(blocks, state.factors, F, params, unit_columns, FFt, sweeps=sweeps, signed=signed)
    fit = jnp.zeros((), F.dtype)
    for b, (w, xft) in enumerate(zip(factors, xfts)):
        fit = fit + params.weights[b] * (data_sq_norms[b] - 2 * jnp.sum(w * xft) + jnp.sum(_dot(w.T, w) * FFt))
    return MUState(F, factors), fit + _penalties(F, factors, params, groups, n_groups)
