"""The coupled NMF solver against the NumPy reference, closed-form facts and bad input."""
import jax
import numpy as np
import pytest

import jaxnmf
from jaxnmf import reference
from jaxnmf._loop import _run_restarts

KEY = jax.random.key(0)


def low_rank_blocks(seed=0, n=120, rows=(30, 50, 20), rank=4, noise=0.01, mapping=True):
    rng = np.random.default_rng(seed)
    F = rng.random((rank, n))
    blocks = [rng.random((r, rank)) @ F + noise * rng.random((r, n)) for r in rows]
    return ({f"b{i}": x for i, x in enumerate(blocks)} if mapping else blocks), F


def explicit_init(blocks, rank, seed=1):
    rng = np.random.default_rng(seed)
    n = next(iter(blocks.values())).shape[1]
    return rng.random((rank, n)) + 0.1, {k: rng.random((x.shape[0], rank)) + 0.1 for k, x in blocks.items()}


SETTINGS = [
    dict(),
    dict(l2_F=0.5, l2=0.1, l1_F=0.2, l1={"b0": 0.0, "b1": 0.3, "b2": 0.05}),
    dict(l2_F=1.0, l1_F=1.0, unit_columns=True, penalty_units="raw"),  # the authors' variant
    dict(block_weights="frobenius", l2=[0.1, 0.2, 0.3]),
    dict(group_F=0.5),
    dict(group_F=0.3, example_groups=np.arange(120) % 3),
]


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 2e-3)])
@pytest.mark.parametrize("opts", SETTINGS, ids=lambda o: ",".join(o) or "plain")
def test_agrees_with_numpy_reference_from_same_factors(dtype, rtol, opts):
    blocks, _ = low_rank_blocks()
    init = explicit_init(blocks, 4)
    kw = dict(key=KEY, max_iter=60, tol=0, init=init, dtype=dtype, **opts)
    ours, ref = jaxnmf.fit(blocks, 4, **kw), reference.fit(blocks, 4, **kw)
    assert ours.n_iter == ref.n_iter == 60
    np.testing.assert_allclose(np.asarray(ours.F), ref.F, rtol=rtol, atol=rtol * np.abs(ref.F).max())
    for k in blocks:
        w, wr = np.asarray(ours.factors[k]), ref.factors[k]
        np.testing.assert_allclose(w, wr, rtol=rtol, atol=rtol * np.abs(wr).max())
        assert ours.relative_errors[k] == pytest.approx(ref.relative_errors[k], rel=10 * rtol)
    np.testing.assert_allclose(ours.losses, ref.losses, rtol=rtol)
    assert ours.loss == pytest.approx(ref.loss, rel=rtol)


def test_nndsvda_init_matches_reference_including_randomised_svd():
    # small: exact SVD; large (M*N > 1e6): randomised SVD with power iterations
    for rows, n in [((30, 50), 100), ((700, 400), 1100)]:
        rng = np.random.default_rng(3)
        # distinct scales per component: singular values well apart, so the init is determined
        F = rng.random((5, n)) * np.array([1, 0.6, 0.36, 0.22, 0.13])[:, None]
        blocks = [rng.random((r, 5)) @ F + 0.01 * rng.random((r, n)) for r in rows]
        ours = jaxnmf.fit(blocks, 5, key=KEY, max_iter=1, tol=0, dtype=np.float64)
        ref = reference.fit(blocks, 5, key=0, max_iter=1, tol=0, dtype=np.float64)
        for w, wr in zip(ours.factors, ref.factors):
            prod, prod_ref = np.asarray(w) @ np.asarray(ours.F), wr @ ref.F
            assert np.linalg.norm(prod - prod_ref) / np.linalg.norm(prod_ref) < 1e-6


