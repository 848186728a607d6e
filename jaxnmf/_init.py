"""Initialisation of the factors and the balance of scales between F and the W_b.

In the units of the scaled problem X_b / data_scale_b (see ``_fit._Scaling``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ._mu import MUState, Params, _group_norms
from ._tiles import dot as _dot, t_times, times

_EXACT_SVD_MAX_SIZE = 1_000_000  # stacked matrices up to this many entries get an exact SVD at init


def _truncated_svd(blocks, coefs, rank, key, dtype):
    """Top-``rank`` SVD of the stacked matrix [c_b X_b] (M, N): exact when small, else randomised
    (Halko et al. 2011: oversampling 10, four power iterations), one block at a time."""
    rows = [x.shape[0] for x in blocks]
    m, n = sum(rows), blocks[0].shape[1]
    if m * n <= _EXACT_SVD_MAX_SIZE:
        return _exact_svd(tuple(blocks), jnp.asarray(coefs, dtype), rank=rank, dtype=dtype)
    k = min(rank + 10, m, n)
    split = lambda q: jnp.split(q, np.cumsum(rows)[:-1], axis=0)
    q, _ = jnp.linalg.qr(jnp.concatenate([c * times(x, jax.random.normal(key, (n, k), dtype))
                                          for c, x in zip(coefs, blocks)], axis=0))
    for _ in range(4):
        z, _ = jnp.linalg.qr(sum(c * t_times(x, qb) for c, x, qb in zip(coefs, blocks, split(q))))
        q, _ = jnp.linalg.qr(jnp.concatenate([c * times(x, z) for c, x in zip(coefs, blocks)], axis=0))
    small = sum(c * t_times(x, qb).T for c, x, qb in zip(coefs, blocks, split(q)))  # (k, N)
    ub, s, vt = jnp.linalg.svd(small, full_matrices=False)
    return _dot(q, ub)[:, :rank], s[:rank], vt[:rank]


@functools.partial(jax.jit, static_argnames=("rank", "dtype"))
def _exact_svd(blocks, coefs, *, rank, dtype):
    """Top-``rank`` SVD (U (M, r), s (r,), V^T (r, N)) of the stacked [c_b X_b], exactly."""
    y = jnp.concatenate([c * x.astype(dtype) for c, x in zip(coefs, blocks)], axis=0)
    u, s, vt = jnp.linalg.svd(y, full_matrices=False)
    return u[:, :rank], s[:rank], vt[:rank]


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
    rows = tuple(x.shape[0] for x in blocks)
    # fill value 0 leaves the zeros (NNDSVD)
    avg = np.sqrt(sum(np.sqrt(w) * m * r for w, m, r in zip(weights, means, rows)) / sum(rows) / rank) \
        if fill_zeros else 0.0
    return _nndsvd_state(u, s, vt, jnp.asarray(avg, dtype), jnp.asarray(1 / np.sqrt(weights), dtype),
                         rows=rows, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("rows", "dtype"))
def _nndsvd_state(u, s, vt, fill, inv_sqrt_w, *, rows, dtype) -> MUState:
    """NNDSVD of U diag(s) V^T with its zeros replaced by ``fill`` (> 0: NNDSVDa), split into the
    blocks' rows ``rows``, each W_b multiplied by ``inv_sqrt_w[b]``."""
    w_stack, F = _nndsvd(u, s, vt)
    w_stack = jnp.where(w_stack > 0, w_stack, fill)
    F = jnp.where(F > 0, F, fill)
    parts = jnp.split(w_stack, np.cumsum(rows)[:-1], axis=0)
    return MUState(F.astype(dtype), tuple((p * c).astype(dtype) for p, c in zip(parts, inv_sqrt_w)))


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
