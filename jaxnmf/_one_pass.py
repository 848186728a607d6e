"""One pass over the data per iteration: the MU and HALS steps of ``_mu`` and ``_hals``, reordered.

A plain step reads every block twice: R = sum_b w_b W_b^T X_b for the update of F, then
X_b F^T with the new F for the update of W_b. But the update of W_b is separable by rows: a tile
of rows X_t (r, N) needs only its own X_t F^T (r, d), F F^T (d, d) and its rows W_t of W_b. So,
one tile at a time while it is in cache,

    P_t = X_t F^T / s_b,   W_t <- update(W_t, P_t, F F^T),   R += (w_b / s_b) W_t^T X_t,   G += w_b W_t^T W_t,

and R, G (what the next F update needs) are ready at the end of the pass. The state carries them
(``PassState``), so the next step starts with its F update (F <- update(F, R, G), no data) and
then makes the pass. In exact arithmetic the iterates are those of the plain step (F first, then
every W_b with the new F); in floating point only the order of the sums differs. With
``unit_columns`` each W_b is rescaled after its pass, by a diagonal D_b that is folded into its
statistics: R_b = D_b W_b^T X_b, G_b = D_b W_b^T W_b D_b.

The objective at the new state comes from the pass too: ||X_b - W_b F||^2 = ||X_b||^2
- 2 <W_b, X_b F^T> + <W_b^T W_b, F F^T>, with <W_b, X_b F^T> = sum_k D_kk c_k summed from
c = column sums of W_t * P_t over the tiles.

Blocks may be stored narrower than the factors (``_tiles.NarrowBlock``: bfloat16 blocks, float32
factors): each tile is converted as it is read, so no full-size converted copy exists (the plain
step would make one per block and pass). Tiles are contiguous rows of about ``PASS_TILE_BYTES`` after
conversion.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ._hals import SWEEPS, hals_update_F_from, hals_update_rows
from ._mu import (MUState, Params, _floor, _penalties, factor_statistics, is_signed, least_squares_rows,
                  mu_update_F_from, mu_update_rows)
from ._tiles import dot as _dot, fold_row_tiles, tile_rows

PASS_TILE_BYTES = 16 << 20  # rows per tile: about this many bytes of converted data (the fastest of 8 to 64 MB here)


class PassState(NamedTuple):
    """Factors and the statistics of the block factors that the next F update needs.

    F: (d, N); factors: W_b (rows_b, d); R: (d, N) sum_b (w_b / s_b) W_b^T X_b; G: (d, d)
    sum_b w_b W_b^T W_b (of the current W_b, after any ``unit_columns`` rescaling).
    """

    F: jax.Array
    factors: tuple[jax.Array, ...]
    R: jax.Array
    G: jax.Array


def with_statistics(blocks: Sequence[jax.Array], state: MUState, params: Params) -> PassState:
    """``state`` with R and G of its block factors (one plain pass over the data)."""
    R, G = factor_statistics(blocks, state.factors, params)
    return PassState(state.F, tuple(state.factors), R, G)


def _block_pass(x, w, F, FFt, weight, scale, l2, l1, update_rows, tile_bytes):
    """One pass over the row tiles of X_b (rows, N): the new W_b and its contributions, unscaled:
    (W_b (rows, d), W_b^T X_b / s_b (d, N), W_b^T W_b (d, d), c (d,) = sum over rows of W_b * X_b F^T / s_b)."""
    d, n = F.shape

    def tile_update(start, x_t, carry):
        w_new, A, WtW, c = carry
        x_t = x_t.astype(F.dtype)
        P = _dot(x_t, F.T) / scale
        w_t = update_rows(lax.dynamic_slice_in_dim(w, start, x_t.shape[0]), P, FFt, weight, l2, l1)
        return (lax.dynamic_update_slice_in_dim(w_new, w_t, start, 0), A + _dot(w_t.T, x_t) / scale,
                WtW + _dot(w_t.T, w_t), c + jnp.sum(w_t * P, axis=0))

    init = (w, jnp.zeros((d, n), F.dtype), jnp.zeros((d, d), F.dtype), jnp.zeros((d,), F.dtype))
    return fold_row_tiles(x, tile_rows(x, F.dtype.itemsize, tile_bytes), tile_update, init)


@dataclasses.dataclass(frozen=True)
class OnePassStep:
    """The MU or HALS step reading the data once; a ``step_fn`` for ``_loop._run`` on ``PassState``.

    Same contract as ``mu_step``: ``step(blocks, state, params, data_sq_norms, *, unit_columns,
    groups, n_groups) -> (new state, J at it)``, J from the pass's products (module docstring).
    Frozen, so that it is hashable and a jit cache key by value.
    """

    solver: str = "mu"
    tile_bytes: int = PASS_TILE_BYTES
    sweeps: int = SWEEPS

    def __call__(self, blocks: Sequence[jax.Array], state: PassState, params: Params, data_sq_norms: jax.Array,
                 *, unit_columns: bool = False, groups: jax.Array | None = None, n_groups: int = 1,
                 signed: tuple[bool, ...] = ()) -> tuple[PassState, jax.Array]:
        if self.solver == "mu":
            F = mu_update_F_from(state.F, state.R, state.G, params, groups, n_groups, signed=any(signed))
            update_rows = mu_update_rows
        else:
            F = hals_update_F_from(state.F, state.R, state.G, params, groups, n_groups, sweeps=self.sweeps)
            update_rows = functools.partial(hals_update_rows, sweeps=self.sweeps)
        FFt = _dot(F, F.T)
        factors, R, G, fit = [], 0, 0, 0
        for b, (x, w) in enumerate(zip(blocks, state.factors)):
            weight = params.weights[b]
            w, A, WtW, c = _block_pass(x, w, F, FFt, weight, params.data_scale[b], params.l2[b], params.l1[b],
                                       least_squares_rows if is_signed(signed, b) else update_rows, self.tile_bytes)
            if unit_columns:
                norms = jnp.sqrt(jnp.diagonal(WtW))  # (d,); a zero column stays zero (D = 0, not 1 / tiny: D^2 overflows)
                D = jnp.where(norms > 0, params.column_norm[b] / _floor(norms), 0)
                w, A, WtW, c = w * D[None, :], A * D[:, None], WtW * jnp.outer(D, D), c * D
            factors.append(w)
            R = R + weight * A
            G = G + weight * WtW
            fit = fit + weight * (data_sq_norms[b] - 2 * jnp.sum(c) + jnp.sum(WtW * FFt))
        factors = tuple(factors)
        return PassState(F, factors, R, G), fit + _penalties(F, factors, params, groups, n_groups)
