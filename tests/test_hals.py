"""The coupled HALS solver (``solver="hals"``): NumPy reference, monotonicity, MU comparison, edge cases.

Compilations dominate the runtime here: fits share shapes, dtype and ``max_iter=40`` wherever they
can, so that ``_run_restarts`` is compiled once per (dtype, groups, unit_columns) variant.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnmf
from jaxnmf import reference
from jaxnmf._hals import hals_step, hals_update_F, hals_update_W
from jaxnmf._loop import _run_restarts
from jaxnmf._mu import MUState, make_params, objective

KEY = jax.random.key(0)
ITERS = 40


def low_rank_blocks(seed=0, n=120, rows=(30, 50, 20), rank=4, noise=0.01):
    rng = np.random.default_rng(seed)
    F = rng.random((rank, n))
    return {f"b{i}": rng.random((r, rank)) @ F + noise * rng.random((r, n)) for i, r in enumerate(rows)}


def explicit_init(blocks, rank, seed=1):
    rng = np.random.default_rng(seed)
    n = next(iter(blocks.values())).shape[1]
    return rng.random((rank, n)) + 0.1, {k: rng.random((x.shape[0], rank)) + 0.1 for k, x in blocks.items()}


PLAIN = dict()
# in raw units (the values of Eq. 3.1): in relative units these would switch every factor off
PENALTIES = dict(l2_F=0.5, l2=0.1, l1_F=0.2, l1={"b0": 0.0, "b1": 0.3, "b2": 0.05}, block_weights=[1.0, 2.0, 0.5],
                 penalty_units="raw")
GROUP_ROWS = dict(group_F=0.05, l2=0.01, block_weights="frobenius")
GROUP_EXAMPLES = dict(group_F=0.3, l2=0.5, example_groups=np.arange(120) % 3)
AUTHORS = dict(l2_F=1.0, l1_F=1.0, unit_columns=True, penalty_units="raw")


@pytest.mark.parametrize("dtype,rtol,opts", [
    (np.float64, 1e-9, PLAIN), (np.float64, 1e-9, PENALTIES), (np.float64, 1e-9, GROUP_ROWS),
    (np.float64, 1e-9, GROUP_EXAMPLES), (np.float64, 1e-9, AUTHORS),
    (np.float32, 2e-3, PLAIN), (np.float32, 2e-3, PENALTIES), (np.float32, 2e-3, GROUP_ROWS),
], ids=["f64-plain", "f64-penalties", "f64-group-rows", "f64-group-examples", "f64-unit-columns",
        "f32-plain", "f32-penalties", "f32-group-rows"])
def test_agrees_with_numpy_reference_from_same_factors(dtype, rtol, opts):
    blocks = low_rank_blocks()
    kw = dict(key=KEY, max_iter=ITERS, tol=0, init=explicit_init(blocks, 4), dtype=dtype, solver="hals", **opts)
    ours, ref = jaxnmf.fit(blocks, 4, **kw), reference.fit(blocks, 4, **kw)
    assert ours.n_iter == ref.n_iter == ITERS and ours.settings["solver"] == ref.settings["solver"] == "hals"
    assert not ours.collapsed  # a fit the penalties switched off would compare zeros with zeros
    np.testing.assert_allclose(np.asarray(ours.F), ref.F, rtol=rtol, atol=rtol * np.abs(ref.F).max())
    for k in blocks:
        w, wr = np.asarray(ours.factors[k]), ref.factors[k]
        np.testing.assert_allclose(w, wr, rtol=rtol, atol=rtol * np.abs(wr).max())
        assert ours.relative_errors[k] == pytest.approx(ref.relative_errors[k], rel=10 * rtol)
    # the trace is from the updates' products: ||X||^2 - 2 <W, X F^T> + <W^T W, F F^T> loses
    # digits to cancellation once J << ||X||^2 (HALS gets there fast), so compare on that scale
    scale = sum(np.sum(x ** 2) for x in blocks.values())
    np.testing.assert_allclose(ours.losses, ref.losses, rtol=rtol, atol=(1e-6 if dtype == np.float32 else 1e-14) * scale)
    assert ours.loss == pytest.approx(ref.loss, rel=rtol)
    if opts.get("unit_columns"):
        for w in ours.factors.values():
            np.testing.assert_allclose(np.linalg.norm(np.asarray(w), axis=0), 1.0, rtol=10 * rtol)
    else:  # every update is an exact block minimiser: J never rises
        assert np.all(np.diff(ref.losses) <= 1e-9 * ref.losses[:-1])


def _random_problem(seed):
    """Random shapes, data with dead rows, penalties (group_F always, example groups on odd seeds)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 30))
    blocks = []
    for _ in range(int(rng.integers(1, 4))):
        x = rng.random((int(rng.integers(1, 15)), n)) ** 2
        x[rng.random(x.shape[0]) < 0.2] = 0.0
        blocks.append(x)
    rank = int(rng.integers(1, min(5, n, sum(x.shape[0] for x in blocks)) + 1))
    groups, n_groups = (None, 1) if seed % 2 == 0 else (jnp.asarray(rng.integers(0, 3, n)), 3)
    pick = lambda *v: float(rng.choice(v))
    params = make_params(len(blocks), weights=rng.random(len(blocks)) + 0.1, l2=rng.choice([0.0, 0.3], len(blocks)),
                         l1=rng.choice([0.0, 0.2], len(blocks)), l2_F=pick(0.0, 0.1, 2.0), l1_F=pick(0.0, 0.5),
                         group_F=pick(0.1, 1.0, 5.0), dtype=jnp.float64)
    state = MUState(jnp.asarray(rng.random((rank, n))),
                    tuple(jnp.asarray(rng.random((x.shape[0], rank))) for x in blocks))
    return tuple(jnp.asarray(x) for x in blocks), state, params, groups, n_groups


