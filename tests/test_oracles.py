"""Tests of the solvers against oracles that share no code or formula with ``jaxnmf`` / ``jaxnmf.reference``.

- scikit-learn's NMF (``solver="mu"`` iterate by iterate, ``solver="cd"`` final objective and fixed points);
- first-order optimality (KKT) of an objective written here in plain ``jnp`` and differentiated by ``jax.grad``;
- exact low-rank recovery of separable noise-free data (factors matched by the Hungarian algorithm);
- ``scipy.optimize.nnls`` (on an augmented system for the l2/l1 penalties; an accelerated proximal
  gradient written here for the group penalty) for ``transform`` and for the HALS subproblems;
- exact algebra (scale equivariance) and hypothesis properties (J never rises, ``loss`` is J).

The J written here, for B blocks X_b (rows_b, N), W_b (rows_b, d), F (d, N):

    J = sum_b w_b ||X_b - W_b F||^2 + l2_F ||F||^2 + sum_b l2_b ||W_b||^2
        + 2 l1_F sum(F) + 2 sum_b l1_b sum(W_b) + 2 group_F sum_{k,g} ||F[k, g]||_2

Penalties are in the raw units of J: every ``fit`` and ``objective`` call passes ``**RAW``.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment, nnls

import jaxnmf
from jaxnmf._hals import hals_update_F, hals_update_rows

jax.config.update("jax_enable_x64", True)  # also set by conftest.py

RAW = RAW_OBJ = {"penalty_units": "raw"}  # the oracles are written in the raw units of J
KEY = jax.random.key(0)


def fit(blocks, rank, **kw):
    """``jaxnmf.fit`` with penalties in raw units (today's meaning)."""
    kw.setdefault("key", KEY)
    return jaxnmf.fit(blocks, rank, **RAW, **kw)


# ---------------------------------------------------------------------------------------------
# An independent objective (plain jnp), its gradient, and the KKT residuals
# ---------------------------------------------------------------------------------------------

def weights_of(blocks, block_weights):
    if isinstance(block_weights, str):
        if block_weights == "none":
            return np.ones(len(blocks))
        assert block_weights == "frobenius"
        return np.array([1.0 / np.sum(np.asarray(x, np.float64) ** 2) for x in blocks])
    return np.asarray(block_weights, np.float64)


def per_block(v, n):
    return np.broadcast_to(np.asarray(v, np.float64), (n,))


def group_matrix(example_groups, n):
    """One-hot (N, n_groups): column g selects the examples of group g (one group: the whole row)."""
    if example_groups is None:
        return np.ones((n, 1))
    g = np.asarray(example_groups)
    return (g[:, None] == np.arange(g.max() + 1)[None, :]).astype(np.float64)


def smooth_J(blocks, F, Ws, *, weights, l2_F=0.0, l2=0.0, l1_F=0.0, l1=0.0):
    """J without the group term."""
    n = len(blocks)
    l2, l1 = per_block(l2, n), per_block(l1, n)
    total = l2_F * jnp.sum(F ** 2) + 2 * l1_F * jnp.sum(F)
    for b, (x, w) in enumerate(zip(blocks, Ws)):
        r = jnp.asarray(x, F.dtype) - w @ F
        total = total + weights[b] * jnp.sum(r ** 2) + l2[b] * jnp.sum(w ** 2) + 2 * l1[b] * jnp.sum(w)
    return total


def group_term(F, S, group_F):
    """2 group_F sum_{k,g} ||F[k, g]||, with a gradient that is finite (and 0) at a zero group."""
    sq = (F * F) @ S
    safe = jnp.where(sq > 0, sq, 1.0)
    return 2 * group_F * jnp.sum(jnp.where(sq > 0, jnp.sqrt(safe), 0.0))


def full_J(blocks, F, Ws, *, weights, group_F=0.0, example_groups=None, **pen):
    S = jnp.asarray(group_matrix(example_groups, F.shape[1]), F.dtype)
    return smooth_J(blocks, F, Ws, weights=weights, **pen) + group_term(F, S, group_F)


def kkt_residuals(blocks, F, Ws, *, weights, group_F=0.0, example_groups=None, zero_group_rtol=0.0,
                  support_rtol=1e-3, **pen):
    """Scaled KKT violations of min J over F >= 0, W_b >= 0 at (F, W_b), from ``jax.grad``.

    For every factor V with gradient G (scale: g_V = 2 max of the data part of the gradient,
    v = max V): dual feasibility max(0, -G) / g_V and complementarity |V G| / (v g_V), both 0
    at a KKT point. Entries of a zero group of F (its norm <= zero_group_rtol * max group norm)
    are left out of those and checked by the subgradient condition instead:
    ||max(0, -G_smooth[k, g])||_2 <= 2 group_F, reported as the excess over 2 group_F, / g_F.
    Also stationarity on the support, |G| / g_V where V > support_rtol * v (what MU reaches:
    its entries can lock at tiny values, even underflow to 0, where the gradient has turned
    negative; they regrow only slowly). Returns a dict of maxima and the number of zero groups.
    """
    F = jnp.asarray(F, jnp.float64)
    Ws = [jnp.asarray(w, jnp.float64) for w in Ws]
    blocks = [jnp.asarray(x, jnp.float64) for x in blocks]
    S = jnp.asarray(group_matrix(example_groups, F.shape[1]))
    gF_s, gWs = jax.grad(lambda F, Ws: smooth_J(blocks, F, Ws, weights=weights, **pen), argnums=(0, 1))(F, Ws)
    gF = gF_s + jax.grad(lambda F: group_term(F, S, group_F))(F)
    norms = jnp.sqrt((F * F) @ S)  # (d, n_groups)
    zero = norms <= zero_group_rtol * jnp.max(norms) if group_F > 0 else jnp.zeros(norms.shape, bool)
    zero_entries = (zero.astype(jnp.float64) @ S.T) > 0  # (d, N)
    out = {}
    scale_F = 2 * max(float(jnp.max(jnp.abs(weights[b] * w.T @ x))) for b, (x, w) in enumerate(zip(blocks, Ws)))
    keep = ~zero_entries
    out["F_dual"] = float(jnp.max(jnp.where(keep, jnp.maximum(0, -gF), 0))) / scale_F
    out["F_compl"] = float(jnp.max(jnp.where(keep, jnp.abs(F * gF), 0))) / (scale_F * float(jnp.max(F)))
    out["F_stat"] = float(jnp.max(jnp.where(keep & (F > support_rtol * jnp.max(F)), jnp.abs(gF), 0))) / scale_F
    neg = jnp.maximum(0, -gF_s)
    excess = jnp.sqrt((neg * neg) @ S) - 2 * group_F  # (d, n_groups)
    out["F_group"] = float(jnp.max(jnp.where(zero, jnp.maximum(excess, 0), 0))) / scale_F
    out["W_dual"] = out["W_compl"] = out["W_stat"] = 0.0
    for b, (x, w, g) in enumerate(zip(blocks, Ws, gWs)):
        scale = 2 * weights[b] * float(jnp.max(jnp.abs(x @ F.T)))
        if scale == 0:  # an all-zero block: W_b = 0 is its minimiser, with G >= 0
            scale = 1.0
        out["W_dual"] = max(out["W_dual"], float(jnp.max(jnp.maximum(0, -g))) / scale)
        out["W_compl"] = max(out["W_compl"], float(jnp.max(jnp.abs(w * g))) / (scale * max(float(jnp.max(w)), 1e-300)))
        out["W_stat"] = max(out["W_stat"], float(jnp.max(jnp.where(w > support_rtol * jnp.max(w), jnp.abs(g), 0))) / scale)
    out["n_zero_groups"] = int(jnp.sum(zero))
    return out


def data_blocks(seed=0, rows=(14, 9), n=24, zero_rows=True):
    """Random non-negative blocks (not low rank), with a zero row in every block when asked."""
    rng = np.random.default_rng(seed)
    blocks = []
    for r in rows:
        x = rng.random((r, n)) ** 2
        if zero_rows:
            x[rng.integers(r)] = 0.0
        blocks.append(x)
    return blocks


def test_independent_objective_equals_jaxnmf_objective():
    """Our plain-jnp J (above) against ``jaxnmf.objective`` at random factors, every option at once:
    the KKT tests below differentiate that J, so it must be the library's J."""
    rng = np.random.default_rng(3)
    blocks = data_blocks(3)
    F = rng.random((3, 24))
    F[1, :8] = 0.0  # a zero group
    Ws = [rng.random((x.shape[0], 3)) for x in blocks]
    groups = np.arange(24) % 3
    for opts in [dict(), dict(l2_F=0.7, l2=[0.2, 0.5], l1_F=0.3, l1=[0.1, 0.4]),
                 dict(group_F=0.6), dict(group_F=0.6, example_groups=groups, l1_F=0.1),
                 dict(block_weights="frobenius", l2=0.1), dict(block_weights=[2.0, 0.25], group_F=0.3)]:
        opts = dict(opts)
        bw = opts.pop("block_weights", "none")
        ours = float(full_J(blocks, jnp.asarray(F), [jnp.asarray(w) for w in Ws], weights=weights_of(blocks, bw),
                            **opts))
        theirs = float(jaxnmf.objective(blocks, F, Ws, block_weights=bw, **opts, **RAW_OBJ))
        assert theirs == pytest.approx(ours, rel=1e-12), opts


# Options of the KKT tests: every F penalty comes with a W penalty (else F / c, c W escapes it
# and J has no minimiser); group_F is large enough that some groups are exactly 0 under HALS.
KKT_CASES = {
    "plain": dict(),
    "l2": dict(l2_F=0.5, l2=[0.3, 1.0]),
    "l1": dict(l1_F=0.2, l1=[0.1, 0.3]),
    "l1F-l2": dict(l1_F=0.4, l2=0.5),
    "group-rows": dict(group_F=3.0, l2=1.0),
    "group-examples": dict(group_F=1.2, l2=0.5, l1_F=0.05, example_groups=np.arange(24) % 4),
    "frobenius": dict(block_weights="frobenius", l2_F=2e-3, l1=[1e-3, 0.0], group_F=5e-3),
    "weights": dict(block_weights=[2.0, 0.5], l1=0.1, l2_F=0.1, l1_F=0.05),
}
NEEDS_ZERO_GROUPS = {"group-rows", "group-examples"}


@pytest.mark.parametrize("name", list(KKT_CASES))
def test_hals_fit_satisfies_kkt_conditions(name):
    """Oracle: first-order optimality of our independent J (``jax.grad``), tight (1e-7) after a long
    float64 HALS fit; zero groups of F by the group-lasso subgradient condition."""
    opts = dict(KKT_CASES[name])
    blocks = data_blocks(0)
    res = fit(blocks, 3, max_iter=1500, tol=0, init="nndsvda", dtype=jnp.float64, solver="hals", **opts)
    bw = opts.pop("block_weights", "none")
    r = kkt_residuals(blocks, res.F, res.factors, weights=weights_of(blocks, bw), **opts)
    assert max(v for k, v in r.items() if k != "n_zero_groups") < 1e-7, r
    if name in NEEDS_ZERO_GROUPS:
        assert r["n_zero_groups"] > 0, r  # the subgradient branch was exercised


@pytest.mark.parametrize("name", list(KKT_CASES))
def test_mu_fit_satisfies_kkt_conditions(name):
    """Oracle: as the HALS test (our J, ``jax.grad``), for MU's weaker guarantee after 15000
    iterations: stationarity on the support (entries above 1e-2 of the largest) to 1e-3,
    complementarity to 1e-4, no dual feasibility (MU locks entries at ~0 where the gradient later
    turns negative; they regrow slowly: the l1 cases reach ~1e-4 on the support); groups below
    1e-6 of the largest norm count as zero (MU never reaches exact zeros)."""
    opts = dict(KKT_CASES[name])
    blocks = data_blocks(0)
    res = fit(blocks, 3, max_iter=15000, tol=0, init="nndsvda", dtype=jnp.float64, solver="mu", **opts)
    bw = opts.pop("block_weights", "none")
    r = kkt_residuals(blocks, res.F, res.factors, weights=weights_of(blocks, bw), zero_group_rtol=1e-6,
                      support_rtol=1e-2, **opts)
    assert r["F_stat"] < 1e-3 and r["W_stat"] < 1e-3, r
    assert r["F_compl"] < 1e-4 and r["W_compl"] < 1e-4 and r["F_group"] < 1e-5, r
    if name in NEEDS_ZERO_GROUPS:
        assert r["n_zero_groups"] > 0, r


# ---------------------------------------------------------------------------------------------
# scikit-learn
# ---------------------------------------------------------------------------------------------
# sklearn factorises Xs (n_samples, n_features) ~ Ws Hs and updates Ws first, then Hs. jaxnmf
# updates F first, so Xs = X^T (n_samples = N, n_features = rows), Ws = F^T, Hs = W^T. sklearn's
# documented objective is
#   1/2 ||Xs - Ws Hs||^2 + aW r n_features |Ws|_1 + aH r n_samples |Hs|_1
#   + 1/2 aW (1 - r) n_features ||Ws||^2 + 1/2 aH (1 - r) n_samples ||Hs||^2      (r = l1_ratio),
# which is J / 2 with l1_F = aW r rows, l2_F = aW (1 - r) rows, l1 = aH r N, l2 = aH (1 - r) N.

def sklearn_penalties(alpha_W, alpha_H, l1_ratio, rows, n):
    return dict(l1_F=alpha_W * l1_ratio * rows, l2_F=alpha_W * (1 - l1_ratio) * rows,
                l1=alpha_H * l1_ratio * n, l2=alpha_H * (1 - l1_ratio) * n)


def sklearn_objective(Xs, Ws, Hs, alpha_W, alpha_H, l1_ratio):
    """sklearn's documented NMF objective (User Guide, 'NMF with a beta-divergence' / class docstring)."""
    n_samples, n_features = Xs.shape
    return (0.5 * np.sum((Xs - Ws @ Hs) ** 2)
            + alpha_W * l1_ratio * n_features * np.sum(np.abs(Ws)) + alpha_H * l1_ratio * n_samples * np.sum(np.abs(Hs))
            + 0.5 * alpha_W * (1 - l1_ratio) * n_features * np.sum(Ws ** 2)
            + 0.5 * alpha_H * (1 - l1_ratio) * n_samples * np.sum(Hs ** 2))


def sklearn_nmf(X, F0, W0, *, solver, max_iter, alpha_W=0.0, alpha_H=0.0, l1_ratio=0.0, tol=0.0):
    """sklearn's NMF of X^T from Ws = F0^T, Hs = W0^T; returns (F, W, n_iter)."""
    from sklearn.decomposition import NMF
    model = NMF(F0.shape[0], solver=solver, beta_loss="frobenius", init="custom", tol=tol, max_iter=max_iter,
                alpha_W=alpha_W, alpha_H=alpha_H, l1_ratio=l1_ratio, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter
        Ws = model.fit_transform(X.T.copy(), W=F0.T.copy(), H=W0.T.copy())
    return Ws.T, model.components_.T, model.n_iter_


def balanced(F, W, *, l2_F=0.0, l1_F=0.0, l2=0.0, l1=0.0):
    """F_k -> c_k F_k, W_k -> W_k / c_k with c_k > 0 minimising the penalties (c = 1 when a side is
    unpenalised), by the positive root of the derivative (a quartic, numpy.roots). ``fit`` applies
    this balancing to any start; a start that is already balanced is left as it is, so sklearn and
    jaxnmf then iterate from the same point."""
    F, W = F.copy(), W.copy()
    for k in range(F.shape[0]):
        a2, a1 = l2_F * np.sum(F[k] ** 2), 2 * l1_F * np.sum(F[k])
        b2, b1 = l2 * np.sum(W[:, k] ** 2), 2 * l1 * np.sum(W[:, k])
        if a2 + a1 == 0 or b2 + b1 == 0:
            continue
        roots = np.roots([2 * a2, a1, 0.0, -b1, -2 * b2])  # d/dc (a2 c^2 + a1 c + b2 / c^2 + b1 / c) * c^3
        c = max(r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0)
        F[k] *= c
        W[:, k] /= c
    return F, W


def sklearn_problem(seed=0, rows=12, n=15, rank=3):
    rng = np.random.default_rng(seed)
    X = rng.random((rows, n))
    X[2] = 0.0  # a zero row
    return X, rng.random((rank, n)) + 0.1, rng.random((rows, rank)) + 0.1


@pytest.mark.parametrize("alphas", [(0.0, 0.0, 0.0), (0.01, 0.02, 0.3), (0.03, 0.0, 1.0), (0.0, 0.02, 0.0)],
                         ids=["plain", "mixed", "l1-F", "l2-W"])
def test_mu_iterates_equal_sklearn_mu(alphas):
    """Oracle: ``sklearn.decomposition.NMF(solver="mu")`` from the same custom start, one block, no
    weights: J along ``losses`` equals 2 x sklearn's documented objective at each of sklearn's
    iterates 1..T, and the factors after T iterations are sklearn's (float64, 1e-12)."""
    X, F0, W0 = sklearn_problem()
    rows, n = X.shape
    F0, W0 = balanced(F0, W0, **sklearn_penalties(*alphas, rows, n))
    T = 25
    res = fit([X], 3, max_iter=T, tol=0, init=(F0, [W0]), dtype=jnp.float64, solver="mu",
              **sklearn_penalties(*alphas, rows, n))
    assert res.n_iter == T
    expected = []
    for t in range(1, T + 1):
        Fs, Ws, n_iter = sklearn_nmf(X, F0, W0, solver="mu", max_iter=t, **dict(zip(("alpha_W", "alpha_H", "l1_ratio"),
                                                                                     alphas)))
        assert n_iter == t
        expected.append(2 * sklearn_objective(X.T, Fs.T, Ws.T, *alphas))
    np.testing.assert_allclose(res.losses, expected, rtol=1e-11)
    np.testing.assert_allclose(np.asarray(res.F), Fs, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(np.asarray(res.factors[0]), Ws, rtol=1e-10, atol=1e-13)
    assert res.loss == pytest.approx(expected[-1], rel=1e-11)


def J_np(X, F, W, *, l2_F=0.0, l2=0.0, l1_F=0.0, l1=0.0):
    """J of one block, unit weight, in NumPy."""
    return (np.sum((X - W @ F) ** 2) + l2_F * np.sum(F ** 2) + l2 * np.sum(W ** 2)
            + 2 * l1_F * np.sum(F) + 2 * l1 * np.sum(W))


def near_low_rank(seed=1, rows=20, n=25, rank=3, noise=0.05):
    rng = np.random.default_rng(seed)
    X = rng.random((rows, rank)) @ rng.random((rank, n)) + noise * rng.random((rows, n))
    return X, rng.random((rank, n)) + 0.1, rng.random((rows, rank)) + 0.1


@pytest.mark.parametrize("alphas", [(0.0, 0.0, 0.0), (0.002, 0.002, 0.0)], ids=["plain", "l2"])
def test_hals_reaches_sklearn_cd_objective(alphas):
    """Oracle: sklearn's coordinate descent (``solver="cd"``, Cython, its own HALS-type code) run to
    tol 1e-14 from the same (balanced) start on a well-posed near-rank-3 problem: HALS reaches the
    same or a lower J (2 x sklearn's objective), to 1e-9."""
    X, F0, W0 = near_low_rank()
    pen = sklearn_penalties(*alphas, *X.shape)
    F0, W0 = balanced(F0, W0, **pen)
    Fs, Ws, n_iter = sklearn_nmf(X, F0, W0, solver="cd", max_iter=5000, tol=1e-14,
                                 **dict(zip(("alpha_W", "alpha_H", "l1_ratio"), alphas)))
    j_cd = J_np(X, Fs, Ws, **pen)
    assert j_cd == pytest.approx(2 * sklearn_objective(X.T, Fs.T, Ws.T, *alphas), rel=1e-12)
    res = fit([X], 3, max_iter=1000, tol=0, init=(F0, [W0]), dtype=jnp.float64, solver="hals", **pen)
    assert res.loss <= j_cd * (1 + 1e-9)
    assert res.loss == pytest.approx(J_np(X, np.asarray(res.F), np.asarray(res.factors[0]), **pen), rel=1e-12)


def test_hals_fixed_point_is_a_fixed_point_of_sklearn_cd():
    """Oracle: sklearn's coordinate descent. With l1 and l2 on both factors the problem has several
    local minima (HALS and cd from one start may end in different ones), but a HALS limit must be
    a fixed point of cd: cd started there lowers J by less than 1e-10 and moves no factor by more
    than 1e-6 (and HALS started at cd's limit stays there, to the same tolerance)."""
    alphas = (0.01, 0.02, 0.3)
    X, F0, W0 = near_low_rank()
    pen = sklearn_penalties(*alphas, *X.shape)
    res = fit([X], 3, max_iter=1500, tol=0, init=(F0, [W0]), dtype=jnp.float64, solver="hals", **pen)
    F, W = np.asarray(res.F), np.asarray(res.factors[0])
    kw = dict(zip(("alpha_W", "alpha_H", "l1_ratio"), alphas))
    Fc, Wc, _ = sklearn_nmf(X, F, W, solver="cd", max_iter=200, **kw)
    j = J_np(X, F, W, **pen)
    assert J_np(X, Fc, Wc, **pen) >= j * (1 - 1e-10)
    np.testing.assert_allclose(Fc, F, atol=1e-6 * F.max())
    np.testing.assert_allclose(Wc, W, atol=1e-6 * W.max())
    # and the other way round, from cd's own limit
    Fs, Ws, _ = sklearn_nmf(X, F0, W0, solver="cd", max_iter=5000, tol=1e-14, **kw)
    back = fit([X], 3, max_iter=200, tol=0, init=(Fs, [Ws]), dtype=jnp.float64, solver="hals", **pen)
    assert back.loss >= J_np(X, Fs, Ws, **pen) * (1 - 1e-10)
    np.testing.assert_allclose(np.asarray(back.F), Fs, atol=1e-6 * Fs.max())


# ---------------------------------------------------------------------------------------------
# Exact recovery
# ---------------------------------------------------------------------------------------------

def separable_problem(seed, rows=(14, 9), n=24, rank=3):
    """X_b = W_b F exactly, F with the rank x rank scaled identity in its first columns (pure
    examples) and every W_b with a scaled identity in its first rows (pure features): both
    factors separable, so the coupled NMF is unique up to permutation and scaling."""
    rng = np.random.default_rng(seed)
    F = rng.random((rank, n)) * (rng.random((rank, n)) < 0.6)
    F[:, :rank] = np.diag(1 + rng.random(rank))
    Ws = []
    for m in rows:
        W = rng.random((m, rank)) * (rng.random((m, rank)) < 0.7)
        W[:rank] = np.diag(1 + rng.random(rank))
        Ws.append(W)
    return F, Ws, [W @ F for W in Ws]


def matched(F_hat, F):
    """Hungarian matching of the rows of F_hat to those of F on cosines: (rows of F_hat, rows of F, cosines)."""
    unit = lambda A: A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-300)
    C = unit(F_hat) @ unit(F).T
    i, j = linear_sum_assignment(-C)
    return i, j, C[i, j]


@pytest.mark.parametrize("seed,init", [(0, "nndsvda"), (1, "random"), (2, "nndsvd")])
def test_hals_recovers_exact_separable_factorisation(seed, init):
    """Oracle: the planted factors. Noise-free separable rank-3 data in two coupled blocks: HALS
    (float64) reaches relative error < 1e-6 per block, its F matches the planted F up to
    permutation and scale (Hungarian matching, cosines > 1 - 1e-8), and every rank-one part
    W_b[:, k] F[k] is the planted one."""
    F, Ws, X = separable_problem(seed)
    res = fit(X, 3, max_iter=1000, tol=0, dtype=jnp.float64, solver="hals", init=init)
    assert max(res.relative_errors) < 1e-6, res.relative_errors
    F_hat = np.asarray(res.F)
    i, j, cos = matched(F_hat, F)
    assert cos.min() > 1 - 1e-8, cos
    for W_hat, W in zip(res.factors, Ws):
        W_hat = np.asarray(W_hat)
        for a, b in zip(i, j):
            np.testing.assert_allclose(np.outer(W_hat[:, a], F_hat[a]), np.outer(W[:, b], F[b]),
                                       atol=1e-6 * np.abs(W @ F).max())


def test_mu_approaches_exact_separable_factorisation():
    """Oracle: the planted factors, as above, for MU: slower (sublinear near an exact fit), so only
    relative error < 1e-3 and cosines > 0.999 after 3000 iterations."""
    F, Ws, X = separable_problem(0)
    res = fit(X, 3, max_iter=3000, tol=0, dtype=jnp.float64, solver="mu", init="nndsvda")
    assert max(res.relative_errors) < 1e-3, res.relative_errors
    assert matched(np.asarray(res.F), F)[2].min() > 0.999


# ---------------------------------------------------------------------------------------------
# transform and the HALS subproblems against brute-force NNLS
# ---------------------------------------------------------------------------------------------

def stacked_nnls(Ws, weights, new_blocks, *, l2_F=0.0, l1_F=0.0):
    """argmin_{F >= 0} sum_b w_b ||X_b - W_b F||^2 + l2_F ||F||^2 + 2 l1_F sum(F), column by column,
    by ``scipy.optimize.nnls`` on the augmented system A = [sqrt(w_b) W_b; sqrt(l2_F) I]: the l1 term
    is folded into the right-hand side, y' = y - l1_F A (A^T A)^-1 1, so that A^T y' = A^T y - l1_F 1
    (the same quadratic up to a constant)."""
    d = np.asarray(Ws[0]).shape[1]
    A = np.vstack([np.sqrt(w) * np.asarray(W) for w, W in zip(weights, Ws)] + [np.sqrt(l2_F) * np.eye(d)])
    n = np.asarray(new_blocks[0]).shape[1]
    Y = np.vstack([np.sqrt(w) * np.asarray(x) for w, x in zip(weights, new_blocks)] + [np.zeros((d, n))])
    Y = Y - l1_F * A @ np.linalg.solve(A.T @ A, np.ones((d, 1)))
    return np.stack([nnls(A, Y[:, j], maxiter=1000)[0] for j in range(n)], axis=1)


def new_columns(Ws, seed=5, n=7):
    """New examples W_b F_new + noise with a sparse F_new: some NNLS constraints are active."""
    rng = np.random.default_rng(seed)
    d = np.asarray(Ws[0]).shape[1]
    F_new = rng.random((d, n)) * (rng.random((d, n)) < 0.5)
    return [np.maximum(np.asarray(W) @ F_new + 0.3 * (rng.random((W.shape[0], n)) - 0.5), 0) for W in Ws]


TRANSFORM_CASES = {
    "weights": dict(block_weights=[2.0, 0.5]),
    "frobenius": dict(block_weights="frobenius"),
    "l2_F-l1_F": dict(l2_F=0.5, l1_F=0.3, l2=0.05, block_weights=[1.0, 3.0]),
}


@pytest.mark.parametrize("name", list(TRANSFORM_CASES))
def test_transform_of_new_columns_equals_nnls(name):
    """Oracle: ``scipy.optimize.nnls`` column by column on the weighted stacked system (augmented for
    l2_F, right-hand side shifted for l1_F), the fit's W_b and weights held fixed; at least one
    constraint active; to 1e-7 of the largest entry."""
    opts = TRANSFORM_CASES[name]
    blocks = data_blocks(0)
    res = fit(blocks, 3, max_iter=300, tol=0, dtype=jnp.float64, solver="hals", **opts)
    new = new_columns(res.factors)
    expected = stacked_nnls(res.factors, res.block_weights, new, l2_F=opts.get("l2_F", 0.0),
                            l1_F=opts.get("l1_F", 0.0))
    assert np.sum(expected == 0) > 0
    got = np.asarray(jaxnmf.transform(res, new, max_iter=5000, tol=1e-14))
    # MU (what transform runs) approaches a zero whose gradient is nearly 0 slowly: one entry of
    # the l2_F-l1_F case is still 2e-8 after 5000 iterations (3e-50 after 50000)
    np.testing.assert_allclose(got, expected, atol=1e-7 * expected.max())


def test_transform_of_training_columns_equals_nnls_at_a_converged_fit():
    """Oracle: ``scipy.optimize.nnls`` with the fit's W_b. At a converged HALS fit (float64) the fit's
    own F is the NNLS solution given its W_b (F-optimality), and ``transform`` of the training
    blocks reproduces it, both checked against NNLS, not against each other."""
    opts = dict(l2_F=0.2, l1_F=0.1, l2=0.3)
    blocks = data_blocks(0)
    res = fit(blocks, 3, max_iter=1500, tol=0, dtype=jnp.float64, solver="hals", **opts)
    expected = stacked_nnls(res.factors, res.block_weights, blocks, l2_F=0.2, l1_F=0.1)
    assert np.sum(expected == 0) > 0
    np.testing.assert_allclose(np.asarray(res.F), expected, atol=1e-9 * expected.max())
    got = np.asarray(jaxnmf.transform(res, blocks, max_iter=5000, tol=1e-14))
    np.testing.assert_allclose(got, expected, atol=1e-9 * expected.max())


def test_transform_with_example_groups_equals_the_group_sparse_minimiser():
    """Oracle: the accelerated proximal gradient written here, on the new columns with their own
    groups (a label the fit never saw included), the fit's raw group_F for every group."""
    blocks = data_blocks(0)
    n = blocks[0].shape[1]
    groups = np.array([3, 5, 9])[np.arange(n) % 3]
    pen = dict(l2_F=0.2, l1_F=0.1, group_F=2.0)
    res = fit(blocks, 3, max_iter=300, tol=0, dtype=jnp.float64, solver="hals", l2=0.1, example_groups=groups, **pen)
    new = new_columns(res.factors, n=10)
    new_groups = np.array([5, 5, 9, 9, 9, 3, 4, 4, 5, 3])
    J, G, R, S = F_subproblem(new, res.factors, res.block_weights, example_groups=new_groups, **pen)
    expected = accelerated_prox_gradient(G, R, S, **pen)
    got = np.asarray(jaxnmf.transform(res, new, example_groups=new_groups, max_iter=20000, tol=0))
    assert J(got) <= J(expected) * (1 + 1e-9)
    np.testing.assert_allclose(got, expected, atol=1e-6 * expected.max())
    assert np.sum(np.sqrt((expected ** 2) @ S) == 0) > 0  # the penalty switched a group off
    with pytest.raises(ValueError, match="example_groups"):
        jaxnmf.transform(res, new)


def test_transform_keeps_the_relative_group_penalty_per_entry():
    """Relative units: each new group's weight is group_F' S sqrt(|g_new|) / N (S = sum_b w_b
    ||X_b||^2 and N of the fit), checked against the proximal-gradient oracle with weights computed
    here; rows as groups likewise with |g_new| = N_new."""
    blocks = data_blocks(0)
    n = blocks[0].shape[1]
    total = sum(np.sum(x ** 2) for x in blocks)  # weights "none"
    new = new_columns(jaxnmf.fit(blocks, 3, key=KEY, max_iter=5).factors, n=9)
    for groups, new_groups in [(None, None), (np.arange(n) % 2, np.array([0, 1, 1, 1, 1, 1, 0, 1, 1]))]:
        res = jaxnmf.fit(blocks, 3, key=KEY, max_iter=200, tol=0, dtype=jnp.float64, solver="hals", group_F=0.02,
                         l2=0.01, example_groups=groups)
        sizes = np.array([9.0]) if groups is None else np.bincount(new_groups).astype(float)
        weights = 0.02 * total * np.sqrt(sizes) / n
        J, G, R, S = F_subproblem(new, res.factors, res.block_weights, example_groups=new_groups, group_F=weights)
        expected = accelerated_prox_gradient(G, R, S, l2_F=0.0, l1_F=0.0, group_F=weights)
        got = np.asarray(jaxnmf.transform(res, new, example_groups=new_groups, max_iter=20000, tol=0))
        assert J(got) <= J(expected) * (1 + 1e-9)
        np.testing.assert_allclose(got, expected, atol=1e-6 * expected.max())


def F_subproblem(blocks, Ws, weights, *, l2_F=0.0, l1_F=0.0, group_F=0.0, example_groups=None):
    """The F-subproblem (W_b fixed) in NumPy: J(F) = <F, G F> - 2 <R, F> + const + l2_F ||F||^2
    + 2 l1_F sum(F) + 2 sum_{k,g} group_F_g ||F[k, g]||, with G, R, S (one-hot groups); group_F
    one value or one per group."""
    n = np.asarray(blocks[0]).shape[1]
    S = group_matrix(example_groups, n)
    G = sum(w * np.asarray(W).T @ np.asarray(W) for w, W in zip(weights, Ws))
    R = sum(w * np.asarray(W).T @ np.asarray(x) for w, W, x in zip(weights, Ws, blocks))
    const = sum(w * np.sum(np.asarray(x) ** 2) for w, x in zip(weights, blocks))

    def J(F):
        return (np.sum(F * (G @ F)) - 2 * np.sum(R * F) + const + l2_F * np.sum(F * F) + 2 * l1_F * np.sum(F)
                + 2 * np.sum(np.sqrt((F * F) @ S) * group_F))

    return J, G, R, S


def accelerated_prox_gradient(G, R, S, *, l2_F, l1_F, group_F, iters=20000):
    """min_{F >= 0} J(F) by accelerated proximal gradient (Nesterov, strongly convex momentum),
    written here: smooth part <F, (G + l2_F) F> - 2 <R - l1_F, F>, step 1/L; the prox of
    t 2 group_F_g ||.|| + (F >= 0) per group is the group soft threshold of the non-negative part
    (group_F one value or one per group)."""
    H = G + l2_F * np.eye(G.shape[0])
    eig = np.linalg.eigvalsh(2 * H)
    L, mu = eig[-1], eig[0]
    beta = (np.sqrt(L) - np.sqrt(mu)) / (np.sqrt(L) + np.sqrt(mu))
    threshold = 2 * (np.broadcast_to(np.asarray(group_F, np.float64), (S.shape[1],)) @ S.T) / L  # (N,)
    F = Y = np.zeros(R.shape)
    for _ in range(iters):
        V = np.maximum(Y - (2 * H @ Y - 2 * (R - l1_F)) / L, 0)
        norms = np.sqrt((V * V) @ S) @ S.T  # each entry's group norm
        F_new = V * np.maximum(0, 1 - threshold / np.where(norms > 0, norms, 1))
        Y = F_new + beta * (F_new - F)
        F = F_new
    return F


@pytest.mark.parametrize("case", ["l2-l1", "group-rows", "group-examples"])
def test_hals_F_update_converges_to_brute_force_minimiser(case):
    """Oracle: the convex F-subproblem (W_b fixed) solved independently: ``scipy.optimize.nnls`` on
    the augmented stacked system without a group term, an accelerated proximal gradient written
    here (a different algorithm, whole-matrix steps) with one. Many HALS sweeps over the rows of
    F (``hals_update_F``, sweeps=400) reach its minimiser: J no higher, factors equal to 1e-9."""
    rng = np.random.default_rng(11)
    blocks = data_blocks(1, n=12)
    d, n = 3, 12
    Ws = [rng.random((x.shape[0], d)) for x in blocks]
    weights = np.array([1.5, 0.7])
    pen = dict(l2_F=0.3, l1_F=0.2)
    groups = None
    if case != "l2-l1":
        pen["group_F"] = 5.0 if case == "group-rows" else 2.5
    else:
        pen["group_F"] = 0.0
    if case == "group-examples":
        groups = np.arange(n) % 3
    params = jaxnmf.make_params(2, weights=weights, dtype=jnp.float64, **pen)
    F = hals_update_F([jnp.asarray(x) for x in blocks], jnp.full((d, n), 0.5), tuple(jnp.asarray(W) for W in Ws),
                      params, None if groups is None else jnp.asarray(groups), 1 if groups is None else 3, sweeps=400)
    F = np.asarray(F)
    J, G, R, S = F_subproblem(blocks, Ws, weights, example_groups=groups, **pen)
    if case == "l2-l1":
        expected = stacked_nnls(Ws, weights, blocks, l2_F=pen["l2_F"], l1_F=pen["l1_F"])
        assert np.sum(expected == 0) > 0
    else:
        expected = accelerated_prox_gradient(G, R, S, **pen)
    assert J(F) <= J(expected) + 1e-12 * abs(J(expected))
    np.testing.assert_allclose(F, expected, atol=1e-9 * expected.max())
    if case != "l2-l1":
        norms = np.sqrt((F * F) @ group_matrix(groups, n))
        assert np.sum(norms == 0) > 0  # a group was switched off exactly


def test_hals_W_update_converges_to_row_by_row_nnls():
    """Oracle: ``scipy.optimize.nnls``: each row w of W_b solves min_w weight ||x - F^T w||^2
    + l2 ||w||^2 + 2 l1 sum(w) over w >= 0 (augmented NNLS); many HALS sweeps over the columns
    of W (``hals_update_rows``, sweeps=400) reach it, to 1e-9."""
    rng = np.random.default_rng(12)
    d, n, m = 3, 12, 8
    F = rng.random((d, n))
    X = np.maximum(rng.random((m, d)) @ F + 0.4 * (rng.random((m, n)) - 0.5), 0)
    X[3] = 0.0
    weight, l2, l1 = 1.7, 0.4, 0.3
    W = hals_update_rows(jnp.full((m, d), 0.5), jnp.asarray(X @ F.T), jnp.asarray(F @ F.T), weight, l2, l1,
                         sweeps=400)
    # the row problem of W is the column problem of W^T with "W" = F^T: reuse the stacked NNLS
    expected = stacked_nnls([F.T], [weight], [X.T], l2_F=l2, l1_F=l1).T
    assert np.sum(expected == 0) > 0
    np.testing.assert_allclose(np.asarray(W), expected, atol=1e-9 * expected.max())


# ---------------------------------------------------------------------------------------------
# Permutation equivariance and float32 against float64 (oracle: exact algebra, a unique minimiser)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_permuting_blocks_rows_and_columns_permutes_the_result(solver):
    """Oracle: algebra. J is a sum over blocks, rows and columns, so permuting the blocks, the rows
    of a block and the examples (start and example groups permuted alike) permutes W_b's rows and
    F's columns and leaves J: float64, 40 iterations, every penalty, to 1e-10."""
    blocks = data_blocks(2)
    rng = np.random.default_rng(6)
    n = blocks[0].shape[1]
    F0 = rng.random((3, n)) + 0.1
    W0 = [rng.random((x.shape[0], 3)) + 0.1 for x in blocks]
    groups = np.arange(n) % 3
    pen = dict(l2_F=0.2, l1_F=0.1, group_F=0.3, l1=[0.1, 0.2], l2=[0.3, 0.1])
    kw = dict(max_iter=40, tol=0, dtype=jnp.float64, solver=solver)
    ref = fit(blocks, 3, init=(F0, W0), example_groups=groups, block_weights=[1.0, 2.0], **kw, **pen)
    cols, rows = rng.permutation(n), rng.permutation(blocks[1].shape[0])
    swapped = [blocks[1][rows][:, cols], blocks[0][:, cols]]  # blocks swapped, rows of one permuted
    out = fit(swapped, 3, init=(F0[:, cols], [W0[1][rows], W0[0]]), example_groups=groups[cols],
              block_weights=[2.0, 1.0], **kw, **dict(pen, l1=[0.2, 0.1], l2=[0.1, 0.3]))
    assert out.loss == pytest.approx(ref.loss, rel=1e-10)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10,
                                                    atol=1e-12 * float(np.max(np.asarray(b))))
    close(out.F, np.asarray(ref.F)[:, cols])
    close(out.factors[0], np.asarray(ref.factors[1])[rows])
    close(out.factors[1], ref.factors[0])


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_float32_factors_agree_with_float64_at_a_unique_minimiser(solver):
    """Noise-free separable data (a unique factorisation up to permutation and scale): float32 and
    float64 fits from the same start reach the same factors, to 2e-3 of the largest entry after
    normalising each row of F (F's scale is shared with W only up to a diagonal), J to 1e-3 of S."""
    F_true, _, blocks = separable_problem(3)
    rng = np.random.default_rng(8)
    F0 = rng.random((3, F_true.shape[1])) + 0.1
    W0 = [rng.random((x.shape[0], 3)) + 0.1 for x in blocks]
    res = {dt: fit(blocks, 3, init=(F0, W0), max_iter=400 if solver == "hals" else 3000, tol=0, dtype=dt,
                   solver=solver) for dt in (jnp.float32, jnp.float64)}
    unit = lambda F: np.asarray(F, np.float64) / np.linalg.norm(np.asarray(F, np.float64), axis=1, keepdims=True)
    f32, f64 = unit(res[jnp.float32].F), unit(res[jnp.float64].F)
    i, j, cos = matched(f64, F_true)
    assert cos.min() > 0.999  # float64 found the true factors: the minimiser is the one we compare at
    np.testing.assert_allclose(f32, f64, atol=2e-3 * f64.max())
    S = sum(np.sum(x ** 2) for x in blocks)
    assert abs(res[jnp.float32].loss - res[jnp.float64].loss) < 1e-3 * S


# ---------------------------------------------------------------------------------------------
# Scale equivariance (oracle: exact algebra)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("c", [1e-30, 1e-6, 1e30])
def test_scaling_the_data_scales_J_and_W_and_leaves_F(solver, c):
    """Oracle: algebra. With X_b -> c X_b, W_b -> c W_b (start included) and raw penalties mapped so
    that every term of J scales by c^2 (l2_F, l1_F, group_F by c^2, l1_b by c, l2_b unchanged),
    J(c X; c W, F) = c^2 J(X; W, F) for every (W, F), so the iterates are the same: F unchanged,
    W scaled by c, J by c^2 (float64, 50 iterations, every penalty at once, 1e-9)."""
    blocks = data_blocks(0)
    rng = np.random.default_rng(4)
    F0 = rng.random((3, 24)) + 0.1
    W0 = [rng.random((x.shape[0], 3)) + 0.1 for x in blocks]
    pen = dict(l2_F=0.2, l1_F=0.1, group_F=0.3, l2=[0.3, 0.6], l1=[0.1, 0.2], block_weights=[1.0, 2.0],
               example_groups=np.arange(24) % 4)
    scaled = dict(pen, l2_F=c ** 2 * 0.2, l1_F=c ** 2 * 0.1, group_F=c ** 2 * 0.3, l1=[c * 0.1, c * 0.2])
    kw = dict(max_iter=50, tol=0, dtype=jnp.float64, solver=solver)
    ref = fit(blocks, 3, init=(F0, W0), **kw, **pen)
    out = fit([c * x for x in blocks], 3, init=(F0, [c * w for w in W0]), **kw, **scaled)
    np.testing.assert_allclose(np.asarray(out.F), np.asarray(ref.F), rtol=1e-9, atol=1e-12 * float(np.max(ref.F)))
    for w_out, w_ref in zip(out.factors, ref.factors):
        np.testing.assert_allclose(np.asarray(w_out) / c, np.asarray(w_ref), rtol=1e-9,
                                   atol=1e-12 * float(np.max(w_ref)))
    assert out.loss / c ** 2 == pytest.approx(ref.loss, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Properties over every option (hypothesis draws the data, so failures shrink)
# ---------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

N_PROP = 6  # one example count and one row count so that compilations are shared between examples
ROWS_PROP = 3
PROP_ITERS = 300  # long enough to run near convergence, where a wrong update shows as a rise of J


@st.composite
def coupled_problems(draw, block_counts=(1, 2), row_counts=(ROWS_PROP,)):
    """(blocks, fit options, whether any entry is non-zero): integer-valued data (shrinks to zeros),
    dead rows, every penalty, example groups (always 3 of them: n_groups is static), weights."""
    n_blocks = draw(st.sampled_from(block_counts))
    blocks = []
    for _ in range(n_blocks):
        rows = draw(st.sampled_from(row_counts))
        x = draw(arrays(np.int64, (rows, N_PROP), elements=st.integers(0, 4))).astype(np.float64)
        blocks.append(x)  # all-zero rows, columns and blocks arise (and shrink) naturally
    if draw(st.booleans()):
        blocks[0][0] = 0.0  # a dead row
    nonzero = sum(float(np.sum(x)) for x in blocks) > 0
    pen = st.sampled_from([0.0, 0.1, 1.0])
    opts = dict(l2_F=draw(pen), l1_F=draw(pen), group_F=draw(pen),
                l2=[draw(pen) for _ in blocks], l1=[draw(pen) for _ in blocks])
    if draw(st.booleans()):
        groups = draw(arrays(np.int64, (N_PROP,), elements=st.integers(0, 2)))
        groups[:3] = [0, 1, 2]
        opts["example_groups"] = groups
    weights = draw(st.sampled_from(["none", "frobenius", "explicit"]))
    opts["block_weights"] = ([draw(st.sampled_from([0.5, 1.0, 3.0])) for _ in blocks] if weights == "explicit"
                             else weights)
    if weights == "frobenius" and any(np.sum(x) == 0 for x in blocks):
        opts["block_weights"] = "none"  # 1 / ||X_b||^2 is undefined for a zero block
    return blocks, opts, nonzero


@st.composite
def problems_with_init(draw, rank_max=2, **kw):
    """A problem, a rank and an explicit integer-valued start (1..3: MU cannot move zeros), drawn
    so that it shrinks too (and no random-init compilation per shape)."""
    blocks, opts, nonzero = draw(coupled_problems(**kw))
    rank = draw(st.integers(1, min(rank_max, N_PROP, sum(x.shape[0] for x in blocks))))  # fit's bound on d
    ints = lambda shape: draw(arrays(np.int64, shape, elements=st.integers(1, 3))).astype(np.float64)
    init = (ints((rank, N_PROP)), [ints((x.shape[0], rank)) for x in blocks])
    return blocks, opts, nonzero, rank, init


def check_monotone_and_final_loss(problem, dtype, solver):
    """J along ``losses`` never rises (to 1e-9 of S = sum_b w_b ||X_b||^2 + J_1 in float64, 1e-4 in
    float32: ``losses`` come from products), its last entry is ``loss``, and ``loss`` is our
    independent J of the returned factors, as is ``jaxnmf.objective``."""
    blocks, opts, nonzero, rank, init = problem
    if not nonzero:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fit that collapses under the penalties
        res = fit(blocks, rank, max_iter=PROP_ITERS, tol=0, dtype=dtype, solver=solver, init=init, **opts)
    assert res.finite and res.n_iter == PROP_ITERS
    opts = dict(opts)
    bw = opts.pop("block_weights")
    weights = weights_of(blocks, bw)
    scale = float(np.sum(weights * np.array([np.sum(x ** 2) for x in blocks]))) + float(res.losses[0])
    tol = 1e-9 if dtype == np.float64 else 1e-4
    rises = np.diff(res.losses)
    assert np.all(rises <= tol * scale), (rises.max() / scale, res.losses)
    assert res.losses[-1] == pytest.approx(res.loss, rel=tol, abs=tol * scale)
    F = jnp.asarray(res.F, jnp.float64)
    Ws = [jnp.asarray(w, jnp.float64) for w in res.factors]
    ours = float(full_J(blocks, F, Ws, weights=weights, **opts))
    rel = 10 * tol if dtype == np.float32 else 1e-10
    assert res.loss == pytest.approx(ours, rel=rel, abs=tol * 1e-3 * scale)
    theirs = float(jaxnmf.objective(blocks, res.F, res.factors, block_weights=bw, **opts, **RAW_OBJ))
    assert theirs == pytest.approx(ours, rel=rel, abs=tol * 1e-3 * scale)


PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=10, **PROPERTY_SETTINGS)
@given(problem=problems_with_init(), dtype=st.sampled_from([np.float32, np.float64]),
       solver=st.sampled_from(["mu", "hals"]))
def test_objective_never_increases_and_final_loss_is_the_objective(problem, dtype, solver):
    """Oracle: our independent J (plain jnp) and ``jaxnmf.objective`` (``check_monotone_and_final_loss``),
    over data, 1-2 blocks, dead rows, rank, dtype, solver and every penalty drawn by hypothesis.
    Block shapes are fixed (3 x 6) so that the ~4 s compilations are shared; see the heavy variant."""
    check_monotone_and_final_loss(problem, dtype, solver)


@pytest.mark.heavy
@settings(max_examples=150, **PROPERTY_SETTINGS)
@given(problem=problems_with_init(rank_max=3, block_counts=(1, 2, 3), row_counts=(1, 2, 4)),
       dtype=st.sampled_from([np.float32, np.float64]), solver=st.sampled_from(["mu", "hals"]))
def test_objective_never_increases_over_varied_shapes(problem, dtype, solver):
    """Heavy (one compilation per example, minutes): as the default property test with 1-3 blocks
    of 1, 2 or 4 rows and rank 1-3."""
    check_monotone_and_final_loss(problem, dtype, solver)
