"""TCAV (experiments/tcav.py, tcav_stats.py, tcav_report.py, validate.py): derivatives against
finite differences, CAVs against scikit-learn, the Monte-Carlo test's calibration (negative
controls uniform, by a binomial check that fails on a miscalibrated test) and power (a planted
concept), constant-gradient detection, held-out splits, the report section."""
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
from experiments import tcav_stats as S
from experiments import validate
from experiments.tcav_report import control_verdicts, tcav_section
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


def assert_predictions_equal(classes, logits):
    """``classes`` are argmax(logits), compared where the top two logits are not near-tied (two
    computations of a near-tie may round either way); nearly every image must be compared."""
    logits = np.asarray(logits)
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5 * np.abs(logits).max()
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(classes)[clear], np.argmax(logits, axis=1)[clear])


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
def planted_result(model, planted):
    """CAV images and score images disjoint; concept 0 = 20 images of class 0, concept 1 = 20
    random images; 200 negative controls; positive controls of each class."""
    cav_images, cav_labels = colour_data(150, seed=3)
    score_images, score_labels = colour_data(90, seed=4)
    rng = np.random.default_rng(0)
    sets = np.stack([np.flatnonzero(cav_labels == 0)[:20], rng.permutation(150)[:20]])
    held = np.stack([np.flatnonzero(score_labels == 0)[:20], rng.permutation(90)[:20]])
    positive = {f"class {c}": (np.flatnonzero(cav_labels == c)[20:40], c) for c in range(3)}
    return T.tcav(model, planted, ("stage1", "pool"), sets, cav_images=cav_images, score_images=score_images,
                  cav_labels=cav_labels, score_labels=score_labels, heldout_sets=held, names=["red", "random"],
                  positive_controls=positive, negative_controls=200, n_null=100, n_matched=40, seed=0)


def to_float64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def finite_differences(model, variables, images, module, directions, h, target):
    """Central differences (B, K, C) of the targets (logits or log-probabilities) along each of
    ``directions`` (K, *layer shape per image), added to the output of the top-level ``module``."""

    @jax.jit
    def targets(eps, direction):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path == (module,):
                out = out + eps * direction[None]
            return out

        with nn.intercept_methods(interceptor):
            logits = model.apply(variables, images, train=False)
        return jax.nn.log_softmax(logits) if target == "logprob" else logits

    h = jnp.float64(h)
    return np.stack([np.asarray(targets(h, v) - targets(-h, v)) / (2 * float(h))
                     for v in jnp.asarray(directions, jnp.float64)], axis=1)


# ----------------------------------------------------------------------------- derivatives
@pytest.mark.parametrize("target", ["logit", "logprob"])
@pytest.mark.parametrize("layer", ["stage1", "pool"])
def test_directional_derivatives_equal_finite_differences(model, variables, data, layer, target):
    images = data[0][:6]
    v64 = to_float64(variables)  # float64 network after the input cast: exact differences
    shape = models.capture_activations(model, variables, images[:1], [layer])[layer].shape[1:]
    cavs = np.random.default_rng(1).normal(size=(3, int(np.prod(shape))))
    cavs /= np.linalg.norm(cavs, axis=1, keepdims=True)
    module = model.layer_modules()[layer]
    got = np.asarray(T.directional_derivatives(model, v64, images, layer, cavs, target=target))
    assert got.shape == (6, 3, 3)
    fd = finite_differences(model, v64, images, module, cavs.reshape(-1, *shape), 1e-5, target)
    assert np.abs(fd).max() > 1e-4
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())
    if layer == "pool" and target == "logit":  # logits = pool @ kernel + bias: the derivative is kernel^T v
        kernel = np.asarray(variables["params"]["head"]["kernel"], np.float64)
        np.testing.assert_allclose(got, np.broadcast_to(cavs @ kernel, got.shape), rtol=1e-5)