@pytest.mark.parametrize("seed", range(4))
def test_each_half_step_never_increases_the_objective(seed):
    # J by explicit residuals in float64 after every F sweep and every W sweep: the updates are
    # exact block minimisers (group soft-threshold included), so J may only fall
    blocks, state, params, groups, n_groups = _random_problem(seed)
    J = lambda F, Ws: objective(blocks, F, Ws, params, groups, n_groups)

    sweeps = 1 + seed % 3  # inner sweeps per update: 1 (plain HALS), 2, 3

    @jax.jit
    def run(state):
        def half_steps(s, _):
            F = hals_update_F(blocks, s.F, s.factors, params, groups, n_groups, sweeps=sweeps)
            Ws = hals_update_W(blocks, s.factors, F, params, sweeps=sweeps)[0]
            return MUState(F, Ws), jnp.stack([J(F, s.factors), J(F, Ws)])
        end, values = jax.lax.scan(half_steps, state, None, length=25)
        # the step's own J (from the products it formed) is J at the factors it returns, and the
        # step under vmap (restarts) is the step
        new, loss = hals_step(blocks, end, params, groups=groups, n_groups=n_groups)
        pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), state, end)
        batched = jax.vmap(lambda s: hals_step(blocks, s, params, groups=groups, n_groups=n_groups))(pair)
        return jnp.concatenate([J(*state)[None], values.reshape(-1)]), end, loss, J(*new), new, batched

    values, end, loss, exact, new, (batched, _) = run(state)
    values = np.asarray(values)
    assert np.all(np.diff(values) <= 1e-10 * values[:-1] + 1e-13 * values[0]), np.diff(values).max()
    for a in jax.tree.leaves(end):
        assert np.isfinite(np.asarray(a)).all() and (np.asarray(a) >= 0).all()
    assert float(loss) == pytest.approx(float(exact), rel=1e-9, abs=1e-12 * values[0])
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(batched)):
        np.testing.assert_allclose(np.asarray(b)[1], np.asarray(a), rtol=1e-12, atol=1e-300)


