"""How reproducible the factors of a fit are across restarts.

Two fits of the same data find the same concepts in another order (NMF is invariant to
permuting and rescaling its components), so factors are compared after matching: row i of one
example factor F_a (d, N) is paired with row p(i) of another, F_b, by the permutation p that
maximises the summed cosine similarity of the paired rows (the Hungarian algorithm,
``scipy.optimize.linear_sum_assignment``). The cosine of two rows,

    cos(F_a[i], F_b[j]) = <F_a[i], F_b[j]> / (||F_a[i]|| ||F_b[j]||),

is 0 when either row is zero (no NaN), so a switched-off factor matches nothing. The cosine is
blind to the rows' scale, which NMF does not determine.

    >>> import numpy as np, jaxnmf
    >>> F = np.random.default_rng(0).random((4, 50))
    >>> perm, cos = jaxnmf.match_factors(F, 3.0 * F[[2, 0, 3, 1]])
    >>> perm.tolist(), np.round(cos, 6).tolist()
    ([1, 3, 0, 2], [1.0, 1.0, 1.0, 1.0])
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.optimize

__all__ = ["FactorStability", "cosine_similarities", "factor_stability", "match_factors"]


def _factor_matrix(F, name: str) -> np.ndarray:
    a = np.asarray(F, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (d, N) example factor, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one factor and one example, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: holds non-finite values")
    return a


def _unit_rows(a: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def cosine_similarities(F_a, F_b) -> np.ndarray:
    """(d_a, d_b) cosine similarity of every row of ``F_a`` (d_a, N) with every row of ``F_b``
    (d_b, N); 0 where either row is zero."""
    a = _factor_matrix(F_a, "F_a")
    b = _factor_matrix(F_b, "F_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"F_b: expected {a.shape[1]} columns (examples) like F_a, got shape {b.shape}")
    return np.clip(_unit_rows(a) @ _unit_rows(b).T, -1.0, 1.0)


def match_factors(F_a, F_b) -> tuple[np.ndarray, np.ndarray]:
    """Pair the factors of two fits: the one-to-one matching of rows with the largest total cosine.

    Args:
      F_a: (d, N) example factor of one fit (rows: factors, columns: the same N examples).
      F_b: (d, N) example factor of another fit, same shape.

    Returns:
      ``(perm, cosines)``: ``perm`` (d,) int, row ``i`` of ``F_a`` is matched to row ``perm[i]``
      of ``F_b`` (so ``F_b[perm]`` is F_b in F_a's order), chosen to maximise
      ``sum_i cos(F_a[i], F_b[perm[i]])`` (Hungarian algorithm); ``cosines`` (d,) float64, the
      matched cosines ``cos(F_a[i], F_b[perm[i]])``, 0 for a zero row.

    Raises:
      ValueError: an argument is not a 2-D finite array with at least one row and column, or the
        shapes differ (the message names the argument).
    """
    a = _factor_matrix(F_a, "F_a")
    b = _factor_matrix(F_b, "F_b")
    if a.shape != b.shape:
        raise ValueError(f"F_b: expected the shape of F_a {a.shape}, got {b.shape}")
    cos = cosine_similarities(a, b)
    rows, cols = scipy.optimize.linear_sum_assignment(cos, maximize=True)
    perm = np.empty(a.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm, cos[np.arange(a.shape[0]), perm]


@dataclasses.dataclass(frozen=True)
class FactorStability:
    """Stability of a reference fit's factors over R - 1 other fits (see ``factor_stability``).

    Attributes:
      per_factor: (d,) mean matched cosine of each factor of the reference fit over the other fits.
      mean: the mean of ``per_factor``.
      cosines: (R - 1, d) the matched cosine of each reference factor in each other fit.
      permutations: (R - 1, d) int, ``permutations[r, i]``: the row of fit r + 1 matched to row i of
        the reference.
    """

    per_factor: np.ndarray
    mean: float
    cosines: np.ndarray
    permutations: np.ndarray


def factor_stability(Fs: Sequence) -> FactorStability:
    """How reproducibly each factor of a reference fit comes back in the other fits.

    With ``Fs[0]`` the reference (put the best fit, e.g. the lowest objective, first), every
    other fit ``Fs[r]`` is matched to it by ``match_factors``, and factor i's stability is

        s_i = mean_{r=1..R-1} cos(F_0[i], F_r[perm_r[i]]),

    1 when the factor comes back exactly (up to scale) in every fit, near 0 when it does not.

    Args:
      Fs: R >= 2 example factors, each (d, N) with the same shape.

    Returns:
      ``FactorStability`` with ``per_factor`` (d,), ``mean`` (float), ``cosines`` (R - 1, d) and
      ``permutations`` (R - 1, d).

    Raises:
      ValueError: fewer than two fits, or a fit that is not a 2-D array of the reference's shape
        (the message names ``Fs[r]``).
    """
    if isinstance(Fs, np.ndarray) and Fs.ndim == 3:
        Fs = list(Fs)
    if isinstance(Fs, (str, bytes)) or not isinstance(Fs, Sequence):
        raise ValueError(f"Fs: expected a list of (d, N) example factors, got {type(Fs).__name__}")
    if len(Fs) < 2:
        raise ValueError(f"Fs: expected at least two fits to compare, got {len(Fs)}")
    reference = _factor_matrix(Fs[0], "Fs[0]")
    perms, cosines = [], []
    for r in range(1, len(Fs)):
        other = _factor_matrix(Fs[r], f"Fs[{r}]")
        if other.shape != reference.shape:
            raise ValueError(f"Fs[{r}]: expected the shape of Fs[0] {reference.shape}, got {other.shape}")
        perm, cos = match_factors(reference, other)
        perms.append(perm)
        cosines.append(cos)
    cosines = np.stack(cosines)
    per_factor = cosines.mean(axis=0)
    return FactorStability(per_factor=per_factor, mean=float(per_factor.mean()), cosines=cosines,
                           permutations=np.stack(perms))
