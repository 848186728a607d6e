"""Penalty units (``penalty_units``), the penalty-balanced start and collapse reporting (issue 11)."""
import jax
import numpy as np
import pytest

import jaxnmf
from jaxnmf import reference
from jaxnmf._init import balance
from jaxnmf._mu import MUState, _penalties, make_params

KEY = jax.random.key(0)


def sparse_blocks(seed=0, n=200, rows=(30, 50, 40)):
    """Four non-negative components of decreasing scale, half their entries zero, plus noise."""
    rng = np.random.default_rng(seed)
    F = rng.random((4, n)) * (rng.random((4, n)) < 0.5) * np.array([1, 0.7, 0.5, 0.3])[:, None]
    return {f"b{i}": rng.random((r, 4)) @ F + 0.05 * rng.random((r, n)) for i, r in enumerate(rows)}


def test_relative_units_map_to_the_documented_raw_values():
    blocks = sparse_blocks()
    groups = np.repeat([0, 1, 2], [20, 80, 100])
    res = jaxnmf.fit(blocks, 3, key=KEY, max_iter=2, l2_F=0.1, l1_F=0.2, l2=[0.3, 0.4, 0.5], l1=0.6, group_F=0.7,
                     example_groups=groups, block_weights="none", dtype=np.float64)
    X = list(blocks.values())
    S, n = sum(np.sum(x ** 2) for x in X), 200
    raw = res.settings["raw_penalties"]
    np.testing.assert_allclose(raw["l2_F"], 0.1 * S / n)
    np.testing.assert_allclose(raw["l1_F"], 0.2 * S / n)
    np.testing.assert_allclose(raw["group_F"], 0.7 * S * np.sqrt([20, 80, 100]) / n)
    np.testing.assert_allclose(raw["l2"], np.array([0.3, 0.4, 0.5]) * n)
    np.testing.assert_allclose(raw["l1"], [0.6 * np.linalg.norm(x) * np.sqrt(n / x.shape[0]) for x in X])
    ref = reference.fit(blocks, 3, key=0, max_iter=2, l2_F=0.1, l1_F=0.2, l2=[0.3, 0.4, 0.5], l1=0.6, group_F=0.7,
                        example_groups=groups, dtype=np.float64)
    for k in raw:
        np.testing.assert_allclose(ref.settings["raw_penalties"][k], raw[k], rtol=1e-12)
    given = jaxnmf.fit(blocks, 3, key=KEY, max_iter=2, penalty_units="raw", l2_F=0.1, l2=0.3, group_F=0.7,
                       example_groups=groups, dtype=np.float64).settings["raw_penalties"]
    assert given["l2_F"] == 0.1 and list(given["l2"]) == [0.3] * 3 and list(given["group_F"]) == [0.7] * 3


@pytest.mark.parametrize("weights", ["none", "frobenius"])
def test_relative_penalties_are_scale_free_and_raw_ones_are_not(weights):
    blocks = sparse_blocks()
    kw = dict(key=KEY, max_iter=300, tol=1e-9, group_F=0.02, l2=0.02, block_weights=weights, solver="hals",
              dtype=np.float64)
    fits = {s: jaxnmf.fit({k: s * x for k, x in blocks.items()}, 8, **kw) for s in (1e-3, 1.0, 1e3)}
    base = fits[1.0]
    assert 0 < base.n_active < 8  # the penalty bites but leaves factors
    for s, res in fits.items():
        np.testing.assert_array_equal(res.active, base.active)
        np.testing.assert_array_equal(np.asarray(res.F) == 0, np.asarray(base.F) == 0)
        np.testing.assert_allclose(np.asarray(res.F), np.asarray(base.F), rtol=1e-6, atol=1e-9 * np.abs(base.F).max())
        assert res.loss == pytest.approx(base.loss * (s * s if weights == "none" else 1.0), rel=1e-6)
    # the same values in raw units change meaning with the data's scale (what issue 11 was about)
    raw = {s: jaxnmf.fit({k: s * x for k, x in blocks.items()}, 8, **dict(kw, penalty_units="raw", l2=1.0,
                                                                          group_F=1.0)).n_active
           for s in (1e-3, 1e3)}
    assert raw[1e-3] != raw[1e3]


def test_mu_and_hals_agree_on_a_group_sparse_problem():
    blocks = sparse_blocks()
    kw = dict(key=KEY, tol=1e-8, group_F=0.02, l2=0.02, block_weights="frobenius", dtype=np.float64)
    mu = jaxnmf.fit(blocks, 8, max_iter=1500, **kw)
    hals = jaxnmf.fit(blocks, 8, max_iter=300, solver="hals", **kw)
    assert 0 < hals.n_active < 8
    assert mu.loss == pytest.approx(hals.loss, rel=1e-2)
    assert mu.n_active == hals.n_active  # (which components survive may differ by a permutation)


