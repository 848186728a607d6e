"""A plain NumPy implementation of the coupled NMF, written for clarity, not speed.

It is the independent reference the tests and benchmarks compare ``jaxnmf.fit`` against: the same
objective, updates, options and ``fit`` signature, computed in the user's units (no internal
scaling), one block at a time, with the objective evaluated from explicit residuals in float64.

    J = sum_b w_b ||X_b - W_b F||^2 + l2_F ||F||^2 + sum_b l2_b ||W_b||^2
        + 2 l1_F sum(F) + 2 sum_b l1_b sum(W_b) + 2 sum_{k,g} group_F_g ||F[k, g]||_2

    F   <- F   * (sum_b w_b W_b^T X_b) / (sum_b w_b W_b^T W_b F + l2_F F + l1_F + group_F_g F / ||F[k, g]||)
    W_b <- W_b * (w_b X_b F^T) / (w_b W_b F F^T + l2_b W_b + l1_b)

HALS (``solver="hals"``; maths in ``jaxnmf._hals``): exact minimisation of J over one row of F,
then one column of one W_b, at a time (``hals_update_F``, ``hals_update_W``, ``hals_step``).

Signed blocks (semi-NMF, ``signed``; maths in ``jaxnmf._mu``): W_b is the least-squares minimiser
w_b X_b F^T (w_b F F^T + l2_b I)^+ (``least_squares_W``, by ``numpy.linalg.pinv``) under both
solvers, and MU's F update is the semi-NMF rule of Ding, Li & Jordan (``update_F(signed=True)``).

The functions below take raw penalties (group_F: one weight per example group, or one number);
``fit`` maps the user's values to them (``raw_penalties``, the same mapping as ``jaxnmf.fit``'s
``penalty_units``) and balances the initial components (``balance``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _problem as P
from ._fit import ACTIVE_TOL, NMFResult, _transform_groups
from ._hals import SWEEPS
from ._settings import FitSettings


def _seed(key: Any) -> int:
    """An int seed from an int or a ``jax.random`` key."""
    if isinstance(key, (int, np.integer)):
        return int(key)
    import jax

    data = np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
    return int(np.uint64(data.ravel().astype(np.uint64).sum()))


def group_norm_of_each_entry(F: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """(d, N): for entry (k, n), ||F[k, g(n)]||_2 over the examples of n's group (whole row if None)."""
    if groups is None:
        return np.repeat(np.sqrt((F * F).sum(axis=1, keepdims=True)), F.shape[1], axis=1)
    out = np.empty_like(F)
    for g in np.unique(groups):
        members = groups == g
        out[:, members] = np.sqrt((F[:, members] ** 2).sum(axis=1, keepdims=True))
    return out


def group_weight_of_each_entry(group_F, groups, n: int) -> np.ndarray:
    """(N,): the weight group_F_g of example n's group g; ``group_F`` one number or (n_groups,)."""
    group_F = np.atleast_1d(np.asarray(group_F, np.float64))
    return np.full(n, group_F[0]) if group_F.size == 1 else group_F[groups]


def update_F(X, F, Ws, weights, l2_F, l1_F, group_F=0.0, groups=None, signed=False):
    """One multiplicative update of F (d, N), the block factors W_b (rows_b, d) held fixed.

    ``signed`` (some W_b have negative entries): F <- F sqrt((R+ + G- F) / (R- + G+ F + penalties)),
    R = sum_b w_b W_b^T X_b and G = sum_b w_b W_b^T W_b split into positive and negative parts."""
    tiny = np.finfo(F.dtype).tiny
    R = sum(wb * (w.T @ x) for x, w, wb in zip(X, Ws, weights))
    G = sum(wb * (w.T @ w) for w, wb in zip(Ws, weights))
    penalty = l2_F * F + l1_F
    if np.any(np.asarray(group_F) > 0):
        penalty = penalty + (group_weight_of_each_entry(group_F, groups, F.shape[1]) * F
                             / np.maximum(group_norm_of_each_entry(F, groups), tiny))
    if signed:
        positive, negative = (lambda a: np.maximum(a, 0)), (lambda a: np.maximum(-a, 0))
        numerator = positive(R) + negative(G) @ F
        with np.errstate(over="ignore", invalid="ignore"):  # where F = 0 (which stays 0) the ratio may overflow
            ratio = numerator / np.maximum(negative(R) + positive(G) @ F + penalty, tiny)
            return np.where(F > 0, F * np.sqrt(ratio), 0.0)
    return F * R / np.maximum(G @ F + penalty, tiny)