def test_hals_reaches_a_lower_objective_than_mu_in_as_many_iterations():
    blocks = low_rank_blocks()
    kw = dict(key=KEY, max_iter=ITERS, tol=0, init=explicit_init(blocks, 4), dtype=np.float64)
    hals, mu = jaxnmf.fit(blocks, 4, solver="hals", **kw), jaxnmf.fit(blocks, 4, solver="mu", **kw)
    assert mu.settings["solver"] == "mu"
    assert hals.loss < 0.1 * mu.loss  # about 1 against 170 here
    assert np.all(np.diff(hals.losses) <= 1e-9 * hals.losses[:-1])


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_dead_rows_zero_block_and_extreme_ranges_stay_finite(scale):
    rng = np.random.default_rng(0)
    x = rng.random((30, 120)) * scale
    x[:7] = 0.0  # dead neurons
    wide = rng.random((20, 120)) * np.logspace(-30, 30, 120)  # 1e-30 ... 1e30 in one block
    blocks = {"b0": x, "b1": np.zeros((50, 120)), "b2": wide}
    for weights in ("none", "frobenius"):
        for init in ("nndsvd", explicit_init(blocks, 4)):  # NNDSVD's exact zeros are no trap for HALS
            res = jaxnmf.fit(blocks, 4, key=KEY, max_iter=ITERS, tol=0, init=init, block_weights=weights,
                             solver="hals", dtype=np.float64)
            for a in [res.F, *res.factors.values()]:
                assert np.isfinite(np.asarray(a)).all() and (np.asarray(a) >= 0).all()
            assert np.isfinite(res.losses).all() and np.isfinite(res.loss) and res.finite
            assert np.isfinite(list(res.relative_errors.values())).all()
            # rows with no data get exactly zero loadings (no floor, no cancellation)
            np.testing.assert_array_equal(np.asarray(res.factors["b1"]), 0.0)
            np.testing.assert_array_equal(np.asarray(res.factors["b0"])[:7], 0.0)


def test_group_penalty_switches_whole_factors_off_exactly_and_dead_factors_stay_finite():
    # rank 4 on rank-1 data with a large group penalty (W bounded by l2): dead rows of F are
    # exact zeros, their W columns follow, and the zero denominators that leaves are guarded
    blocks = low_rank_blocks(rank=1)
    res = jaxnmf.fit(blocks, 4, key=KEY, max_iter=ITERS, tol=0, group_F=5.0, l2=1.0, l1_F=0.1, solver="hals",
                     penalty_units="raw", dtype=np.float64)
    F = np.asarray(res.F)
    row_norms = np.linalg.norm(F, axis=1)
    assert (row_norms == 0).sum() >= 2 and (row_norms > 0.1 * row_norms.max()).sum() >= 1
    for k in np.flatnonzero(row_norms == 0):
        for w in res.factors.values():
            np.testing.assert_array_equal(np.asarray(w)[:, k], 0.0)
    assert res.finite and np.all(np.diff(res.losses) <= 1e-9 * res.losses[:-1])


def test_new_data_and_penalties_do_not_recompile():
    # (restarts: the step under vmap is checked above; the runner is the one MU uses)
    blocks = low_rank_blocks()
    kw = dict(key=KEY, max_iter=ITERS, tol=0, init=explicit_init(blocks, 4), solver="hals", dtype=np.float64)
    jaxnmf.fit(blocks, 4, **kw)
    size = _run_restarts._cache_size()
    jaxnmf.fit(low_rank_blocks(seed=5), 4, **{**kw, "key": jax.random.key(3)}, l2_F=0.7, l1=0.2)
    assert _run_restarts._cache_size() == size


@pytest.mark.parametrize("solver", ["als", "HALS", None, 1])
def test_bad_solver_is_refused_naming_the_argument(solver):
    blocks = low_rank_blocks()
    with pytest.raises(ValueError, match=r"solver must be one of \('mu', 'hals'\)"):
        jaxnmf.fit(blocks, 3, key=KEY, max_iter=2, solver=solver)
    with pytest.raises(ValueError, match="solver must be one of"):
        reference.fit(blocks, 3, key=0, max_iter=2, solver=solver)
