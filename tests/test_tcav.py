"""TCAV (experiments/tcav.py): derivatives against finite differences, CAVs against scikit-learn,
the statistics, the report section, and (heavy) the validation on a ResNet-18 trained on shapes."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.linear_model
from matplotlib.figure import Figure

import models
from experiments import tcav as T
from experiments.report import Section

# A two-stage ResNet of width 4 on 8x8 images: compiles in seconds.
MODEL_KWARGS = {"num_classes": 3, "width": 4, "stage_sizes": (1, 1)}
N = 90


def colour_data(n: int, seed: int):
    """(n, 8, 8, 3) noise in [0, 0.6) whose class (0, 1, 2) is the channel brightened by 0.4."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.uniform(0, 0.6, (n, 8, 8, 3)).astype(np.float32)
    images[np.arange(n), :, :, labels] += 0.4
    return images, labels


@pytest.fixture(scope="module")
def model():
    return models.build_model("resnet18", **MODEL_KWARGS)


@pytest.fixture(scope="module")
def data():
    return colour_data(N, seed=0)


@pytest.fixture(scope="module")
def variables(model):
    return models.init_variables(model, jax.random.key(0), (1, 8, 8, 3))


@pytest.fixture(scope="module")
def planted(model, variables, data):
    """The random network with its head replaced by class centroids of the pooled features:
    logit_c(x) = pool(x) . (mu_c - mu), so each class's logit rises along its own images'
    direction. The concept "images of class 0" must then raise logit 0 and lower the others."""
    images, labels = data
    pool = np.asarray(models.capture_activations(model, variables, images, ["pool"])["pool"])
    centroids = np.stack([pool[labels == c].mean(axis=0) for c in range(3)])
    kernel = (centroids - pool.mean(axis=0)).T.astype(np.float32)  # (features, classes)
    params = {**variables["params"],
              "head": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(3, jnp.float32)}}
    return {**variables, "params": params}


@pytest.fixture(scope="module")
def planted_result(model, planted, data):
    images, labels = data
    concept = np.flatnonzero(labels == 0)[:20]
    return T.tcav(model, planted, images, labels, concept[None], ("stage2", "pool"),
                  n_random=10, seed=0)


def to_float64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def finite_differences(model, variables, images, module, directions, h):
    """Central differences (B, K, C) of the logits along each of ``directions`` (K, *layer
    shape per image), added to the output of the top-level ``module``."""

    @jax.jit
    def logits(eps, direction):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path == (module,):
                out = out + eps * direction[None]
            return out

        with nn.intercept_methods(interceptor):
            return model.apply(variables, images, train=False)

    h = jnp.float64(h)
    return np.stack([np.asarray(logits(h, v) - logits(-h, v)) / (2 * float(h))
                     for v in jnp.asarray(directions, jnp.float64)], axis=1)


# ----------------------------------------------------------------------------- derivatives
@pytest.mark.parametrize("layer", ["stage1", "pool"])
def test_directional_derivatives_equal_finite_differences(model, variables, data, layer):
    images = data[0][:6]
    v64 = to_float64(variables)  # float64 network after the input cast: exact differences
    shape = models.capture_activations(model, variables, images[:1], [layer])[layer].shape[1:]
    cavs = np.random.default_rng(1).normal(size=(3, int(np.prod(shape))))
    cavs /= np.linalg.norm(cavs, axis=1, keepdims=True)
    module = model.layer_modules()[layer]
    S = np.asarray(T.directional_derivatives(model, v64, images, layer, cavs))
    assert S.shape == (6, 3, 3)
    fd = finite_differences(model, v64, images, module, cavs.reshape(-1, *shape), 1e-5)
    assert np.abs(fd).max() > 1e-3
    np.testing.assert_allclose(S, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())
    if layer == "pool":  # logits = pool @ kernel + bias: the derivative is kernel^T v exactly
        kernel = np.asarray(variables["params"]["head"]["kernel"], np.float64)
        np.testing.assert_allclose(S, np.broadcast_to(cavs @ kernel, S.shape), rtol=1e-5)


