"""TCAV validation of the latent concepts (paper Figure 6), after Kim et al. (ICML 2018).

The paper's authors published no TCAV code, so the protocol is this project's; it follows Kim et
al. (and their ``tcav`` library). For every latent factor k of the example factor F (d, N) of
N probe images:

1. **Concept set** ``P_k``: the ``n_concept`` probe images with the largest ``F[k, :]``.
2. **Random sets**: for each repeat i < ``n_random``, two disjoint sets of ``n_concept`` probe
   images drawn uniformly from those not in ``P_k``: ``R_ki`` (the random counterpart) and
   ``Q_ki`` (a random set standing in for the concept, Kim et al.'s random-vs-random null).
   R and Q come from the same pool, so they are exchangeable and the null scores are symmetric
   about 1/2 (drawing Q from the whole probe set would bias it towards the concept: R lacks
   the concept's images). Hence ``n_concept <= N / 3``.
3. **CAV** per (set pair, layer l): a linear classifier separates the layer's flattened
   activations (NHWC order, (h * W + w) * C + c) of the positive set from those of the negative
   set; the CAV ``v`` is the unit normal of its decision boundary, pointing towards the positive
   set. Concept CAVs are ``P_k`` vs ``R_ki``, null CAVs ``Q_ki`` vs ``R_ki``.
4. **Directional derivative** ``S_c(x) = grad_{h_l} logit_c(x) . v``: the rate at which class c's
   logit changes when the image's activation at layer l moves along v. Computed by JAX autodiff
   through the unchanged Flax model: a `flax.linen.intercept_methods` interceptor adds a
   perturbation to the output of the layer's module and the derivative with respect to it at 0
   is taken. `tcav` needs only each image's own class, so one forward and one backward pass per
   batch give every layer's activations and own-class gradients ``g`` (a VJP), and
   ``S = g . v`` for all CAVs is one matrix product; `directional_derivatives` gives every
   logit along given CAVs (a JVP per CAV, with `jax.linearize`). Both equal finite differences
   (tests/test_tcav.py). The model runs in inference mode, so images do not interact.
5. **TCAV score** of (CAV, class c) = the share of the probe images of class c with S_c > 0.
6. **Test** per (layer, concept, class): the ``n_random`` concept scores against the
   ``n_random`` null scores, two-sided t-test (`scipy.stats.ttest_ind`; Welch's unequal-variance
   form by default, since null scores spread far more than concept scores). The p-values of all
   (layer, concept, class) tests of one call are corrected together for multiple testing:
   Benjamini-Hochberg (``"bh"``, default; controls the false discovery rate, valid for
   independent or positively dependent tests) or Bonferroni (``"bonferroni"``, family-wise error
   rate, any dependence). A score is reported as significant when its corrected p-value is below
   ``alpha``. A test whose two samples are the same constant has no evidence: p = 1; one whose
   samples are different constants has p = 0.

The linear classifier is ridge regression on +-1 targets with an unpenalised intercept (a
least-squares SVM; scikit-learn's ``Ridge`` gives the same normal), solved in closed form in its
dual (kernel) form, so that all CAVs of a layer are one vectorised, jitted computation on the
probe set's Gram matrix: with the centred Gram matrix ``Kc`` (2n, 2n) of the pair's images and
targets y, ``alpha = (Kc + lam I)^-1 y`` and ``v ~ sum_j alpha_j (h_j - mean_j h_j)``, with
``lam = ridge * trace(Kc) / 2n`` (``ridge`` times the mean eigenvalue, so the choice is
scale-free). It is deterministic and needs no iteration; Kim et al. used a linear SVM (SGD) or
logistic regression, linear classifiers of the same family. Its exact leave-one-out accuracy
(from the hat matrix, no refit) is reported as a check that the concept is linearly separable
at the layer (``TCAVResult.cav_accuracy``; the null CAVs' is near 0.5).

Reading the scores: near 1, the concept raises the class's logit for nearly every image of the
class; near 0, it lowers it; both can be significant. At a pooled layer (``"pool"``) the logit's
gradient is the same for every image, so each CAV's score is 0 or 1. Which class an image
belongs to is given by ``labels``, indices of the model's outputs; ``labels=None`` uses the
network's own predictions (needed when the probe set's classes are not the model's, as in the
cross-dataset study).

What the test does and does not say: as in Kim et al., the concept set is fixed across repeats
and only its random counterpart varies, while the null CAVs vary both sets. The t-test thus
asks whether this set's CAVs consistently score differently from random-vs-random CAVs, not
whether the set is unlike a random set of images: a fixed set of random images gets a
consistent score of its own and can pass. Measured on a ResNet-18 (width 8) trained on
``shapes``, 600 probe images, ``n_concept=50``, 4 layers, with 6 shape, 6 colour and 8
random-image concept sets: at ``n_random=10`` (Welch, BH) 3-4 of the 48 tests of the random sets
per layer came out significant (21% had raw p < 0.05), at ``n_random=30`` about 40%, since more
repeats make any consistent bias significant. Bonferroni removed them at ``n_random=10`` but
also most true effects. So keep ``n_random`` near 10, and read a significant score as
"consistent", weighed by its size and by ``cav_accuracy``. (Comparing a concept's mean score
with those of many random-image sets instead is calibrated, but random sets reach mean scores
of 0.9-1.0 often enough that even the class-defining shape concepts then fall short of
significance.)

Example::

    result = tcav_scores(model, variables, probe.images, probe.labels, nmf.F,
                         ("stage3", "stage4"), n_concept=50, n_random=10, seed=0)
    result.mean[result.layers.index("stage3")]              # (d, C) TCAV scores
    section = tcav_section(result, probe.class_names)      # for experiments.report.write_report

CPU cost at the quickstart's scale (``python -m experiments.tcav``: width-16 ResNet-18, 1000
probe images, d = 20 factors, layers stage3, stage4 and pool, ``n_random=10``, so 1,200 CAVs),
on 2 CPU cores shared with other jobs: the first call 6-10 s wall (5.6 s CPU), compilation
included, a second call 2-5 s (2.4 s CPU). One forward and backward pass over the probe set
dominates; the CAVs (closed form on a 1000 x 1000 Gram matrix) and the scores are a fraction.
"""
from __future__ import annotations