def test_restarts_under_vmap_equal_a_loop_of_single_fits():
    blocks, _ = low_rank_blocks(mapping=False)
    kw = dict(init="random", max_iter=50, tol=0)
    together = jaxnmf.fit(blocks, 4, key=KEY, n_restarts=3, **kw)
    singles = [jaxnmf.fit(blocks, 4, key=k, **kw) for k in jax.random.split(KEY, 3)]
    np.testing.assert_allclose(together.restart_losses, [s.loss for s in singles], rtol=1e-4)
    best = singles[int(np.argmin([s.loss for s in singles]))]
    np.testing.assert_allclose(np.asarray(together.F), np.asarray(best.F), rtol=1e-3, atol=1e-4)
    assert together.loss == min(together.restart_losses)


def test_new_data_of_same_shapes_does_not_recompile():
    a, _ = low_rank_blocks(seed=1)
    b, _ = low_rank_blocks(seed=2)
    jaxnmf.fit(a, 3, key=KEY, max_iter=20, l2_F=0.1)
    size = _run_restarts._cache_size()
    jaxnmf.fit(b, 3, key=jax.random.key(5), max_iter=20, l2_F=0.7, tol=1e-3)
    assert _run_restarts._cache_size() == size


def test_tol_zero_runs_max_iter_and_tol_stops_early():
    blocks, _ = low_rank_blocks()
    full = jaxnmf.fit(blocks, 4, key=KEY, max_iter=123, tol=0)
    assert full.n_iter == 123 and len(full.losses) == 123 and not full.converged
    noisy, _ = low_rank_blocks(noise=0.5)
    early = jaxnmf.fit(noisy, 4, key=KEY, max_iter=2000, tol=1e-3)
    assert early.converged and early.n_iter < 2000 and early.n_iter % 10 == 0


def test_float32_and_float64_reach_the_same_fit():
    blocks, _ = low_rank_blocks()
    r32 = jaxnmf.fit(blocks, 4, key=KEY, max_iter=100, tol=0, dtype=np.float32)
    r64 = jaxnmf.fit(blocks, 4, key=KEY, max_iter=100, tol=0, dtype=np.float64)
    assert r32.loss == pytest.approx(r64.loss, rel=1e-3)


def test_loss_is_the_objective_of_the_returned_factors():
    blocks, _ = low_rank_blocks()
    opts = dict(l2_F=0.3, l1=0.1, group_F=0.2, block_weights="frobenius")
    res = jaxnmf.fit(blocks, 4, key=KEY, max_iter=30, dtype=np.float64, **opts)
    assert res.loss == pytest.approx(float(jaxnmf.objective(blocks, res.F, res.factors, **opts)), rel=1e-10)
    weights = [1 / np.sum(x ** 2) for x in blocks.values()]
    raw = res.settings["raw_penalties"]  # the relative values mapped to Eq. 3.1's (tests/test_penalty_units.py)
    ref = reference.objective_value([np.asarray(x) for x in blocks.values()], np.asarray(res.F),
                                    [np.asarray(w) for w in res.factors.values()], weights, raw["l2"], raw["l1"],
                                    raw["l2_F"], raw["l1_F"], group_F=raw["group_F"])
    assert res.loss == pytest.approx(ref, rel=1e-10)
    assert res.losses[-1] == pytest.approx(res.loss, rel=1e-8)


def test_containers_and_names_are_kept():
    blocks, _ = low_rank_blocks()
    res = jaxnmf.fit(blocks, 2, key=KEY, max_iter=10)
    assert list(res.factors) == list(blocks) and list(res.relative_errors) == list(blocks)
    assert res.F.shape == (2, 120) and res.factors["b1"].shape == (50, 2)
    res = jaxnmf.fit(tuple(blocks.values()), 2, key=KEY, max_iter=10)
    assert isinstance(res.factors, tuple) and len(res.factors) == 3


def test_unit_columns_and_frobenius_weights():
    blocks, _ = low_rank_blocks()
    res = jaxnmf.fit(blocks, 4, key=KEY, max_iter=20, unit_columns=True, l2_F=1.0, l1_F=1.0, penalty_units="raw")
    for w in res.factors.values():
        np.testing.assert_allclose(np.linalg.norm(np.asarray(w), axis=0), 1.0, rtol=1e-5)
    res = jaxnmf.fit(blocks, 4, key=KEY, max_iter=5, block_weights="frobenius", dtype=np.float64)
    for k, x in blocks.items():
        assert res.block_weights[k] == pytest.approx(1 / np.sum(x ** 2))