def test_one_backward_pass_gives_each_images_own_class_derivative(model, variables, data):
    """The VJP path of `tcav` (activations and own-class gradients of a batch in one pass)
    agrees with `models.capture_activations` and with the per-CAV JVPs, in float32."""
    images, labels = data[0][:8], data[1][:8].astype(np.int32)
    layers = ("stage1", "pool")
    modules = tuple(model.layer_modules()[layer] for layer in layers)
    for use_labels in (True, False):
        acts, grads, classes = T._activations_and_gradients(
            model, modules, use_labels, variables, jnp.asarray(images), jnp.asarray(labels))
        logits = model.apply(variables, images, train=False)
        expected = labels if use_labels else np.argmax(np.asarray(logits), axis=1)
        np.testing.assert_array_equal(classes, expected)
        captured = models.capture_activations(model, variables, images, layers)
        rng = np.random.default_rng(2)
        for layer, a, g in zip(layers, acts, grads):
            np.testing.assert_allclose(a, captured[layer], rtol=1e-6, atol=1e-6)
            cavs = rng.normal(size=(4, int(np.prod(a.shape[1:])))).astype(np.float32)
            S = np.asarray(T.directional_derivatives(model, variables, images, layer, cavs))
            own = S[np.arange(8), :, expected]  # (B, K)
            projected = np.asarray(g).reshape(8, -1) @ cavs.T
            np.testing.assert_allclose(projected, own, rtol=1e-4, atol=1e-5 * np.abs(own).max())


# ----------------------------------------------------------------------------- CAVs
def test_cavs_are_scikit_learns_ridge_classifier_and_point_to_the_positives():
    rng = np.random.default_rng(0)
    n_images, a, n = 60, 30, 8
    acts = rng.normal(size=(n_images, a)).astype(np.float32)
    acts[:20] += 0.7 * rng.normal(size=a).astype(np.float32)  # images 0-19 share a direction
    positives = np.stack([rng.choice(20, n, replace=False) for _ in range(4)])
    negatives = np.stack([rng.choice(np.arange(20, n_images), n, replace=False) for _ in range(4)])
    ridge = 0.1
    cavs, accuracy = T.compute_cavs(acts, positives, negatives, ridge=ridge)
    cavs, accuracy = np.asarray(cavs), np.asarray(accuracy)
    np.testing.assert_allclose(np.linalg.norm(cavs, axis=1), 1, rtol=1e-5)
    for k in range(4):
        X = acts[np.concatenate([positives[k], negatives[k]])].astype(np.float64)
        y = np.r_[np.ones(n), -np.ones(n)]
        Xc = X - X.mean(axis=0)
        lam = ridge * np.trace(Xc @ Xc.T) / (2 * n)
        reference = sklearn.linear_model.Ridge(alpha=lam).fit(X, y)
        w = reference.coef_ / np.linalg.norm(reference.coef_)
        np.testing.assert_allclose(cavs[k], w, atol=2e-5)
        assert w @ (X[:n].mean(axis=0) - X[n:].mean(axis=0)) > 0  # towards the positives
        # Exact leave-one-out accuracy: refit without each image, same lam.
        hits = [np.sign(sklearn.linear_model.Ridge(alpha=lam)
                        .fit(np.delete(X, i, 0), np.delete(y, i)).predict(X[i:i + 1])[0]) == y[i]
                for i in range(2 * n)]
        assert accuracy[k] == pytest.approx(np.mean(hits), abs=1e-6)


