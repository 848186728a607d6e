"""The concept-discovery baselines ``experiments.evaluate`` measures the coupled NMF against.

Every baseline takes examples as columns, like the blocks of ``jaxnmf.fit`` (``X`` (M, N): M
features, N examples), and returns a ``Scores``: a (d, N) per-example score of each discovered
concept (what ``jaxnmf.attribute_auc`` ranks images by) and its relative reconstruction error
``||X - X_hat||_F / ||X||_F`` on what it reconstructs.

- ``sklearn_nmf``: single-layer NMF (scikit-learn, coordinate descent), as DFF and CRAFT factorise
  one layer: scikit-learn's samples are our examples, so its ``W`` (N, d) is our F^T.
- ``kmeans``: d clusters; an example's score for cluster c is minus its distance to the centroid
  (continuous, larger = closer); the reconstruction of an example is its centroid.
- ``pca``: d principal components; scores are the projections. A component's sign is arbitrary,
  so the scores hold each component and its negation (2d rows, ``factor_of`` maps them back): the
  best-factor AUC is then max(AUC, 1 - AUC), the credit PCA alone gets.
- ``topk_sae`` (``train_topk_sae``): a TopK sparse autoencoder (Makhzani & Frey 2013; Gao et al.
  2024), z = TopK_k(ReLU(W_enc^T (x - b_dec) + b_enc)), x_hat = W_dec^T z + b_dec, unit-norm
  decoder rows, trained by full-batch Adam on the squared error; scores are the codes z.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np

__all__ = ["Scores", "kmeans", "nonnegative_scores", "pca", "sae_encode", "sklearn_nmf", "topk_codes", "topk_sae",
           "train_topk_sae"]


@dataclasses.dataclass(frozen=True)
class Scores:
    """A baseline's per-example concept scores.

    Attributes:
      scores: (d', N) float64, non-negative (shifted per row where the method's scores are signed:
        a per-row shift changes no ranking, hence no AUC).
      relative_error: ||X - X_hat||_F / ||X||_F of the method's reconstruction X_hat.
      factor_of: (d',) int, the concept each score row belongs to (``arange(d)`` but for PCA).
      info: what was used (initialisation, iterations, ...), JSON-able.
    """

    scores: np.ndarray
    relative_error: float
    factor_of: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)


def nonnegative_scores(S) -> np.ndarray:
    """``S`` (d, N) shifted per row to a minimum of 0 (rankings, hence AUCs, unchanged)."""
    S = np.asarray(S, dtype=np.float64)
    return S - S.min(axis=1, keepdims=True)


def sign_free(P) -> tuple[np.ndarray, np.ndarray]:
    """Scores of components of arbitrary sign: ``P`` (d, N) -> ((2d, N) rows P and -P, shifted to
    be non-negative, (2d,) the component of each row). AUC(-s) = 1 - AUC(s) (ties count 1/2), so
    the best row of a component scores max(AUC, 1 - AUC)."""
    P = np.asarray(P, dtype=np.float64)
    return nonnegative_scores(np.concatenate([P, -P])), np.tile(np.arange(P.shape[0]), 2)


def _relative_error(X: np.ndarray, X_hat: np.ndarray) -> float:
    norm = float(np.linalg.norm(X))
    return float(np.linalg.norm(X - X_hat) / norm) if norm > 0 else 0.0


def sklearn_nmf(X, rank: int, *, max_iter: int = 300, seed: int = 0) -> Scores:
    """Single-block NMF with scikit-learn: X (M, N) ~ W F, F (d, N) the scores. NNDSVDa start,
    random where d > min(M, N) (NNDSVD needs d <= min(M, N))."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    X = np.asarray(X, dtype=np.float64)
    init = "nndsvda" if rank <= min(X.shape) else "random"
    model = NMF(n_components=rank, init=init, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        codes = model.fit_transform(X.T)  # (N, d): scikit-learn's W is our F^T
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    reconstruction = codes @ model.components_
    return Scores(scores=codes.T.copy(), relative_error=_relative_error(X.T, reconstruction),
                  factor_of=np.arange(rank),
                  info=dict(init=init, n_iter=int(model.n_iter_), converged=converged, solver="cd"))


def kmeans(X, rank: int, *, seed: int = 0, n_init: int = 10) -> Scores:
    """k-means with ``rank`` clusters of the columns of X (M, N); scores: minus the distance to
    each centroid (shifted to be non-negative)."""
    from sklearn.cluster import KMeans

    X = np.asarray(X, dtype=np.float64)
    model = KMeans(n_clusters=rank, n_init=n_init, random_state=seed).fit(X.T)
    distances = model.transform(X.T)  # (N, d)
    reconstruction = model.cluster_centers_[model.labels_]
    return Scores(scores=nonnegative_scores(-distances.T), relative_error=_relative_error(X.T, reconstruction),
                  factor_of=np.arange(rank),
                  info=dict(n_init=n_init, cluster_sizes=np.bincount(model.labels_, minlength=rank).tolist()))


def pca(X, rank: int, *, seed: int = 0) -> Scores:
    """PCA of the columns of X (M, N) (centred) with min(rank, M, N) components; scores: the
    projections and their negations (``sign_free``)."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    model = PCA(n_components=min(rank, *X.shape), random_state=seed)
    projections = model.fit_transform(X.T)  # (N, d)
    reconstruction = model.inverse_transform(projections)
    scores, factor_of = sign_free(projections.T)
    return Scores(scores=scores, relative_error=_relative_error(X.T, reconstruction), factor_of=factor_of,
                  info=dict(explained_variance_ratio=model.explained_variance_ratio_.tolist()))


# ----------------------------------------------------------------------------- TopK sparse autoencoder
def topk_codes(pre, k: int):
    """TopK activation: ReLU of the k largest of each row of ``pre`` (B, L), zero elsewhere, so each
    row has at most k non-zeros (exactly k when it has k positive entries)."""
    import jax
    import jax.numpy as jnp

    _, index = jax.lax.top_k(pre, k)
    keep = jax.nn.one_hot(index, pre.shape[-1], dtype=pre.dtype).sum(axis=-2)  # (B, L) 0/1
    return jax.nn.relu(pre) * jax.lax.stop_gradient(keep)


def sae_encode(params: dict, x, k: int):
    """Codes z (B, L) of examples x (B, M) (rows: examples)."""
    pre = (x - params["b_dec"][None, :]) @ params["W_enc"] + params["b_enc"][None, :]
    return topk_codes(pre, k)


def _sae_loss(params: dict, x, k: int):
    import jax.numpy as jnp

    z = sae_encode(params, x, k)
    x_hat = z @ params["W_dec"] + params["b_dec"][None, :]
    return jnp.mean(jnp.sum((x - x_hat) ** 2, axis=1))


def _unit_rows(W):
    import jax.numpy as jnp

    return W / jnp.maximum(jnp.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def train_topk_sae(x, n_latents: int, k: int, *, steps: int = 2000, learning_rate: float = 1e-3,
                   seed: int = 0) -> tuple[dict, np.ndarray]:
    """Train a TopK sparse autoencoder on examples ``x`` (B, M) (rows: examples), float32.

    Initialisation: b_dec = the mean example; the decoder's rows (``W_dec`` (L, M)) are L random
    centred examples scaled to unit norm (random directions where an example equals the mean),
    ``W_enc = W_dec^T``, ``b_enc = 0``. Each full-batch Adam step on the mean squared error is
    followed by rescaling the decoder's rows to unit norm.

    Returns:
      (params ``{"W_enc": (M, L), "b_enc": (L,), "W_dec": (L, M), "b_dec": (M,)}``, losses
      ``(steps,)``: the loss before each step).
    """
    import jax
    import jax.numpy as jnp
    import optax

    if not 1 <= k <= n_latents:
        raise ValueError(f"k: expected 1 <= k <= n_latents = {n_latents}, got {k}")
    x = jnp.asarray(x, dtype=jnp.float32)
    b, m = x.shape
    key_pick, key_dirs = jax.random.split(jax.random.key(seed))
    mean = x.mean(axis=0)
    picked = x[jax.random.choice(key_pick, b, (n_latents,), replace=n_latents > b)] - mean[None, :]
    directions = jax.random.normal(key_dirs, (n_latents, m), dtype=jnp.float32)
    small = jnp.linalg.norm(picked, axis=1, keepdims=True) < 1e-6
    W_dec = _unit_rows(jnp.where(small, directions, picked))
    params = {"W_enc": W_dec.T, "b_enc": jnp.zeros((n_latents,), jnp.float32), "W_dec": W_dec, "b_dec": mean}
    optimiser = optax.adam(learning_rate)
    state = optimiser.init(params)

    def step(params, state, x):
        loss, grads = jax.value_and_grad(_sae_loss)(params, x, k)
        updates, state = optimiser.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return {**params, "W_dec": _unit_rows(params["W_dec"])}, state, loss

    @jax.jit
    def run(params, state, x):
        def body(carry, _):
            params, state, loss = step(*carry, x)
            return (params, state), loss
        (params, state), losses = jax.lax.scan(body, (params, state), None, length=steps)
        return params, losses

    params, losses = run(params, state, x)
    return params, np.asarray(losses)


def topk_sae(X, n_latents: int, k: int, *, steps: int = 2000, learning_rate: float = 1e-3, seed: int = 0) -> Scores:
    """A TopK sparse autoencoder on the columns of X (M, N); scores: the codes (L, N). The data
    are scaled so that the mean squared example norm is 1 (the relative error does not change)."""
    import jax.numpy as jnp

    X = np.asarray(X, dtype=np.float64)
    scale = float(np.sqrt(np.mean(np.sum(X ** 2, axis=0)))) or 1.0
    x = (X.T / scale).astype(np.float32)
    params, losses = train_topk_sae(x, n_latents, k, steps=steps, learning_rate=learning_rate, seed=seed)
    z = sae_encode(params, jnp.asarray(x), k)
    x_hat = np.asarray(z @ params["W_dec"] + params["b_dec"][None, :], dtype=np.float64)
    codes = np.asarray(z, dtype=np.float64)
    dead = int(np.sum(~np.any(codes > 0, axis=0)))
    return Scores(scores=codes.T.copy(), relative_error=_relative_error(x.astype(np.float64), x_hat),
                  factor_of=np.arange(n_latents),
                  info=dict(n_latents=n_latents, k=k, steps=steps, learning_rate=learning_rate,
                            first_loss=float(losses[0]), final_loss=float(losses[-1]), dead_latents=dead))
