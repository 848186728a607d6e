"""Numerical corners of ``jaxnmf.fit`` with their honest outcomes (issue 16): no false success."""
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnmf
from jaxnmf import _fit

RNG = np.random.default_rng(0)
KEY = jax.random.key(0)
X = {"a": RNG.random((20, 30)), "b": RNG.random((15, 30))}
W0 = {"a": RNG.random((20, 3)), "b": RNG.random((15, 3))}
F0 = RNG.random((3, 30))


def test_mu_refuses_an_all_zero_F_init():
    with pytest.raises(ValueError, match=r"^init: F0 is all zero.*solver='hals'"):
        jaxnmf.fit(X, 3, key=KEY, init=(np.zeros((3, 30)), W0), dtype=jnp.float64)


def test_hals_moves_an_all_zero_F_init():
    res = jaxnmf.fit(X, 3, key=KEY, init=(np.zeros((3, 30)), W0), dtype=jnp.float64, solver="hals", max_iter=100)
    assert not res.collapsed and max(res.relative_errors.values()) < 0.6


def test_mu_warns_about_a_zero_row_of_F_which_stays_dead():
    F = F0.copy()
    F[1] = 0
    with pytest.warns(RuntimeWarning, match=r"init: components \[1\] are zero"):
        res = jaxnmf.fit(X, 3, key=KEY, init=(F, W0), dtype=jnp.float64, max_iter=50)
    assert res.active.tolist() == [True, False, True] and np.all(np.asarray(res.F[1]) == 0)


def test_a_collapse_without_penalties_does_not_blame_them(monkeypatch):
    # a result with no active factor and no penalty: the message says the data or start carried nothing
    message = _fit.collapse_message(dict(group_F=0.0, l2=[0.0], l1=[0.0], l2_F=0.0, l1_F=0.0, penalty_units="raw"))
    assert "no penalty caused it" in message and "converged is set False" in message


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_a_block_of_underflowing_weight_is_still_fitted_and_warned_about(solver):
    blocks = {"a": X["a"].astype(np.float32), "b": (X["b"] * 1e-30).astype(np.float32)}
    with pytest.warns(RuntimeWarning, match=r"block_weights: block 'b' carries less than"):
        res = jaxnmf.fit(blocks, 3, key=KEY, block_weights="none", solver=solver, dtype=jnp.float32, max_iter=200)
    assert res.relative_errors["b"] < 0.6  # was 237,570 (HALS) and 1.0 (MU)
    assert res.relative_errors["a"] < 0.5


@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("scale, weights", [(3e38, "none"), (3e38, "frobenius"), (1e37, "frobenius"), (1e30, "none")])
def test_data_near_the_float32_maximum_is_fitted(scale, weights, solver):
    blocks = {k: (x * scale).astype(np.float32) for k, x in X.items()}
    res = jaxnmf.fit(blocks, 3, key=KEY, block_weights=weights, solver=solver, dtype=jnp.float32, max_iter=150)
    reference = jaxnmf.fit(X, 3, key=KEY, block_weights=weights, solver=solver, dtype=jnp.float64, max_iter=150)
    assert res.finite and not res.collapsed and res.n_active == 3
    for k in X:  # the fit of the scaled data is that of the data (3e38 gave F = 0, "relative error 0")
        assert 0.3 < res.relative_errors[k] < 0.5
        assert res.relative_errors[k] == pytest.approx(reference.relative_errors[k], abs=2e-3)
    assert np.all(res.losses >= 0) and np.all(np.isfinite(res.losses))
    assert np.all(np.isfinite(np.asarray(res.F)))


def test_a_non_finite_step_is_reported(monkeypatch):
    def poisoned(blocks, state, params, data_sq_norms=None, **kwargs):
        new, loss = jaxnmf.mu_step(blocks, state, params, data_sq_norms, **kwargs)
        return new, jnp.where(state.F[0, 0] > 0, jnp.nan, loss)  # every step overflows

    monkeypatch.setitem(_fit._STEPS, "mu", poisoned)
    with pytest.warns(RuntimeWarning, match=r"non-finite objective"):
        res = jaxnmf.fit(X, 3, key=KEY, dtype=jnp.float64, max_iter=30)
    assert not res.finite and not res.converged and res.n_iter == 0


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_returns_the_state_reached():
    kw = dict(key=KEY, tol=0, dtype=jnp.float64)
    jaxnmf.fit(X, 3, max_iter=100, **kw)  # compiled, so the interrupt lands while iterating
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    before = signal.getsignal(signal.SIGINT)
    timer.start()
    try:
        with pytest.warns(RuntimeWarning, match=r"fit interrupted \(KeyboardInterrupt\) at iteration \d+"):
            res = jaxnmf.fit(X, 3, max_iter=10 ** 8, **kw)
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert not res.converged and 0 < res.n_iter < 10 ** 8 and res.settings["interrupted_at"] == res.n_iter
    assert len(res.losses) == res.n_iter and max(res.relative_errors.values()) < 0.5