def test_transform_recovers_F_of_the_training_blocks():
    blocks, _ = low_rank_blocks(noise=0.0)
    res = jaxnmf.fit(blocks, 4, key=KEY, max_iter=3000, tol=1e-7, dtype=np.float64)
    F = np.asarray(jaxnmf.transform(res, blocks, max_iter=3000, tol=1e-9))
    assert np.linalg.norm(F - np.asarray(res.F)) / np.linalg.norm(np.asarray(res.F)) < 1e-2
    F_ref = reference.transform(res, blocks, max_iter=3000, tol=1e-9)
    assert np.linalg.norm(F - F_ref) / np.linalg.norm(F_ref) < 1e-6


def test_large_group_penalty_switches_whole_factors_off():
    # the penalty needs W bounded (here l2 on W): otherwise F -> F / c, W -> c W escapes it
    blocks, _ = low_rank_blocks(rank=3)
    res = jaxnmf.fit(blocks, 8, key=KEY, max_iter=300, tol=0, group_F=5.0, l2=1.0, penalty_units="raw")
    row_norms = np.linalg.norm(np.asarray(res.F), axis=1)
    assert (row_norms < 1e-3 * row_norms.max()).sum() >= 5
    assert (row_norms > 0.1 * row_norms.max()).sum() >= 2
    groups = np.repeat(np.arange(4), 30)
    res = jaxnmf.fit(blocks, 4, key=KEY, max_iter=300, tol=0, group_F=200.0, l2=1.0, example_groups=groups,
                     penalty_units="raw")
    F = np.asarray(res.F)
    norms = np.array([[np.linalg.norm(F[k, groups == g]) for g in range(4)] for k in range(4)])
    assert (norms < 1e-3 * norms.max()).sum() >= 4


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_dead_neurons_zero_blocks_and_extreme_ranges_stay_finite(scale):
    rng = np.random.default_rng(0)
    x = rng.random((40, 60)) * scale
    x[:7] = 0.0  # dead neurons
    wide = rng.random((20, 60)) * np.logspace(-30, 30, 60)  # 1e-30 ... 1e30 in one block
    blocks = {"x": x, "zero": np.zeros((10, 60)), "wide": wide}
    for weights in ("none", "frobenius"):
        for init in ("nndsvda", "random"):
            res = jaxnmf.fit(blocks, 3, key=KEY, max_iter=30, init=init, block_weights=weights)
            for a in [res.F, *res.factors.values()]:
                assert np.isfinite(np.asarray(a)).all()
            assert np.isfinite(res.losses).all() and np.isfinite(res.loss) and res.finite
            assert np.isfinite(list(res.relative_errors.values())).all()
            np.testing.assert_array_equal(np.asarray(res.factors["zero"]), 0.0)


def _bad(**changes):
    blocks, _ = low_rank_blocks()
    kw = dict(rank=3, key=KEY, max_iter=2)
    kw.update(changes)
    return jaxnmf.fit(kw.pop("blocks", blocks), **kw)


