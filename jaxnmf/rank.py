"""Choosing the rank d of a coupled NMF without labels: held-out error curves and a rule.

``rank_curve`` splits the examples (columns) and the rows of every block at random into a
training and a held-out share, fits every rank of a grid on the training rows and columns, and
measures two held-out errors (Owen & Perry, "Bi-cross-validation of the SVD and the non-negative
matrix factorization", Ann. Appl. Stat. 2009): with X_b = [[D_b, C_b], [B_b, A_b]] (rows:
training / held out; columns: training t / held out h), the fit gives W_b and F_t on D,

- column hold-out: F_h = ``jaxnmf.transform`` of C (the held-out columns, W_b fixed); the error
  of C against W_b F_h. F_h is fitted to C itself, so this error keeps falling (slowly) past the
  data's rank: extra factors always explain a little more of any column;
- bi-cross-validation (BCV): the held-out rows' factors V_b = argmin_{V >= 0} ||B_b - V F_t||
  (F_t fixed), and the prediction V_b F_h of A_b, whose entries entered no fit. Past the data's
  rank the extra factors are fitted to noise of D, and the prediction of A gets worse: the BCV
  error has a minimum near the rank the data supports.

It also measures how reproducibly the factors come back from random starts
(``jaxnmf.factor_stability``). ``choose_rank`` applies a stated rule to the BCV curve: the rank
after which no added factor lowers the BCV error by ``tol`` (2 %) of itself.

    >>> import jax, numpy as np, jaxnmf
    >>> rng = np.random.default_rng(0)
    >>> F = rng.random((3, 200))
    >>> X = {k: rng.random((m, 3)) @ F for k, m in (("a", 60), ("b", 40))}
    >>> X = {k: np.abs(x + 0.02 * x.std() * rng.standard_normal(x.shape)) for k, x in X.items()}
    >>> curve = jaxnmf.rank_curve(X, [1, 2, 3, 4, 5], key=jax.random.key(0), solver="hals", max_iter=300)
    >>> jaxnmf.choose_rank(curve)
    3
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ._fit import fit, transform
from .stability import factor_stability

__all__ = ["RankCurve", "choose_rank", "rank_curve"]


@dataclasses.dataclass(frozen=True)
class RankCurve:
    """The measurements of ``rank_curve``, one entry per rank (in increasing rank order).

    Every error is a weighted relative error sqrt(sum_b w_b ||Y_b - Yhat_b||^2 / sum_b w_b
    ||Y_b||^2), w_b the fit's ``block_weights`` (the blocks count as in the fit), Y_b the part of
    X_b named (see the module docstring for D, C, B, A).

    Attributes:
      ranks: (R,) the ranks fitted.
      bcv_error: (R,) bi-cross-validation error: A_b (held-out rows x held-out columns) against
        V_b F_h.
      held_out_error: (R,) column hold-out error: C_b (training rows x held-out columns) against
        W_b F_h, F_h = ``transform`` of C with the W_b of the best fit held fixed.
      train_error: (R,) D_b against W_b F_t, the best fit's own.
      stability: (R,) mean matched cosine of the rows of F_t across the ``n_restarts`` fits
        (``factor_stability``, the lowest-objective fit the reference); NaN with one restart.
      converged: (R,) whether the best training fit met its tolerance.
      n_train, n_held_out: columns fitted and held out; held_rows: rows held out per block.
    """

    ranks: np.ndarray
    bcv_error: np.ndarray
    held_out_error: np.ndarray
    train_error: np.ndarray
    stability: np.ndarray
    converged: np.ndarray
    n_train: int
    n_held_out: int
    held_rows: dict

    def as_dict(self) -> dict:
        """JSON-able: lists of floats / ints / bools (NaN stability as None)."""
        return dict(ranks=[int(r) for r in self.ranks], bcv_error=[float(x) for x in self.bcv_error],
                    held_out_error=[float(x) for x in self.held_out_error],
                    train_error=[float(x) for x in self.train_error],
                    stability=[None if np.isnan(x) else float(x) for x in self.stability],
                    converged=[bool(x) for x in self.converged], n_train=self.n_train, n_held_out=self.n_held_out,
                    held_rows={str(k): int(v) for k, v in self.held_rows.items()})


def _as_arrays(blocks: Any) -> tuple[list, list[np.ndarray]]:
    if isinstance(blocks, Mapping):
        names = list(blocks)
        arrays = [np.asarray(blocks[k]) for k in names]
    elif isinstance(blocks, Sequence) and not isinstance(blocks, (str, bytes)):
        names = list(range(len(blocks)))
        arrays = [np.asarray(b) for b in blocks]
    else:
        raise ValueError(f"blocks: expected a mapping or sequence of 2-D (rows_b, N) arrays, got "
                         f"{type(blocks).__name__}")
    if not arrays:
        raise ValueError("blocks: no blocks given")
    for name, x in zip(names, arrays):
        if x.ndim != 2:
            raise ValueError(f"blocks: block {name!r} must be 2-D (rows_b, N), got shape {x.shape}")
    n = {x.shape[1] for x in arrays}
    if len(n) != 1:
        raise ValueError(f"blocks: every block needs the same number of columns N, got {sorted(n)}")
    return names, arrays


def _rebuild(blocks, names, arrays):
    return dict(zip(names, arrays)) if isinstance(blocks, Mapping) else list(arrays)


def _weighted_error(weights, targets, predictions) -> float:
    num = den = 0.0
    for w, y, yhat in zip(weights, targets, predictions):
        if y.size == 0:
            continue
        y = y.astype(np.float64)
        num += w * float(np.sum((y - yhat) ** 2))
        den += w * float(np.sum(y ** 2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _nonneg_left(B: np.ndarray, F: np.ndarray, iterations: int = 300) -> np.ndarray:
    """V >= 0 (rows, d) minimising ||B - V F||_F with F (d, n) fixed: HALS over the columns of V."""
    G = F @ F.T
    P = B @ F.T
    V = np.maximum(P, 0) / np.maximum(np.diag(G), 1e-300)  # a non-negative start
    d = F.shape[0]
    for _ in range(iterations):
        for k in range(d):
            if G[k, k] > 0:
                V[:, k] = np.maximum(0.0, V[:, k] + (P[:, k] - V @ G[:, k]) / G[k, k])
    return V


def _check_share(held_out) -> float:
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float, np.floating)) or not 0 < held_out < 1:
        raise ValueError(f"held_out: the share of columns (and rows) held out must lie in (0, 1), got {held_out!r}")
    return float(held_out)


def rank_curve(blocks, ranks: Sequence[int], *, key: jax.Array, held_out: float = 0.2, n_restarts: int = 3,
               **fit_options) -> RankCurve:
    """Bi-cross-validation, column hold-out and training errors and stability at every rank.

    The N columns (examples) are split once, at random (``key``), into ``round(held_out N)``
    held-out columns h and the training columns t; the rows of every block b with at least two
    rows likewise into ``max(1, round(held_out rows_b))`` held-out rows and training rows (a
    one-row block is kept whole). With X_b = [[D_b, C_b], [B_b, A_b]] (training / held-out rows
    by training t / held-out h columns), for every rank d:

    1. ``n_restarts`` coupled fits of D (training rows, (rows_b', |t|)), keys
       ``fold_in(key, 1 + i)``, options ``fit_options`` (``jaxnmf.fit``; ``init`` defaults to
       "random" so that the restarts differ); the lowest objective gives W_b (rows_b', d), F_t
       (d, |t|);
    2. F_h (d, |h|) = ``jaxnmf.transform`` of C with the W_b fixed; V_b (held rows_b, d) =
       argmin_{V >= 0} ||B_b - V F_t|| (300 HALS sweeps, F_t fixed);
    3. errors, weighted by the fit's ``block_weights`` w_b:
       bcv = err(A, V F_h), held-out (columns) = err(C, W F_h), training = err(D, W F_t), with
       err(Y, Yhat) = sqrt(sum_b w_b ||Y_b - Yhat_b||^2 / sum_b w_b ||Y_b||^2);
    4. stability: ``factor_stability`` of the restarts' F_t, the best fit the reference.

    Args:
      blocks: mapping or sequence of non-negative (rows_b, N) arrays, as for ``jaxnmf.fit``.
      ranks: distinct positive ints, each at most the training columns and the training rows.
      key: ``jax.random`` key (the split and the restarts).
      held_out: share of the columns and of each block's rows held out, in (0, 1), leaving at
        least one column each side.
      n_restarts: fits per rank (>= 1; stability needs >= 2, NaN otherwise).
      **fit_options: passed to ``jaxnmf.fit`` (``max_iter``, ``solver``, ``block_weights``, ...);
        not ``rank``, ``key`` or ``n_restarts``. Explicit ``block_weights`` are per block, as for
        the whole blocks.

    Returns:
      ``RankCurve`` with one entry per rank, ranks sorted increasingly.

    Raises:
      ValueError: a bad argument, named in the message.
    """
    names, arrays = _as_arrays(blocks)
    n = arrays[0].shape[1]
    held_out = _check_share(held_out)
    n_held = int(round(held_out * n))
    if n_held < 1 or n - n_held < 1:
        raise ValueError(f"held_out: {held_out} of N = {n} columns leaves {n_held} held out and {n - n_held} to "
                         f"fit; both must be >= 1")
    if isinstance(n_restarts, bool) or not isinstance(n_restarts, (int, np.integer)) or n_restarts < 1:
        raise ValueError(f"n_restarts: must be an int >= 1, got {n_restarts!r}")
    for bad in ("rank", "key", "n_restarts"):
        if bad in fit_options:
            raise ValueError(f"{bad}: set by rank_curve, not a fit option here")
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, (Sequence, np.ndarray)) or len(ranks) == 0 or any(
            isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or r < 1 for r in ranks):
        raise ValueError(f"ranks: expected a non-empty sequence of positive ints, got {ranks!r}")
    grid = sorted(int(r) for r in ranks)
    if len(set(grid)) != len(grid):
        raise ValueError(f"ranks: repeated ranks in {list(ranks)}")
    fit_options.setdefault("init", "random")

    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), n))
    h, t = np.sort(perm[:n_held]), np.sort(perm[n_held:])
    row_train, row_held = [], []
    for i, x in enumerate(arrays):
        m = x.shape[0]
        k = 0 if m < 2 else max(1, int(round(held_out * m)))
        p = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 0), 1 + i), m))
        row_held.append(np.sort(p[:k]))
        row_train.append(np.sort(p[k:]))
    rows = sum(len(r) for r in row_train)
    if max(grid) > min(len(t), rows):
        raise ValueError(f"ranks: {max(grid)} exceeds min(training columns {len(t)}, training rows {rows})")
    if not any(len(r) for r in row_held):
        raise ValueError("blocks: every block has a single row, so no rows can be held out for bi-cross-validation")
    D = [x[r][:, t] for x, r in zip(arrays, row_train)]
    C = [x[r][:, h] for x, r in zip(arrays, row_train)]
    B = [x[r][:, t].astype(np.float64) for x, r in zip(arrays, row_held)]
    A = [x[r][:, h] for x, r in zip(arrays, row_held)]
    bcv, held_err, train_err, stab, conv = [], [], [], [], []
    for d in grid:
        fits = [fit(_rebuild(blocks, names, D), d, key=jax.random.fold_in(key, 1 + i), **fit_options)
                for i in range(n_restarts)]
        fits.sort(key=lambda f: f.loss)
        best = fits[0]
        W = [np.asarray(best.factors[k], np.float64) for k in names]
        weights = [float(best.block_weights[k]) for k in names]
        F_t = np.asarray(best.F, np.float64)
        F_h = np.asarray(transform(best, _rebuild(blocks, names, C)), np.float64)
        V = [_nonneg_left(b, F_t) if b.shape[0] else np.zeros((0, d)) for b in B]
        bcv.append(_weighted_error(weights, A, [v @ F_h for v in V]))
        held_err.append(_weighted_error(weights, C, [w @ F_h for w in W]))
        train_err.append(_weighted_error(weights, D, [w @ F_t for w in W]))
        stab.append(factor_stability([np.asarray(f.F) for f in fits]).mean if n_restarts > 1 else np.nan)
        conv.append(bool(best.converged))
    return RankCurve(ranks=np.asarray(grid), bcv_error=np.asarray(bcv), held_out_error=np.asarray(held_err),
                     train_error=np.asarray(train_err), stability=np.asarray(stab, np.float64),
                     converged=np.asarray(conv), n_train=int(len(t)), n_held_out=int(n_held),
                     held_rows={k: len(r) for k, r in zip(names, row_held)})


def choose_rank(curve: RankCurve, *, tol: float = 0.02, min_stability: float = 0.0) -> int:
    """The rank the bi-cross-validation error asks for, by a stated rule (no labels).

    Rule: stop where an added factor no longer buys ``tol`` of the prediction error. With e_i the
    BCV error (``curve.bcv_error``: held-out rows x held-out columns, entries that entered no
    fit) at rank d_i of the curve (ranks increasing), the gain per added factor of step i is

        g_i = (e_{i-1} - e_i) / (e_{i-1} (d_i - d_{i-1})),

    and the chosen rank is the smallest d_i after which every later step gains less than ``tol``
    (default 0.02: 2 % of the error per factor), i.e. d_i with g_j < tol for every j > i (the
    first rank of the curve when no step gains ``tol``). On data of an exact rank plus noise the
    BCV error has its minimum at the rank and does not fall past it (the extra factors are fitted
    to the training entries' noise, which the held-out entries do not share): every later gain is
    <= 0 and the rule returns the rank. On data without an exact rank (a CNN's activations) the
    error keeps falling and the rule stops where the gain per factor drops below ``tol``: then
    the chosen rank depends on ``tol`` (report the curve with it).

    Then, optionally, stability: with ``min_stability > 0`` and stability measured
    (``n_restarts >= 2``), a chosen rank whose stability is below ``min_stability`` is replaced by
    the largest smaller rank of the curve that reaches it (factors that do not come back from
    other starts are not read); none reaching it: the chosen rank is kept.

    Args:
      curve: a ``RankCurve`` of ``rank_curve``.
      tol: the gain per added factor that a factor must buy, relative to the error, in (0, 1).
      min_stability: stability floor in [0, 1] (0: not used).

    Returns:
      the chosen rank (an int of ``curve.ranks``).

    Raises:
      ValueError: a bad argument, named in the message.
    """
    if not isinstance(curve, RankCurve):
        raise ValueError(f"curve: expected the RankCurve of jaxnmf.rank_curve, got {type(curve).__name__}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not 0 < tol < 1:
        raise ValueError(f"tol: must lie in (0, 1), got {tol!r}")
    if isinstance(min_stability, bool) or not isinstance(min_stability, (int, float, np.floating)) \
            or not 0 <= min_stability <= 1:
        raise ValueError(f"min_stability: must lie in [0, 1], got {min_stability!r}")
    ranks, e = np.asarray(curve.ranks), np.asarray(curve.bcv_error, np.float64)
    if len(ranks) == 0 or len(e) != len(ranks) or not np.all(np.isfinite(e)):
        raise ValueError("curve: empty, or its BCV errors do not match its ranks or are not finite")
    gains = np.zeros(len(ranks))
    prev = np.where(e[:-1] > 0, e[:-1], 1.0)
    gains[1:] = np.where(e[:-1] > 0, (e[:-1] - e[1:]) / (prev * np.diff(ranks)), 0.0)
    worth = np.nonzero(gains >= tol)[0]
    i = int(worth[-1]) if len(worth) else 0
    stab = np.asarray(curve.stability, np.float64)
    if min_stability > 0 and not np.isnan(stab[i]) and stab[i] < min_stability:
        ok = [j for j in range(i) if not np.isnan(stab[j]) and stab[j] >= min_stability]
        if ok:
            i = ok[-1]
    return int(ranks[i])