def test_balance_keeps_the_products_and_minimises_the_penalties():
    rng = np.random.default_rng(1)
    F = rng.random((3, 40)) * np.array([1e-3, 1.0, 1e3])[:, None]
    Ws = (rng.random((10, 3)), rng.random((7, 3)))
    params = make_params(2, l2=[0.5, 0.2], l1=[0.1, 0.0], l2_F=0.3, l1_F=0.05, group_F=0.4, dtype=np.float64)
    state = MUState(jax.numpy.asarray(F), tuple(map(jax.numpy.asarray, Ws)))
    out = jax.tree.map(lambda a: a[0], balance(jax.tree.map(lambda a: a[None], state), params, None, 1))
    for w, w_new in zip(Ws, out.factors):
        np.testing.assert_allclose(np.asarray(w_new) @ np.asarray(out.F), w @ F, rtol=1e-10)
    pen = lambda s: float(_penalties(s.F, s.factors, params, None, 1))
    assert pen(out) < pen(state)
    for c in (0.9, 1.1):  # a minimum over every per-component rescaling
        for k in range(3):
            scale = np.ones(3)
            scale[k] = c
            moved = MUState(out.F * scale[:, None], tuple(w / scale[None, :] for w in out.factors))
            assert pen(moved) > pen(out)
    F_ref, W_ref = reference.balance(F, list(Ws), [0.5, 0.2], [0.1, 0.0], 0.3, 0.05, 0.4)
    np.testing.assert_allclose(np.asarray(out.F), F_ref, rtol=1e-9)


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_a_forced_collapse_is_reported(solver):
    blocks = sparse_blocks()
    with pytest.warns(RuntimeWarning, match="every factor is zero.*group_F=1000"):
        res = jaxnmf.fit(blocks, 4, key=KEY, max_iter=50, tol=1e-6, group_F=1e3, l2=0.01, solver=solver)
    assert res.collapsed and res.n_active == 0 and not res.converged and not res.active.any()
    ref = reference.fit(blocks, 4, key=0, max_iter=20, tol=1e-6, group_F=1e3, l2=0.01, solver=solver)
    assert ref.collapsed and not ref.converged
    fine = jaxnmf.fit(blocks, 4, key=KEY, max_iter=50, solver=solver)
    assert not fine.collapsed and fine.n_active == 4


def test_bad_penalty_units_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="penalty_units must be one of"):
        jaxnmf.fit(sparse_blocks(), 2, key=KEY, max_iter=2, penalty_units="absolute")
    with pytest.raises(ValueError, match="penalty_units must be one of"):
        reference.fit(sparse_blocks(), 2, key=0, max_iter=2, penalty_units=None)


def test_sparsity_path_switches_factors_off_from_warm_starts():
    """Along a non-decreasing path each fit starts from the previous one (so a second fit at the
    same value continues the first and never ends higher), J never rises within a fit, the number
    of active factors never rises, and the strongest value switches every factor off (reported,
    not raised). Bad paths are refused naming the argument."""
    blocks = sparse_blocks()
    values = [0.0, 0.02, 0.02, 0.2, 50.0]
    path = jaxnmf.group_sparsity_path(blocks, 6, values, key=KEY, max_iter=150, tol=0, l2=0.02,
                                      block_weights="frobenius", dtype=np.float64)
    assert [p.group_F for p in path] == values
    for p in path:
        assert np.all(np.diff(p.result.losses) <= 1e-9 * np.abs(p.result.losses[:-1]))
    assert path[2].result.loss <= path[1].result.loss * (1 + 1e-12)
    first = path[2].result.losses[0]  # J after one step from the previous fit: a continuation
    assert path[1].result.loss * (1 - 1e-3) <= first <= path[1].result.loss * (1 + 1e-12)
    active = [p.n_active for p in path]
    assert active[0] == 6 and all(b <= a for a, b in zip(active, active[1:])) and 0 < active[3] < 6
    assert path[-1].result.collapsed
    for bad, message in [([0.1, 0.05], "non-decreasing"), ([-1.0], ">= 0"), ([], "at least one"),
                         ([float("nan")], "finite")]:
        with pytest.raises(ValueError, match=f"group_F: .*{message}"):
            jaxnmf.group_sparsity_path(blocks, 3, bad, key=KEY)
