"""jaxnmf.match_factors / factor_stability: Hungarian matching on cosines (issue 12)."""
import itertools

import numpy as np
import pytest

import jaxnmf
from jaxnmf.stability import cosine_similarities


def brute_force(F_a, F_b):
    cos = cosine_similarities(F_a, F_b)
    d = F_a.shape[0]
    best = max(itertools.permutations(range(d)), key=lambda p: cos[np.arange(d), list(p)].sum())
    return np.array(best), cos[np.arange(d), list(best)]


@pytest.mark.parametrize("seed", range(40))
def test_matching_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    d = 1 + seed % 6
    n = int(rng.integers(2, 12))
    F_a, F_b = rng.random((d, n)), rng.random((d, n))
    if seed % 3 == 0:  # signed factors too
        F_a, F_b = F_a - 0.5, F_b - 0.5
    perm, cos = jaxnmf.match_factors(F_a, F_b)
    expected_perm, expected_cos = brute_force(F_a, F_b)
    assert cos.sum() == pytest.approx(expected_cos.sum(), abs=1e-12)
    np.testing.assert_array_equal(perm, expected_perm)  # continuous random data: the optimum is unique
    np.testing.assert_allclose(cos, expected_cos, atol=1e-12)
    assert sorted(perm.tolist()) == list(range(d))


def test_a_permuted_and_scaled_copy_is_matched_back_with_cosine_one():
    rng = np.random.default_rng(1)
    F = rng.random((6, 40))
    order = rng.permutation(6)
    scales = rng.uniform(0.1, 10.0, (6, 1))
    perm, cos = jaxnmf.match_factors(F, scales * F[order])
    np.testing.assert_array_equal(order[perm], np.arange(6))
    np.testing.assert_allclose(cos, 1.0, atol=1e-12)
    np.testing.assert_allclose((scales * F[order])[perm] / scales[perm], F, rtol=1e-12)


def test_zero_rows_have_cosine_zero_without_nan():
    rng = np.random.default_rng(2)
    F_a, F_b = rng.random((4, 20)), rng.random((4, 20))
    F_a[1] = 0.0
    F_b[3] = 0.0
    perm, cos = jaxnmf.match_factors(F_a, F_b)
    assert np.all(np.isfinite(cos))
    assert cos[1] == 0.0 or perm[1] == 3
    zero = jaxnmf.match_factors(np.zeros((3, 5)), np.zeros((3, 5)))[1]
    np.testing.assert_array_equal(zero, 0.0)
    s = jaxnmf.factor_stability([F_a, F_b, F_b])
    assert np.all(np.isfinite(s.per_factor)) and s.per_factor[1] == 0.0


def test_factor_stability_averages_matched_cosines_over_the_other_fits():
    rng = np.random.default_rng(3)
    F = rng.random((5, 30))
    noisy = F + 0.3 * rng.random((5, 30))
    other = rng.random((5, 30))
    s = jaxnmf.factor_stability([F, 2.0 * F[[4, 3, 2, 1, 0]], noisy, other])
    assert s.per_factor.shape == (5,) and s.cosines.shape == (3, 5) and s.permutations.shape == (3, 5)
    np.testing.assert_allclose(s.cosines[0], 1.0, atol=1e-12)
    np.testing.assert_array_equal(s.permutations[0], [4, 3, 2, 1, 0])
    for r, G in enumerate([noisy, other], start=1):
        np.testing.assert_allclose(s.cosines[r], jaxnmf.match_factors(F, G)[1])
    np.testing.assert_allclose(s.per_factor, s.cosines.mean(axis=0))
    assert s.mean == pytest.approx(s.per_factor.mean())
    assert jaxnmf.factor_stability([F, F]).mean == pytest.approx(1.0)


@pytest.mark.parametrize("F_a, F_b, name", [
    (np.ones((3, 4)), np.ones((3, 5)), "F_b"),
    (np.ones((3, 4)), np.ones((2, 4)), "F_b"),
    (np.ones(4), np.ones(4), "F_a"),
    (np.ones((3, 4)), np.ones((3, 4, 1)), "F_b"),
    (np.ones((0, 4)), np.ones((0, 4)), "F_a"),
    (np.full((2, 2), np.nan), np.ones((2, 2)), "F_a"),
])
def test_bad_input_names_the_argument(F_a, F_b, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        jaxnmf.match_factors(F_a, F_b)


def test_factor_stability_refuses_bad_lists():
    with pytest.raises(ValueError, match=r"^Fs: "):
        jaxnmf.factor_stability([np.ones((2, 3))])
    with pytest.raises(ValueError, match=r"^Fs: "):
        jaxnmf.factor_stability(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"^Fs\[2\]: "):
        jaxnmf.factor_stability([np.ones((2, 3)), np.ones((2, 3)), np.ones((3, 3))])
    with pytest.raises(ValueError, match=r"^Fs\[1\]: "):
        jaxnmf.factor_stability([np.ones((2, 3)), np.ones(3)])
