"""Signed blocks (semi-NMF, ``fit(signed=...)``): F >= 0, the W_b of chosen blocks unconstrained.

Oracles: the NumPy reference step by step (its own formulas, ``numpy.linalg.pinv``); the closed-form
least-squares update against ``numpy.linalg.lstsq``; first-order optimality (KKT) of an objective and
gradient written out here; monotone J; exact recovery of an exact semi-NMF factorisation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnmf
from jaxnmf import reference
from jaxnmf._mu import least_squares_rows

jax.config.update("jax_enable_x64", True)  # also set by conftest.py
KEY = jax.random.key(0)


def semi_blocks(seed: int = 0, n: int = 60, noise: float = 0.05) -> dict:
    """A mean-centred block (both signs) and a non-negative one, sharing a non-negative F (3, n)."""
    rng = np.random.default_rng(seed)
    F = rng.random((3, n))
    centred = rng.normal(size=(20, 3)) @ F + noise * rng.normal(size=(20, n))
    layer = rng.random((15, 3)) @ F + noise * rng.random((15, n))
    return {"centred": centred - centred.mean(axis=1, keepdims=True), "layer": layer}


def explicit_init(blocks: dict, rank: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.random((rank, blocks["layer"].shape[1])) + 0.1, {k: rng.random((x.shape[0], rank)) + 0.1
                                                                 for k, x in blocks.items()}


PLAIN = dict()
PENALTIES = dict(l2_F=0.3, l1_F=0.1, l2=[0.2, 0.1], l1=[0.0, 0.2], block_weights=[1.0, 2.0], penalty_units="raw")
GROUPS = dict(group_F=0.4, l2=0.5, example_groups=np.arange(60) % 3, penalty_units="raw")
UNIT = dict(unit_columns=True, l2_F=0.5, l1_F=0.5, penalty_units="raw")


@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
@pytest.mark.parametrize("opts", [PLAIN, PENALTIES, GROUPS, UNIT], ids=["plain", "penalties", "groups", "unit-columns"])
def test_agrees_with_numpy_reference_from_same_factors(solver, one_pass, opts):
    blocks = semi_blocks()
    kw = dict(key=KEY, max_iter=25, tol=0, init=explicit_init(blocks, 3), dtype=jnp.float64, solver=solver,
              signed=["centred"], **opts)
    ours, ref = jaxnmf.fit(blocks, 3, one_pass=one_pass, **kw), reference.fit(blocks, 3, **kw)
    assert ours.settings["signed"] == ref.settings["signed"] == (True, False)
    assert not ours.collapsed
    assert (np.asarray(ours.factors["centred"]) < 0).any()  # the signed factor did use both signs
    assert (np.asarray(ours.F) >= 0).all() and (np.asarray(ours.factors["layer"]) >= 0).all()
    np.testing.assert_allclose(np.asarray(ours.F), ref.F, rtol=1e-8, atol=1e-8 * np.abs(ref.F).max())
    for k in blocks:
        np.testing.assert_allclose(np.asarray(ours.factors[k]), ref.factors[k], rtol=1e-8,
                                   atol=1e-8 * np.abs(ref.factors[k]).max())
    assert ours.loss == pytest.approx(ref.loss, rel=1e-9)


@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("init", ["nndsvda", "random"])
@pytest.mark.parametrize("opts", [PLAIN, PENALTIES, GROUPS], ids=["plain", "penalties", "groups"])
def test_objective_never_increases(solver, init, opts):
    """J by explicit residuals (the reference's ``objective_value``, float64) after every step."""
    blocks = semi_blocks(seed=2)
    res = reference.fit(blocks, 3, key=3, max_iter=150, tol=0, init=init, dtype=np.float64, solver=solver,
                        signed=["centred"], **opts)
    losses = res.losses
    assert np.all(np.diff(losses) <= 1e-12 * losses[:-1]), np.max(np.diff(losses) / losses[:-1])
    ours = jaxnmf.fit(blocks, 3, key=KEY, max_iter=150, tol=0, init=init, dtype=jnp.float64, solver=solver,
                      signed=["centred"], **opts)
    assert np.all(np.diff(ours.losses) <= 1e-10 * ours.losses[:-1])


@pytest.mark.parametrize("l2", [0.0, 0.7])
def test_least_squares_update_equals_lstsq(l2):
    """W = w X F^T (w F F^T + l2 I)^+ is the minimiser of w ||X - W F||^2 + l2 ||W||^2: the least-squares
    solution of the stacked system [sqrt(w) F^T; sqrt(l2) I] W^T = [sqrt(w) X^T; 0], by LAPACK; with a
    zero row of F (F F^T singular) the minimum-norm one."""
    rng = np.random.default_rng(4)
    X, F, w = rng.normal(size=(9, 30)), rng.random((4, 30)), 1.7
    F[2] = 0.0
    A = np.vstack([np.sqrt(w) * F.T, np.sqrt(l2) * np.eye(4)])
    b = np.vstack([np.sqrt(w) * X.T, np.zeros((4, 9))])
    expected = np.linalg.lstsq(A, b, rcond=None)[0].T
    got = least_squares_rows(None, jnp.asarray(X @ F.T), jnp.asarray(F @ F.T), w, l2)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-12)


