"""Out-of-core coupled NMF: ``fit_streamed`` reads the blocks from disk once per iteration, in row tiles.

``fit`` holds every block X_b (rows_b, N) in device memory. ``fit_streamed`` holds only the
factors, F (d, N) and every W_b (rows_b, d), the statistics R (d, N) and G (d, d) of the one-pass
step (``jaxnmf._one_pass``) and two tiles of data, so the blocks may be larger than memory: memory
held is O((d + sum_b rows_b) d + d N) plus two tiles of about ``tile_bytes``, whatever the data's
size. An iteration is the one-pass step: F <- update(F, R, G) (no data), then one pass over each
block in contiguous row tiles X_t (r, N), each read from disk (a ``.npy`` file is read with
``os.preadv`` into a fresh buffer, never memory-mapped, so the data never counts as this process's
memory), put on the device and updated by one jitted call,

    P_t = X_t F^T / s_b,   W_t <- update(W_t, P_t, F F^T),   R += (w_b / s_b) W_t^T X_t,   G += w_b W_t^T W_t,

(``_one_pass._block_pass`` on the tile: MU or HALS rows, in sub-tiles that stay in cache), while a
background thread reads the next tile. J at the new state comes from the pass's products as in
``_one_pass``, ||X_b - W_b F||^2 = ||X_b||^2 - 2 <W_b, X_b F^T> + <W_b^T W_b, F F^T>; on the
iterations where ``fit`` would evaluate J by explicit residuals (every ``check_every``-th, for the
``tol`` test, and the last) the same tiles also give sum ||X_t / s_b - W_t F||^2, at the cost of
one more product per tile but no more reading.

The iterates are those of ``fit(..., one_pass=True)`` from the same start (validation, statistics,
scaling, weights, penalty units, init and balance are ``fit``'s), up to the order of the sums.
Use it when the blocks do not fit in memory (or would crowd it); otherwise ``fit`` is faster
(no reading, no per-tile dispatch) and has more options: ``fit_streamed`` has MU and HALS, random
or explicit init, and no restarts, NNDSVD, ``unit_columns``, group penalty, signed blocks or
16-bit blocks.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from . import _problem as P
from ._fit import (NMFResult, _Scaling, _check_dtype, _divide_array, active_factors, aligned_empty, collapse_message,
                   raw_penalties)
from ._hals import SWEEPS, hals_update_F_from, hals_update_rows
from ._init import balance, init_random
from ._mu import MUState, _penalties, _residual_sq, mu_update_F_from, mu_update_rows
from ._one_pass import PASS_TILE_BYTES, _block_pass
from ._settings import FitSettings
from ._tiles import dot as _dot, tile_rows

TILE_BYTES = 64 << 20  # bytes of stored data per tile (rows of about this size)
_HALS_ROWS = functools.partial(hals_update_rows, sweeps=SWEEPS)  # one object: a static jit argument


class _Source:
    """One block (rows, N), read by ranges of rows: a ``.npy`` file (with ``os.preadv``, never mapped)
    or a NumPy array (``np.memmap`` too: its pages then count as resident memory as they are read)."""

    def __init__(self, value: Any, label: str):
        self.label, self.path, self.array = label, None, None
        if isinstance(value, (str, os.PathLike)):
            path = Path(value)
            if not path.is_file():
                raise ValueError(f"{label}: no file at {path}")
            try:
                header = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as error:  # not an .npy file, damaged header, pickled data
                raise ValueError(f"{label}: {path} is not a readable .npy file ({type(error).__name__}: "
                                 f"{error})") from None
            if not isinstance(header, np.memmap):
                header.close()
                raise ValueError(f"{label}: {path} is an .npz archive; give one .npy file per block")
            if header.ndim == 2 and not header.flags.c_contiguous:
                raise ValueError(f"{label}: {path} is stored in Fortran order; save it in C order (np.save of "
                                 "np.ascontiguousarray(x))")
            self.path, self.offset, self.shape, self.dtype = path, header.offset, header.shape, header.dtype
        elif isinstance(value, np.ndarray):
            self.array, self.shape, self.dtype = value, value.shape, value.dtype
        else:
            raise TypeError(f"{label} must be a path to a .npy file or a NumPy array, got {type(value).__name__}")
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"{label} has dtype {self.dtype}; fit_streamed reads float32 or float64 blocks "
                             "(native byte order)")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new C-ordered, 64-byte aligned array (rows, N) of the block's dtype."""
        out = aligned_empty((stop - start, self.shape[1]), self.dtype)
        if self.path is None:
            np.copyto(out, self.array[start:stop])
            return out
        view = memoryview(out.reshape(-1).view(np.uint8))
        first = self.offset + start * self.shape[1] * self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], first + done)
                if got == 0:
                    raise ValueError(f"{self.label}: {self.path} ends before its header's shape {self.shape}")
                done += got
        finally:
            os.close(fd)
        return out

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows ``rows`` (a slice with step 1): what ``_problem.block_stats`` reads."""
        start, stop, _ = rows.indices(self.shape[0])
        return self.read(start, stop)


def _sources(blocks: Any) -> Any:
    """``blocks`` with every value a ``_Source``, in the same kind of container (anything else is
    passed on for ``_problem.check_fit`` to refuse)."""
    if isinstance(blocks, Mapping):
        return {k: _Source(v, f"block {k!r}") for k, v in blocks.items()}
    if isinstance(blocks, Sequence) and not isinstance(blocks, (str, bytes)):
        return (tuple if isinstance(blocks, tuple) else list)(_Source(v, f"block {i}") for i, v in enumerate(blocks))
    return blocks


@functools.partial(jax.jit, static_argnames=("update_rows", "prescaled"), donate_argnames=("w", "acc"))
def _tile_step(w, acc, x_t, start, update, exact, F, FFt, weight, scale, l2, l1, root, *, update_rows, prescaled):
    """One tile: rows [start, start + r) of W_b (rows_b, d) updated in place from x_t (r, N) when
    ``update`` (else kept: a pass that only gathers R, G and J of the current factors), and
    acc = (sum W_t^T X_t / s_b (d, N), sum W_t^T W_t (d, d), c (d,), sum ||X_t / s_b - W_t F||^2 ())
    accumulated, the last term only when ``exact``. ``update`` and ``exact`` are bool arrays (one
    program for every kind of pass). The tile is worked in the one-pass step's sub-tiles
    (``_one_pass._block_pass``, about ``PASS_TILE_BYTES``: each in cache for both of its products).
    ``prescaled``: the tile is divided by root^2 first (``_Scaling``)."""
    x = x_t.astype(F.dtype)
    if prescaled:
        x = _divide_array(x, root)
    rows = lambda w_t, P, *args: lax.cond(update, update_rows, lambda w_t, *_: w_t, w_t, P, *args)
    w_t, A, WtW, c = _block_pass(x, lax.dynamic_slice_in_dim(w, start, x.shape[0]), F, FFt, weight, scale, l2, l1,
                                 rows, PASS_TILE_BYTES)
    sq = acc[3] + lax.cond(exact, lambda: _residual_sq(x, w_t, F, scale), lambda: jnp.zeros((), F.dtype))
    return lax.dynamic_update_slice_in_dim(w, w_t, start, 0), (acc[0] + A, acc[1] + WtW, acc[2] + c, sq)


@jax.jit
def _add_block(R, G, fit, acc, weight, sq_norm, FFt):
    """R, G and the fit term of J with block b's pass added (``_one_pass.OnePassStep``'s sums)."""
    A, WtW, c, _ = acc
    return R + weight * A, G + weight * WtW, fit + weight * (sq_norm - 2 * jnp.sum(c) + jnp.sum(WtW * FFt))


@functools.partial(jax.jit, static_argnames=("solver",))
def _update_F(F, R, G, params, *, solver):
    """The F update of the one-pass step from R (d, N) and G (d, d); returns (F, F F^T)."""
    F = mu_update_F_from(F, R, G, params) if solver == "mu" else hals_update_F_from(F, R, G, params, sweeps=SWEEPS)
    return F, _dot(F, F.T)


@jax.jit
def _penalty(F, factors, params):
    """The penalty terms of J (no example groups)."""
    return _penalties(F, factors, params, None, 1)


@jax.jit
def _exact_objective(F, factors, params, residuals):
    """J by explicit residuals, from sum_b ||X_b / s_b - W_b F||^2 (B,), as ``_mu.objective`` sums it."""
    fit = sum(params.weights[b] * residuals[b] for b in range(len(factors)))
    return fit + _penalties(F, factors, params, None, 1)


class _Stream:
    """The passes over the blocks: each block's tiles in order, the next one read by ``pool`` (one
    thread) while the device updates the current one."""

    def __init__(self, sources, params, scaling: _Scaling, sq_norms, tile_bytes: int, pool):
        self.sources, self.sq_norms, self.pool = sources, sq_norms, pool
        dtype = params.weights.dtype
        self.prescaled = [bool(p) for p in scaling.prescaled]
        self.scalars = [(params.weights[b], params.data_scale[b], params.l2[b], params.l1[b],
                         jnp.asarray(np.sqrt(scaling.s[b]), dtype)) for b in range(len(sources))]
        self.jobs = []  # (block, first row, end row) of every tile, in reading order
        for b, x in enumerate(sources):
            step = tile_rows(x, x.dtype.itemsize, tile_bytes)
            self.jobs += [(b, a, min(a + step, x.shape[0])) for a in range(0, x.shape[0], step)]

    def _read(self, job):
        b, start, stop = job
        return jax.device_put(self.sources[b].read(start, stop))

    def run(self, F, FFt, factors, update_rows, update: bool, exact: bool):
        """One pass with F (d, N) and its F F^T, updating the W_b by ``update_rows`` when ``update``:
        (the W_b, R (d, N), G (d, d), the fit term of J from the products (), sum ||X_b / s_b - W_b F||^2
        per block (B,) when ``exact``, else None)."""
        d, n = F.shape
        R, G, fit = jnp.zeros((d, n), F.dtype), jnp.zeros((d, d), F.dtype), jnp.zeros((), F.dtype)
        new, residuals = list(factors), []
        pending = self.pool.submit(self._read, self.jobs[0])
        for i, (b, start, stop) in enumerate(self.jobs):
            x_t = pending.result()
            if i + 1 < len(self.jobs):
                pending = self.pool.submit(self._read, self.jobs[i + 1])
            if start == 0:  # a copy: the donated buffer is updated in place, the old W_b stays intact
                w, acc = jnp.copy(factors[b]), (jnp.zeros((d, n), F.dtype), jnp.zeros((d, d), F.dtype),
                                                 jnp.zeros((d,), F.dtype), jnp.zeros((), F.dtype))
            w, acc = _tile_step(w, acc, x_t, start, update, exact, F, FFt, *self.scalars[b], update_rows=update_rows,
                                prescaled=self.prescaled[b])
            jax.block_until_ready(acc)  # at most one tile read ahead of the device
            if stop == self.sources[b].shape[0]:
                new[b] = w
                R, G, fit = _add_block(R, G, fit, acc, self.scalars[b][0], self.sq_norms[b], FFt)
                residuals.append(acc[3])
        return tuple(new), R, G, fit, (jnp.stack(residuals) if exact else None)


def fit_streamed(blocks, rank: int, *, key: jax.Array, max_iter: int = 200, tol: float = 1e-4, init: Any = "random",
                 solver: str = "mu", l2_F: float = 0.0, l2: Any = 0.0, l1_F: float = 0.0, l1: Any = 0.0,
                 block_weights: Any = "none", penalty_units: str = "relative", dtype=jnp.float32,
                 check_every: int = 10, tile_bytes: int = TILE_BYTES, progress: bool = False) -> NMFResult:
    """Coupled NMF X_b ~ W_b F of blocks read from disk tile by tile (module docstring): ``fit``'s
    objective, options and result for data larger than memory.

    Args:
      blocks: sequence or mapping of blocks (rows_b, N), same N, non-negative, float32 or float64:
        paths to ``.npy`` files (C order; read with ``os.preadv``, never loaded whole) or NumPy
        arrays (``np.memmap`` too). The result keeps the container and names.
      rank: d. key: a ``jax.random`` key (random init).
      max_iter, tol, check_every: as ``fit``: stop when J (by explicit residuals, formed in the
        pass) decreased by less than ``tol`` relative over the last ``check_every`` iterations.
      init: "random" (``fit``'s rule) or explicit ``(F0 (d, N), factors0)`` with factors0 W0_b
        (rows_b, d) in the container of ``blocks``; balanced as in ``fit``.
      solver: "mu" or "hals". l2_F, l2, l1_F, l1, block_weights, penalty_units: as ``fit``.
      dtype: float32 or float64 (needs ``jax_enable_x64``): the factors and the arithmetic; tiles
        are converted on the device as they are read.
      tile_bytes: bytes of stored data per tile (whole rows; at least one row).
      progress: a progress bar.

    Returns:
      ``NMFResult`` as ``fit``'s: F (d, N), factors W_b (rows_b, d); ``loss`` and
      ``relative_errors`` by explicit residuals, summed over the tiles of the last pass that was
      kept (or of one more read-only pass when it did not form them, after a non-finite step);
      ``losses`` from the passes' products; one entry in ``restart_losses``;
      ``settings`` with ``streamed=True`` and ``tile_bytes``. ``jaxnmf.transform`` and ``save_fit``
      take it as they take ``fit``'s.

    Every pass reads all the blocks once; a statistics pass (``_problem.block_stats``: finite,
    non-negative, norms) and a pass for the initial R, G come first. A non-finite J stops the fit
    at the last finite iterate (``finite=False``, a RuntimeWarning), as in ``fit``.
    """
    key = P.check_key(key)
    progress = P.check_bool(progress, "progress")
    dtype = _check_dtype(dtype)
    tile_bytes = P.check_positive_int(tile_bytes, "tile_bytes")
    if isinstance(init, str) and init != "random":
        raise ValueError(f"init must be 'random' or explicit factors (F0, factors0) in fit_streamed, got {init!r} "
                         "(NNDSVD needs an SVD of all the data)")
    bl, stats, st = P.check_fit(_sources(blocks), rank, max_iter=max_iter, tol=tol, init=init, n_restarts=1,
                                l2_F=l2_F, l2=l2, l1_F=l1_F, l1=l1, unit_columns=False, block_weights=block_weights,
                                group_F=0.0, example_groups=None, check_every=check_every, solver=solver,
                                penalty_units=penalty_units)
    for label, hi in zip(bl.labels, stats.max):
        if hi > float(jnp.finfo(dtype).max):
            raise ValueError(f"{label} has entries up to {hi:.3g}, beyond the range of {dtype}: use dtype=float64")
    init = st["init"]  # "random", or the explicit (F0, [W0_b])
    n, rows = bl.arrays[0].shape[1], [x.shape[0] for x in bl.arrays]
    settings = FitSettings.resolved(st, dtype=dtype, block_dtype=dtype, one_pass=True,
                                    raw_penalties=raw_penalties(st, stats.sq_norm, rows, n), streamed=True,
                                    tile_bytes=tile_bytes)
    rank, max_iter, check_every, tol = settings.rank, settings.max_iter, settings.check_every, settings.tol
    weights, raw = settings.weights, settings.raw_penalties
    scaling = _Scaling.of(stats, weights, dtype, rows, n)
    params = scaling.params(weights, raw, raw.group_F, dtype)
    sq_norms = jnp.asarray(stats.sq_norm / scaling.s ** 2, dtype)
    if scaling.floored.any():
        names = ", ".join(lb for lb, f in zip(bl.labels, scaling.floored) if f)
        warnings.warn(f"block_weights: {names} carry less than {float(jnp.finfo(dtype).eps) ** 2:.2g} of the weighted "
                      f"objective in {dtype}: they do not influence F and are fitted to F alone (as in fit).",
                      RuntimeWarning, stacklevel=2)
    if isinstance(init, tuple):
        f0, w0 = init
        states = MUState(jnp.asarray(f0, dtype)[None], tuple(jnp.asarray(w / s, dtype)[None]
                                                             for w, s in zip(w0, scaling.s)))
    else:
        states = jax.vmap(lambda k: init_random(k, n, rows, stats.mean / scaling.s, rank, dtype=dtype))(key[None])
    state = jax.tree.map(lambda a: a[0], balance(states, params, None, 1))
    update_rows = mu_update_rows if settings.solver == "mu" else _HALS_ROWS

    with concurrent.futures.ThreadPoolExecutor(1) as pool, \
            tqdm(total=max_iter, desc="coupled NMF (streamed)", unit="it", disable=not progress, leave=False) as bar:
        stream = _Stream(bl.arrays, params, scaling, sq_norms, tile_bytes, pool)
        FFt = _dot(state.F, state.F.T)
        _, R, G, _, residuals = stream.run(state.F, FFt, state.factors, update_rows, False, tol > 0)
        check_loss = float(_exact_objective(state.F, state.factors, params, residuals)) if tol > 0 else np.inf
        finite, converged, losses = tol == 0 or bool(np.isfinite(check_loss)), False, []
        while finite and not converged and len(losses) < max_iter:
            t = len(losses) + 1
            exact = (tol > 0 and t % check_every == 0) or t == max_iter
            F, FFt = _update_F(state.F, R, G, params, solver=settings.solver)
            factors, R_new, G_new, fit, res = stream.run(F, FFt, state.factors, update_rows, True, exact)
            loss = float(fit + _penalty(F, factors, params))
            if not np.isfinite(loss):
                finite = False
                break
            state, R, G, residuals = MUState(F, factors), R_new, G_new, res
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=loss * scaling.c)
            if tol > 0 and t % check_every == 0:
                now = float(_exact_objective(F, factors, params, res))
                converged = (check_loss - now) / check_loss < tol if check_loss > 0 else True
                check_loss = now
        if residuals is None:
            residuals = stream.run(state.F, _dot(state.F, state.F.T), state.factors, update_rows, False, True)[4]

    n_iter = len(losses)
    loss = float(_exact_objective(state.F, state.factors, params, residuals)) * scaling.c
    rel = np.sqrt(np.asarray(residuals, np.float64) / np.where(stats.sq_norm > 0, np.asarray(sq_norms, np.float64), 1))
    active = active_factors(state.F, state.factors, np.asarray(params.weights, np.float64),
                            np.asarray(sq_norms, np.float64))
    collapsed = not active.any()
    if collapsed:
        warnings.warn(collapse_message(settings), RuntimeWarning, stacklevel=2)
    if not finite:
        warnings.warn(f"iteration {n_iter + 1} gave a non-finite objective (an overflow or NaN in the updates); the "
                      f"fit stopped there and returns iterate {n_iter}, the last finite one, with finite=False and "
                      "converged=False. Try dtype=float64, smaller penalties, or look for extreme values in the "
                      "blocks.", RuntimeWarning, stacklevel=2)
    return NMFResult(
        F=state.F, loss=loss, factors=bl.rebuild([w * s for w, s in zip(state.factors, scaling.s)]),
        losses=np.asarray(losses, np.float64) * scaling.c, relative_errors=bl.rebuild([float(r) for r in rel]),
        n_iter=n_iter, converged=converged and not collapsed, finite=finite, restart_losses=np.array([loss]),
        block_weights=bl.rebuild([float(w) for w in weights]), active=active, collapsed=collapsed,
        settings=settings)