def test_cav_of_constant_activations_is_zero():
    cavs, _ = T.compute_cavs(np.ones((12, 5), np.float32), [[0, 1, 2]], [[3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(cavs), 0)


# ----------------------------------------------------------------------------- statistics
def test_correct_p_values_against_a_plain_reference():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(3, 7)) ** 3
    p[0, 0] = np.nan
    finite = p[np.isfinite(p)]
    m = finite.size
    ranks = np.argsort(np.argsort(finite))  # 0-based rank of each p-value
    ordered = np.sort(finite)
    bh = [min(1.0, min(ordered[j] * m / (j + 1) for j in range(r, m))) for r in ranks]
    corrected = T.correct_p_values(p, "bh")
    assert np.isnan(corrected[0, 0])
    np.testing.assert_allclose(corrected[np.isfinite(p)], bh, rtol=1e-12)
    np.testing.assert_allclose(T.correct_p_values(p, "bonferroni")[np.isfinite(p)],
                               np.minimum(1, finite * m))
    assert np.all(corrected[np.isfinite(p)] >= finite)
    with pytest.raises(ValueError, match="correction"):
        T.correct_p_values(p, "holm")


def test_t_test_degenerate_samples():
    scores = np.zeros((4, 3, 2))  # (concepts, repeats, classes)
    null = np.zeros((4, 3, 2))
    scores[0] = 1.0  # both constant, different: infinite t, p = 0
    scores[2:, :, 1] = np.nan  # a class without images
    null[2:, :, 1] = np.nan
    p = T._t_test(scores, null, equal_var=False)
    assert p[0, 0] == 0 and p[1, 0] == 1  # equal constants: no evidence, p = 1
    assert np.isnan(p[2:, 1]).all() and np.isfinite(p[:2]).all()


# ----------------------------------------------------------------------------- TCAV
def test_planted_concept_raises_its_class_and_lowers_the_others(planted_result):
    r = planted_result
    for l in range(2):  # stage2 and pool
        assert r.mean[l, 0, 0] == 1.0 and r.significant[l, 0, 0]
        assert np.all(r.mean[l, 0, 1:] <= 0.2)
        assert abs(np.mean(r.null_mean[l]) - 0.5) < 0.25
    assert np.all(r.cav_accuracy > 0.75)


def test_tcav_result_shapes_sets_and_p_values(model, variables, data):
    images, labels = data
    F = np.random.default_rng(0).uniform(size=(4, N))
    r = T.tcav_scores(model, variables, images, labels, F, ["stage1", "pool"], n_concept=12,
                      n_random=3, seed=1)
    L, d, R, C = 2, 4, 3, 3
    assert r.layers == ("stage1", "pool")
    assert r.concept_sets.shape == (d, 12)
    assert r.random_sets.shape == r.null_sets.shape == (d, R, 12)
    np.testing.assert_array_equal(r.concept_sets, T.concept_sets_from_factors(F, 12))
    top = F[np.arange(d)[:, None], r.concept_sets]  # the 12 largest of each row, largest first
    np.testing.assert_array_equal(top, -np.sort(-F, axis=1)[:, :12])
    for k in range(d):
        for i in range(R):
            concept, rand, null = r.concept_sets[k], r.random_sets[k, i], r.null_sets[k, i]
            assert len(np.unique(np.r_[concept, rand, null])) == 36  # pairwise disjoint
    assert r.scores.shape == r.null_scores.shape == (L, d, R, C)
    for x in (r.mean, r.std, r.null_mean, r.null_std, r.p_values, r.p_corrected, r.significant):
        assert x.shape == (L, d, C)
    assert r.cav_accuracy.shape == r.null_cav_accuracy.shape == (L, d)
    for scores in (r.scores, r.null_scores):
        assert np.all((scores >= 0) & (scores <= 1))
    assert np.all((r.p_values >= 0) & (r.p_values <= 1))
    assert np.all((r.p_corrected >= r.p_values) & (r.p_corrected <= 1))
    np.testing.assert_array_equal(r.significant, r.p_corrected < r.alpha)
    np.testing.assert_array_equal(r.class_counts, [30, 30, 30])
    np.testing.assert_array_equal(r.labels, labels)
    np.testing.assert_allclose(r.mean, r.scores.mean(axis=2))


def test_same_seed_same_result_other_seed_other_random_sets(model, variables, data):
    images, labels = data
    concept = np.arange(10)[None]
    run = lambda seed, batch: T.tcav(model, variables, images, labels, concept, "stage2",
                                     n_random=2, seed=seed, batch_size=batch)
    a, b, c = run(0, 32), run(0, 90), run(1, 32)
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)  # batching changes nothing either
    assert not np.array_equal(a.random_sets, c.random_sets)


def test_labels_none_uses_the_networks_predictions(model, variables, data):
    images, _ = data
    r = T.tcav(model, variables, images, None, np.arange(10)[None], "pool", n_random=2)
    predicted = np.argmax(np.asarray(model.apply(variables, images, train=False)), axis=1)
    np.testing.assert_array_equal(r.labels, predicted)
    np.testing.assert_array_equal(r.class_counts, np.bincount(predicted, minlength=3))
    missing = r.class_counts == 0  # a class nobody is predicted as: NaN scores, no test
    assert np.array_equal(np.isnan(r.p_values[0, 0]), missing)


def test_bad_input_raises_clear_errors(model, variables, data):
    images, labels = data
    F = np.ones((2, N))
    def call(**kw):
        args = [kw.pop(name, default) for name, default in
                (("images", images), ("labels", labels), ("F", F), ("layers", "pool"))]
        return T.tcav_scores(model, variables, *args, **{"n_random": 2, "n_concept": 10, **kw})

    with pytest.raises(ValueError, match="unknown layer 'stage4'"):
        call(layers="stage4")
    with pytest.raises(ValueError, match="unknown layer 'softmax'"):
        call(layers=("pool", "softmax"))
    with pytest.raises(ValueError, match="F has 89 columns but there are 90 probe images"):
        call(F=np.ones((2, N - 1)))
    with pytest.raises(ValueError, match="exceeds a third of the N=90"):
        call(n_concept=31)
    with pytest.raises(ValueError, match="labels must lie in"):
        call(labels=labels + 1)
    with pytest.raises(ValueError, match=r"labels must be \(90,\)"):
        call(labels=labels[:-1])
    with pytest.raises(ValueError, match="n_random"):
        call(n_random=1)
    with pytest.raises(ValueError, match="correction"):
        call(correction="holm")
    with pytest.raises(ValueError, match="alpha"):
        call(alpha=1.5)
    with pytest.raises(ValueError, match="F must be finite"):
        call(F=np.full((2, N), np.nan))
    with pytest.raises(ValueError, match="images must be"):
        call(images=images[0])
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        call(images=images * 255)
    with pytest.raises(ValueError, match="must not repeat an image"):
        T.tcav(model, variables, images, labels, [[0, 0, 1]], "pool")
    with pytest.raises(ValueError, match="layers must not repeat"):
        call(layers=("pool", "pool"))
    with pytest.raises(ValueError, match=r"cavs must be \(K, 8\)"):
        T.directional_derivatives(model, variables, images[:2], "pool", np.ones((1, 7)))