def least_squares_W(x, F, weight, l2_b):
    """The W_b (rows_b, d) minimising w_b ||X_b - W_b F||^2 + l2_b ||W_b||^2 without a sign constraint:
    w_b X_b F^T (w_b F F^T + l2_b I)^+."""
    d = F.shape[0]
    return (weight * (x @ F.T)) @ np.linalg.pinv(weight * (F @ F.T) + l2_b * np.eye(d), rcond=d * np.finfo(F.dtype).eps,
                                                  hermitian=True)


def update_W(x, w, F, weight, l2_b, l1_b, unit_columns=False):
    """One multiplicative update of a block factor W_b (rows_b, d), F (d, N) held fixed."""
    tiny = np.finfo(F.dtype).tiny
    w = w * (weight * (x @ F.T)) / np.maximum(weight * (w @ (F @ F.T)) + l2_b * w + l1_b, tiny)
    if unit_columns:
        w = w / np.maximum(np.linalg.norm(w, axis=0, keepdims=True), tiny)
    return w


def _unit(w, unit_columns):
    return w / np.maximum(np.linalg.norm(w, axis=0, keepdims=True), np.finfo(w.dtype).tiny) if unit_columns else w


def mu_step(X, F, Ws, weights, l2, l1, l2_F, l1_F, group_F=0.0, groups=None, unit_columns=False, signed=()):
    """One coupled step: F first, then every W_b with the new F (Gauss-Seidel). Returns (F, Ws).
    ``signed``: (B,) bools, the blocks whose W_b is the unconstrained least-squares minimiser."""
    signed = tuple(signed) or (False,) * len(X)
    F = update_F(X, F, Ws, weights, l2_F, l1_F, group_F, groups, signed=any(signed))
    Ws = [_unit(least_squares_W(x, F, wb, a2), unit_columns) if sb else update_W(x, w, F, wb, a2, a1, unit_columns)
          for x, w, wb, a2, a1, sb in zip(X, Ws, weights, l2, l1, signed)]
    return F, Ws


def hals_update_F(X, F, Ws, weights, l2_F, l1_F, group_F=0.0, groups=None, sweeps=SWEEPS):
    """``sweeps`` HALS sweeps over the rows of F (d, N), W_b (rows_b, d) fixed; rows k = 0..d-1 in turn.

    Row k is replaced by the exact minimiser of J over it, the other rows fixed at their latest
    values:  a = G_kk + l2_F,  u = (R_k - sum_{j != k} G_kj F_j - l1_F) / a,
    F_k[g] = max(0, u[g]) * max(0, 1 - group_F_g / (a ||max(0, u[g])||)) for every example group g
    (the whole row when ``groups`` is None), with G = sum_b w_b W_b^T W_b, R = sum_b w_b W_b^T X_b.
    If a = 0 the row is set to 0 when l1_F or group_F > 0, else left as it is.
    """
    tiny = np.finfo(F.dtype).tiny
    d = F.shape[0]
    G = sum(wb * (w.T @ w) for w, wb in zip(Ws, weights))
    R = sum(wb * (w.T @ x) for x, w, wb in zip(X, Ws, weights))
    labels = np.zeros(F.shape[1], int) if groups is None else groups
    weight = group_weight_of_each_entry(group_F, groups, F.shape[1])
    grouped = np.any(np.asarray(group_F) > 0)
    F = F.copy()
    for k in list(range(d)) * sweeps:
        others = np.arange(d) != k
        a = G[k, k] + l2_F
        if a < tiny:
            if l1_F > 0 or grouped:
                F[k] = 0.0
            continue
        u = np.maximum((R[k] - G[k, others] @ F[others] - l1_F) / a, 0.0)
        if grouped:
            for g in np.unique(labels):
                members = labels == g
                norm, tau = np.linalg.norm(u[members]), weight[members][0] / a
                u[members] = u[members] * (1.0 - tau / norm) if norm > tau else 0.0
        F[k] = u
    return F


