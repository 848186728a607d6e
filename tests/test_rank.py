"""jaxnmf.rank_curve / choose_rank: the rank of synthetic exact-rank data is found without labels."""
import jax
import numpy as np
import pytest

import jaxnmf

GRID = {3: [2, 3, 4, 5], 5: [3, 4, 5, 6, 7]}  # around each rank, both sides (each rank is a compilation)
NOISE = 0.05


def exact_rank(r, seed, n=200, rows=(60, 40, 10)):
    """Blocks W_b F + noise (NOISE of the clean entries' spread), and the noise's weighted relative
    size under frobenius weights."""
    rng = np.random.default_rng(seed)
    F = rng.random((r, n)) ** 2
    blocks, num = {}, 0.0
    for i, m in enumerate(rows):
        clean = (rng.random((m, r)) ** 2) @ F
        x = np.abs(clean + NOISE * clean.std() * rng.standard_normal(clean.shape))
        blocks[f"b{i}"] = x.astype(np.float32)
        num += np.sum((x - clean) ** 2) / np.sum(x ** 2)
    return blocks, float(np.sqrt(num / len(rows)))


@pytest.fixture(scope="module", params=[pytest.param("mu", marks=pytest.mark.heavy), "hals"])  # MU: 1 min of curves
def curves(request):
    solver = request.param
    options = dict(solver=solver, max_iter=300 if solver == "hals" else 1000, tol=1e-5, block_weights="frobenius")
    out = {}
    for r in (3, 5):
        blocks, noise = exact_rank(r, seed=r)
        out[r] = (jaxnmf.rank_curve(blocks, GRID[r], key=jax.random.key(0), n_restarts=2, **options), noise)
    return solver, out


@pytest.mark.parametrize("r", [3, 5])
def test_choose_rank_finds_the_rank(curves, r):
    solver, out = curves
    curve, _ = out[r]
    assert abs(jaxnmf.choose_rank(curve) - r) <= 1, (solver, curve.as_dict())


@pytest.mark.parametrize("r", [3, 5])
def test_held_out_errors_stay_at_the_noise_past_the_rank(curves, r):
    solver, out = curves
    curve, noise = out[r]
    past = curve.ranks > r
    # what is held out cannot be explained better than its noise: no error falls much below it
    assert np.all(curve.bcv_error[past] >= 0.9 * noise), (curve.bcv_error, noise)
    assert np.all(curve.held_out_error[past] >= 0.8 * noise), (curve.held_out_error, noise)
    # below the rank the prediction misses structure: the error there is far above the noise
    assert np.all(curve.bcv_error[curve.ranks < r] > 2 * noise)
    # the training error (nearly) only falls with the rank; stability is a mean cosine
    assert np.all(np.diff(curve.train_error) <= 3e-3)  # up to an unconverged MU fit from a random start
    assert np.all((curve.stability >= 0) & (curve.stability <= 1 + 1e-9))
    d = curve.as_dict()
    assert d["ranks"] == GRID[r] and len(d["bcv_error"]) == len(GRID[r]) and curve.n_train + curve.n_held_out == 200


def test_choose_rank_rule():
    def curve(e, stab):
        k = len(e)
        return jaxnmf.RankCurve(ranks=np.array([2, 4, 6, 8][:k]), bcv_error=np.array(e), held_out_error=np.array(e),
                                train_error=np.array(e), stability=np.array(stab), converged=np.ones(k, bool),
                                n_train=10, n_held_out=2, held_rows={})

    assert jaxnmf.choose_rank(curve([0.5, 0.2, 0.1, 0.11], [1, 1, 1, 1])) == 6
    assert jaxnmf.choose_rank(curve([0.5, 0.2, 0.101, 0.1], [1, 1, 1, 1])) == 6  # within tol of the best: fewer
    assert jaxnmf.choose_rank(curve([0.5, 0.2, 0.101, 0.1], [1, 1, 1, 1]), tol=0.001) == 8
    assert jaxnmf.choose_rank(curve([0.5, 0.49, 0.48, 0.47], [1, 1, 1, 1])) == 2  # no step buys tol
    assert jaxnmf.choose_rank(curve([0.5, 0.2, 0.1, 0.11], [1, 0.9, 0.5, 0.5]), min_stability=0.8) == 4
    assert jaxnmf.choose_rank(curve([0.5, 0.2, 0.1, 0.11], [0.1, 0.1, 0.1, 0.1]), min_stability=0.8) == 6


@pytest.mark.parametrize("kwargs, name", [
    (dict(ranks=[]), "ranks"),
    (dict(ranks=[0, 2]), "ranks"),
    (dict(ranks=[2, 2]), "ranks"),
    (dict(ranks=[2.5]), "ranks"),
    (dict(ranks=[500]), "ranks"),
    (dict(held_out=0.0), "held_out"),
    (dict(held_out=1.5), "held_out"),
    (dict(held_out=0.001), "held_out"),
    (dict(n_restarts=0), "n_restarts"),
    (dict(rank=3), "rank"),
])
def test_bad_arguments_are_named(kwargs, name):
    blocks, _ = exact_rank(2, seed=0, n=40, rows=(6, 4))
    args = dict(ranks=[1, 2], key=jax.random.key(0), max_iter=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        jaxnmf.rank_curve(blocks, **args)


def test_bad_blocks_and_choose_rank_arguments_are_named():
    with pytest.raises(ValueError, match="^blocks:"):
        jaxnmf.rank_curve("x", [1], key=jax.random.key(0))
    with pytest.raises(ValueError, match="^blocks:"):
        jaxnmf.rank_curve({"a": np.ones((3, 5)), "b": np.ones((3, 6))}, [1], key=jax.random.key(0))
    with pytest.raises(ValueError, match="^blocks:"):
        jaxnmf.rank_curve({"a": np.ones((1, 20))}, [1], key=jax.random.key(0))
    with pytest.raises(ValueError, match="^curve:"):
        jaxnmf.choose_rank({"ranks": [1]})
    c = jaxnmf.RankCurve(ranks=np.array([1]), bcv_error=np.array([0.1]), held_out_error=np.array([0.1]),
                         train_error=np.array([0.1]), stability=np.array([np.nan]), converged=np.ones(1, bool),
                         n_train=4, n_held_out=1, held_rows={})
    for kwargs, name in ((dict(tol=0.0), "tol"), (dict(tol=1.0), "tol"), (dict(min_stability=2.0), "min_stability")):
        with pytest.raises(ValueError, match=rf"^{name}:"):
            jaxnmf.choose_rank(c, **kwargs)
    assert jaxnmf.choose_rank(c, min_stability=0.9) == 1  # no stability measured: the rule's rank