def _objective_and_gradients(blocks, F, Ws, l2, l2_F):
    """J = sum_b ||X_b - W_b F||^2 + l2_F ||F||^2 + l2 sum_b ||W_b||^2 and its gradients, written out."""
    J = l2_F * np.sum(F ** 2) + sum(np.sum((x - w @ F) ** 2) + l2 * np.sum(w ** 2) for x, w in zip(blocks, Ws))
    gF = 2 * sum(w.T @ (w @ F - x) for x, w in zip(blocks, Ws)) + 2 * l2_F * F
    gW = [2 * (w @ F - x) @ F.T + 2 * l2 * w for x, w in zip(blocks, Ws)]
    return J, gF, gW


def test_hals_fit_satisfies_the_semi_nmf_kkt_conditions():
    """At a long float64 HALS fit: the signed W_b's gradient vanishes; F and the non-negative W_b meet
    min(x, grad) = 0 (complementarity and dual feasibility), all relative to the gradient's scale."""
    blocks = semi_blocks(seed=5)
    res = jaxnmf.fit(blocks, 3, key=KEY, max_iter=3000, tol=0, dtype=jnp.float64, solver="hals",
                     signed=["centred"], l2=0.05, l2_F=0.05, penalty_units="raw")
    F, Ws = np.asarray(res.F), [np.asarray(res.factors[k]) for k in blocks]
    J, gF, (g_signed, g_layer) = _objective_and_gradients(list(blocks.values()), F, Ws, 0.05, 0.05)
    assert res.loss == pytest.approx(J, rel=1e-10)
    scale = max(np.abs(x).max() for x in blocks.values()) ** 2 * F.shape[1]
    assert np.abs(g_signed).max() < 1e-8 * scale
    assert np.abs(np.minimum(F, gF)).max() < 1e-8 * scale
    assert np.abs(np.minimum(Ws[1], g_layer)).max() < 1e-8 * scale
    assert (Ws[0] < 0).any()


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_recovers_an_exact_semi_nmf_factorisation(solver):
    """X_signed = W F exactly, with W of both signs and F containing the identity (separable): the
    coupled fit reaches it (HALS to 1e-6; MU, slower, to 1.3e-3 in 3000 iterations here); plain NMF
    cannot even be asked."""
    rng = np.random.default_rng(6)
    F = np.hstack([np.eye(3), rng.random((3, 57))])
    blocks = {"centred": rng.normal(size=(20, 3)) @ F, "layer": rng.random((15, 3)) @ F}
    res = jaxnmf.fit(blocks, 3, key=KEY, max_iter=3000, tol=1e-12, dtype=jnp.float64, solver=solver,
                     signed=["centred"])
    assert max(res.relative_errors.values()) < (1e-6 if solver == "hals" else 3e-3), res.relative_errors
    with pytest.raises(ValueError, match="block 'centred' has negative entries"):
        jaxnmf.fit(blocks, 3, key=KEY)


def test_transform_saved_fit_and_objective_keep_the_signed_blocks(tmp_path):
    blocks = semi_blocks(seed=7)
    res = jaxnmf.fit(blocks, 3, key=KEY, max_iter=2000, tol=1e-10, dtype=jnp.float64, solver="hals",
                     signed=["centred"])
    assert res.converged
    J = jaxnmf.objective(blocks, res.F, res.factors, signed=["centred"])
    assert float(J) == pytest.approx(res.loss, rel=1e-10)
    with pytest.raises(ValueError, match="factors: block 'centred' must be non-negative"):
        jaxnmf.objective(blocks, res.F, res.factors)
    path = tmp_path / "fit.npz"
    jaxnmf.save_fit(res, path)
    loaded = jaxnmf.load_fit(path)
    F = jaxnmf.transform(loaded, blocks, max_iter=20000, tol=0)
    assert np.linalg.norm(np.asarray(F) - np.asarray(res.F)) < 1e-4 * np.linalg.norm(np.asarray(res.F))


def test_bad_signed_arguments_are_refused_naming_them():
    blocks = semi_blocks()
    with pytest.raises(ValueError, match=r"^signed names \['pixels'\], which are not blocks"):
        jaxnmf.fit(blocks, 3, key=KEY, signed=["pixels"])
    with pytest.raises(TypeError, match="^signed must be None or a list of block keys"):
        jaxnmf.fit(blocks, 3, key=KEY, signed="centred")
    with pytest.raises(ValueError, match="^l1: block 'centred' is signed"):
        jaxnmf.fit(blocks, 3, key=KEY, signed=["centred"], l1=0.1)
    F0, W0 = explicit_init(blocks, 3)
    jaxnmf.fit(blocks, 3, key=KEY, max_iter=2, signed=["centred"], init=(F0, dict(W0, centred=-W0["centred"])))
    with pytest.raises(ValueError, match="^init factor of block 'layer' must be non-negative"):
        jaxnmf.fit(blocks, 3, key=KEY, signed=["centred"], init=(F0, dict(W0, layer=-W0["layer"])))
    with pytest.raises(ValueError, match="^init F0 must be non-negative"):
        jaxnmf.fit(blocks, 3, key=KEY, signed=["centred"], init=(-F0, W0))
