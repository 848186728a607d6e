"""Model-agnostic analyses of a coupled NMF (Saini & Papalexakis, SDM 2021, Section 4).

Notation (paper, Eq. 3.1): the probe set of N images is described by blocks X_b ~ W_b F with
all factors non-negative. ``F`` is (d, N): column n says how strongly each of the d latent
concepts is present in image n. A block factor ``W_b`` is (rows_b, d): column k says which
pixels (pixel blocks ``P_i``) or neurons (activation blocks ``O_j``) carry concept k.

Every function takes NumPy or JAX arrays, computes in float64 NumPy, and returns NumPy arrays
or plain Python containers. Bad inputs raise ``ValueError`` naming the argument.

Example:
    >>> import numpy as np
    >>> F = np.array([[1.0, 3.0, 0.0], [0.0, 1.0, 1.0]])
    >>> class_weights(F, labels=np.array([0, 1, 1]), n_classes=2)
    array([[0.25, 0.75],
           [0.  , 1.  ]])
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.special
import scipy.stats

__all__ = [
    "attribute_auc",
    "class_weights",
    "factor_table",
    "latent_images",
    "masked_top_images",
    "mean_top_eigenvalues",
    "median_masks",
    "nearest_neighbours",
    "neighbour_factor_distribution",
    "neuron_similarity",
    "similarity_eigenvalues",
]


# ----------------------------------------------------------------------------- validation
def _matrix(x, name: str, *, non_negative: bool = False) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite (it contains NaN or inf)")
    if non_negative and np.any(a < 0):
        raise ValueError(f"{name} must be non-negative (min {a.min():.3g})")
    return a


def _factor(F) -> np.ndarray:
    F = _matrix(F, "F", non_negative=True)
    if F.shape[0] == 0 or F.shape[1] == 0:
        raise ValueError(f"F must have at least one factor and one image, got shape {F.shape}")
    return F


def _codes(x, name: str, n: int, n_values: int | None = None) -> np.ndarray:
    """Integer codes of length n, in [0, n_values) when n_values is given."""
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match F's {n} columns, got {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if n_values is not None and a.size and (a.min() < 0 or a.max() >= n_values):
        raise ValueError(f"{name} must lie in [0, {n_values}), "
                         f"got values in [{a.min()}, {a.max()}]")
    return a.astype(np.int64)


# ----------------------------------------------------------------------------- factor table
def class_weights(F, labels, n_classes: int) -> np.ndarray:
    """Share of each factor's total activation that falls on each class (paper, Table 1).

    ``w_k(c) = sum_{n : labels[n] = c} F[k, n] / sum_n F[k, n]``, so each row sums to 1.
    A factor whose row of F is all zero gets a row of zeros (no NaN).

    Args:
        F: (d, N) non-negative.
        labels: (N,) integer class of each image, in [0, n_classes).
        n_classes: C, the number of classes.

    Returns:
        (d, C) class weights.
    """
    F = _factor(F)
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    labels = _codes(labels, "labels", F.shape[1], int(n_classes))
    onehot = np.zeros((F.shape[1], int(n_classes)))
    onehot[np.arange(F.shape[1]), labels] = 1.0
    per_class = F @ onehot
    totals = F.sum(axis=1, keepdims=True)
    return np.divide(per_class, totals, out=np.zeros_like(per_class), where=totals > 0)


def factor_table(
    F,
    labels,
    class_names: Sequence[str],
    superlabels=None,
    superclass_names: Sequence[str] | None = None,
    *,
    n_top_classes: int = 5,
    n_top_images: int | None = None,
) -> list[dict]:
    """Paper Table 1: for each latent factor its classes, superclass, entropy and top images.

    For factor k, with the class weights w_k(c) of :func:`class_weights`:

    - ``top_classes``: the ``n_top_classes`` classes of largest w_k(c), each as
      ``{"index": c, "name": class_names[c], "weight": w_k(c)}``, largest first.
    - ``top_superclass``: ``{"index", "name", "weight"}`` of the superclass s maximising
      ``sum_{c in s} w_k(c) = sum_{n : superlabels[n] = s} F[k, n] / sum_n F[k, n]``
      (computed per image, so it equals the per-class sum whenever each class lies in one
      superclass, as in CIFAR-100); ``None`` when no superlabels are given.
    - ``entropy``: ``H_k = -sum_c w_k(c) log w_k(c)`` in nats (0 log 0 = 0); it lies in
      [0, log C], log C for a factor spread evenly over all C classes.
    - ``mass``: ``sum_n F[k, n]``; a factor of mass 0 is unused (its weights and entropy are 0).
    - ``top_images``: column indices of F (positions in the probe set) of the largest
      F[k, :], largest first; ``n_top_images`` defaults to ``max(1, min(200, N // 10))`` as the
      authors kept.

    Args:
        F: (d, N) non-negative.
        labels: (N,) integer class of each image.
        class_names: the C class names.
        superlabels: optional (N,) integer superclass of each image.
        superclass_names: the superclass names; required with ``superlabels``.
        n_top_classes: classes listed per factor (clipped to C).
        n_top_images: images listed per factor (clipped to N).

    Returns:
        A list of d dicts, one per factor, with keys ``factor, mass, top_classes,
        top_superclass, entropy, top_images``.
    """
    F = _factor(F)
    d, n = F.shape
    class_names = list(class_names)
    weights = class_weights(F, labels, len(class_names))
    if superlabels is None:
        super_weights = None
    else:
        if superclass_names is None:
            raise ValueError("superclass_names is required when superlabels are given")
        superclass_names = list(superclass_names)
        super_weights = class_weights(F, superlabels, len(superclass_names))
    if n_top_classes < 1:
        raise ValueError(f"n_top_classes must be >= 1, got {n_top_classes}")
    if n_top_images is None:
        n_top_images = max(1, min(200, n // 10))
    if n_top_images < 1:
        raise ValueError(f"n_top_images must be >= 1, got {n_top_images}")
    n_top_classes = min(n_top_classes, len(class_names))
    n_top_images = min(n_top_images, n)

    table = []
    for k in range(d):
        order = np.argsort(-weights[k], kind="stable")[:n_top_classes]
        top_superclass = None
        if super_weights is not None:
            s = int(np.argmax(super_weights[k]))
            top_superclass = {"index": s, "name": superclass_names[s],
                              "weight": float(super_weights[k, s])}
        table.append({
            "factor": k,
            "mass": float(F[k].sum()),
            "top_classes": [{"index": int(c), "name": class_names[c],
                             "weight": float(weights[k, c])} for c in order],
            "top_superclass": top_superclass,
            "entropy": float(scipy.special.entr(weights[k]).sum()),
            "top_images": np.argsort(-F[k], kind="stable")[:n_top_images].tolist(),
        })
    return table


# ----------------------------------------------------------------------------- neurons
def neuron_similarity(W) -> np.ndarray:
    """Cosine similarity between the d columns of a block factor (paper, Fig. 2).

    ``S[i, j] = <W[:, i], W[:, j]> / (||W[:, i]|| ||W[:, j]||)``. A zero column has no
    direction: its similarity to every other column is defined as 0, and the diagonal is 1
    for every column (zero or not), so ``trace(S) = d`` and the eigenvalues of S average to 1.

    Args:
        W: (rows, d) block factor, e.g. the neuron factor O_j of one layer.

    Returns:
        (d, d) symmetric similarity matrix, entries in [-1, 1] (in [0, 1] for non-negative W).
    """
    W = _matrix(W, "W")
    norms = np.linalg.norm(W, axis=0)
    unit = np.divide(W, norms, out=np.zeros_like(W), where=norms > 0)
    S = np.clip(unit.T @ unit, -1.0, 1.0)
    np.fill_diagonal(S, 1.0)
    return S


def similarity_eigenvalues(S) -> np.ndarray:
    """Eigenvalues of a symmetric similarity matrix, sorted descending (paper, Fig. 3).

    The authors averaged the "first K" eigenvalues in LAPACK's unsorted order; this project
    sorts them (symmetric solver ``numpy.linalg.eigvalsh``), so the first K are the largest.

    Args:
        S: (d, d) symmetric matrix, e.g. from :func:`neuron_similarity`.

    Returns:
        (d,) eigenvalues, largest first.
    """
    S = _matrix(S, "S")
    if S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be square, got shape {S.shape}")
    if not np.allclose(S, S.T):
        raise ValueError("S must be symmetric")
    return np.linalg.eigvalsh(S)[::-1].copy()


def mean_top_eigenvalues(S, k: int) -> float:
    """Mean of the k largest eigenvalues of S: ``(1/k) sum_{i<k} lambda_i`` (paper, Fig. 3a).

    For a cosine-similarity matrix trace(S) = d, so the mean of all d eigenvalues is 1. The
    mean of the top k is 1 for every k when S is the identity (the concepts use orthogonal
    sets of neurons) and grows towards d / k as the columns become parallel (shared neurons).
    The authors used k = 3 for ResNet-18 and k = 10 for VGG-11.

    Args:
        S: (d, d) symmetric matrix.
        k: how many of the largest eigenvalues to average, 1 <= k <= d.
    """
    eigenvalues = similarity_eigenvalues(S)
    if not 1 <= k <= eigenvalues.shape[0]:
        raise ValueError(f"k must be in [1, {eigenvalues.shape[0]}] for a "
                         f"{eigenvalues.shape[0]}x{eigenvalues.shape[0]} S, got {k}")
    return float(eigenvalues[:k].mean())


# ----------------------------------------------------------------------------- pixels
def latent_images(pixel_factors: Sequence, image_shape: tuple[int, int]) -> np.ndarray:
    """Each factor's latent image from the columns of the pixel factors (paper, Fig. 4a, 5a).

    Channel c of latent image k is column k of the pixel factor ``P_c`` reshaped row-major to
    (H, W) (row ``h * W + w``), divided by its own maximum as the authors did:
    ``L[k, :, :, c] = P_c[:, k] / max(P_c[:, k])``, a channel that is all zero stays zero.
    Scaling each channel separately shows where each channel is active, not how strongly one
    channel is active relative to another, so hues are only qualitative.

    Args:
        pixel_factors: C pixel factors in channel order (R, G, B, or one grey), each (H*W, d).
        image_shape: (H, W).

    Returns:
        (d, H, W, C) latent images with values in [0, 1].
    """
    if len(pixel_factors) == 0:
        raise ValueError("pixel_factors must hold at least one channel's factor")
    height, width = (int(s) for s in image_shape)
    channels = [_matrix(P, f"pixel_factors[{c}]", non_negative=True)
                for c, P in enumerate(pixel_factors)]
    for c, P in enumerate(channels):
        if P.shape != (height * width, channels[0].shape[1]):
            raise ValueError(f"pixel_factors[{c}] must have shape ({height * width}, d) for "
                             f"image_shape {(height, width)}, d = {channels[0].shape[1]}; "
                             f"got {P.shape}")
    stacked = np.stack(channels, axis=-1)  # (H*W, d, C)
    peak = stacked.max(axis=0, keepdims=True)
    scaled = np.divide(stacked, peak, out=np.zeros_like(stacked), where=peak > 0)
    return scaled.transpose(1, 0, 2).reshape(-1, height, width, len(channels))


def median_masks(latent) -> np.ndarray:
    """Mask of the pixels where a latent image is above its median (paper, Fig. 4c, 5c).

    ``M[k, h, w] = m_k[h, w] > median(m_k)`` with ``m_k = mean_c latent[k, :, :, c]``. The
    authors thresholded each channel separately; this project thresholds the channel mean so
    that a mask keeps or drops whole pixels (about half of them, fewer where values tie at the
    median) and the masked image keeps its colours.

    Args:
        latent: (d, H, W, C) latent images, e.g. from :func:`latent_images`.

    Returns:
        (d, H, W) boolean masks.
    """
    latent = np.asarray(latent, dtype=np.float64)
    if latent.ndim != 4:
        raise ValueError(f"latent must have shape (d, H, W, C), got {latent.shape}")
    mean = latent.mean(axis=-1)
    return mean > np.median(mean, axis=(1, 2), keepdims=True)


def masked_top_images(images, masks, indices) -> np.ndarray:
    """Each factor's mask laid over an image of that factor (paper, Fig. 4c, 5c).

    ``out[k] = images[indices[k]] * masks[k][..., None]``: pixels outside the mask are 0.

    Args:
        images: (N, H, W, C) probe images, in the order of F's columns.
        masks: (d, H, W) boolean, from :func:`median_masks`.
        indices: (d,) the image for each factor, usually its top image ``argmax F[k, :]``.

    Returns:
        (d, H, W, C) masked images.
    """
    images = np.asarray(images)
    masks = np.asarray(masks, dtype=bool)
    indices = np.asarray(indices)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got {images.shape}")
    if masks.ndim != 3 or masks.shape[1:] != images.shape[1:3]:
        raise ValueError(f"masks must have shape (d, {images.shape[1]}, {images.shape[2]}) "
                         f"to match images, got {masks.shape}")
    indices = _codes(indices, "indices", masks.shape[0], images.shape[0])
    return images[indices] * masks[..., None]


# ----------------------------------------------------------------------------- neighbours
def nearest_neighbours(F, index: int, k: int = 30) -> np.ndarray:
    """The k images nearest to image ``index`` in latent space (paper, Fig. 4d, 5d).

    Distance between images n and m: ``||F[:, n] - F[:, m]||_2``; image ``index`` itself is
    excluded, ties are broken by the lower index.

    Args:
        F: (d, N) non-negative.
        index: column of F (position in the probe set) of the query image.
        k: neighbours to return, 1 <= k < N (the paper: about 30).

    Returns:
        (k,) column indices of F, nearest first.
    """
    F = _factor(F)
    n = F.shape[1]
    if not 0 <= index < n:
        raise ValueError(f"index must be in [0, {n}) for F with {n} columns, got {index}")
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for F with {n} columns, got {k}")
    distances = np.linalg.norm(F - F[:, [index]], axis=0)
    distances[index] = np.inf
    return np.argsort(distances, kind="stable")[:k]


def neighbour_factor_distribution(F, neighbours) -> np.ndarray:
    """Share of the neighbours whose dominant factor is each factor (paper, Fig. 4d, 5d).

    ``p[k] = #{m in neighbours : argmax_j F[j, m] = k} / #neighbours``, so p sums to 1.

    Args:
        F: (d, N) non-negative.
        neighbours: (k,) column indices of F, e.g. from :func:`nearest_neighbours`.

    Returns:
        (d,) distribution.
    """
    F = _factor(F)
    neighbours = np.asarray(neighbours)
    if neighbours.ndim != 1 or neighbours.shape[0] == 0:
        raise ValueError(f"neighbours must be a non-empty 1-D array, got shape {neighbours.shape}")
    neighbours = _codes(neighbours, "neighbours", neighbours.shape[0], F.shape[1])
    dominant = np.argmax(F[:, neighbours], axis=0)
    return np.bincount(dominant, minlength=F.shape[0]) / neighbours.shape[0]


# ----------------------------------------------------------------------------- ground truth
def _roc_auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of scores (d, N) against a boolean (N,) target, by ranks.

    AUC = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-), with R_+ the sum of the positives' ranks
    (ties get their average rank, which counts a tied positive/negative pair as 1/2).
    """
    n_pos = positive.sum()
    n_neg = positive.shape[0] - n_pos
    ranks = scipy.stats.rankdata(scores, axis=1)
    return (ranks[:, positive].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def attribute_auc(F, attributes: Mapping[str, object]) -> dict[str, dict]:
    """How well single factors recover known attributes (method.md, "Measured here").

    For attribute a and each value v it takes, the target is ``y_n = [a_n = v]`` and each
    factor scores the images by F[k, :]; the value is credited to its best factor
    ``k* = argmax_k AUC(F[k, :], y)`` where AUC is the ROC AUC (the probability that a random
    image with the value scores higher than one without, ties counting 1/2). A value held by
    every image (an attribute with a single value) has no AUC and is left out.

    Args:
        F: (d, N) non-negative.
        attributes: attribute name -> (N,) integer value of each image.

    Returns:
        attribute name -> ``{"values": {v: (k*, auc)}, "mean": mean auc over the values}``;
        an attribute with a single value gets ``{"values": {}, "mean": None}``.
    """
    F = _factor(F)
    out = {}
    for name, values in attributes.items():
        codes = _codes(values, f"attributes[{name!r}]", F.shape[1])
        per_value = {}
        for v in np.unique(codes):
            positive = codes == v
            if positive.all():
                continue
            auc = _roc_auc(F, positive)
            best = int(np.argmax(auc))
            per_value[int(v)] = (best, float(auc[best]))
        mean = float(np.mean([a for _, a in per_value.values()])) if per_value else None
        out[name] = {"values": per_value, "mean": mean}
    return out