# ----------------------------------------------------------------------------- report
def test_section_heatmap_and_json_table(planted_result):
    section = T.tcav_section(planted_result, ["r", "g", "b"], concept_names=["red images"])
    assert isinstance(section, Section) and section.title == "TCAV (Figure 6)"
    assert set(section.figures) == {"tcav_heatmap"}
    assert isinstance(section.figures["tcav_heatmap"], Figure)
    data = json.loads(json.dumps(section.data, allow_nan=False))
    assert data["layers"] == ["stage2", "pool"] and data["correction"] == "bh"
    assert len(data["tests"]) == 2 * 1 * 3
    first = data["tests"][0]
    assert first["concept"] == "red images" and first["class"] == "r"
    assert first["p_value"] == pytest.approx(planted_result.p_values[0, 0, 0])
    assert data["n_significant"] == int(planted_result.significant.sum())
    # Only significant scores appear in the HTML table, one row each.
    assert section.html.count("<td>red images</td>") == data["n_significant"]
    # Non-significant cells are masked (drawn grey) in the heatmap.
    image = section.figures["tcav_heatmap"].axes[0].images[0]
    np.testing.assert_array_equal(np.ma.getmaskarray(image.get_array()),
                                  ~planted_result.significant[0])
    with pytest.raises(ValueError, match="class_names"):
        T.tcav_section(planted_result, ["r", "g"])


# ----------------------------------------------------------------------------- validation
@pytest.mark.heavy
def test_shape_concepts_on_a_resnet18_trained_on_shapes():
    """A ResNet-18 (width 8) trained on `shapes` for 4 epochs (about 1.5 min on 2 CPU cores).
    F = the one-hot shape attribute, so factor k's concept set is 50 images of shape k: each
    gets a significant score near 1 for its own class, and low scores for the others on average.
    """
    from experiments.data import make_shapes

    train, test = make_shapes(3000, seed=0, split="train"), make_shapes(600, seed=0, split="test")
    model = models.build_model("resnet18", num_classes=6, width=8)
    config = models.TrainConfig(epochs=4, batch_size=64, learning_rate=0.05, warmup_epochs=1,
                                crop_padding=0, flip=False)
    trained = models.train(model, train.images, train.labels, test.images, test.labels, config,
                           seed=0, progress=False)
    assert trained.test_accuracy > 0.95
    probe = make_shapes(600, seed=1, split="test")
    F = np.eye(6)[probe.attributes["shape"]].T  # (6, N): factor k = "shape is k"
    r = T.tcav_scores(model, trained.variables, probe.images, probe.labels, F,
                      ("stage2", "stage3"), n_concept=50, n_random=10, seed=0)
    assert np.all(probe.attributes["shape"][r.concept_sets] == np.arange(6)[:, None])
    own = np.stack([np.diagonal(r.mean[l]) for l in range(2)])
    own_significant = np.stack([np.diagonal(r.significant[l]) for l in range(2)])
    off = ~np.eye(6, dtype=bool)
    assert np.all(own >= 0.95) and np.all(own_significant)
    for l in range(2):
        others = r.mean[l][off]
        assert others.mean() < 0.45
        # Of the significant scores for other classes, most are low.
        significant_others = others[r.significant[l][off]]
        assert np.mean(significant_others < 0.5) > 0.6
    # The circle concept (factor 0): high for circles, far lower for the other shapes on average,
    # and significantly low for at least one.
    for l in range(2):
        assert own[l, 0] - r.mean[l, 0, 1:].mean() > 0.3
        assert np.any(r.significant[l, 0, 1:] & (r.mean[l, 0, 1:] < 0.2))
    assert np.all(r.cav_accuracy > 0.7)
