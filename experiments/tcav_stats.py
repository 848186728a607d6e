"""The statistics of TCAV: CAVs from Gram matrices, set-level scores, and a calibrated test.

Everything here works on two matrices per layer, so that thousands of CAVs cost a few matrix
products (`experiments.tcav` computes them from the network):

- ``gram`` (N_b, N_b): ``K = H H^T`` of the flattened activations H (N_b, a) of the *CAV images*,
  from which concept and random sets are drawn;
- ``cross`` (N_s, N_b): ``G = D H^T``, with D (N_s, a) the gradients of the target (class logit or
  class log-probability) at the layer, for the *score images* (held out from the CAV images).

**CAV.** For a positive set P and a negative set R (n images each), ridge regression of +-1
targets with an unpenalised intercept, in its dual form on the pair's centred Gram matrix
``Kc`` (2n, 2n): ``alpha = (Kc + lam I)^-1 y``, ``lam = ridge * trace(Kc) / 2n``. The CAV is
``v = sum_j c_j h_j`` with ``c = alpha - mean(alpha)`` (a vector of N_b coefficients, zero
outside P and R), so an image's directional derivative is ``S_x = d_x . v = (G c)_x``: no CAV is
ever formed in activation space. `ridge_coefficients` gives c for many pairs at once.

**Score of a set** for class k, over the score images x of class k (``S_x`` along the set's CAV):
``"cosine"`` (default): ``mean_x S_x / (||v|| rms_x ||d_x||)``, the mean derivative along the
unit CAV relative to the gradients' size, in [-1, 1]; ``"sign"`` (Kim et al.): the share with
``S_x > 0``; ``"magnitude"`` (Captum): ``sum max(S_x, 0) / sum |S_x|``. All three are invariant to
the CAV's length and the target's scale. The sign and magnitude scores saturate at 0 or 1 when
the gradient barely varies within a class (late layers of a confident network), and random sets
reach those values too; the cosine score does not saturate. A set's statistic
``T[l, k]`` is the mean of the score over ``n_negatives`` CAVs, each against its own random
negative set drawn uniformly from the CAV images outside the set.

**Test** (`monte_carlo_test`). The statistic of a concept set is compared with its distribution
over many random sets of the same size, each scored exactly as the concept is (its own random
negatives): the null hypothesis is that the concept set is exchangeable with such a set.
Studentised deviations ``z = (T - mean) / sd`` per (layer, class), with the mean and sd of the
pool of the concept and the M null sets, give the two-sided Monte-Carlo p-value
``(1 + #{j: |z_j| >= |z|}) / (M + 1)``, valid at any M (it is the rank of the observed statistic
among M + 1 exchangeable ones, all studentised alike; ties count against the concept). Family-wise
error over the classes and layers of one concept: single-step max-T (Westfall & Young), the same
p-value computed from ``max_{l,k} |z_j[l, k]|``, which is valid under any dependence between the
tests. Two nulls: *uniform* random sets, and *class-matched* random sets with the concept set's
class histogram (`matched_sets`), which asks whether the concept carries more than its classes.
The effect ``T - mean_null`` comes with the interval ``[T - q_97.5, T - q_2.5]`` of the null's
quantiles (the spread of a random set's score around the concept's). The test ranks |z| about the
pooled mean, so with a skewed null the interval and the test at 5% can disagree near the boundary.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "STATISTICS",
    "MonteCarloTest",
    "check_int",
    "concept_sets_from_factors",
    "matched_sets",
    "monte_carlo_test",
    "negative_sets",
    "ridge_coefficients",
    "set_scores",
    "undetermined_rows",
    "uniform_sets",
]

STATISTICS = ("cosine", "sign", "magnitude")
_HIGHEST = lax.Precision.HIGHEST  # no TF32/bf16 shortcuts on GPUs: signs of small S matter
_CHUNK = 512  # CAVs per batched solve: (512, 2n, 2n) float32 pair matrices at a time


# ----------------------------------------------------------------------------- sets
def concept_sets_from_factors(F, n_concept: int) -> np.ndarray:
    """The concept set of every latent factor: its ``n_concept`` top images by ``F[k, :]``.

    Args:
        F: (d, N) example factor of the images the sets are drawn from.
        n_concept: images per set, ``2 <= n_concept <= N / 2`` (a negative set of the same size
            must fit outside it).

    Returns:
        (d, n_concept) int64 indices, largest ``F[k, n]`` first; ties keep the lower index.

    Raises:
        ValueError: for a row whose ``n_concept``-th and ``(n_concept + 1)``-th largest values
            are equal (a zero or constant factor, or a sparse one with fewer than ``n_concept``
            positive entries): F does not determine the set, which would be images taken in order.
    """
    F = np.asarray(F, np.float64)
    if F.ndim != 2 or F.shape[0] < 1:
        raise ValueError(f"F must be (d, N) with d >= 1, got shape {F.shape}")
    if not np.all(np.isfinite(F)):
        raise ValueError("F must be finite")
    n_concept = check_int("n_concept", n_concept, 2)
    if 2 * n_concept > F.shape[1]:
        raise ValueError(f"n_concept={n_concept} exceeds half of the N={F.shape[1]} images "
                         "(a negative set of its size must fit outside it)")
    flat = undetermined_rows(F, n_concept)
    if flat.size:
        raise ValueError(f"F rows {flat.tolist()} have no top images: their {n_concept}-th and {n_concept + 1}-th "
                         "largest entries are equal (a zero, constant or too sparse factor), so a concept set "
                         "would be arbitrary")
    return np.argsort(-F, axis=1, kind="stable")[:, :n_concept].astype(np.int64)


def undetermined_rows(F, n_concept: int) -> np.ndarray:
    """Indices of the rows of F (d, N) whose ``n_concept``-th and ``(n_concept + 1)``-th largest
    values are equal (up to 1e-12 of the row's largest): rows whose top set F does not determine."""
    F = np.asarray(F, np.float64)
    top = -np.sort(-F, axis=1)[:, :n_concept + 1]
    return np.flatnonzero(top[:, -2] - top[:, -1] <= 1e-12 * np.maximum(np.abs(top[:, 0]), 1e-300))


def uniform_sets(rng: np.random.Generator, n_images: int, n_sets: int, size: int) -> np.ndarray:
    """(n_sets, size) int64: each row ``size`` distinct indices drawn uniformly from range(n_images)."""
    return np.argsort(rng.random((n_sets, n_images)), axis=1)[:, :size].astype(np.int64)


def matched_sets(rng: np.random.Generator, labels: np.ndarray, concept_set: np.ndarray,
                 n_sets: int) -> np.ndarray:
    """(n_sets, n) random sets with the class histogram of ``concept_set``: for every class with
    m images in the concept set, m images drawn uniformly from all images of that class."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels[concept_set], return_counts=True)
    parts = []
    for c, m in zip(classes, counts):
        pool = np.flatnonzero(labels == c)
        parts.append(pool[uniform_sets(rng, len(pool), n_sets, m)])
    return np.concatenate(parts, axis=1).astype(np.int64)


def negative_sets(rng: np.random.Generator, n_images: int, positives: np.ndarray,
                  n_negatives: int) -> np.ndarray:
    """(K, n_negatives, n) negative sets: for each positive set (row of the (K, n) ``positives``),
    ``n_negatives`` sets of n images drawn uniformly from the images outside it."""
    k, n = positives.shape
    keys = rng.random((k, n_negatives, n_images))
    keys[np.arange(k)[:, None, None], np.arange(n_negatives)[None, :, None], positives[:, None, :]] = 2.0
    return np.argsort(keys, axis=2)[:, :, :n].astype(np.int64)


# ----------------------------------------------------------------------------- CAVs and scores
def ridge_coefficients(gram, positives, negatives, ridge: float = 0.1) -> jax.Array:
    """(K, N_b) CAV coefficients c of K (positive, negative) pairs (module docstring).

    Args:
        gram: (N_b, N_b) Gram matrix of the CAV images' activations.
        positives, negatives: (K, n) int indices into the CAV images, n >= 2.
        ridge: ``lam`` relative to the mean eigenvalue of the pair's centred Gram matrix, > 0.

    ``v = sum_j c_j h_j`` separates the pair: ``v . (mean h_P - mean h_R) = y^T Kc alpha / n > 0``.
    """
    gram = jnp.asarray(gram, jnp.float32)
    positives, negatives = np.asarray(positives), np.asarray(negatives)
    out = [_ridge_chunk(gram, jnp.asarray(positives[i:i + _CHUNK], jnp.int32),
                        jnp.asarray(negatives[i:i + _CHUNK], jnp.int32), jnp.float32(ridge))
           for i in range(0, len(positives), _CHUNK)]
    return jnp.concatenate(out)


@jax.jit
def _ridge_chunk(gram, positives, negatives, ridge):
    k, n = positives.shape
    m = 2 * n
    members = jnp.concatenate([positives, negatives], axis=1)  # (K, 2n)
    y = jnp.concatenate([jnp.ones(n, jnp.float32), -jnp.ones(n, jnp.float32)])
    pair = gram[members[:, :, None], members[:, None, :]]  # (K, 2n, 2n)
    kc = (pair - jnp.mean(pair, axis=1, keepdims=True) - jnp.mean(pair, axis=2, keepdims=True)
          + jnp.mean(pair, axis=(1, 2), keepdims=True))  # H K H, H = I - 11^T / 2n
    lam = ridge * jnp.trace(kc, axis1=1, axis2=2) / m + jnp.finfo(jnp.float32).tiny
    system = kc + lam[:, None, None] * jnp.eye(m, dtype=jnp.float32)[None]
    alpha = jnp.linalg.solve(system, jnp.broadcast_to(y, (k, m))[..., None])[..., 0]
    coefficients = alpha - jnp.mean(alpha, axis=1, keepdims=True)
    return jnp.zeros((k, gram.shape[0]), jnp.float32).at[jnp.arange(k)[:, None], members].add(coefficients)


def set_scores(cross, coefficients, labels, num_classes: int, statistic: str, gram=None,
               gradient_sq_norms=None) -> np.ndarray:
    """(K, C) score of every CAV for every class (NaN for a class without score images).

    Args:
        cross: (N_s, N_b) ``G = D H^T`` of the layer (module docstring).
        coefficients: (K, N_b) CAV coefficients (`ridge_coefficients`).
        labels: (N_s,) class of each score image, whose target gradient D holds.
        num_classes: C. statistic: one of ``STATISTICS`` (module docstring).
        gram, gradient_sq_norms: (N_b, N_b) K and (N_s,) ``||d_x||^2``, needed by ``"cosine"``.
    """
    S = np.asarray(jnp.matmul(jnp.asarray(cross, jnp.float32), jnp.asarray(coefficients).T,
                              precision=_HIGHEST), np.float64)  # (N_s, K)
    one_hot = np.eye(num_classes)[np.asarray(labels)]  # (N_s, C)
    counts = one_hot.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if statistic == "sign":
            return ((S > 0).T.astype(np.float64) @ one_hot) / counts
        if statistic == "magnitude":
            return (np.maximum(S, 0).T @ one_hot) / (np.abs(S).T @ one_hot)
        if statistic == "cosine":
            c = jnp.asarray(coefficients)
            cav_norms = np.sqrt(np.maximum(np.asarray(jnp.sum(jnp.matmul(c, jnp.asarray(gram), precision=_HIGHEST) * c,
                                                              axis=1), np.float64), 0))  # ||v_k||
            rms = np.sqrt((np.asarray(gradient_sq_norms, np.float64) @ one_hot) / counts)  # (C,)
            mean = (S.T @ one_hot) / counts  # (K, C): mean d_x . v over the class
            return np.where(cav_norms[:, None] > 0, mean / np.where(cav_norms > 0, cav_norms, 1)[:, None], 0) / rms
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


# ----------------------------------------------------------------------------- test
class MonteCarloTest(NamedTuple):
    """The test of S observed sets against M null sets, over (L layers, C classes).

    Attributes:
        p_values: (S, L, C) two-sided Monte-Carlo p-values, one per test; NaN where untestable.
        p_family: (S, L, C) max-T adjusted p-values: family-wise error over each set's tests.
        null_mean, null_sd: (..., L, C) mean and standard deviation (ddof=1) of the null.
        effect: (S, L, C) observed statistic minus null mean.
        interval: (S, L, C, 2) ``[T - q_97.5, T - q_2.5]`` of the null's quantiles.
        n_null: M.
    """

    p_values: np.ndarray
    p_family: np.ndarray
    null_mean: np.ndarray
    null_sd: np.ndarray
    effect: np.ndarray
    interval: np.ndarray
    n_null: int


def monte_carlo_test(observed, null) -> MonteCarloTest:
    """Monte-Carlo p-values of each observed set against the null sets (module docstring).

    Args:
        observed: (S, L, C) statistics of the sets under test.
        null: (M, L, C) statistics of M random sets drawn and scored like them; NaN entries
            (a class without score images, a skipped layer) are left out of every test.
    """
    observed, null = np.asarray(observed, np.float64), np.asarray(null, np.float64)
    m = null.shape[0]
    if m < 19:
        raise ValueError(f"a Monte-Carlo test needs at least 19 null sets (p >= 1 / (M + 1)), got {m}")
    testable = np.all(np.isfinite(null), axis=0)  # (L, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: untestable, NaN statistics
        mean, sd = np.nanmean(null, axis=0), np.nanstd(null, axis=0, ddof=1)
        q_low, q_high = np.nanquantile(null, [0.025, 0.975], axis=0)
    untestable = ~testable[None] | ~np.isfinite(observed)
    p, p_family = np.empty(observed.shape), np.empty(observed.shape)
    for start in range(0, len(observed), 64):  # (64, M, L, C) at a time
        rows = slice(start, start + 64)
        p[rows], p_family[rows] = _ranks(np.where(testable, observed[rows] - mean, 0.0),
                                         np.where(testable, null - mean, 0.0))
    p[untestable] = np.nan
    p_family[untestable] = np.nan
    interval = np.stack([observed - q_high, observed - q_low], axis=-1)
    return MonteCarloTest(p_values=p, p_family=p_family, null_mean=mean, null_sd=sd,
                          effect=observed - mean, interval=interval, n_null=m)


def _ranks(observed, null):
    """Per-test and max-T p-values of (S, L, C) observed against (M, L, C) null statistics.

    Each observed set is studentised together with the null sets, by the mean and sd of the pool
    of M + 1 (so all M + 1 are treated alike: exactly exchangeable under the null); ties count
    against the observed set."""
    m = null.shape[0]
    mu = (null.sum(axis=0) + observed) / (m + 1)  # (S, L, C)
    var = (np.sum(null ** 2, axis=0) + observed ** 2 - (m + 1) * mu ** 2) / m
    scale = np.sqrt(np.maximum(var, 0))
    scale = np.where(scale > 1e-12 * np.maximum(np.abs(mu), 1e-300), scale, np.inf)  # a constant pool: z = 0
    z_null = np.abs(null[None] - mu[:, None]) / scale[:, None]  # (S, M, L, C)
    z_obs = np.abs(observed - mu) / scale
    threshold = (z_obs - 1e-9 * np.maximum(z_obs, 1.0))[:, None]
    p = (1 + np.sum(z_null >= threshold, axis=1)) / (m + 1)
    max_null = z_null.reshape(*z_null.shape[:2], -1).max(axis=2)  # (S, M)
    p_family = (1 + np.sum(max_null[:, :, None, None] >= threshold, axis=1)) / (m + 1)
    return p, p_family


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer >= ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