def hals_update_W(x, w, F, weight, l2_b, l1_b, unit_columns=False, sweeps=SWEEPS):
    """``sweeps`` HALS sweeps over the columns of W_b (rows_b, d), F (d, N) fixed; columns k = 0..d-1.

    Column k: a = w_b (F F^T)_kk + l2_b,
    W_k = max(0, (w_b ((X F^T)_k - sum_{j != k} W_j (F F^T)_jk) - l1_b) / a); if a = 0 it is set to
    0 when l1_b > 0, else left. With ``unit_columns`` every column is rescaled to unit norm after the
    last sweep.
    """
    tiny = np.finfo(F.dtype).tiny
    d = F.shape[0]
    xft, fft = x @ F.T, F @ F.T
    w = w.copy()
    for k in list(range(d)) * sweeps:
        others = np.arange(d) != k
        a = weight * fft[k, k] + l2_b
        if a < tiny:
            if l1_b > 0:
                w[:, k] = 0.0
            continue
        w[:, k] = np.maximum((weight * (xft[:, k] - w[:, others] @ fft[others, k]) - l1_b) / a, 0.0)
    if unit_columns:
        w = w / np.maximum(np.linalg.norm(w, axis=0, keepdims=True), tiny)
    return w


def hals_step(X, F, Ws, weights, l2, l1, l2_F, l1_F, group_F=0.0, groups=None, unit_columns=False, sweeps=SWEEPS,
              signed=()):
    """One coupled HALS step: ``sweeps`` sweeps over the rows of F, then as many over the columns of
    every W_b with the new F (a ``signed`` block: its least-squares minimiser). Returns (F, Ws)."""
    signed = tuple(signed) or (False,) * len(X)
    F = hals_update_F(X, F, Ws, weights, l2_F, l1_F, group_F, groups, sweeps)
    Ws = [_unit(least_squares_W(x, F, wb, a2), unit_columns) if sb
          else hals_update_W(x, w, F, wb, a2, a1, unit_columns, sweeps)
          for x, w, wb, a2, a1, sb in zip(X, Ws, weights, l2, l1, signed)]
    return F, Ws


def objective_value(X, F, Ws, weights, l2, l1, l2_F, l1_F, group_F=0.0, groups=None) -> float:
    """J in float64 from explicit residuals."""
    F = F.astype(np.float64)
    total = 0.0
    for x, w, wb, a2, a1 in zip(X, Ws, weights, l2, l1):
        w = w.astype(np.float64)
        residual = x.astype(np.float64) - w @ F
        total += wb * np.sum(residual ** 2) + a2 * np.sum(w ** 2) + 2 * a1 * np.sum(w)
    total += l2_F * np.sum(F ** 2) + 2 * l1_F * np.sum(F)
    if np.any(np.asarray(group_F) > 0):
        labels = np.zeros(F.shape[1], int) if groups is None else groups
        weight = group_weight_of_each_entry(group_F, groups, F.shape[1])
        for g in np.unique(labels):
            members = labels == g
            total += 2 * weight[members][0] * np.sum(np.sqrt((F[:, members] ** 2).sum(axis=1)))
    return float(total)