import argparse
import functools
import html
import time
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from jax import lax
from matplotlib.figure import Figure
from scipy import stats

import models
from experiments.report import Section

__all__ = [
    "CORRECTIONS",
    "TCAVResult",
    "compute_cavs",
    "concept_sets_from_factors",
    "correct_p_values",
    "directional_derivatives",
    "tcav",
    "tcav_scores",
    "tcav_section",
]

CORRECTIONS = ("bh", "bonferroni")
"""Multiple-testing corrections: Benjamini-Hochberg (false discovery rate) and Bonferroni."""

_HIGHEST = lax.Precision.HIGHEST  # no TF32/bf16 shortcuts on GPUs: signs of small S matter


class TCAVResult(NamedTuple):
    """What `tcav` and `tcav_scores` return. L layers, d concepts, C classes (model outputs).

    Attributes:
        layers: (L,) layer names, the order of the first axis below.
        concept_sets: (d, n_concept) int64 probe indices of each concept set.
        random_sets: (d, n_random, n_concept) int64, ``R_ki``: negatives of every CAV.
        null_sets: (d, n_random, n_concept) int64, ``Q_ki``: positives of the null CAVs.
        scores: (L, d, n_random, C) TCAV score of the CAV ``P_k`` vs ``R_ki`` for class c.
        null_scores: (L, d, n_random, C) TCAV score of the null CAV ``Q_ki`` vs ``R_ki``.
        mean, std: (L, d, C) mean and standard deviation (ddof=1) of ``scores`` over repeats.
        null_mean, null_std: (L, d, C) the same of ``null_scores``.
        p_values: (L, d, C) two-sided t-test of scores vs null scores; NaN for a class without
            probe images.
        p_corrected: (L, d, C) after the multiple-testing correction over all finite tests.
        significant: (L, d, C) bool, ``p_corrected < alpha``.
        cav_accuracy: (L, d) mean leave-one-out accuracy of the concept CAVs' classifiers.
        null_cav_accuracy: (L, d) the same for the null CAVs (near 0.5 unless the layer
            separates random sets).
        class_counts: (C,) probe images per class (the denominators of the scores).
        labels: (N,) the class of each probe image used (given or predicted).
        alpha: significance level. correction: ``"bh"`` or ``"bonferroni"``.
        equal_var: Student's (True) or Welch's (False) t-test.
    """

    layers: tuple[str, ...]
    concept_sets: np.ndarray
    random_sets: np.ndarray
    null_sets: np.ndarray
    scores: np.ndarray
    null_scores: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    null_mean: np.ndarray
    null_std: np.ndarray
    p_values: np.ndarray
    p_corrected: np.ndarray
    significant: np.ndarray
    cav_accuracy: np.ndarray
    null_cav_accuracy: np.ndarray
    class_counts: np.ndarray
    labels: np.ndarray
    alpha: float
    correction: str
    equal_var: bool


# ----------------------------------------------------------------------------- validation
def _layer_module(model: nn.Module, layer: str) -> str:
    """The top-level submodule whose output is ``layer``; ValueError if the model has none."""
    modules = model.layer_modules()
    if not isinstance(layer, str) or layer not in modules:
        raise ValueError(
            f"unknown layer {layer!r} for {type(model).__name__}; valid: {tuple(modules)}")
    return modules[layer]


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image")
    if not (images.min() >= 0 and images.max() <= 1):
        raise ValueError(f"images must lie in [0, 1], got values in "
                         f"[{images.min()}, {images.max()}]")
    return images.astype(np.float32)


