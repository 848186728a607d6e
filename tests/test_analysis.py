"""Each analysis of jaxnmf.analysis against a small case that can be checked by hand."""
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics.pairwise import cosine_similarity

from jaxnmf.analysis import (
    attribute_auc,
    class_weights,
    factor_table,
    latent_images,
    masked_top_images,
    mean_top_eigenvalues,
    median_masks,
    nearest_neighbours,
    neighbour_factor_distribution,
    neuron_similarity,
    similarity_eigenvalues,
)

# Three factors over four images of classes 0, 1, 1, 2; factor 2 is unused.
F_HAND = np.array([[1.0, 3.0, 0.0, 0.0],
                   [0.0, 0.0, 1.0, 3.0],
                   [0.0, 0.0, 0.0, 0.0]])
LABELS_HAND = np.array([0, 1, 1, 2])


# ----------------------------------------------------------------------------- class weights
def test_class_weights_by_hand():
    expected = np.array([[0.25, 0.75, 0.0],
                         [0.0, 0.25, 0.75],
                         [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(class_weights(F_HAND, LABELS_HAND, 3), expected)


def test_class_weights_accepts_jax_arrays_and_rows_sum_to_one():
    rng = np.random.default_rng(0)
    F = rng.uniform(size=(5, 40))
    labels = rng.integers(0, 7, size=40)
    weights = class_weights(jnp.asarray(F), jnp.asarray(labels), 7)
    assert weights.shape == (5, 7)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)


@pytest.mark.parametrize("F, labels, n_classes, match", [
    (F_HAND, LABELS_HAND[:3], 3, "labels"),
    (-F_HAND, LABELS_HAND, 3, "F must be non-negative"),
    (F_HAND, LABELS_HAND, 2, "labels must lie in"),
    (F_HAND, LABELS_HAND.astype(float), 3, "labels must hold integers"),
    (F_HAND[0], LABELS_HAND, 3, "F must be a 2-D"),
])
def test_class_weights_rejects_bad_input(F, labels, n_classes, match):
    with pytest.raises(ValueError, match=match):
        class_weights(F, labels, n_classes)


# ----------------------------------------------------------------------------- factor table
def test_factor_table_by_hand():
    # Classes 0 and 1 form superclass 0, class 2 is superclass 1. Factor 0 puts weights
    # .3, .3, .4 on the classes: its top class (2) is not in its top superclass (0, weight .6).
    F = np.array([[3.0, 3.0, 4.0, 0.0],
                  [1.0, 1.0, 1.0, 1.0]])
    labels = np.array([0, 1, 2, 3])
    superlabels = np.array([0, 0, 1, 1])
    table = factor_table(F, labels, ("a", "b", "c", "d"), superlabels, ("ab", "cd"),
                         n_top_classes=2, n_top_images=3)
    assert [row["factor"] for row in table] == [0, 1]
    first = table[0]
    assert [c["name"] for c in first["top_classes"]] == ["c", "a"]
    np.testing.assert_allclose([c["weight"] for c in first["top_classes"]], [0.4, 0.3])
    assert first["top_superclass"]["name"] == "ab"
    assert first["top_superclass"]["weight"] == pytest.approx(0.6)
    assert first["top_images"] == [2, 0, 1]
    assert first["mass"] == pytest.approx(10.0)
    assert first["entropy"] == pytest.approx(-(2 * 0.3 * np.log(0.3) + 0.4 * np.log(0.4)))
    # A factor spread evenly over all C classes has the maximum entropy, log C.
    assert table[1]["entropy"] == pytest.approx(np.log(4))


def test_factor_table_single_class_and_unused_factor():
    table = factor_table(F_HAND, LABELS_HAND, ("x", "y", "z"))
    assert table[0]["top_superclass"] is None
    assert table[1]["top_classes"][0]["name"] == "z"
    unused = table[2]
    assert unused["mass"] == 0.0 and unused["entropy"] == 0.0
    assert all(c["weight"] == 0.0 for c in unused["top_classes"])
    # A factor on one class only has entropy 0.
    single = factor_table(np.array([[0.0, 2.0, 5.0, 0.0]]), LABELS_HAND, ("x", "y", "z"))
    assert single[0]["entropy"] == pytest.approx(0.0)


@pytest.mark.parametrize("n, expected", [(5, 1), (30, 3), (2500, 200)])
def test_factor_table_default_top_images_follows_the_authors(n, expected):
    F = np.arange(n, dtype=float)[None, :]
    table = factor_table(F, np.zeros(n, dtype=int), ("only",))
    assert table[0]["top_images"] == list(range(n - 1, n - 1 - expected, -1))


def test_factor_table_needs_superclass_names():
    with pytest.raises(ValueError, match="superclass_names"):
        factor_table(F_HAND, LABELS_HAND, ("x", "y", "z"), superlabels=LABELS_HAND)


# ----------------------------------------------------------------------------- neurons
def test_orthogonal_columns_give_identity_and_unit_eigenvalues():
    # Non-negative columns on disjoint rows, of different lengths.
    W = np.zeros((12, 4))
    for k in range(4):
        W[3 * k:3 * k + 3, k] = k + 1.0
    S = neuron_similarity(W)
    np.testing.assert_allclose(S, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(similarity_eigenvalues(S), np.ones(4))
    assert mean_top_eigenvalues(S, 3) == pytest.approx(1.0)


def test_parallel_columns_concentrate_the_spectrum():
    W = np.outer(np.arange(1.0, 6.0), [1.0, 2.0, 0.5])  # three parallel columns
    S = neuron_similarity(W)
    np.testing.assert_allclose(S, np.ones((3, 3)))
    np.testing.assert_allclose(similarity_eigenvalues(S), [3.0, 0.0, 0.0], atol=1e-12)
    assert mean_top_eigenvalues(S, 1) == pytest.approx(3.0)
    assert mean_top_eigenvalues(S, 3) == pytest.approx(1.0)  # trace / d


def test_similarity_matches_sklearn_and_handles_a_zero_column():
    rng = np.random.default_rng(1)
    W = rng.uniform(size=(30, 5))
    np.testing.assert_allclose(neuron_similarity(jnp.asarray(W)), cosine_similarity(W.T))
    np.testing.assert_allclose(neuron_similarity([[1.0, 1.0], [0.0, 1.0]])[0, 1], 2 ** -0.5)
    W[:, 2] = 0.0
    S = neuron_similarity(W)
    assert not np.any(np.isnan(S))
    np.testing.assert_array_equal(S[2, [0, 1, 3, 4]], 0.0)
    np.testing.assert_array_equal(np.diag(S), 1.0)


def test_eigenvalues_sorted_descending_and_validated():
    rng = np.random.default_rng(2)
    A = rng.normal(size=(6, 6))
    S = A + A.T
    eigenvalues = similarity_eigenvalues(S)
    np.testing.assert_allclose(eigenvalues, np.sort(np.linalg.eigvals(S).real)[::-1])
    assert np.all(np.diff(eigenvalues) <= 0)
    with pytest.raises(ValueError, match="symmetric"):
        similarity_eigenvalues(A + np.triu(np.ones((6, 6))))
    with pytest.raises(ValueError, match="square"):
        similarity_eigenvalues(np.ones((2, 3)))
    with pytest.raises(ValueError, match="k must be in"):
        mean_top_eigenvalues(S, 7)


# ----------------------------------------------------------------------------- pixels
def test_latent_images_reshape_row_major_and_scale_each_channel():
    height, width, d = 2, 3, 2
    red = np.arange(6.0)[:, None] * np.array([[1.0, 2.0]])     # column k = k-scaled ramp
    green = np.zeros((6, d))
    green[4, 0] = 5.0                                          # pixel h=1, w=1 of factor 0
    blue = np.zeros((6, d))                                    # all zero: stays zero
    latent = latent_images([red, green, jnp.asarray(blue)], (height, width))
    assert latent.shape == (d, height, width, 3)
    ramp = np.arange(6.0).reshape(2, 3) / 5.0
    np.testing.assert_allclose(latent[0, :, :, 0], ramp)
    np.testing.assert_allclose(latent[1, :, :, 0], ramp)      # each channel by its own max
    assert latent[0, 1, 1, 1] == 1.0 and latent[0, :, :, 1].sum() == 1.0
    np.testing.assert_array_equal(latent[:, :, :, 2], 0.0)
    with pytest.raises(ValueError, match=r"pixel_factors\[1\]"):
        latent_images([red, green[:5]], (height, width))


def test_median_masks_select_above_median_pixels_of_the_channel_mean():
    grey = np.array([[1.0, 2.0], [3.0, 4.0]])                  # median 2.5
    latent = np.stack([grey, grey[::-1]], axis=0)[..., None]
    np.testing.assert_array_equal(median_masks(latent),
                                  [[[False, False], [True, True]],
                                   [[True, True], [False, False]]])
    # Two channels: the mask follows their mean, 1, 2, 3, 4 again.
    two = np.stack([grey * 2.0, np.zeros((2, 2))], axis=-1)[None]
    np.testing.assert_array_equal(median_masks(two)[0], [[False, False], [True, True]])


def test_masked_top_images_zero_outside_the_mask():
    images = np.arange(2 * 2 * 2 * 3, dtype=float).reshape(2, 2, 2, 3) + 1.0
    masks = np.array([[[True, False], [False, True]], [[False, False], [True, False]]])
    out = masked_top_images(images, masks, [1, 0])
    np.testing.assert_array_equal(out[0, 0, 0], images[1, 0, 0])
    np.testing.assert_array_equal(out[0, 0, 1], 0.0)
    np.testing.assert_array_equal(out[1, 1, 0], images[0, 1, 0])
    assert out[1].sum() == images[0, 1, 0].sum()
    with pytest.raises(ValueError, match="indices"):
        masked_top_images(images, masks, [0, 2])


# ----------------------------------------------------------------------------- neighbours
def test_nearest_neighbours_known_order_excludes_the_image_itself():
    # Images on a line in 2-D latent space: positions 0, 10, 1, 3, 0 (image 4 duplicates 0).
    F = np.array([[0.0, 10.0, 1.0, 3.0, 0.0],
                  [1.0, 1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(nearest_neighbours(F, 0, k=3), [4, 2, 3])
    np.testing.assert_array_equal(nearest_neighbours(F, 1, k=1), [3])
    with pytest.raises(ValueError, match="k must be in"):
        nearest_neighbours(F, 0, k=5)
    with pytest.raises(ValueError, match="index must be in"):
        nearest_neighbours(F, 5, k=1)


def test_neighbour_factor_distribution_by_hand():
    F = np.array([[5.0, 0.0, 1.0, 2.0],
                  [1.0, 3.0, 0.0, 9.0],
                  [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(neighbour_factor_distribution(F, [0, 1, 2, 3]), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(neighbour_factor_distribution(F, [0, 2, 1]), [2 / 3, 1 / 3, 0.0])
    with pytest.raises(ValueError, match="neighbours"):
        neighbour_factor_distribution(F, [4])


# ----------------------------------------------------------------------------- attributes
def test_attribute_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(3)
    n = 90
    colour = rng.integers(0, 3, size=n)
    # Rounded scores create many ties; factor 1 leans towards colour 2.
    F = np.round(rng.uniform(size=(4, n)) * 4)
    F[1] += 2.0 * (colour == 2)
    result = attribute_auc(F, {"colour": colour})["colour"]
    assert sorted(result["values"]) == [0, 1, 2]
    for value, (best, auc) in result["values"].items():
        target = colour == value
        sklearn_aucs = [roc_auc_score(target, F[k]) for k in range(4)]
        assert auc == pytest.approx(max(sklearn_aucs))
        assert sklearn_aucs[best] == pytest.approx(auc)
    assert result["values"][2][0] == 1
    assert result["mean"] == pytest.approx(np.mean([a for _, a in result["values"].values()]))


def test_attribute_auc_planted_factor_and_single_valued_attribute():
    shape = np.array([0, 0, 1, 1, 1, 0])
    F = np.array([[0.1, 0.2, 0.9, 0.8, 0.7, 0.3],    # ranks every shape-1 image first
                  [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])   # constant: AUC 1/2 everywhere
    result = attribute_auc(F, {"shape": shape, "size": np.zeros(6, dtype=int)})
    assert result["shape"]["values"][1] == (0, 1.0)
    assert result["shape"]["values"][0] == (1, 0.5)
    assert result["shape"]["mean"] == pytest.approx(0.75)
    assert result["size"] == {"values": {}, "mean": None}
    with pytest.raises(ValueError, match="attributes\\['shape'\\]"):
        attribute_auc(F, {"shape": shape[:5]})
