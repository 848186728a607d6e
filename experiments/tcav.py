"""TCAV validation of concepts (paper Figure 6), after Kim et al. (ICML 2018), calibrated.

For a concept given as a set of images, at a layer l of the network:

1. **CAV**: the normal of a linear (ridge) classifier that separates the layer's activations of
   the concept's images from those of a random set of images (`experiments.tcav_stats`).
2. **Directional derivative** of image x along the CAV v: ``S(x) = grad_{h_l} f_y(x) . v``, with
   ``f_y`` the *target* of the image's class y: ``"logprob"`` (default: ``log softmax_y``, the
   cross-entropy of the class, as the tool the paper cites differentiates) or ``"logit"``
   (Kim et al.). At a global pool followed by a linear head the logit's gradient is the same
   for every image of a class, so each CAV scores 0 or 1; such layers are detected
   (``TCAVResult.constant_layers``) and not tested. Computed by JAX autodiff through the
   unchanged Flax model: one forward and backward pass per batch gives every layer's
   activations and own-class gradients.
3. **Score** of (concept, class): ``"cosine"`` (default: the mean derivative along the unit CAV
   relative to the gradients' size), ``"sign"`` (Kim et al.: the share of the class's images
   with S > 0) or ``"magnitude"`` (Captum); the statistic is the mean over ``n_negatives`` CAVs
   against different random negative sets (`experiments.tcav_stats`).
4. **Calibrated test**: the statistic is compared with the same statistic of ``n_null`` uniform
   random sets of the same size, and of ``n_matched`` random sets with the concept's class
   histogram (does the concept carry more than its classes?): Monte-Carlo p-values, max-T
   family-wise correction over each concept's classes and layers, effect sizes with intervals.
5. **Held out**: concept and random sets are drawn from the *CAV images*; the scores are
   computed on other images, the *score images*, so no image that chose or trained a CAV is
   scored; the CAVs' accuracy is measured on the score images (``heldout_sets``).
6. **Controls**: ``negative_controls`` random sets are tested exactly like concepts (their
   p-values must be uniform: the report shows how often they come out significant), and
   ``positive_controls`` (sets of images known to share a class-defining attribute) must come
   out significant for their class.

Example::

    result = tcav(model, variables, ("stage3", "stage4"), concept_sets, cav_images=select,
                  score_images=score, score_labels=score_labels, heldout_sets=heldout)
    result.significant      # (d, L, C) concept raises or lowers the class, family-wise 5%
    result.beats_classes    # (d,) more than the concept's class histogram explains
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import models
from experiments import tcav_stats as stats
from experiments.tcav_stats import STATISTICS, MonteCarloTest, concept_sets_from_factors

__all__ = [
    "STATISTICS",
    "TARGETS",
    "TCAVResult",
    "compute_cavs",
    "concept_sets_from_factors",
    "directional_derivatives",
    "tcav",
    "tcav_factors",
]

TARGETS = ("logprob", "logit")
_HIGHEST = lax.Precision.HIGHEST
_CONSTANT = 1e-4  # a layer's gradient is constant when every class's spread is below this, relative


class TCAVResult(NamedTuple):
    """What `tcav` returns. d concepts, L layers, C classes (the model's outputs).

    Attributes:
        layers: (L,) layer names. names: (d,) concept names. target, statistic: as asked.
        concept_sets: (d, n) int64 indices into the CAV images.
        scores: (d, L, C) statistic of every concept (mean score over its CAVs); NaN for a class
            without score images and for a constant layer.
        uniform: `tcav_stats.MonteCarloTest` against uniform random sets (shapes (d, L, C)).
        matched: the same against class-matched random sets (null_mean (d, L, C)).
        significant: (d, L, C) bool, ``uniform.p_family < alpha``.
        beats_classes: (d,) bool, some (layer, class) with ``matched.p_family < alpha``.
        cav_accuracy: (d, L) balanced accuracy of the concept CAVs on the score images, the
            held-out concept set against the other score images; NaN without ``heldout_sets``.
        constant_layers: (L,) bool, the target's gradient is the same for every image of a class.
        negative: MonteCarloTest of the negative controls ((n_controls, L, C)), or None.
        positive_names, positive_classes: names and expected classes of the positive controls.
        positive_scores, positive: their statistics (P, L, C) and MonteCarloTest, or None.
        class_counts: (C,) score images per class. score_labels: (N_s,) their classes.
        alpha: the significance level. n_negatives: CAVs per set.
    """

    layers: tuple[str, ...]
    names: tuple[str, ...]
    target: str
    statistic: str
    concept_sets: np.ndarray
    scores: np.ndarray
    uniform: MonteCarloTest
    matched: MonteCarloTest
    significant: np.ndarray
    beats_classes: np.ndarray
    cav_accuracy: np.ndarray
    constant_layers: np.ndarray
    negative: MonteCarloTest | None
    positive_names: tuple[str, ...]
    positive_classes: np.ndarray
    positive_scores: np.ndarray | None
    positive: MonteCarloTest | None
    class_counts: np.ndarray
    score_labels: np.ndarray
    alpha: float
    n_negatives: int


# ----------------------------------------------------------------------------- validation
def _layer_module(model: nn.Module, layer: str) -> str:
    """The top-level submodule whose output is ``layer``; ValueError if the model has none."""
    modules = model.layer_modules()
    if not isinstance(layer, str) or layer not in modules:
        raise ValueError(f"unknown layer {layer!r} for {type(model).__name__}; valid: {tuple(modules)}")
    return modules[layer]


def _check_images(images, name: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name} must be (N, H, W, C), got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} must be floats in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image")
    if not (images.min() >= 0 and images.max() <= 1):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{images.min()}, {images.max()}]")
    return images.astype(np.float32)


def _check_labels(labels, n: int, num_classes: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be ({n},) integers (one per image), got shape {labels.shape} and "
                         f"dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}) (the model's num_classes), got values in "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int32)


def _check_layers(model, layers) -> tuple[str, ...]:
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    if len(set(layers)) < len(layers):
        raise ValueError(f"layers must not repeat, got {layers}")
    for layer in layers:
        _layer_module(model, layer)
    return layers


def _check_sets(sets, n_images: int, name: str, size: int | None = None) -> np.ndarray:
    sets = np.asarray(sets)
    if sets.ndim != 2 or not np.issubdtype(sets.dtype, np.integer) or sets.shape[0] < 1 or sets.shape[1] < 2:
        raise ValueError(f"{name} must be (d, n) integer indices with d >= 1 and n >= 2, got shape {sets.shape} "
                         f"and dtype {sets.dtype}")
    if size is not None and sets.shape[1] != size:
        raise ValueError(f"{name} must hold sets of {size} images like the concept sets, got {sets.shape[1]}")
    if sets.min() < 0 or sets.max() >= n_images:
        raise ValueError(f"{name} must be indices in [0, {n_images})")
    if any(len(np.unique(row)) < sets.shape[1] for row in sets):
        raise ValueError(f"{name} must not repeat an image within a set")
    if 2 * sets.shape[1] > n_images:
        raise ValueError(f"{name}: sets of {sets.shape[1]} images exceed half of the {n_images} images they are "
                         "drawn from (a negative set of their size must fit outside them)")
    return sets.astype(np.int64)


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- derivatives
def _intercepted_logits(model, variables, images, deltas: Mapping[str, jax.Array], captured: dict | None = None):
    """Logits (B, C) with ``deltas[module]`` added to the output of each top-level ``module``;
    the unperturbed outputs are stored in ``captured`` when given."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = context.module.path
        if context.method_name == "__call__" and len(path) == 1 and path[0] in deltas:
            if captured is not None:
                captured[path[0]] = out
            out = out + deltas[path[0]]
        return out

    with nn.intercept_methods(interceptor):
        return model.apply(variables, images, train=False)


def _targets(logits, target: str):
    return jax.nn.log_softmax(logits, axis=-1) if target == "logprob" else logits


def directional_derivatives(model, variables, images, layer: str, cavs, target: str = "logprob") -> jax.Array:
    """``S[b, k, c] = grad_{h_l} f_c(x_b) . v_k`` for every class c and CAV v_k (a JVP per CAV).

    Args:
        model: a `models.ResNet` or `models.VGG` (any Linen module with ``layer_modules()``).
        variables: its ``{"params", "batch_stats"}``; the model runs in inference mode.
        images: (B, H, W, C) images in [0, 1].
        layer: a name from ``model.layer_modules()``.
        cavs: (K, a) directions, a = the layer's flattened (NHWC) size per image.
        target: ``"logprob"`` (f = log softmax) or ``"logit"``.

    Returns:
        (B, K, num_classes).
    """
    module = _layer_module(model, layer)
    _check_choice("target", target, TARGETS)
    images = jnp.asarray(_check_images(images))
    shape = jax.eval_shape(lambda x: models.capture_activations(model, variables, x, (layer,))[layer],
                           jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32)).shape[1:]
    cavs = jnp.asarray(cavs)
    if cavs.ndim != 2 or cavs.shape[1] != int(np.prod(shape)):
        raise ValueError(f"cavs must be (K, {int(np.prod(shape))}) for layer {layer!r} of shape {shape}, "
                         f"got {cavs.shape}")
    return _jvp_derivatives(model, module, target, variables, images, cavs.reshape(-1, 1, *shape))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _jvp_derivatives(model, module, target, variables, images, cavs):
    zero = jnp.zeros(cavs.shape[1:], jnp.float32)  # (1, h, w, c): broadcast over the batch
    _, jvp = jax.linearize(lambda delta: _targets(_intercepted_logits(model, variables, images, {module: delta}),
                                                  target), zero)
    return jnp.moveaxis(jax.vmap(jvp)(cavs.astype(zero.dtype)), 0, 1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _activations_and_gradients(model, layer_modules, use_labels, target, variables, images, labels):
    """Per layer (B, ...) activations and gradients of ``f_y`` (y: ``labels``, or the predicted
    class when ``use_labels`` is False), and (B,) y: one forward and one backward pass. Images do
    not interact in inference mode, so the gradient of ``sum_b f_{y_b}(x_b)`` is per image."""
    modules = tuple(dict.fromkeys(layer_modules))
    shapes = jax.eval_shape(lambda x: _outputs(model, variables, x, modules), images)
    zeros = {m: jnp.zeros(shapes[m].shape, jnp.float32) for m in modules}

    def own_targets(deltas):
        captured = {}
        logits = _intercepted_logits(model, variables, images, deltas, captured)
        classes = labels if use_labels else jnp.argmax(logits, axis=1).astype(jnp.int32)
        own = jnp.take_along_axis(_targets(logits, target), classes[:, None], axis=1)
        return jnp.sum(own), (captured, classes)

    gradients, (captured, classes) = jax.grad(own_targets, has_aux=True)(zeros)
    return [captured[m] for m in layer_modules], [gradients[m] for m in layer_modules], classes


def _outputs(model, variables, images, modules):
    captured = {}
    _intercepted_logits(model, variables, images, {m: 0.0 for m in modules}, captured)
    return captured


def _layer_arrays(model, variables, layers, images, labels, target, batch_size):
    """Flattened activations and own-class target gradients of every layer, (N, a_l) each, and
    (N,) the classes used (``labels`` or the predictions)."""
    n = len(images)
    batch_size = min(batch_size, n)
    modules = tuple(_layer_module(model, layer) for layer in layers)
    given = np.zeros(n, np.int32) if labels is None else labels
    acts, grads, classes = [[] for _ in layers], [[] for _ in layers], []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        a, g, c = _activations_and_gradients(model, modules, labels is not None, target, variables,
                                             jnp.asarray(_pad(images[start:stop], batch_size)),
                                             jnp.asarray(_pad(given[start:stop], batch_size)))
        for out, parts in ((acts, a), (grads, g)):
            for store, x in zip(out, parts):
                store.append(np.asarray(x[:stop - start]).reshape(stop - start, -1))
        classes.append(np.asarray(c[:stop - start]))
    return [np.concatenate(x) for x in acts], [np.concatenate(x) for x in grads], np.concatenate(classes)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` padded with zeros along its first axis to ``size`` rows (one compilation per size)."""
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def _is_constant(gradients: np.ndarray, labels: np.ndarray) -> bool:
    """Whether every class's gradients (rows) are equal up to ``_CONSTANT`` relative spread."""
    for c in np.unique(labels):
        g = gradients[labels == c].astype(np.float64)
        spread = np.max(np.linalg.norm(g - g.mean(axis=0), axis=1))
        if spread > _CONSTANT * max(np.linalg.norm(g.mean(axis=0)), np.finfo(np.float32).tiny):
            return False
    return True


def _matmul_t(a, b) -> jax.Array:
    return jnp.matmul(jnp.asarray(a), jnp.asarray(b).T, precision=_HIGHEST)


def compute_cavs(activations, positives, negatives, *, ridge: float = 0.1) -> jax.Array:
    """(K, a) unit CAVs of K (positive, negative) pairs of sets: the ridge classifiers' normals
    (`tcav_stats.ridge_coefficients`) in activation space, pointing towards the positives.

    Args:
        activations: (N, a) flattened activations. positives, negatives: (K, n) int indices.
        ridge: regularisation relative to the mean eigenvalue of the pair's centred Gram matrix.
    """
    activations = jnp.asarray(activations, jnp.float32)
    if activations.ndim != 2:
        raise ValueError(f"activations must be (N, a), got shape {activations.shape}")
    positives, negatives = np.asarray(positives), np.asarray(negatives)
    if positives.ndim != 2 or positives.shape != negatives.shape or positives.shape[1] < 2:
        raise ValueError(f"positives and negatives must both be (K, n) with n >= 2, got {positives.shape} and "
                         f"{negatives.shape}")
    if not ridge > 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    coefficients = stats.ridge_coefficients(_matmul_t(activations, activations), positives, negatives, ridge)
    v = jnp.matmul(coefficients, activations, precision=_HIGHEST)
    norms = jnp.linalg.norm(v, axis=1, keepdims=True)
    return jnp.where(norms > 0, v / jnp.where(norms > 0, norms, 1), 0)


# ----------------------------------------------------------------------------- TCAV
def tcav(model, variables, layers, concept_sets, *, cav_images, score_images, cav_labels=None,
         score_labels=None, heldout_sets=None, names: Sequence[str] | None = None,
         positive_controls: Mapping[str, tuple[Sequence[int], int]] | None = None, negative_controls: int = 300,
         target: str = "logprob", statistic: str = "cosine", n_null: int = 500, n_matched: int = 100,
         n_negatives: int = 4, alpha: float = 0.05, ridge: float = 0.1, seed: int = 0,
         batch_size: int = 256) -> TCAVResult:
    """Calibrated TCAV of concept sets (module docstring).

    Args:
        model, variables: a `models.ResNet` or `models.VGG` and its variables; C = num_classes.
        layers: a layer name or names from ``model.layer_modules()``.
        concept_sets: (d, n) int indices into ``cav_images``, one concept per row, ``2n <= N_b``.
        cav_images: (N_b, H, W, C) images in [0, 1] the concept, random and negative sets come from.
        score_images: (N_s, H, W, C) images in [0, 1], disjoint from ``cav_images``, on which the
            scores are computed.
        cav_labels: (N_b,) classes of the CAV images for the class-matched null; None: the
            network's predictions.
        score_labels: (N_s,) classes of the score images (whose target is differentiated);
            None: the network's predictions.
        heldout_sets: (d, n) int indices into ``score_images``: each concept's own images among
            the score images, for the CAVs' held-out accuracy; None: not measured.
        names: (d,) concept names; default ``"factor k"``.
        positive_controls: name -> (n indices into ``cav_images``, expected class): sets that
            must come out significant for their class; tested like the concepts.
        negative_controls: uniform random sets tested like the concepts (0: none).
        target: ``"logprob"`` or ``"logit"``. statistic: ``"cosine"``, ``"sign"`` or ``"magnitude"``.
        n_null, n_matched: uniform and class-matched random sets per null (>= 19).
        n_negatives: CAVs per set, each against its own random negative set.
        alpha: the family-wise level of ``significant`` and ``beats_classes``, in (0, 1).
        ridge: the CAV classifiers' regularisation. seed: of every random set (NumPy).
        batch_size: images per forward and backward pass.
    """
    cav_images = _check_images(cav_images, "cav_images")
    score_images = _check_images(score_images, "score_images")
    n_b, n_s = len(cav_images), len(score_images)
    num_classes = int(model.num_classes)
    layers = _check_layers(model, layers)
    concept_sets = _check_sets(concept_sets, n_b, "concept_sets")
    d, size = concept_sets.shape
    names = tuple(f"factor {k}" for k in range(d)) if names is None else tuple(str(x) for x in names)
    if len(names) != d:
        raise ValueError(f"names must name the {d} concepts, got {len(names)}")
    if heldout_sets is not None:
        heldout_sets = _check_sets(heldout_sets, n_s, "heldout_sets", size)
        if len(heldout_sets) != d:
            raise ValueError(f"heldout_sets must hold one set per concept ({d}), got {len(heldout_sets)}")
    positive_controls = dict(positive_controls or {})
    positive_sets = (_check_sets([s for s, _ in positive_controls.values()], n_b, "positive_controls", size)
                     if positive_controls else np.zeros((0, size), np.int64))
    positive_classes = np.array([int(c) for _, c in positive_controls.values()], np.int64)
    if positive_classes.size and (positive_classes.min() < 0 or positive_classes.max() >= num_classes):
        raise ValueError(f"positive_controls: expected classes must lie in [0, {num_classes})")
    negative_controls = stats.check_int("negative_controls", negative_controls, 0)
    n_null = stats.check_int("n_null", n_null, 19)
    n_matched = stats.check_int("n_matched", n_matched, 19)
    n_negatives = stats.check_int("n_negatives", n_negatives, 1)
    batch_size = stats.check_int("batch_size", batch_size, 1)
    _check_choice("target", target, TARGETS)
    _check_choice("statistic", statistic, STATISTICS)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not ridge > 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    if cav_labels is not None:
        cav_labels = _check_labels(cav_labels, n_b, num_classes, "cav_labels")
    if score_labels is not None:
        score_labels = _check_labels(score_labels, n_s, num_classes, "score_labels")

    # One pass over each image set: activations (and, for the score images, target gradients).
    cav_acts, _, predicted = _layer_arrays(model, variables, layers, cav_images, cav_labels, target, batch_size)
    cav_labels = predicted if cav_labels is None else cav_labels
    score_acts, score_grads, score_labels = _layer_arrays(model, variables, layers, score_images, score_labels,
                                                          target, batch_size)

    # Every set tested, in one stack: concepts, positive controls, negative controls, uniform
    # null sets, class-matched null sets of each concept (the controls are not matched: a
    # one-class set's class-matched null is itself).
    rng = np.random.default_rng(seed)
    tested = np.concatenate([concept_sets, positive_sets])
    groups = [tested, stats.uniform_sets(rng, n_b, negative_controls, size), stats.uniform_sets(rng, n_b, n_null, size),
              *(stats.matched_sets(rng, cav_labels, s, n_matched) for s in concept_sets)]
    positives = np.concatenate(groups)
    negatives = stats.negative_sets(rng, n_b, positives, n_negatives)  # (K, n_negatives, n)
    flat_positives = np.repeat(positives, n_negatives, axis=0)
    flat_negatives = negatives.reshape(-1, size)

    L, C = len(layers), num_classes
    all_scores = np.full((len(positives), L, C), np.nan)
    cav_accuracy = np.full((d, L), np.nan)
    constant = np.zeros(L, bool)
    concept_cavs = slice(0, d * n_negatives)  # the concepts' CAVs come first
    for l in range(L):
        acts, grads, held_acts = cav_acts[l], score_grads[l], score_acts[l]
        cav_acts[l] = score_grads[l] = score_acts[l] = None  # the layer's arrays are freed after it
        constant[l] = _is_constant(grads, score_labels)
        if constant[l] and heldout_sets is None:
            continue  # nothing to score or measure at this layer
        gram = _matmul_t(acts, acts)
        cavs = concept_cavs if constant[l] else slice(None)  # held-out accuracy needs the concepts' CAVs only
        coefficients = stats.ridge_coefficients(gram, flat_positives[cavs], flat_negatives[cavs], ridge)
        if not constant[l]:
            per_cav = stats.set_scores(_matmul_t(grads, acts), coefficients, score_labels, C, statistic, gram=gram,
                                       gradient_sq_norms=np.sum(np.square(grads, dtype=np.float64), axis=1))
            all_scores[:, l] = per_cav.reshape(len(positives), n_negatives, C).mean(axis=1)
        if heldout_sets is not None:
            cav_accuracy[:, l] = _heldout_accuracy(gram, _matmul_t(held_acts, acts), coefficients[concept_cavs],
                                                   flat_positives[concept_cavs], flat_negatives[concept_cavs],
                                                   heldout_sets, n_negatives)

    n_t, n_neg_c = len(tested), negative_controls
    observed, negative_scores = all_scores[:n_t], all_scores[n_t:n_t + n_neg_c]
    null = all_scores[n_t + n_neg_c:n_t + n_neg_c + n_null]
    matched_null = all_scores[n_t + n_neg_c + n_null:].reshape(d, n_matched, L, C)
    uniform = stats.monte_carlo_test(observed, null)
    matched = _stack_tests([stats.monte_carlo_test(observed[i:i + 1], matched_null[i]) for i in range(d)])
    negative = stats.monte_carlo_test(negative_scores, null) if n_neg_c else None
    concepts, controls = slice(0, d), slice(d, n_t)
    uniform_c = _rows(uniform, concepts)
    counts = np.bincount(score_labels, minlength=C)
    with np.errstate(invalid="ignore"):
        significant = np.nan_to_num(uniform_c.p_family, nan=1.0) < alpha
        beats = np.any(np.nan_to_num(matched.p_family, nan=1.0) < alpha, axis=(1, 2))
    return TCAVResult(
        layers=layers, names=names, target=target, statistic=statistic, concept_sets=concept_sets,
        scores=observed[concepts], uniform=uniform_c, matched=matched, significant=significant,
        beats_classes=beats, cav_accuracy=cav_accuracy, constant_layers=constant, negative=negative,
        positive_names=tuple(positive_controls), positive_classes=positive_classes,
        positive_scores=observed[controls] if positive_controls else None,
        positive=_rows(uniform, controls) if positive_controls else None,
        class_counts=counts.astype(np.int64), score_labels=score_labels.astype(np.int64), alpha=float(alpha),
        n_negatives=n_negatives)


def _stack_tests(tests: Sequence[MonteCarloTest]) -> MonteCarloTest:
    """One MonteCarloTest of sets tested each against its own null: per-set null mean and sd."""
    cat = lambda field: np.concatenate([getattr(t, field) for t in tests])
    stack = lambda field: np.stack([getattr(t, field) for t in tests])
    return MonteCarloTest(p_values=cat("p_values"), p_family=cat("p_family"), null_mean=stack("null_mean"),
                          null_sd=stack("null_sd"), effect=cat("effect"), interval=cat("interval"),
                          n_null=tests[0].n_null)


def _rows(test: MonteCarloTest, rows: slice) -> MonteCarloTest:
    """The tests of some of the sets (against a null they share)."""
    return test._replace(p_values=test.p_values[rows], p_family=test.p_family[rows], effect=test.effect[rows],
                         interval=test.interval[rows])


def _heldout_accuracy(gram, cross_acts, coefficients, positives, negatives, heldout_sets, n_negatives):
    """(d,) mean over each concept's CAVs of the balanced accuracy of the classifier
    ``f(h) = (h - mean of the pair's h) . v`` on the score images: concept's held-out set vs the rest."""
    coefficients = np.asarray(coefficients, np.float64)
    projections = np.asarray(cross_acts, np.float64) @ coefficients.T  # (N_s, K): h_x . v
    kc = np.asarray(gram, np.float64) @ coefficients.T  # (N_b, K): h_j . v
    members = np.concatenate([positives, negatives], axis=1)
    centre = np.take_along_axis(kc.T, members, axis=1).mean(axis=1)  # (K,): mean of the pair's h . v
    decision = projections - centre  # (N_s, K)
    d = len(heldout_sets)
    inside = np.zeros((decision.shape[0], d), bool)
    inside[heldout_sets.T, np.arange(d)[None, :]] = True
    inside = np.repeat(inside, n_negatives, axis=1)
    hits = 0.5 * ((decision > 0) & inside).sum(0) / inside.sum(0) + 0.5 * ((decision <= 0) & ~inside).sum(0) / (
        ~inside).sum(0)
    return hits.reshape(d, n_negatives).mean(axis=1)


def tcav_factors(model, variables, layers, F_cav, *, cav_images, score_images, F_score=None, n_concept: int = 50,
                 **kwargs) -> TCAVResult:
    """`tcav` of latent factors: concept k = the ``n_concept`` top CAV images by ``F_cav[k]``.

    Args:
        F_cav: (d, N_b) example factor of the CAV images (``jaxnmf.transform`` of a fit on
            other images, so that no fitted image chooses a concept).
        F_score: (d, N_s) the same for the score images, for the CAVs' held-out accuracy.
        n_concept: images per concept set.
        **kwargs: the other options of `tcav`.
    """
    F_cav = np.asarray(F_cav)
    if F_cav.ndim != 2 or F_cav.shape[1] != len(cav_images):
        raise ValueError(f"F_cav must be (d, {len(cav_images)}), one column per CAV image, got {F_cav.shape}")
    heldout = None
    if F_score is not None:
        F_score = np.asarray(F_score)
        if F_score.shape != (F_cav.shape[0], len(score_images)):
            raise ValueError(f"F_score must be ({F_cav.shape[0]}, {len(score_images)}), got {F_score.shape}")
        heldout = concept_sets_from_factors(F_score, n_concept)
    return tcav(model, variables, layers, concept_sets_from_factors(F_cav, n_concept), cav_images=cav_images,
                score_images=score_images, heldout_sets=heldout, **kwargs)