def _check_labels(labels, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ({n},) integers (one per image), "
                         f"got shape {labels.shape} and dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) (the model's num_classes), "
                         f"got values in [{labels.min()}, {labels.max()}]")
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


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- concept sets
def concept_sets_from_factors(F, n_concept: int) -> np.ndarray:
    """The concept set of every latent factor: its ``n_concept`` top probe images.

    Args:
        F: (d, N) example factor (``jaxnmf.fit(...).F``), column n = probe image n.
        n_concept: images per concept set, ``2 <= n_concept <= N / 3`` (the rest of the probe
            set must hold two disjoint random sets of the same size).

    Returns:
        (d, n_concept) int64 probe indices, largest ``F[k, n]`` first; ties keep the lower index.
    """
    F = np.asarray(F)
    if F.ndim != 2 or F.shape[0] < 1:
        raise ValueError(f"F must be (d, N) with d >= 1, got shape {F.shape}")
    if not np.all(np.isfinite(F)):
        raise ValueError("F must be finite")
    n_concept = _check_positive_int("n_concept", n_concept, 2)
    if 3 * n_concept > F.shape[1]:
        raise ValueError(f"n_concept={n_concept} exceeds a third of the N={F.shape[1]} probe "
                         f"images (two disjoint random sets of its size must fit in the rest)")
    return np.argsort(-F, axis=1, kind="stable")[:, :n_concept].astype(np.int64)


