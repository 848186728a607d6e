"""``fit_streamed`` (blocks read from disk in row tiles) against the in-memory one-pass fit, the explicit
objective, a NumPy computation of J, and its refusals of bad blocks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnmf
from jaxnmf import _stream

KEY = jax.random.key(0)
RANK, N, ROWS = 5, 200, {"a": 300, "b": 90}
TILE_ROWS = 37  # 8 full tiles and a partial one of 4 rows in block a, 2 and a partial one of 16 in block b
OPTIONS = dict(block_weights="frobenius", l2=0.1, l1_F=0.01, max_iter=40, tol=1e-3, check_every=5)
TOL = {jnp.float64: dict(rtol=1e-10, atol=1e-13), jnp.float32: dict(rtol=1e-4, atol=1e-5)}  # atol: of the largest entry


@functools.cache
def data(dtype):
    """In-memory blocks (low rank plus noise) and an explicit start, in ``dtype``."""
    rng = np.random.default_rng(0)
    G = rng.exponential(size=(8, N))
    blocks = {k: (rng.exponential(size=(r, 8)) @ G + rng.random((r, N))).astype(dtype) for k, r in ROWS.items()}
    blocks["b"] *= 40  # scales that differ
    init = (rng.random((RANK, N)) + 0.1, {k: rng.random((r, RANK)) + 0.1 for k, r in ROWS.items()})
    return blocks, init


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The blocks of both dtypes as .npy files: {dtype: {name: path}}."""
    root = tmp_path_factory.mktemp("blocks")
    out = {}
    for dtype in (jnp.float64, jnp.float32):
        out[dtype] = {}
        for k, x in data(dtype)[0].items():
            out[dtype][k] = root / f"{k}_{np.dtype(dtype).name}.npy"
            np.save(out[dtype][k], x)
    return out


def streamed(paths, dtype, solver, **kw):
    options = {**OPTIONS, "key": KEY, "init": data(dtype)[1], **kw}
    return jaxnmf.fit_streamed(paths, RANK, solver=solver, dtype=dtype,
                               tile_bytes=TILE_ROWS * N * np.dtype(dtype).itemsize, **options)


@pytest.fixture(scope="module")
def pair(folder):
    """pair(solver, dtype): (in-memory fit(one_pass=True), fit_streamed from the files) from the same explicit
    start, each computed once."""
    @functools.cache
    def get(solver, dtype):
        blocks, init = data(dtype)
        memory = jaxnmf.fit(blocks, RANK, key=KEY, init=init, solver=solver, dtype=dtype, one_pass=True, **OPTIONS)
        return memory, streamed(folder[dtype], dtype, solver)
    return get


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_streamed_fit_equals_the_in_memory_one_pass_fit(pair, solver, dtype):
    memory, ours = pair(solver, dtype)
    tol = TOL[dtype]
    if dtype == jnp.float64:  # the tol test decides alike (float32 checks may differ by one)
        assert (ours.n_iter, ours.converged) == (memory.n_iter, memory.converged)
    n = min(ours.n_iter, memory.n_iter)
    assert n >= 10 and ours.finite and not ours.collapsed
    np.testing.assert_allclose(ours.losses[:n], memory.losses[:n], **tol)
    if ours.n_iter == memory.n_iter:
        for a, b in [(ours.F, memory.F)] + [(ours.factors[k], memory.factors[k]) for k in ROWS]:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol["rtol"],
                                       atol=tol["atol"] * float(np.max(b)))
        assert ours.loss == pytest.approx(memory.loss, rel=tol["rtol"])
        for k in ROWS:
            assert ours.relative_errors[k] == pytest.approx(memory.relative_errors[k], rel=tol["rtol"])
    # ||X_b||^2: fit sums float32 blocks' rows on the device in float32, fit_streamed in float64
    for k in ("l2", "l1", "l2_F", "l1_F", "group_F"):
        np.testing.assert_allclose(ours.settings["raw_penalties"][k], memory.settings["raw_penalties"][k],
                                   rtol=1e-12 if dtype == jnp.float64 else 1e-7)
    assert ours.block_weights == pytest.approx(memory.block_weights)
    assert ours.settings["streamed"] and ours.settings["tile_bytes"] == TILE_ROWS * N * np.dtype(dtype).itemsize
    assert list(ours.factors) == ["a", "b"] and ours.restart_losses.shape == (1,)


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_objective_is_the_explicit_one_and_never_rises(pair, solver):
    """The returned J is jaxnmf.objective of the returned factors and a NumPy sum_b w_b ||X_b - W_b F||^2
    + penalties; the trace never rises."""
    blocks, _ = data(jnp.float64)
    _, ours = pair(solver, jnp.float64)
    penalties = {k: OPTIONS[k] for k in ("block_weights", "l2", "l1_F")}
    assert ours.loss == pytest.approx(float(jaxnmf.objective(blocks, ours.F, ours.factors, **penalties)), rel=1e-12)
    F = np.asarray(ours.F)
    raw = ours.settings["raw_penalties"]
    J = raw["l2_F"] * np.sum(F * F) + 2 * raw["l1_F"] * np.sum(F)
    for b, (k, x) in enumerate(blocks.items()):
        w = np.asarray(ours.factors[k])
        J += np.sum((x - w @ F) ** 2) / np.sum(x * x) + raw["l2"][b] * np.sum(w * w) + 2 * raw["l1"][b] * np.sum(w)
        assert ours.relative_errors[k] == pytest.approx(np.linalg.norm(x - w @ F) / np.linalg.norm(x), rel=1e-10)
    assert ours.loss == pytest.approx(J, rel=1e-10)
    assert np.all(np.diff(ours.losses) <= 1e-12 * ours.losses[:-1])
    assert ours.losses[-1] == pytest.approx(ours.loss, rel=1e-9)  # the pass's products agree with the residuals