@pytest.mark.parametrize("target", ["logit", "logprob"])
def test_one_backward_pass_gives_each_images_own_class_derivative(model, variables, data, target):
    """The VJP path of `tcav` (activations and own-class target gradients of a batch in one pass)
    agrees with `models.capture_activations` and with the per-CAV JVPs, in float32."""
    images, labels = data[0][:8], data[1][:8].astype(np.int32)
    layers = ("stage1", "pool")
    modules = tuple(model.layer_modules()[layer] for layer in layers)
    for use_labels in (True, False):
        acts, grads, classes = T._activations_and_gradients(model, modules, use_labels, target, variables,
                                                            jnp.asarray(images), jnp.asarray(labels))
        if use_labels:
            np.testing.assert_array_equal(classes, labels)
        else:
            assert_predictions_equal(classes, model.apply(variables, images, train=False))
        classes = np.asarray(classes)
        captured = models.capture_activations(model, variables, images, layers)
        rng = np.random.default_rng(2)
        for layer, a, g in zip(layers, acts, grads):
            np.testing.assert_allclose(a, captured[layer], rtol=1e-6, atol=1e-6)
            cavs = rng.normal(size=(4, int(np.prod(a.shape[1:])))).astype(np.float32)
            full = np.asarray(T.directional_derivatives(model, variables, images, layer, cavs, target=target))
            own = full[np.arange(8), :, classes]  # (B, K)
            projected = np.asarray(g).reshape(8, -1) @ cavs.T
            np.testing.assert_allclose(projected, own, rtol=1e-4, atol=1e-5 * np.abs(own).max())


def test_constant_gradient_is_detected_at_the_pooled_layer(model, variables, data):
    """Global pool then a linear head: the logit's gradient at "pool" (and at the last stage)
    depends on the class only; the log-probability's does not."""
    images, labels = data
    acts, grads, classes = T._layer_arrays(model, variables, ("stage1", "pool"), images, labels.astype(np.int32),
                                           "logit", 64)
    assert not T._is_constant(grads[0], classes) and T._is_constant(grads[1], classes)
    _, grads, classes = T._layer_arrays(model, variables, ("pool",), images, labels.astype(np.int32), "logprob", 64)
    assert not T._is_constant(grads[0], classes)
    cav, score = colour_data(60, 5), colour_data(45, 6)
    r = T.tcav(model, variables, ("stage1", "pool"), [np.arange(10)], cav_images=cav[0], score_images=score[0],
               target="logit", n_null=19, n_matched=19, negative_controls=0, n_negatives=1)
    np.testing.assert_array_equal(r.constant_layers, [False, True])
    assert np.all(np.isnan(r.scores[:, 1])) and not np.any(r.significant[:, 1])


# ----------------------------------------------------------------------------- CAVs
def test_cavs_are_scikit_learns_ridge_classifier_and_point_to_the_positives():
    rng = np.random.default_rng(0)
    n_images, a, n = 60, 30, 8
    acts = rng.normal(size=(n_images, a)).astype(np.float32)
    acts[:20] += 0.7 * rng.normal(size=a).astype(np.float32)  # images 0-19 share a direction
    positives = np.stack([rng.choice(20, n, replace=False) for _ in range(4)])
    negatives = np.stack([rng.choice(np.arange(20, n_images), n, replace=False) for _ in range(4)])
    ridge = 0.1
    cavs = np.asarray(T.compute_cavs(acts, positives, negatives, ridge=ridge))
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