def raw_penalties(X, st) -> dict:
    """Raw penalties (l2, l1 (B,), l2_F, l1_F, group_F (n_groups,)) from the user's, in float64.

    "raw": as given. "relative": with S = sum_b w_b ||X_b||^2 (1 if all blocks are zero), N
    examples, M_b rows, |g| examples per group: l2_F S / N, l1_F S / N, group_F S sqrt(|g|) / N,
    l2_b w_b N, l1_b w_b ||X_b|| sqrt(N / M_b) (``jaxnmf.fit``'s ``penalty_units``).
    """
    n, n_groups, groups = X[0].shape[1], st["n_groups"], st["example_groups"]
    if st["penalty_units"] == "raw":
        return dict(l2=np.asarray(st["l2"]), l1=np.asarray(st["l1"]), l2_F=st["l2_F"], l1_F=st["l1_F"],
                    group_F=np.full(n_groups, st["group_F"]))
    norms = np.array([np.linalg.norm(x.astype(np.float64)) for x in X])
    w = np.asarray(st["weights"], np.float64)
    S = float(np.sum(w * norms ** 2)) or 1.0
    sizes = np.array([float(n)]) if groups is None else np.array([np.sum(groups == g) for g in range(n_groups)], float)
    return dict(l2=np.asarray(st["l2"]) * w * n,
                l1=np.asarray(st["l1"]) * w * norms * np.sqrt(n / np.array([x.shape[0] for x in X])),
                l2_F=st["l2_F"] * S / n, l1_F=st["l1_F"] * S / n, group_F=st["group_F"] * S * np.sqrt(sizes) / n)


def balance(F, Ws, l2, l1, l2_F, l1_F, group_F=0.0, groups=None):
    """Rescale each component k, F_k -> c F_k, W_b[:, k] -> W_b[:, k] / c, with c > 0 minimising
    the penalties A2 c^2 + A1 c + B2 / c^2 + B1 / c (the fit is unchanged). c solves
    2 A2 c^4 + A1 c^3 - B1 c - 2 B2 = 0, by bisection on log c in [-100, 100]; c = 1 for a
    component without penalty on the F side or on the W side. Returns (F, Ws) in float64."""
    F = F.astype(np.float64).copy()
    Ws = [w.astype(np.float64).copy() for w in Ws]
    labels = np.zeros(F.shape[1], int) if groups is None else groups
    weight = group_weight_of_each_entry(group_F, groups, F.shape[1])
    for k in range(F.shape[0]):
        f = F[k]
        A2 = l2_F * f @ f
        A1 = 2 * l1_F * f.sum() + 2 * sum(weight[labels == g][0] * np.linalg.norm(f[labels == g])
                                          for g in np.unique(labels))
        B2 = sum(a2 * w[:, k] @ w[:, k] for w, a2 in zip(Ws, l2))
        B1 = sum(2 * a1 * w[:, k].sum() for w, a1 in zip(Ws, l1))
        if not (A2 + A1 > 0 and B2 + B1 > 0):
            continue
        lo, hi = -100.0, 100.0
        for _ in range(80):
            t = (lo + hi) / 2
            c = np.exp(t)
            lo, hi = (lo, t) if 2 * A2 * c ** 4 + A1 * c ** 3 - B1 * c - 2 * B2 > 0 else (t, hi)
        c = np.exp((lo + hi) / 2)
        F[k] *= c
        for w in Ws:
            w[:, k] /= c
    return F, Ws


def _scale(x, signed: bool) -> float:
    """The mean entry of a block; for a signed block its root-mean-square entry."""
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if signed else float(x.mean())