def test_memmaps_arrays_and_paths_give_the_same_fit(folder, pair):
    paths = folder[jnp.float64]
    _, by_path = pair("mu", jnp.float64)
    memmaps = {k: np.load(p, mmap_mode="r") for k, p in paths.items()}
    for other in (memmaps, data(jnp.float64)[0]):
        res = streamed(other, jnp.float64, "mu")
        assert res.n_iter == by_path.n_iter and res.loss == by_path.loss
        np.testing.assert_array_equal(np.asarray(res.F), np.asarray(by_path.F))
    F0, W0 = data(jnp.float64)[1]
    as_list = streamed([paths["a"], str(paths["b"])], jnp.float64, "mu", init=(F0, [W0["a"], W0["b"]]),
                       block_weights=[1 / float(np.sum(x * x)) for x in data(jnp.float64)[0].values()])
    assert isinstance(as_list.factors, list) and as_list.loss == pytest.approx(by_path.loss, rel=1e-12)


def test_random_init_is_fits(folder):
    blocks, _ = data(jnp.float64)
    kw = dict(OPTIONS, key=jax.random.key(3), init="random", dtype=jnp.float64)
    memory = jaxnmf.fit(blocks, RANK, one_pass=True, **kw)
    ours = jaxnmf.fit_streamed(folder[jnp.float64], RANK, tile_bytes=TILE_ROWS * N * 8, **kw)
    assert ours.n_iter == memory.n_iter >= 10 and ours.settings["init"] == "random"
    np.testing.assert_allclose(ours.losses, memory.losses, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(ours.F), np.asarray(memory.F), rtol=1e-9, atol=1e-12)


def test_transform_and_save_fit_take_the_streamed_result(pair, tmp_path):
    blocks, _ = data(jnp.float64)
    memory, ours = pair("mu", jnp.float64)
    new = {k: x[:, :40] for k, x in blocks.items()}
    np.testing.assert_allclose(np.asarray(jaxnmf.transform(ours, new)), np.asarray(jaxnmf.transform(memory, new)),
                               rtol=1e-8, atol=1e-10)
    loaded = jaxnmf.load_fit(jaxnmf.save_fit(ours, tmp_path / "fit"))
    assert loaded.settings["streamed"] and loaded.loss == ours.loss
    np.testing.assert_array_equal(np.asarray(jaxnmf.transform(loaded, new)), np.asarray(jaxnmf.transform(ours, new)))


def test_a_non_finite_step_returns_the_last_finite_iterate(folder, monkeypatch):
    paths = folder[jnp.float64]
    three = streamed(paths, jnp.float64, "mu", max_iter=3, tol=0)
    calls, penalty = [], _stream._penalty

    def poisoned(F, factors, params):
        calls.append(1)
        return penalty(F, factors, params) + (jnp.nan if len(calls) > 3 else 0.0)

    monkeypatch.setattr(_stream, "_penalty", poisoned)
    with pytest.warns(RuntimeWarning, match="iteration 4 gave a non-finite objective"):
        res = streamed(paths, jnp.float64, "mu", max_iter=10, tol=0)
    assert (res.n_iter, res.finite, res.converged) == (3, False, False)
    for a, b in [(res.F, three.F)] + [(res.factors[k], three.factors[k]) for k in ROWS]:  # the discarded pass's W_b
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)  # updated a copy
    assert res.loss == pytest.approx(three.loss, rel=1e-12)  # by a read-only residual pass


def test_bad_blocks_are_named(folder, tmp_path):
    good = data(jnp.float64)[0]["a"]
    text = tmp_path / "notes.npy"
    text.write_text("not an array")
    np.save(tmp_path / "fortran.npy", np.asfortranarray(good))
    negative, nan = good.copy(), good.copy()
    negative[3, 4], nan[5, 6] = -1.0, np.nan
    cases = [(tmp_path / "missing.npy", "block 'b': no file at"),
             (text, "block 'b': .* is not a readable .npy file"),
             (tmp_path / "fortran.npy", "block 'b': .* Fortran order"),
             (np.ones(N), r"block 'b' must be 2-D"),
             (negative, "block 'b' has negative entries"),
             (nan, "block 'b' contains NaN or Inf"),
             (good[:, :N - 1], "block 'b' has 199 columns but block 'a' has 200"),
             (good.astype(np.float16), "block 'b' has dtype float16"),
             ([[1.0, 2.0]], "block 'b' must be a path to a .npy file or a NumPy array")]
    for bad, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            jaxnmf.fit_streamed({"a": folder[jnp.float64]["a"], "b": bad}, RANK, key=KEY, dtype=jnp.float64)
    with pytest.raises(ValueError, match="init must be 'random' or explicit"):
        jaxnmf.fit_streamed([good], RANK, key=KEY, init="nndsvda")
    with pytest.raises(ValueError, match="tile_bytes must be an int >= 1"):
        jaxnmf.fit_streamed([good], RANK, key=KEY, tile_bytes=0)
    with pytest.raises(TypeError, match="n_restarts"):
        jaxnmf.fit_streamed([good], RANK, key=KEY, n_restarts=2)