def test_cav_of_constant_activations_is_zero():
    cavs = T.compute_cavs(np.ones((12, 5), np.float32), [[0, 1, 2]], [[3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(cavs), 0)


def test_set_scores_against_plain_loops():
    rng = np.random.default_rng(1)
    cross, coefficients, labels = rng.normal(size=(30, 20)), rng.normal(size=(4, 20)), np.arange(30) % 3
    derivatives = cross @ coefficients.T  # (30, 4)
    sign = S.set_scores(cross, coefficients, labels, 4, "sign")
    magnitude = S.set_scores(cross, coefficients, labels, 4, "magnitude")
    for k in range(4):
        for c in range(3):
            s = derivatives[labels == c, k]
            assert sign[k, c] == pytest.approx(np.mean(s > 0))
            assert magnitude[k, c] == pytest.approx(s[s > 0].sum() / np.abs(s).sum(), rel=1e-5)
    assert np.all(np.isnan(sign[:, 3]))  # a class without score images


# ----------------------------------------------------------------------------- sets
def test_random_sets_are_distinct_matched_and_outside_their_positives():
    rng = np.random.default_rng(0)
    sets = S.uniform_sets(rng, 50, 200, 10)
    assert all(len(set(row)) == 10 for row in sets)
    assert np.bincount(sets.ravel(), minlength=50).min() > 0  # every image can be drawn
    negatives = S.negative_sets(rng, 50, sets, 3)
    assert negatives.shape == (200, 3, 10)
    for row, negs in zip(sets, negatives):
        assert all(len(set(neg)) == 10 and not set(neg) & set(row) for neg in negs)
    labels = np.arange(60) % 4
    concept = np.array([0, 4, 8, 1, 5, 2])  # classes 0, 0, 0, 1, 1, 2
    matched = S.matched_sets(rng, labels, concept, 50)
    for row in matched:
        assert len(set(row)) == 6
        np.testing.assert_array_equal(np.bincount(labels[row], minlength=4), [3, 2, 1, 0])


def test_concept_sets_refuse_zero_and_constant_factors():
    F = np.random.default_rng(0).uniform(size=(3, 40))
    np.testing.assert_array_equal(T.concept_sets_from_factors(F, 5), np.argsort(-F, axis=1)[:, :5])
    F[1] = 0.0
    with pytest.raises(ValueError, match=r"F rows \[1\] have no top images"):
        T.concept_sets_from_factors(F, 5)
    F[1] = 3.0
    F[1, :2] = 4.0  # two distinct top values, then a constant: the top 6 are not determined
    with pytest.raises(ValueError, match=r"F rows \[1\]"):
        T.concept_sets_from_factors(F, 5)
    with pytest.raises(ValueError, match="exceeds half"):
        T.concept_sets_from_factors(np.random.default_rng(1).uniform(size=(2, 9)), 5)


# ----------------------------------------------------------------------------- the test
def calibration_failures(p_values, alpha_levels=(0.05, 0.1, 0.2, 0.5), threshold=1e-3):
    """The levels a at which more p-values than a binomial(n, a) allows (one-sided, p < threshold)
    fall at or below a: a check of "p-values are uniform or conservative" that a miscalibrated test fails."""
    from scipy import stats as sps

    p = np.asarray(p_values)[np.isfinite(p_values)]
    return [a for a in alpha_levels
            if sps.binomtest(int(np.sum(p <= a)), p.size, a, alternative="greater").pvalue < threshold]


def test_monte_carlo_p_values_are_uniform_under_exchangeability_and_max_t_controls_the_family():
    """1000 independent experiments (each its own null of 99 sets): the p-values of exchangeable
    sets are uniform, max-T holds the family-wise rate over 12 correlated tests of unequal spread."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(12, 12))
    draw = lambda n: (rng.normal(size=(n, 12)) @ mix).reshape(n, 3, 4) * [1, 1, 1, 10]
    tests = [S.monte_carlo_test(draw(1), draw(99)) for _ in range(1000)]
    p = np.concatenate([t.p_values for t in tests])  # (1000, 3, 4)
    family = np.concatenate([t.p_family for t in tests])
    assert calibration_failures(p[:, 0, 0]) == [] and calibration_failures(p[:, 2, 3]) == []
    family_rate = np.mean(np.any(family < 0.05, axis=(1, 2)))
    assert 0.025 < family_rate < 0.075
    assert np.all(family >= p)
    assert np.mean(np.any(p < 0.05, axis=(1, 2))) > 0.2  # uncorrected, the family errs far more often
    # the check fails for anti-conservative p-values, and a shift is found
    assert calibration_failures(p[:, 0, 0] ** 1.5) != []
    null = draw(199)
    shifted = S.monte_carlo_test(draw(50) + 8 * null.std(axis=0), null)
    assert np.all(shifted.p_family <= 1 / 200 + 1e-12)
    lo, hi = shifted.interval[..., 0], shifted.interval[..., 1]
    assert np.all(lo > 0) and np.all(lo <= shifted.effect) and np.all(shifted.effect <= hi)


def test_monte_carlo_test_needs_enough_null_sets_and_skips_untestable_cells():
    with pytest.raises(ValueError, match="at least 19 null sets"):
        S.monte_carlo_test(np.zeros((1, 1, 2)), np.zeros((10, 1, 2)))
    null = np.random.default_rng(0).normal(size=(30, 1, 2))
    null[:, 0, 1] = np.nan  # a class without score images
    test = S.monte_carlo_test(np.zeros((2, 1, 2)), null)
    assert np.all(np.isfinite(test.p_values[:, 0, 0])) and np.all(np.isnan(test.p_values[:, 0, 1]))


def test_negative_controls_of_a_network_are_calibrated(planted_result):
    """Random sets tested like concepts on a real (small) network: uniform p-values at every level
    checked, the verdict says so. (Power is checked on a trained network: the heavy test below.)"""
    r = planted_result
    assert calibration_failures(r.negative.p_values) == []
    verdicts = control_verdicts(r)
    assert verdicts["negative"]["tests"] == 200 * 2 * 3 and verdicts["negative"]["calibrated"]
    assert verdicts["negative"]["family_rate"] <= verdicts["negative"]["upper_bound"]
    assert verdicts["positive"]["cases"] == 3 * 2
    assert not r.constant_layers.any()
    # held-out CAV accuracy: the class-0 (red) concept separates its held-out images from the rest
    assert np.nanmax(r.cav_accuracy[0]) > 0.7 and np.all(r.cav_accuracy[1] < 0.75)


def test_same_seed_same_result(model, planted, data):
    images, labels = data
    kw = dict(cav_images=images[:60], score_images=images[60:], cav_labels=labels[:60], score_labels=labels[60:],
              n_null=19, n_matched=19, negative_controls=5, n_negatives=2)
    a = T.tcav(model, planted, "pool", [np.arange(10)], seed=3, **kw)
    b = T.tcav(model, planted, "pool", [np.arange(10)], seed=3, **kw)
    c = T.tcav(model, planted, "pool", [np.arange(10)], seed=4, **kw)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.negative.p_values, b.negative.p_values)
    assert not np.array_equal(a.negative.p_values, c.negative.p_values)


def test_labels_none_uses_the_networks_predictions(model, variables, data):
    images, _ = data
    r = T.tcav(model, variables, "pool", [np.arange(10)], cav_images=images[:50], score_images=images[50:],
               n_null=19, n_matched=19, negative_controls=0, n_negatives=1)
    logits = np.asarray(model.apply(variables, images[50:], train=False))
    assert_predictions_equal(r.score_labels, logits)
    np.testing.assert_array_equal(r.class_counts, np.bincount(r.score_labels, minlength=3))


def test_bad_input_raises_clear_errors(model, variables, data):
    images, labels = data

    def call(**kw):
        args = dict(cav_images=images[:60], score_images=images[60:], n_null=19, n_matched=19,
                    negative_controls=0, n_negatives=1)
        args.update(kw)
        sets = args.pop("sets", [np.arange(10)])
        layers = args.pop("layers", "pool")
        return T.tcav(model, variables, layers, sets, **args)

    with pytest.raises(ValueError, match="unknown layer 'stage4'"):
        call(layers="stage4")
    with pytest.raises(ValueError, match="layers must not repeat"):
        call(layers=("pool", "pool"))
    with pytest.raises(ValueError, match="exceed half of the 60 images"):
        call(sets=[np.arange(31)])
    with pytest.raises(ValueError, match="must not repeat an image"):
        call(sets=[[0, 0, 1]])
    with pytest.raises(ValueError, match=r"concept_sets must be indices in \[0, 60\)"):
        call(sets=[[0, 60]])
    with pytest.raises(ValueError, match=r"score_labels must be \(30,\)"):
        call(score_labels=labels[:5])
    with pytest.raises(ValueError, match="cav_labels must lie in"):
        call(cav_labels=labels[:60] + 1)
    with pytest.raises(ValueError, match="n_null must be an integer >= 19"):
        call(n_null=10)
    with pytest.raises(ValueError, match="target must be one of"):
        call(target="loss")
    with pytest.raises(ValueError, match="statistic must be one of"):
        call(statistic="mean")
    with pytest.raises(ValueError, match="alpha"):
        call(alpha=1.5)
    with pytest.raises(ValueError, match=r"cav_images must lie in \[0, 1\]"):
        call(cav_images=images[:60] * 255)
    with pytest.raises(ValueError, match="heldout_sets must hold sets of 10 images"):
        call(heldout_sets=[np.arange(5)])
    with pytest.raises(ValueError, match="positive_controls: expected classes"):
        call(positive_controls={"x": (np.arange(10, 20), 7)})
    with pytest.raises(ValueError, match=r"cavs must be \(K, 8\)"):
        T.directional_derivatives(model, variables, images[:2], "pool", np.ones((1, 7)))


# ----------------------------------------------------------------------------- held-out split
def test_held_out_images_never_reuse_a_fitted_image():
    from experiments.data import make_shapes

    probe, train = make_shapes(300, seed=0, split="test"), make_shapes(400, seed=0, split="train")
    fitted = np.arange(0, 300, 2)
    held = validate.held_out_images(probe, fitted, train, 100, labelled=True, seed=0)
    key = lambda x: {im.tobytes() for im in x}
    assert len(held.cav) == len(held.score) == 50
    assert not key(held.cav) & key(held.score)
    assert not (key(held.cav) | key(held.score)) & key(probe.images[fitted])
    assert key(held.cav) <= key(probe.images) and "not used in the fit" in held.source
    # too few left in the probe split: the training split, said so
    held = validate.held_out_images(probe, np.arange(280), train, 100, labelled=True, seed=0)
    assert key(held.cav) <= key(train.images) and "had only 20 left" in held.source
    with pytest.raises(ValueError, match="--tcav-images"):
        validate.held_out_images(probe, np.arange(280), train, 100, labelled=False, seed=0)


# ----------------------------------------------------------------------------- report
def test_section_reports_controls_findings_and_every_test(planted_result):
    section = tcav_section(planted_result, ["r", "g", "b"], notes=["a note"])
    assert isinstance(section, Section) and section.title == "TCAV (Figure 6)"
    assert isinstance(section.figures["tcav"], Figure)
    data = json.loads(json.dumps(section.data, allow_nan=False))
    assert data["layers"] == ["stage1", "pool"] and data["target"] == "logprob"
    assert len(data["tests"]) == 2 * 2 * 3
    first = data["tests"][0]
    assert first["concept"] == "red" and first["class"] == "r"
    assert first["p_family"] == pytest.approx(planted_result.uniform.p_family[0, 0, 0])
    assert data["controls"]["negative"]["calibrated"] is True
    assert "calibrated: " in section.html and "negative-control tests" in section.html
    assert "positive-control cases" in section.html and "a note" in section.html
    assert data["n_significant"] == int(planted_result.significant.sum())
    assert section.html.count("<td>red</td>") == int(planted_result.significant[0].sum())
    image = section.figures["tcav"].axes[0].images[0]  # non-significant cells are masked (grey)
    np.testing.assert_array_equal(np.ma.getmaskarray(image.get_array()), ~planted_result.significant[:, 0])
    with pytest.raises(ValueError, match="class_names"):
        tcav_section(planted_result, ["r", "g"])


# ----------------------------------------------------------------------------- validation
@pytest.mark.heavy
def test_controls_on_a_resnet18_trained_on_shapes():
    """A ResNet-18 (width 8) trained on `shapes` for 4 epochs (minutes on 2 CPU cores). Held-out
    CAV and score images. Positive controls (50 images of one shape) are significant for their own
    class with a positive effect in at least 90% of (shape, layer) cases at stage3 and pool;
    200 negative controls are calibrated at every layer."""
    from experiments.data import make_shapes

    train, test = make_shapes(3000, seed=0, split="train"), make_shapes(600, seed=0, split="test")
    model = models.build_model("resnet18", num_classes=6, width=8)
    config = models.TrainConfig(epochs=4, batch_size=64, learning_rate=0.05, warmup_epochs=1, crop_padding=0,
                                flip=False)
    trained = models.train(model, train.images, train.labels, test.images, test.labels, config, seed=0,
                           progress=False)
    assert trained.test_accuracy > 0.9
    cav, score = make_shapes(400, seed=1, split="test"), make_shapes(400, seed=2, split="test")
    rng = np.random.default_rng(0)
    positive = {f"shape {c}": (rng.permutation(np.flatnonzero(cav.labels == c))[:50], c) for c in range(6)}
    r = T.tcav(model, trained.variables, ("stage3", "pool"), np.stack([s for s, _ in positive.values()]),
               cav_images=cav.images, score_images=score.images, cav_labels=cav.labels, score_labels=score.labels,
               positive_controls=positive, negative_controls=200, seed=0)
    verdicts = control_verdicts(r)
    assert verdicts["negative"]["calibrated"], verdicts["negative"]["verdict"]
    for l in range(2):
        assert calibration_failures(r.negative.p_values[:, l]) == []
    assert verdicts["positive"]["rate"] >= 0.9, verdicts["positive"]