def init_nndsvd(X, weights, rank, fill_zeros, signed=()):
    """NNDSVD (Boutsidis & Gallopoulos 2008) of the stacked matrix [sqrt(w_b) X_b], by exact SVD; the zeros
    of NNDSVDa are filled with sqrt(m / rank), m the stacked matrix's mean (``_scale`` for signed blocks)."""
    stacked = np.concatenate([np.sqrt(wb) * x.astype(np.float64) for x, wb in zip(X, weights)], axis=0)
    U, S, Vt = np.linalg.svd(stacked, full_matrices=False)
    W = np.zeros((stacked.shape[0], rank))
    H = np.zeros((rank, stacked.shape[1]))
    for j in range(rank):
        u, v = U[:, j], Vt[j]
        up, un, vp, vn = np.maximum(u, 0), np.maximum(-u, 0), np.maximum(v, 0), np.maximum(-v, 0)
        if np.linalg.norm(up) * np.linalg.norm(vp) >= np.linalg.norm(un) * np.linalg.norm(vn):
            a, b = up, vp
        else:
            a, b = un, vn
        sigma = np.linalg.norm(a) * np.linalg.norm(b)
        if sigma > 0:
            W[:, j] = np.sqrt(S[j] * sigma) * a / np.linalg.norm(a)
            H[j] = np.sqrt(S[j] * sigma) * b / np.linalg.norm(b)
    if fill_zeros:  # NNDSVDa, zeros filled at the scale of a random init
        signed = tuple(signed) or (False,) * len(X)
        mean = sum(np.sqrt(wb) * _scale(x, sb) * x.shape[0] for x, wb, sb in zip(X, weights, signed)) / stacked.shape[0]
        W[W == 0] = np.sqrt(mean / rank)
        H[H == 0] = np.sqrt(mean / rank)
    bounds = np.cumsum([x.shape[0] for x in X])[:-1]
    return H, [part / np.sqrt(wb) for part, wb in zip(np.split(W, bounds), weights)]


def init_random(rng, X, rank, signed=()):
    """F ~ sqrt(mean(X)/d) |N(0,1)|, W_b ~ sqrt(mean(X_b)/d) |N(0,1)| (scikit-learn's rule, per block;
    ``_scale`` for signed blocks)."""
    signed = tuple(signed) or (False,) * len(X)
    means = [_scale(x, sb) for x, sb in zip(X, signed)]
    mean_all = sum(m * x.shape[0] for m, x in zip(means, X)) / sum(x.shape[0] for x in X)
    F = np.sqrt(mean_all / rank) * np.abs(rng.standard_normal((rank, X[0].shape[1])))
    return F, [np.sqrt(m / rank) * np.abs(rng.standard_normal((x.shape[0], rank))) for m, x in zip(means, X)]