@pytest.mark.parametrize("changes,error,match", [
    (dict(blocks={"a": -np.ones((3, 4))}), ValueError, "block 'a' has negative"),
    (dict(blocks={"a": np.full((3, 4), np.nan)}), ValueError, "block 'a' contains NaN"),
    (dict(blocks=[np.ones((3, 4)), np.full((3, 4), np.inf)]), ValueError, "block 1 contains NaN or Inf"),
    (dict(blocks={"a": np.ones((3, 4)), "b": np.ones((3, 5))}), ValueError, "block 'b' has 5 columns"),
    (dict(blocks={"a": np.ones(4)}), ValueError, "block 'a' must be 2-D"),
    (dict(blocks={"a": np.ones((0, 4))}), ValueError, "block 'a' is empty"),
    (dict(blocks={}), ValueError, "blocks is empty"),
    (dict(blocks=np.ones((3, 4))), TypeError, "sequence or a mapping"),
    (dict(rank=0), ValueError, "rank must be >= 1"),
    (dict(rank=121), ValueError, "larger than the data allows"),
    (dict(init="svd"), ValueError, "init must be one of"),
    (dict(block_weights="l2"), ValueError, "block_weights must be one of"),
    (dict(block_weights=[1.0, -1.0, 1.0]), ValueError, "block_weights must be positive"),
    (dict(l2=[0.1, 0.2]), ValueError, "l2 has 2 values for 3 blocks"),
    (dict(l1_F=-1.0), ValueError, "l1_F must be"),
    (dict(init=(np.ones((3, 120)), {"b0": np.ones((30, 3))})), ValueError, "init factors have keys"),
    (dict(init=(np.ones((3, 120)), {"b0": np.ones((30, 3)), "b1": np.ones((5, 3)), "b2": np.ones((20, 3))})),
     ValueError, "init factor of block 'b1' has shape"),
    (dict(init=(np.ones((2, 120)), {})), ValueError, "init F0 has shape"),
    (dict(n_restarts=3), ValueError, "n_restarts > 1 needs init='random'"),
    (dict(example_groups=np.zeros(7, int)), ValueError, "example_groups must be"),
])
def test_bad_input_is_refused_with_a_clear_message(changes, error, match):
    with pytest.raises(error, match=match):
        _bad(**changes)


def test_transform_refuses_blocks_that_do_not_match_the_fit():
    blocks, _ = low_rank_blocks()
    res = jaxnmf.fit(blocks, 3, key=KEY, max_iter=5)
    with pytest.raises(ValueError, match="block 'b1' of new_blocks has 7 rows"):
        jaxnmf.transform(res, {**blocks, "b1": np.ones((7, 120))})
    with pytest.raises(ValueError, match="new_blocks have blocks"):
        jaxnmf.transform(res, {"b0": blocks["b0"]})


def test_aligned_numpy_input_is_used_in_place_on_cpu_and_other_input_is_converted_once():
    from jaxnmf._fit import _to_device
    x = jaxnmf.aligned_empty((30, 50), np.float32)
    x[:] = np.random.default_rng(0).random((30, 50))
    on_device = _to_device(x, np.float32)
    if jax.default_backend() == "cpu":
        assert on_device.unsafe_buffer_pointer() == x.ctypes.data
    raw = np.empty(30 * 50 * 4 + 64, np.uint8)
    start = 4 + (-raw.ctypes.data % 64)  # 4 bytes past a 64-byte boundary
    unaligned = raw[start:start + 30 * 50 * 4].view(np.float32).reshape(30, 50)
    unaligned[:] = x
    for other in (unaligned, x.astype(np.float64), x.tolist(), jax.numpy.asarray(x, np.float64)):
        converted = _to_device(other, np.float32)
        assert converted.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(converted), x)
    res_aligned = jaxnmf.fit([x], 3, key=KEY, max_iter=20)
    res_copy = jaxnmf.fit([np.array(x)], 3, key=KEY, max_iter=20)
    np.testing.assert_array_equal(np.asarray(res_aligned.F), np.asarray(res_copy.F))


def test_a_non_finite_step_stops_the_fit_with_a_warning(monkeypatch):
    """A step whose objective is NaN is discarded: the fit returns the last finite iterate (here
    the start) with finite=False and converged=False, and says so."""
    import jaxnmf._fit as fit_module
    from jaxnmf._mu import mu_step

    def nan_step(blocks, state, params, sq_norms, **kw):
        new, loss = mu_step(blocks, state, params, sq_norms, **kw)
        return new, jax.numpy.where(jax.numpy.sum(new.F) < 0, loss, jax.numpy.nan)  # always NaN

    monkeypatch.setitem(fit_module._STEPS, "mu", nan_step)
    blocks, _ = low_rank_blocks()
    with pytest.warns(RuntimeWarning, match="iteration 1 gave a non-finite objective"):
        res = jaxnmf.fit(blocks, 3, key=KEY, max_iter=20)
    assert not res.finite and not res.converged and res.n_iter == 0
    assert np.isfinite(np.asarray(res.F)).all() and np.isfinite(res.loss)