def _random_sets(concept_sets: np.ndarray, n: int, n_random: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(d, n_random, m) random sets R and null sets Q: disjoint, both outside the concept set."""
    d, m = concept_sets.shape
    random_sets = np.empty((d, n_random, m), np.int64)
    null_sets = np.empty((d, n_random, m), np.int64)
    for k in range(d):
        outside = np.setdiff1d(np.arange(n), concept_sets[k])
        for i in range(n_random):
            # R and Q: disjoint, both uniform from outside the concept set, so exchangeable:
            # the null scores are symmetric about 1/2.
            drawn = rng.choice(outside, 2 * m, replace=False)
            random_sets[k, i], null_sets[k, i] = drawn[:m], drawn[m:]
    return random_sets, null_sets


# ----------------------------------------------------------------------------- CAVs
def compute_cavs(activations, positives, negatives, *, ridge: float = 0.1):
    """CAVs of a layer: unit normals of ridge classifiers, one per (positive, negative) set pair.

    Ridge regression of targets +1 (positives) and -1 (negatives) on the flattened activations,
    with an unpenalised intercept, in its dual form (module docstring): with the pair's centred
    Gram matrix ``Kc`` (2n, 2n), ``alpha = (Kc + lam I)^-1 y``, ``lam = ridge * trace(Kc) / 2n``,
    and the normal ``w = sum_j alpha_j (h_j - mean h)``, scaled to unit length. ``w . (mean of
    positives - mean of negatives) = y^T Kc (Kc + lam I)^-1 y / n > 0``: w points towards the
    positives.

    Args:
        activations: (N, a) a layer's activations of the N probe images, flattened.
        positives, negatives: (K, n) int probe indices of the K pairs' sets (n >= 2 each).
        ridge: ``lam`` relative to the mean eigenvalue of ``Kc``, > 0.

    Returns:
        ``(cavs, loo_accuracy)``: (K, a) float32 unit vectors (zero where the pair's activations
        are all equal), and (K,) the classifiers' exact leave-one-out accuracies.
    """
    activations = jnp.asarray(activations, jnp.float32)
    positives, negatives = np.asarray(positives), np.asarray(negatives)
    if activations.ndim != 2:
        raise ValueError(f"activations must be (N, a), got shape {activations.shape}")
    if positives.ndim != 2 or positives.shape != negatives.shape or positives.shape[1] < 2:
        raise ValueError(f"positives and negatives must both be (K, n) with n >= 2, got "
                         f"{positives.shape} and {negatives.shape}")
    n_images = activations.shape[0]
    for name, sets in (("positives", positives), ("negatives", negatives)):
        if not np.issubdtype(sets.dtype, np.integer) or sets.min() < 0 or sets.max() >= n_images:
            raise ValueError(f"{name} must be integer indices in [0, {n_images})")
    if not ridge > 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    gram = jnp.matmul(activations, activations.T, precision=_HIGHEST)
    coefficients, loo_accuracy = _ridge_dual(gram, jnp.asarray(positives, jnp.int32),
                                             jnp.asarray(negatives, jnp.int32), jnp.float32(ridge))
    return _unit_rows(jnp.matmul(coefficients, activations, precision=_HIGHEST)), loo_accuracy


@jax.jit
def _ridge_dual(gram, positives, negatives, ridge):
    """(K, N) weights of the probe images in each CAV (before scaling), (K,) LOO accuracy."""
    k, n = positives.shape
    m = 2 * n
    members = jnp.concatenate([positives, negatives], axis=1)  # (K, 2n)
    y = jnp.concatenate([jnp.ones(n, jnp.float32), -jnp.ones(n, jnp.float32)])
    pair = gram[members[:, :, None], members[:, None, :]]  # (K, 2n, 2n)
    # Centring: Kc = H K H with H = I - 11^T / m.
    kc = (pair - jnp.mean(pair, axis=1, keepdims=True) - jnp.mean(pair, axis=2, keepdims=True)
          + jnp.mean(pair, axis=(1, 2), keepdims=True))
    lam = ridge * jnp.trace(kc, axis1=1, axis2=2) / m + jnp.finfo(jnp.float32).tiny  # (K,)
    eye = jnp.eye(m, dtype=jnp.float32)[None]
    inverse = jnp.linalg.inv(kc + lam[:, None, None] * eye)  # (K, 2n, 2n)
    alpha = jnp.einsum("kij,j->ki", inverse, y, precision=_HIGHEST)
    # Hat matrix with the intercept: H = 11^T / m + Kc (Kc + lam I)^-1, whose diagonal is
    # 1 / m + 1 - lam diag((Kc + lam I)^-1); leave-one-out fit y_i - (y_i - f_i) / (1 - H_ii).
    fitted = jnp.einsum("kij,kj->ki", kc, alpha, precision=_HIGHEST)  # + intercept mean(y) = 0
    leverage = jnp.float32(1 / m) + 1 - lam[:, None] * jnp.diagonal(inverse, axis1=1, axis2=2)
    targets = y[None, :]
    loo = targets - (targets - fitted) / jnp.maximum(1 - leverage, jnp.float32(1e-12))
    loo_accuracy = jnp.mean((loo > 0) == (targets > 0), axis=1)
    # v ~ sum_j alpha_j (h_j - mean h) = sum_j (alpha_j - mean alpha) h_j.
    coefficients = alpha - jnp.mean(alpha, axis=1, keepdims=True)
    weights = jnp.zeros((k, gram.shape[0]), jnp.float32)
    weights = weights.at[jnp.arange(k)[:, None], members].add(coefficients)
    return weights, loo_accuracy


@jax.jit
def _unit_rows(x):
    """Rows of x scaled to unit L2 norm; zero rows stay zero."""
    norms = jnp.linalg.norm(x, axis=1, keepdims=True)
    return jnp.where(norms > 0, x / jnp.where(norms > 0, norms, 1), 0)


# ----------------------------------------------------------------------------- derivatives
def _perturbed_logits(model, variables, images, deltas: dict[str, jax.Array]):
    """Logits (B, C) with ``deltas[module]`` added to the output of each top-level ``module``."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = context.module.path
        if context.method_name == "__call__" and len(path) == 1 and path[0] in deltas:
            out = out + deltas[path[0]]
        return out

    with nn.intercept_methods(interceptor):
        return model.apply(variables, images, train=False)


def directional_derivatives(model, variables, images, layer: str, cavs) -> jax.Array:
    """``S[b, k, c] = grad_{h_l} logit_c(x_b) . v_k``: every logit's derivative along every CAV.

    The JVP of the logits with respect to ``eps`` at 0 when ``eps * v_k`` is added to the output
    of ``layer`` of every image, computed once per batch with `jax.linearize` and applied to the
    K CAVs under `jax.vmap`. The model runs in inference mode (BatchNorm uses its running
    statistics), so images do not interact and S[b] is image b's own derivative.

    Args:
        model: a `models.ResNet` or `models.VGG` (any Linen module with ``layer_modules()``).
        variables: its ``{"params", "batch_stats"}``.
        images: (B, H, W, C) images in [0, 1].
        layer: a name from ``model.layer_modules()`` (e.g. ``"stage3"``).
        cavs: (K, a) directions, a = the layer's flattened (NHWC) size per image.

    Returns:
        (B, K, num_classes) directional derivatives, in the model's compute dtype.
    """
    module = _layer_module(model, layer)
    images = jnp.asarray(_check_images(images))
    shape = jax.eval_shape(
        lambda x: models.capture_activations(model, variables, x, (layer,))[layer],
        jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32)).shape[1:]
    cavs = jnp.asarray(cavs)
    if cavs.ndim != 2 or cavs.shape[1] != int(np.prod(shape)):
        raise ValueError(f"cavs must be (K, {int(np.prod(shape))}) for layer {layer!r} of "
                         f"shape {shape}, got {cavs.shape}")
    return _jvp_derivatives(model, module, variables, images, cavs.reshape(-1, 1, *shape))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jvp_derivatives(model, module, variables, images, cavs):
    # The perturbation is (1, h, w, c), broadcast over the batch: its tangent v_k moves every
    # image's activation along v_k at once, and the primal pass does not depend on the CAVs.
    zero = jnp.zeros(cavs.shape[1:], jnp.float32)
    _, jvp = jax.linearize(lambda delta: _perturbed_logits(model, variables, images,
                                                           {module: delta}), zero)
    return jnp.moveaxis(jax.vmap(jvp)(cavs.astype(zero.dtype)), 0, 1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _activations_and_gradients(model, layer_modules, use_labels, variables, images, labels):
    """Activations, own-class gradients and classes of a batch; one forward and one backward pass.

    A zero perturbation is added to the output of each layer's module; the gradient of
    sum_b logit_{y_b}(x_b) with respect to it is, per image b, ``grad_{h_l} logit_{y_b}(x_b)``
    (images do not interact in inference mode). ``y`` is ``labels``, or the predicted class
    when ``use_labels`` is False.

    Returns:
        ``(activations, gradients, classes)``: per layer (B, h, w, c) arrays (or (B, c) for
        pooled layers), and (B,) int32.
    """
    modules = tuple(dict.fromkeys(layer_modules))  # a module may output several named layers
    shapes = jax.eval_shape(
        lambda x: _capture_outputs(model, variables, x, modules), images)
    zeros = {m: jnp.zeros(shapes[m].shape, jnp.float32) for m in modules}

    def own_logits(deltas):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = context.module.path
            if context.method_name == "__call__" and len(path) == 1 and path[0] in deltas:
                captured[path[0]] = out
                out = out + deltas[path[0]]
            return out

        with nn.intercept_methods(interceptor):
            logits = model.apply(variables, images, train=False)
        classes = labels if use_labels else jnp.argmax(logits, axis=1).astype(jnp.int32)
        own = jnp.take_along_axis(logits, classes[:, None], axis=1)
        return jnp.sum(own), (captured, classes)

    gradients, (captured, classes) = jax.grad(own_logits, has_aux=True)(zeros)
    return ([captured[m] for m in layer_modules], [gradients[m] for m in layer_modules], classes)


def _capture_outputs(model, variables, images, modules):
    """{module: output} of the given top-level modules (for their shapes)."""
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = context.module.path
        if context.method_name == "__call__" and len(path) == 1 and path[0] in modules:
            captured[path[0]] = out
        return out

    with nn.intercept_methods(interceptor):
        model.apply(variables, images, train=False)
    return captured


@jax.jit
def _positive_derivatives(gradients, cavs):
    """(N, K) bool: S = gradient . CAV > 0, for (N, a) gradients and (K, a) CAVs."""
    return jnp.matmul(gradients, cavs.T, precision=_HIGHEST) > 0


def _batches(n: int, batch_size: int):
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` padded with zeros along its first axis to ``size`` rows (one compilation per size)."""
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


# ----------------------------------------------------------------------------- statistics
def correct_p_values(p_values, method: str = "bh") -> np.ndarray:
    """Multiple-testing correction of all finite p-values together; NaN stays NaN.

    ``"bh"``: Benjamini-Hochberg adjusted p-values (``p_(i) m / i`` made monotone, capped at 1):
    rejecting those below alpha controls the false discovery rate at alpha for independent or
    positively dependent tests. ``"bonferroni"``: ``min(1, p m)``, family-wise error rate under
    any dependence. m is the number of finite p-values.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {method!r}")
    p_values = np.asarray(p_values, np.float64)
    out = np.full(p_values.shape, np.nan)
    finite = np.isfinite(p_values)
    p = p_values[finite]
    m = p.size
    if m == 0:
        return out
    if method == "bonferroni":
        out[finite] = np.minimum(1.0, p * m)
        return out
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    corrected = np.empty(m)
    corrected[order] = adjusted
    out[finite] = corrected
    return out


def _t_test(scores: np.ndarray, null_scores: np.ndarray, equal_var: bool) -> np.ndarray:
    """Two-sided p-values over the repeat axis (-2) of (..., R, C) arrays; 1 where both samples
    are the same constant, NaN where a class has no images (NaN scores)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant samples
        p = stats.ttest_ind(scores, null_scores, axis=-2, equal_var=equal_var).pvalue
    p = np.asarray(p, np.float64)
    no_class = np.isnan(scores).all(axis=-2)
    p[np.isnan(p) & ~no_class] = 1.0
    p[no_class] = np.nan
    return p


# ----------------------------------------------------------------------------- TCAV
def tcav(model, variables, images, labels, concept_sets, layers, *, n_random: int = 10,
         alpha: float = 0.05, correction: str = "bh", equal_var: bool = False,
         ridge: float = 0.1, seed: int = 0, batch_size: int = 256) -> TCAVResult:
    """TCAV scores and their significance for given concept sets (module docstring, steps 2-6).

    Args:
        model: a `models.ResNet` or `models.VGG`; ``model.num_classes`` classes C.
        variables: its ``{"params", "batch_stats"}``.
        images: (N, H, W, C) probe images in [0, 1].
        labels: (N,) class of each image, indices of the model's outputs; None: the network's
            predicted classes.
        concept_sets: (d, n) int probe indices, one concept set per row, no repeats in a row,
            ``2 <= n <= N / 3``.
        layers: a layer name or a sequence of names from ``model.layer_modules()``.
        n_random: random sets per concept (repeats of the experiment), >= 2; Kim et al. and this
            project ask for at least 10.
        alpha: significance level of the corrected p-values, in (0, 1).
        correction: ``"bh"`` or ``"bonferroni"``, over all (layer, concept, class) tests.
        equal_var: Student's t-test if True, else Welch's.
        ridge: regularisation of the CAV classifier (`compute_cavs`).
        seed: seed of the random sets (a NumPy generator); same seed, same result.
        batch_size: images per forward/backward pass.

    Returns:
        `TCAVResult`.
    """
    images = _check_images(images)
    n = images.shape[0]
    num_classes = int(model.num_classes)
    layers = _check_layers(model, layers)
    concept_sets = np.asarray(concept_sets)
    if concept_sets.ndim != 2 or not np.issubdtype(concept_sets.dtype, np.integer):
        raise ValueError(f"concept_sets must be (d, n_concept) integers, got shape "
                         f"{concept_sets.shape} and dtype {concept_sets.dtype}")
    d, n_concept = concept_sets.shape
    if d < 1 or n_concept < 2:
        raise ValueError(f"concept_sets needs d >= 1 sets of >= 2 images, got {concept_sets.shape}")
    if 3 * n_concept > n:
        raise ValueError(f"concept sets of {n_concept} images exceed a third of the N={n} probe "
                         f"images (two disjoint random sets of their size must fit in the rest)")
    if concept_sets.min() < 0 or concept_sets.max() >= n:
        raise ValueError(f"concept_sets must be indices in [0, {n})")
    if any(len(np.unique(row)) < n_concept for row in concept_sets):
        raise ValueError("concept_sets must not repeat an image within a set")
    n_random = _check_positive_int("n_random", n_random, 2)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    batch_size = _check_positive_int("batch_size", batch_size)
    if labels is not None:
        labels = _check_labels(labels, n, num_classes)

    random_sets, null_sets = _random_sets(concept_sets, n, n_random, np.random.default_rng(seed))

    # One forward and backward pass: activations and own-class logit gradients, every layer.
    batch_size = min(batch_size, n)
    layer_modules = tuple(_layer_module(model, layer) for layer in layers)
    given = np.zeros(n, np.int32) if labels is None else labels
    activations, gradients, classes = [[] for _ in layers], [[] for _ in layers], []
    for start, stop in _batches(n, batch_size):
        acts, grads, cls = _activations_and_gradients(
            model, layer_modules, labels is not None, variables,
            jnp.asarray(_pad(images[start:stop], batch_size)),
            jnp.asarray(_pad(given[start:stop], batch_size)))
        for parts, x in zip(activations, acts):
            parts.append(np.asarray(x[: stop - start]).reshape(stop - start, -1))
        for parts, x in zip(gradients, grads):
            parts.append(np.asarray(x[: stop - start]).reshape(stop - start, -1))
        classes.append(np.asarray(cls[: stop - start]))
    labels = np.concatenate(classes)

    # CAVs, per layer: d * n_random concept CAVs, then d * n_random null CAVs; and the signs of
    # the directional derivatives along them.
    positives = np.concatenate([np.repeat(concept_sets, n_random, axis=0),
                                null_sets.reshape(d * n_random, n_concept)])
    negatives = np.tile(random_sets.reshape(d * n_random, n_concept), (2, 1))
    positive, accuracies = [], []
    for l in range(len(layers)):
        acts, activations[l] = np.concatenate(activations[l]), None
        v, accuracy = compute_cavs(acts, positives, negatives, ridge=ridge)
        grads, gradients[l] = np.concatenate(gradients[l]), None
        positive.append(np.asarray(_positive_derivatives(jnp.asarray(grads), v)))
        accuracies.append(np.asarray(accuracy).reshape(2, d, n_random).mean(axis=2))
    positive = np.stack(positive)  # (L, N, 2 d n_random)

    # Scores: share of each class's images with S > 0, per CAV.
    one_hot = np.eye(num_classes, dtype=np.float64)[labels]  # (N, C)
    counts = one_hot.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.einsum("lnk,nc->lkc", positive.astype(np.float64), one_hot) / counts
    shares = shares.reshape(len(layers), 2, d, n_random, num_classes)
    scores, null_scores = shares[:, 0], shares[:, 1]

    p_values = _t_test(scores, null_scores, equal_var)
    p_corrected = correct_p_values(p_values, correction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # classes without images: NaN
        mean, std = scores.mean(axis=2), scores.std(axis=2, ddof=1)
        null_mean, null_std = null_scores.mean(axis=2), null_scores.std(axis=2, ddof=1)
    accuracies = np.stack(accuracies)  # (L, 2, d)
    return TCAVResult(
        layers=layers, concept_sets=concept_sets.astype(np.int64), random_sets=random_sets,
        null_sets=null_sets, scores=scores, null_scores=null_scores, mean=mean, std=std,
        null_mean=null_mean, null_std=null_std, p_values=p_values, p_corrected=p_corrected,
        significant=np.nan_to_num(p_corrected, nan=1.0) < alpha,
        cav_accuracy=accuracies[:, 0], null_cav_accuracy=accuracies[:, 1],
        class_counts=counts.astype(np.int64), labels=labels.astype(np.int64), alpha=float(alpha),
        correction=correction, equal_var=bool(equal_var))


def tcav_scores(model, variables, images, labels, F, layers, *, n_concept: int = 50,
                **kwargs) -> TCAVResult:
    """TCAV of the latent factors of F: concept k = the ``n_concept`` top images by ``F[k, :]``.

    Args:
        model, variables, images, labels: as `tcav`; ``images`` are the N probe images in the
            column order of F.
        F: (d, N) example factor of the NMF (``jaxnmf.fit(...).F``).
        layers: a layer name or names from ``model.layer_modules()``.
        n_concept: images per concept (and random) set, ``2 <= n_concept <= N / 3``.
        **kwargs: ``n_random``, ``alpha``, ``correction``, ``equal_var``, ``ridge``, ``seed``,
            ``batch_size`` of `tcav`.

    Returns:
        `TCAVResult` with concept k = factor k.
    """
    n = np.shape(images)[0] if np.ndim(images) == 4 else None
    F = np.asarray(F)
    if F.ndim != 2:
        raise ValueError(f"F must be (d, N), got shape {F.shape}")
    if n is not None and F.shape[1] != n:
        raise ValueError(f"F has {F.shape[1]} columns but there are {n} probe images; "
                         f"F must be (d, N) with one column per image")
    return tcav(model, variables, images, labels, concept_sets_from_factors(F, n_concept),
                layers, **kwargs)


# ----------------------------------------------------------------------------- report
def _heatmap_figure(result: TCAVResult, class_names, concept_names) -> Figure:
    n_layers, d, c = result.mean.shape
    width = min(4 + 0.45 * c * n_layers + 1.5 * n_layers, 22)
    fig = Figure(figsize=(width, 1.5 + 0.32 * d), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n_layers, sharey=True, squeeze=False)[0])
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    image = None
    for ax, l, layer in zip(axes, range(n_layers), result.layers):
        shown = np.ma.masked_where(~result.significant[l], result.mean[l])
        image = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, aspect="auto",
                          interpolation="nearest")
        ax.set_title(layer)
        ax.set_xticks(range(c), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(d), concept_names, fontsize=8)
        if d * c <= 400:
            for k, j in zip(*np.nonzero(result.significant[l])):
                score = result.mean[l, k, j]
                ax.text(j, k, f"{score:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if abs(score - 0.5) > 0.3 else "black")
    fig.colorbar(image, ax=list(axes), label="TCAV score (grey: not significant)", shrink=0.8)
    return fig


def _json_float(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def tcav_section(result: TCAVResult, class_names: Sequence[str],
                 concept_names: Sequence[str] | None = None,
                 title: str = "TCAV (Figure 6)") -> Section:
    """The report section of a TCAV run: heatmap, how to read it, table of significant scores.

    Args:
        result: from `tcav` or `tcav_scores`.
        class_names: (C,) names of the model's outputs.
        concept_names: (d,) names of the concepts; default ``"factor k"``.
        title: the section's heading.

    Returns:
        `experiments.report.Section` with one figure (``"tcav_heatmap"``) and ``data``: the
        settings, per-class image counts, per-layer CAV accuracies and every (layer, concept,
        class) test with its score, null score and raw and corrected p-values (JSON types,
        NaN -> None).
    """
    n_layers, d, c = result.mean.shape
    class_names = [str(name) for name in class_names]
    if len(class_names) != c:
        raise ValueError(f"class_names must name the {c} classes, got {len(class_names)}")
    concept_names = ([f"factor {k}" for k in range(d)] if concept_names is None
                     else [str(name) for name in concept_names])
    if len(concept_names) != d:
        raise ValueError(f"concept_names must name the {d} concepts, got {len(concept_names)}")
    n_random, n_concept = result.scores.shape[2], result.concept_sets.shape[1]
    tests, rows = [], []
    for l, layer in enumerate(result.layers):
        for k in range(d):
            for j in range(c):
                entry = {
                    "layer": layer, "concept": concept_names[k], "class": class_names[j],
                    "score_mean": _json_float(result.mean[l, k, j]),
                    "score_std": _json_float(result.std[l, k, j]),
                    "null_mean": _json_float(result.null_mean[l, k, j]),
                    "null_std": _json_float(result.null_std[l, k, j]),
                    "p_value": _json_float(result.p_values[l, k, j]),
                    "p_corrected": _json_float(result.p_corrected[l, k, j]),
                    "significant": bool(result.significant[l, k, j]),
                }
                tests.append(entry)
                if entry["significant"]:
                    rows.append(entry)
    rows.sort(key=lambda e: (e["layer"], -abs(e["score_mean"] - 0.5)))
    correction = {"bh": "Benjamini&ndash;Hochberg (false discovery rate)",
                  "bonferroni": "Bonferroni (family-wise error rate)"}[result.correction]
    table = "".join(
        f"<tr><td>{html.escape(e['layer'])}</td><td>{html.escape(e['concept'])}</td>"
        f"<td>{html.escape(e['class'])}</td>"
        f'<td class="num">{e["score_mean"]:.2f} &plusmn; {e["score_std"]:.2f}</td>'
        f'<td class="num">{e["null_mean"]:.2f} &plusmn; {e["null_std"]:.2f}</td>'
        f'<td class="num">{e["p_value"]:.1e}</td><td class="num">{e["p_corrected"]:.1e}</td></tr>'
        for e in rows)
    accuracy = "".join(
        f"<tr><td>{html.escape(layer)}</td>"
        f'<td class="num">{np.mean(result.cav_accuracy[l]):.2f}</td>'
        f'<td class="num">{np.mean(result.null_cav_accuracy[l]):.2f}</td></tr>'
        for l, layer in enumerate(result.layers))
    text = f"""
<p class="how">Paper Figure 6, protocol of Kim et al. (2018). Each concept is a set of
{n_concept} probe images (for a latent factor: its top images by F[k, :]). At each layer a linear
classifier separates the concept's activations from those of a random set of probe images; its
unit normal, pointing towards the concept, is the concept activation vector (CAV). The TCAV score
of (concept, class) is the share of the class's probe images whose class logit rises when the
layer's activation moves along the CAV (a positive directional derivative, by autodiff). It is
computed against {n_random} random sets and compared, by a two-sided
{"Student" if result.equal_var else "Welch"} t-test, with {n_random} scores of CAVs that separate
one random set from another. P-values of all {n_layers * d * c} (layer, concept, class) tests are
corrected together by {correction}; cells with a corrected p-value of {result.alpha:g} or more
are grey. Red (score near 1): the concept raises the class's logit for nearly all of its images;
blue (near 0): it lowers it; a significant score near 0.5 differs from the null only in spread.
Scores at the pooled layer are 0 or 1 per CAV, since the logit's gradient there is the same for
every image.</p>
<table><thead><tr><th>layer</th><th>concept</th><th>class</th><th>TCAV score</th>
<th>null score</th><th>p</th><th>corrected p</th></tr></thead><tbody>{table}</tbody></table>
<p class="how">{len(rows)} of {len(tests)} tests significant. Leave-one-out accuracy of the CAV
classifiers (concept vs random, and random vs random as a reference near 0.5):</p>
<table><thead><tr><th>layer</th><th>concept CAVs</th><th>null CAVs</th></tr></thead>
<tbody>{accuracy}</tbody></table>"""
    data = {
        "layers": list(result.layers), "class_names": class_names,
        "concepts": concept_names, "n_concept": int(n_concept), "n_random": int(n_random),
        "alpha": result.alpha, "correction": result.correction,
        "t_test": "student" if result.equal_var else "welch",
        "class_counts": [int(x) for x in result.class_counts],
        "cav_accuracy": {layer: [_json_float(x) for x in result.cav_accuracy[l]]
                         for l, layer in enumerate(result.layers)},
        "null_cav_accuracy": {layer: [_json_float(x) for x in result.null_cav_accuracy[l]]
                              for l, layer in enumerate(result.layers)},
        "n_significant": len(rows),
        "tests": tests,
    }
    return Section(title, text, {"tcav_heatmap": _heatmap_figure(result, class_names,
                                                                 concept_names)}, data)


# ----------------------------------------------------------------------------- benchmark
def _benchmark(n_probe: int = 1000, width: int = 16, d: int = 20, n_random: int = 10,
               layers: Sequence[str] = ("stage3", "stage4", "pool"), seed: int = 0) -> None:
    """Time `tcav_scores` at the quickstart's scale (an untrained network costs the same)."""
    from experiments.data import make_shapes

    probe = make_shapes(n_probe, seed=seed, split="test")
    model = models.build_model("resnet18", num_classes=len(probe.class_names), width=width)
    variables = models.init_variables(model, jax.random.key(seed), (1, 32, 32, 3))
    F = np.random.default_rng(seed).uniform(size=(d, n_probe))
    print(f"N={n_probe}, width={width}, d={d}, n_random={n_random}, layers={tuple(layers)}, "
          f"{jax.devices()[0].platform}")
    for run in ("first call (with compilation)", "second call"):
        start, cpu = time.perf_counter(), time.process_time()
        result = tcav_scores(model, variables, probe.images, probe.labels, F, tuple(layers),
                             n_random=n_random, seed=seed)
        print(f"{run}: {time.perf_counter() - start:.1f} s wall, "
              f"{time.process_time() - cpu:.1f} s CPU (all threads); "
              f"{int(result.significant.sum())} of {result.significant.size} tests significant")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Time TCAV at the quickstart's scale on this machine.")
    parser.add_argument("--n-probe", type=int, default=1000)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--d", type=int, default=20)
    parser.add_argument("--n-random", type=int, default=10)
    parser.add_argument("--layers", nargs="+", default=["stage3", "stage4", "pool"])
    args = parser.parse_args()
    _benchmark(args.n_probe, args.width, args.d, args.n_random, args.layers)