def fit(blocks, rank: int, *, key: Any, max_iter: int = 200, tol: float = 1e-4, init: Any = "nndsvda",
        n_restarts: int = 1, l2_F: float = 0.0, l2: Any = 0.0, l1_F: float = 0.0, l1: Any = 0.0,
        unit_columns: bool = False, block_weights: Any = "none", group_F: float = 0.0, example_groups=None,
        dtype=np.float32, check_every: int = 10, progress: bool = False, solver: str = "mu",
        penalty_units: str = "relative", signed=None) -> NMFResult:
    """Same signature and result as ``jaxnmf.fit``; ``key`` may be an int seed or a jax key.

    ``solver``: "mu" (``mu_step``) or "hals" (``hals_step``).

    Restarts run one after another; restart i uses ``numpy.random.default_rng((seed, i))``.
    ``progress`` is accepted for compatibility and ignored.
    """
    bl, _, st = P.check_fit(blocks, rank, max_iter=max_iter, tol=tol, init=init, n_restarts=n_restarts,
                            l2_F=l2_F, l2=l2, l1_F=l1_F, l1=l1, unit_columns=unit_columns,
                            block_weights=block_weights, group_F=group_F, example_groups=example_groups,
                            check_every=check_every, solver=solver, penalty_units=penalty_units, signed=signed)
    dtype = np.dtype(dtype)
    rank, max_iter, n_restarts, check_every, tol, init = (st[k] for k in (
        "rank", "max_iter", "n_restarts", "check_every", "tol", "init"))
    step = hals_step if st["solver"] == "hals" else mu_step
    X = [np.asarray(x, dtype) for x in bl.arrays]
    raw = raw_penalties(X, st)
    reg = dict(raw, weights=st["weights"], groups=st["example_groups"])
    unit_columns, signed = st["unit_columns"], st["signed"]

    runs = []
    for restart in range(n_restarts):
        if isinstance(init, tuple):
            F, Ws = init
        elif init == "random":
            F, Ws = init_random(np.random.default_rng((_seed(key), restart)), X, rank, signed)
        else:
            F, Ws = init_nndsvd(X, st["weights"], rank, fill_zeros=init == "nndsvda", signed=signed)
        if not unit_columns:
            F, Ws = balance(F, Ws, raw["l2"], raw["l1"], raw["l2_F"], raw["l1_F"], raw["group_F"], st["example_groups"])
        F, Ws = F.astype(dtype), [w.astype(dtype) for w in Ws]
        losses, converged = [], False
        last_check = objective_value(X, F, Ws, **reg)
        for it in range(1, max_iter + 1):
            F, Ws = step(X, F, Ws, unit_columns=unit_columns, signed=signed, **reg)
            losses.append(objective_value(X, F, Ws, **reg))
            if it % check_every == 0:
                decrease = (last_check - losses[-1]) / last_check if last_check > 0 else 0.0
                last_check = losses[-1]
                if tol > 0 and decrease < tol:
                    converged = True
                    break
        runs.append((F, Ws, np.array(losses), converged))

    final = np.array([r[2][-1] for r in runs])
    F, Ws, losses, converged = runs[int(np.argmin(final))]
    rel = [np.linalg.norm(x - w @ F) / np.linalg.norm(x) if np.any(x) else np.linalg.norm(w @ F) for x, w in zip(X, Ws)]
    settings = FitSettings.resolved(st, dtype=dtype, block_dtype=dtype, one_pass=False, raw_penalties=raw)
    energy = sum(wb * np.sum(w.astype(np.float64) ** 2, axis=0) for w, wb in zip(Ws, st["weights"]))
    energy = energy * np.sum(F.astype(np.float64) ** 2, axis=1)
    total = sum(wb * np.sum(x.astype(np.float64) ** 2) for x, wb in zip(X, st["weights"]))
    active = energy > ACTIVE_TOL * total if total > 0 else np.zeros(rank, bool)
    return NMFResult(F=F, loss=float(losses[-1]), factors=bl.rebuild(Ws), losses=losses,
                     relative_errors=bl.rebuild([float(r) for r in rel]), n_iter=len(losses),
                     converged=converged and bool(active.any()), finite=bool(np.isfinite(losses).all()),
                     restart_losses=final, block_weights=bl.rebuild([float(w) for w in st["weights"]]),
                     active=active, collapsed=not active.any(), settings=settings)


def transform(result: NMFResult, new_blocks, *, example_groups=None, max_iter: int = 500,
              tol: float = 1e-5) -> np.ndarray:
    """F for new examples with the block factors of ``result`` fixed (MU on F alone); the group
    weights as ``jaxnmf.transform`` resolves them."""
    st = result.settings
    bl = P.as_blocks(new_blocks, "new_blocks")
    Ws = P.as_blocks(result.factors, "result.factors").arrays
    X = [np.asarray(x, st.dtype) for x in bl.arrays]
    groups, _, group_F = _transform_groups(st, result.F.shape[1], example_groups, X[0].shape[1])
    raw = st.raw_penalties
    F = np.full((st.rank, X[0].shape[1]), float(np.mean(result.F)) or 1.0, st.dtype)
    previous = F
    for it in range(1, max_iter + 1):
        F = update_F(X, F, Ws, st.weights, raw.l2_F, raw.l1_F, group_F, groups, signed=any(st.signed))
        if it % 10 == 0:
            if tol > 0 and np.linalg.norm(F - previous) / max(np.linalg.norm(previous), np.finfo(F.dtype).tiny) < tol:
                break
            previous = F
    return F
