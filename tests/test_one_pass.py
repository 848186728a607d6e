"""One pass over the data per iteration, and 16-bit block storage, against the plain two-pass steps,
the NumPy reference on the rounded data, and XLA's own account of the memory a step needs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnmf
from jaxnmf import reference
from jaxnmf._fit import _to_device
from jaxnmf._hals import hals_step
from jaxnmf._one_pass import OnePassStep, with_statistics
from jaxnmf._problem import as_blocks, block_stats
from jaxnmf._init import init_nndsvd
from jaxnmf._mu import MUState, make_params, mu_step
from jaxnmf._tiles import NarrowBlock

KEY = jax.random.key(0)
PENALTIES = dict(weights=[1.0, 2.0, 0.5], l2=[0.1, 0.0, 0.2], l1=[0.0, 0.3, 0.1], l2_F=0.1, l1_F=0.05, group_F=0.2)


def problem(dtype, n=37, rows=(23, 8, 50), rank=4, seed=0):
    rng = np.random.default_rng(seed)
    blocks = tuple(jnp.asarray(rng.random((r, n)), dtype) for r in rows)
    state = MUState(jnp.asarray(rng.random((rank, n)), dtype), tuple(jnp.asarray(rng.random((r, rank)), dtype)
                                                                      for r in rows))
    return blocks, state, jnp.stack([jnp.sum(x * x) for x in blocks])


@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("unit_columns,groups", [(False, np.arange(37) % 3), (True, None)],
                         ids=["example-groups", "unit-columns"])
def test_one_pass_step_gives_the_iterates_of_the_plain_step(solver, unit_columns, groups):
    blocks, state, sq = problem(jnp.float64)
    params = make_params(3, dtype=jnp.float64, **PENALTIES)
    groups = None if groups is None else jnp.asarray(groups)
    kw = dict(unit_columns=unit_columns, n_groups=1 if groups is None else 3)
    # tiles of 3 rows of 37 float64: 7 full tiles and a remainder in the first block, 2 and 2 in the second
    one_pass = jax.jit(lambda s: OnePassStep(solver, tile_bytes=3 * 37 * 8)(blocks, s, params, sq, groups=groups, **kw))
    plain = jax.jit(lambda s: {"mu": mu_step, "hals": hals_step}[solver](blocks, s, params, sq, groups=groups, **kw))
    a, b = state, with_statistics(blocks, state, params)
    for _ in range(25):
        a, loss_a = plain(a)
        b, loss_b = one_pass(b)
        assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-12)
    np.testing.assert_allclose(np.asarray(b.F), np.asarray(a.F), rtol=1e-10, atol=1e-12)
    for wa, wb in zip(a.factors, b.factors):
        np.testing.assert_allclose(np.asarray(wb), np.asarray(wa), rtol=1e-10, atol=1e-12)
    # the carried statistics are those of the returned factors
    fresh = with_statistics(blocks, MUState(b.F, b.factors), params)
    np.testing.assert_allclose(np.asarray(b.R), np.asarray(fresh.R), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(b.G), np.asarray(fresh.G), rtol=1e-12)


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_fit_with_one_pass_equals_the_plain_fit(solver):
    rng = np.random.default_rng(1)
    blocks = {"a": rng.random((60, 80)), "b": 5 * rng.random((30, 80))}
    for opts in (dict(l2_F=1.0, l1_F=1.0, unit_columns=True, penalty_units="raw"),
                 dict(n_restarts=3, init="random", tol=1e-6)):
        kw = dict(key=KEY, max_iter=40, dtype=jnp.float64, solver=solver, **opts)
        plain, one = jaxnmf.fit(blocks, 5, **kw), jaxnmf.fit(blocks, 5, one_pass=True, **kw)
        assert (one.n_iter, one.converged) == (plain.n_iter, plain.converged)
        assert one.settings["one_pass"] and not plain.settings["one_pass"]
        assert one.loss == pytest.approx(plain.loss, rel=1e-12)
        np.testing.assert_allclose(one.losses, plain.losses, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(one.F), np.asarray(plain.F), rtol=1e-9, atol=1e-12)


def rounded(x, dtype):
    return np.asarray(jnp.asarray(x, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("block_dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_blocks_fit_the_rounded_data_like_the_numpy_reference(block_dtype):
    rng = np.random.default_rng(2)
    blocks = {"a": rng.random((60, 80)) * 3, "b": rng.random((30, 80))}
    init = (rng.random((5, 80)) + 0.1, {k: rng.random((x.shape[0], 5)) + 0.1 for k, x in blocks.items()})
    kw = dict(key=KEY, max_iter=50, tol=0, init=init, l2=0.1)
    ours = jaxnmf.fit(blocks, 5, block_dtype=block_dtype, **kw)
    ref = reference.fit({k: rounded(x, block_dtype) for k, x in blocks.items()}, 5, **kw)
    assert ours.settings["one_pass"] and ours.settings["block_dtype"] == block_dtype
    np.testing.assert_allclose(np.asarray(ours.F, np.float64), ref.F, rtol=2e-3, atol=2e-3 * ref.F.max())
    assert ours.loss == pytest.approx(ref.loss, rel=2e-3)
    # the same fit from a JAX array as input
    on_device = jaxnmf.fit({k: jnp.asarray(x, jnp.float32) for k, x in blocks.items()}, 5, block_dtype=block_dtype,
                           **kw)
    assert on_device.loss == pytest.approx(ours.loss, rel=1e-6)


def test_block_statistics_and_randomised_init_of_16_bit_blocks_match_the_rounded_float32_data():
    rng = np.random.default_rng(4)
    # 1.2e6 entries: the randomised SVD. The compared start must be determined by the data: the
    # second block is rank 5 with well separated singular values plus faint noise (uniform noise
    # alone has near-equal trailing singular values, whose vectors any rounding rotates).
    low_rank = 7 * (rng.random((400, 5)) * [1, 0.6, 0.36, 0.22, 0.13]) @ rng.random((5, 1100))
    x = [rng.random((700, 1100)) * 1e-20, low_rank + 0.01 * rng.random((400, 1100))]
    sv = np.linalg.svd(np.vstack(x), compute_uv=False)[:6]
    assert np.all(sv[1:5] / sv[:4] < 0.7) and sv[5] / sv[4] < 0.01  # the premise: clear spectral gaps
    narrow = [_to_device(b, jnp.bfloat16) for b in x]
    assert all(isinstance(b, NarrowBlock) for b in narrow)
    wide = [jnp.asarray(rounded(b, jnp.bfloat16), jnp.float32) for b in x]
    ours, expected = block_stats(as_blocks(narrow)), block_stats(as_blocks([rounded(b, jnp.bfloat16) for b in x]))
    for field in ("max", "sq_norm", "mean"):
        np.testing.assert_allclose(getattr(ours, field), getattr(expected, field), rtol=1e-5)
    args = (np.ones(2), np.ones(2), expected.mean, 5, KEY)
    a = init_nndsvd(narrow, *args, fill_zeros=True, dtype=jnp.float32)
    b = init_nndsvd(wide, *args, fill_zeros=True, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(a.F), np.asarray(b.F), rtol=1e-3, atol=1e-4 * float(b.F.max()))


def test_16_bit_blocks_are_converted_tile_by_tile_never_whole():
    rows, n, rank = 4000, 1000, 5
    rng = np.random.default_rng(5)
    x = rng.random((rows, n)).astype(np.float32)
    state = MUState(jnp.asarray(rng.random((rank, n)), jnp.float32), (jnp.asarray(rng.random((rows, rank)),
                                                                                  jnp.float32),))
    params, sq = make_params(1), jnp.ones(1)
    f32_size = rows * n * 4

    def temp_bytes(step, blocks, state):
        compiled = jax.jit(lambda b, s: step(b, s, params, sq)).lower(blocks, state).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    narrow = (_to_device(x, jnp.bfloat16),)
    one_pass = OnePassStep("mu", tile_bytes=1 << 20)
    assert temp_bytes(one_pass, narrow, with_statistics(narrow, state, params)) < f32_size / 4
    # what the measure catches: the two-pass step on the same blocks converts them whole
    assert temp_bytes(mu_step, (narrow[0].astype(jnp.bfloat16),), state) >= f32_size


@pytest.mark.parametrize("kw,match", [
    (dict(block_dtype=np.int8), "block_dtype must be a floating dtype"),
    (dict(block_dtype=np.float64), "block_dtype must be a floating dtype no wider than dtype=float32"),
    (dict(block_dtype=jnp.bfloat16, one_pass=False), "block_dtype=bfloat16 needs one_pass"),
])
def test_bad_block_dtype_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        jaxnmf.fit([np.ones((4, 5))], 2, key=KEY, **kw)
