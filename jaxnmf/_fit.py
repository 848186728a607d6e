"""``fit`` and ``transform``: the user-facing coupled NMF (validation, scaling, restarts, result)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from . import _checkpoint
from . import _problem as P
from ._hals import hals_step
from ._one_pass import OnePassStep, with_statistics
from ._init import balance, init_nndsvd, init_random
from ._loop import _initial_carry_restarts, _run_restarts, _run_transform, objective_restarts
from ._mu import MUState, make_params, mu_step, relative_errors
from ._mu import objective as _objective
from ._settings import FitSettings, RawPenalties
from ._tiles import NarrowBlock, pack_narrow

_CHUNK = 50  # iterations per compiled scan; convergence and progress are checked between chunks
_STEPS = {"mu": mu_step, "hals": hals_step}
ACTIVE_TOL = 1e-6  # a factor is active when its part of the fit carries more than this share of S (see NMFResult)


@dataclass(frozen=True)
class NMFResult:
    """A fitted coupled NMF.

    Attributes:
      F: (rank, N) the example factor shared by every block.
      factors: block factors W_b (rows_b, rank), in the container type of ``blocks``.
      loss: final objective J (Eq. 3.1 with penalties), from explicit residuals.
      losses: (n_iter,) float64, J after each iteration, from the products the updates form
        (||X||^2 - 2 <W, X F^T> + <W^T W, F F^T>: about 1e-4 relative accuracy in float32, less
        once J << sum_b w_b ||X_b||^2, as a converged HALS fit can reach).
      relative_errors: ||X_b - W_b F||_F / ||X_b||_F per block, same container.
      n_iter: iterations taken; converged: the ``tol`` test was met and the fit has not collapsed;
        finite: no step produced a non-finite objective (such a step is discarded and the fit
        stops there).
      active: (rank,) bool, factor k is active when its rank-one part carries more than
        ``ACTIVE_TOL`` (1e-6) of the weighted data:
        sum_b w_b ||W_b[:, k]||^2 ||F[k]||^2 > 1e-6 S,  S = sum_b w_b ||X_b||^2 (J of F = 0).
      collapsed: no factor is active (F = 0 or negligible): the penalties outweigh every component
        (``fit`` then warns and sets ``converged`` False; nothing should be read from F).
      restart_losses: (n_restarts,) final objective of every restart; the best is returned.
      block_weights: w_b used, same container.
      settings: the resolved options (``FitSettings``; used by ``transform``).
    """

    F: jax.Array
    loss: float
    factors: Any
    losses: np.ndarray
    relative_errors: Any
    n_iter: int
    converged: bool
    finite: bool
    restart_losses: np.ndarray
    block_weights: Any
    active: np.ndarray
    collapsed: bool
    settings: FitSettings = field(repr=False)

    @property
    def n_active(self) -> int:
        """The number of active factors (see ``active``)."""
        return int(np.sum(self.active))


def raw_penalties(st: Mapping, sq_norms: np.ndarray, rows, n: int) -> RawPenalties:
    """The penalties of J in raw units (Eq. 3.1) from the user's, in ``st["penalty_units"]``.

    st: the settings of ``_problem.check_fit`` (or any mapping of weights, l2, l1, l2_F, l1_F,
    group_F, example_groups, n_groups, penalty_units); sq_norms: (B,) ||X_b||_F^2; rows: (B,) M_b;
    n: N. Returns the ``RawPenalties``: l2 (B,), l1 (B,), l2_F, l1_F (floats) and group_F
    (n_groups,), the weight of each example group's norm.
    "raw": the values as given (one weight for every group).
    "relative", with S = sum_b w_b ||X_b||^2, S_b = w_b ||X_b||^2, |g| the size of group g:
        l2_F = l2_F' S / N,  l1_F = l1_F' S / N,  group_F_g = group_F' S sqrt(|g|) / N,
        l2_b = l2_b' w_b N,  l1_b = l1_b' w_b ||X_b|| sqrt(N / M_b)
    (S = 1 when every block is zero). See ``fit`` for what the relative values mean.
    """
    w, l2, l1 = (np.asarray(st[k], np.float64) for k in ("weights", "l2", "l1"))
    groups, n_groups = st["example_groups"], st["n_groups"]
    if st["penalty_units"] == "raw":
        return RawPenalties(l2=l2, l1=l1, l2_F=st["l2_F"], l1_F=st["l1_F"], group_F=np.full(n_groups, st["group_F"]))
    sq_norms, rows = np.asarray(sq_norms, np.float64), np.asarray(rows, np.float64)
    total = float(np.sum(w * sq_norms)) or 1.0
    sizes = np.full(1, float(n)) if groups is None else np.bincount(groups, minlength=n_groups).astype(np.float64)
    return RawPenalties(l2=l2 * w * n, l1=l1 * w * np.sqrt(sq_norms * n / rows), l2_F=st["l2_F"] * total / n,
                        l1_F=st["l1_F"] * total / n, group_F=st["group_F"] * total * np.sqrt(sizes) / n)


def active_factors(F, factors, weights, sq_norms) -> np.ndarray:
    """(rank,) bool: sum_b w_b ||W_b[:, k]||^2 ||F[k]||^2 > ACTIVE_TOL sum_b w_b ||X_b||^2 (NumPy,
    float64). F: (rank, N), factors: W_b (rows_b, rank), weights and sq_norms: (B,)."""
    f2 = np.sum(np.asarray(F, np.float64) ** 2, axis=1)
    energy = sum(wb * np.sum(np.asarray(w, np.float64) ** 2, axis=0) * f2 for w, wb in zip(factors, weights))
    total = float(np.sum(np.asarray(weights) * np.asarray(sq_norms)))
    return energy > ACTIVE_TOL * total if total > 0 else np.zeros(f2.shape, bool)


def collapse_message(st: Mapping) -> str:
    """The warning of a collapsed fit, naming the penalties that caused it (``st``: the ``FitSettings``,
    or any mapping of group_F, l2, l1, l2_F, l1_F and penalty_units)."""
    given = [f"{k}={np.asarray(st[k]).tolist()}" for k in ("group_F", "l2", "l1", "l2_F", "l1_F")
             if np.any(np.asarray(st[k]) > 0)]
    if not given:
        return (f"every factor is zero: no component carries more than {ACTIVE_TOL:g} of the weighted data, so F "
                "means nothing, and no penalty caused it: the data carry (almost) nothing to fit, or the start "
                "could not move. converged is set False.")
    return (f"every factor is zero: no component carries more than {ACTIVE_TOL:g} of the weighted data, so F "
            f"means nothing. The penalties ({', '.join(given) or 'none'}; penalty_units={st['penalty_units']!r}) "
            "outweigh every component: use smaller ones (e.g. a tenth). converged is set False.")


@dataclass(frozen=True)
class _Scaling:
    """fit solves the equivalent problem X_b / s_b, W_b / s_b (s_b the largest entry of block b),
    objective / c with c = max_b w_b s_b^2, so that any data range stays in floating point; the
    weights and penalties are mapped so that c J' = J exactly.

    The steps divide by s_b as they read X_b (``data_scale``), so the data is used in place. A block
    whose s_b is so large (or small) that its raw products X_b^T W_b could overflow (or 1 / s_b
    underflow) in the dtype, s_b > max / (16 max(rows_b, N)) or s_b < its inverse (float32: above
    about 1e35 for blocks of a few thousand rows), is ``prescaled``: ``fit`` divides it by s_b into a
    copy first (then its ``data_scale`` is 1, s_b rounded to the dtype).

    A block whose scaled weight w_b s_b^2 / c is below eps^2 of the dtype (float32: 1.4e-14) carries
    less of J than rounding and would underflow: it is iterated with weight eps^2 instead
    (``floored``), so that its W_b is still fitted to F; F and J are unchanged to rounding."""

    s: np.ndarray  # (B,)
    c: float
    prescaled: np.ndarray  # (B,) bool
    floored: np.ndarray  # (B,) bool

    @classmethod
    def of(cls, stats: P.BlockStats, weights: np.ndarray, dtype, rows, n: int) -> "_Scaling":
        info = jnp.finfo(dtype)
        s = np.where(stats.max > 0, stats.max, 1.0)
        hi = np.minimum(float(info.max) / (16.0 * np.maximum(np.asarray(rows, np.float64), n)),
                        1.0 / (16.0 * float(info.tiny)))
        prescaled = (s > hi) | (s < 1.0 / hi)
        s = np.where(prescaled, s.astype(dtype).astype(np.float64), s)
        c = float(np.max(weights * s * s))
        floored = (weights * s * s / c < float(info.eps) ** 2) & (stats.max > 0)  # an all-zero block has nothing to fit
        return cls(s=s, c=c, prescaled=prescaled, floored=floored)

    @property
    def data_scale(self) -> np.ndarray:
        """(B,) what the steps divide each block by as they read it (1 for a prescaled block)."""
        return np.where(self.prescaled, 1.0, self.s)

    def blocks(self, arrays) -> tuple:
        """The blocks the steps read: the prescaled ones divided by s_b (a copy), the others as they are."""
        return tuple(_divide(x, float(s)) if pre else x for x, s, pre in zip(arrays, self.s, self.prescaled))

    def params(self, weights, raw: RawPenalties, group_F, dtype):
        """The steps' ``Params`` of weights (B,) and the raw penalties, with group weights ``group_F``
        (n_groups,) (``raw.group_F`` in ``fit``; ``transform``'s for the new examples)."""
        s, c = self.s, self.c
        scaled = np.where(self.floored, float(jnp.finfo(dtype).eps) ** 2, weights * s * s / c)
        return make_params(len(s), weights=scaled, l2=raw.l2 * s * s / c, l1=raw.l1 * s / c,
                           l2_F=raw.l2_F / c, l1_F=raw.l1_F / c, group_F=group_F / c,
                           data_scale=self.data_scale, column_norm=1.0 / s, dtype=dtype)


@jax.jit
def _divide_array(x, root):
    # two halves, kept apart (XLA folds (x / r) / r into x / r^2): XLA's CPU code multiplies by 1 / s, which is
    # subnormal, hence 0, near the dtype's maximum
    return lax.optimization_barrier(x / root) / root


def _divide(x, s: float):
    """Block x / s in its own dtype, a new array (a ``NarrowBlock`` is divided in float32 and packed again)."""
    root = float(np.sqrt(s))
    if isinstance(x, NarrowBlock):
        return _pack_narrow(_divide_array(x.astype(jnp.float32), jnp.float32(root)), x.dtype)
    return _divide_array(x, jnp.asarray(root, x.dtype))


def _check_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype=float64 needs jax_enable_x64: jax.config.update('jax_enable_x64', True)")
    return dtype


_ALIGNMENT = 64  # bytes: JAX's CPU backend uses a NumPy buffer in place when it is aligned to this


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised NumPy array that ``fit`` uses in place, without a copy, on a CPU backend.

    JAX aliases host memory aligned to 64 bytes instead of copying it; NumPy's own allocations are
    usually only 16-byte aligned. Fill the array, then pass it (in the fit's dtype) to ``fit``: the
    data is then held once, not twice.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


_pack_narrow = jax.jit(pack_narrow, static_argnums=1)


def _to_device(x, dtype):
    """A block on the default device, held in ``dtype``, copied at most once: a JAX array of that
    dtype as it is, an aligned NumPy array of that dtype aliased on a CPU backend, any other NumPy
    array converted straight into an aligned buffer (so the conversion is the copy). A 16-bit
    ``dtype`` gives a ``NarrowBlock``."""
    narrow = jnp.dtype(dtype).itemsize == 2
    if isinstance(x, jax.Array):
        return _pack_narrow(x, jnp.dtype(dtype)) if narrow else x.astype(dtype)
    x = np.asarray(x)
    if x.dtype != dtype or x.ctypes.data % _ALIGNMENT:
        converted = aligned_empty(x.shape, dtype)
        np.copyto(converted, x, casting="unsafe")
        x = converted
    if narrow:
        return NarrowBlock(jax.device_put(x.view(np.uint16)), jnp.dtype(dtype))
    return jax.device_put(x)


def _check_block_dtype(block_dtype, dtype) -> jnp.dtype:
    if block_dtype is None:
        return dtype
    block_dtype = jnp.dtype(block_dtype)
    floats = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)
    if block_dtype not in floats or block_dtype.itemsize > dtype.itemsize:
        raise ValueError(f"block_dtype must be a floating dtype no wider than dtype={dtype} "
                         f"(bfloat16, float16, float32), got {block_dtype}")
    return block_dtype


@jax.jit
def _with_statistics_restarts(blocks, states, params):
    return jax.vmap(with_statistics, in_axes=(None, 0, None))(blocks, states, params)


class _Interrupted:
    """Set by the first SIGINT while ``fit`` iterates; true once set."""

    def __init__(self):
        self.flag = False

    def __bool__(self):
        return self.flag


@contextlib.contextmanager
def _deferred_interrupt():
    """While ``fit`` iterates in the main thread, a first Ctrl-C (SIGINT) is deferred to the end of the
    running chunk of iterations (``yield``s a flag that turns true); the handler before it is then put
    back, so a second Ctrl-C interrupts at once. Elsewhere (other threads), nothing changes."""
    flag = _Interrupted()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag.flag = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        if signal.getsignal(signal.SIGINT) is handler:
            signal.signal(signal.SIGINT, previous)


def fit(blocks, rank: int, *, key: jax.Array, max_iter: int = 200, tol: float = 1e-4, init: Any = "nndsvda",
        n_restarts: int = 1, l2_F: float = 0.0, l2: Any = 0.0, l1_F: float = 0.0, l1: Any = 0.0,
        unit_columns: bool = False, block_weights: Any = "none", group_F: float = 0.0, example_groups=None,
        dtype=jnp.float32, check_every: int = 10, progress: bool = False, solver: str = "mu",
        one_pass: bool | None = None, block_dtype=None, penalty_units: str = "relative",
        checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100, signed=None) -> NMFResult:
    """Coupled NMF of blocks X_b ~ W_b F with one shared example factor F (paper Eq. 3.1, 3.2).

    Minimises J = sum_b w_b ||X_b - W_b F||^2 + l2_F ||F||^2 + sum_b l2_b ||W_b||^2
    + 2 l1_F sum(F) + 2 sum_b l1_b sum(W_b) + 2 sum_{k,g} group_F_g ||F[k, g]||_2 over non-negative
    factors by multiplicative updates (``solver="mu"``, the paper's Eq. 3.2) or HALS
    (``solver="hals"``, exact coordinate minimisation over rows of F and columns of the W_b), F
    first, then every W_b, run under ``lax.scan``. The penalties in J are the raw values that
    ``penalty_units`` maps the arguments to.

    Penalty units. With S = sum_b w_b ||X_b||^2 (J of the all-zero fit), S_b = w_b ||X_b||^2,
    M_b the rows of block b, N the examples, |g| the examples in group g (N for whole rows):

    - ``penalty_units="relative"`` (default): the same value means the same on any data, whatever
      its scale, rows or examples. The raw values are
          l2_F S / N,  l1_F S / N,  group_F_g = group_F S sqrt(|g|) / N,
          l2_b w_b N,  l1_b w_b ||X_b|| sqrt(N / M_b),
      i.e. J / S = sum_b (w_b / S) ||X_b - W_b F||^2 + l2_F mean_n ||F[:, n]||^2
          + 2 l1_F mean_n sum_k F[k, n] + 2 group_F sum_{k,g} (sqrt(|g|) / N) ||F[k, g]||
          + sum_b (S_b / S) (l2_b mean_i ||V_b[i]||^2 + 2 l1_b mean_i sum(V_b[i])),
      V_b = W_b / rms(X_b), rms(X_b) = ||X_b|| / sqrt(M_b N): every penalty is a share of S, F in
      units of one per entry and W_b in units of the block's root-mean-square entry. Multiplying
      the data by any factor (or repeating examples or rows) leaves the minimisers' F unchanged.
      Groups get the group-lasso weight sqrt(|g|), so a large group is not cheaper per example
      than a small one.
    - ``"raw"``: the values as given, one weight for every group (J exactly as above with
      group_F_g = group_F; the authors' variant ``l2_F=1, l1_F=1, unit_columns=True`` is raw).

    ``result.settings.raw_penalties`` holds the raw values used (l2, l1 per block, l2_F, l1_F,
    group_F per group). Before iterating, each component k of the initialisation is rescaled,
    F_k -> c_k F_k, W_b[:, k] -> W_b[:, k] / c_k, with c_k minimising the penalties (``W b F`` and
    the fit term unchanged; ``_init.balance``), except with ``unit_columns``.

    Args:
      blocks: sequence or mapping of non-negative 2-D arrays (rows_b, N), same N. The result
        keeps the container and names. JAX arrays of ``dtype`` are used as they are, and so are
        NumPy arrays of ``dtype`` from ``aligned_empty`` on a CPU backend; any other array is
        copied to the device once.
      rank: d, the number of latent factors.
      key: a ``jax.random`` key (random init, restarts, randomised SVD).
      max_iter: iteration limit. tol: stop when J decreased by less than ``tol`` (relative) over
        the last ``check_every`` iterations; ``tol=0`` runs exactly ``max_iter`` iterations.
      init: "nndsvda" (NNDSVD with its zeros filled by sqrt(mean / rank) of the weighted, scaled
        data: MU cannot move exact zeros; HALS can),
        "nndsvd", "random", or explicit ``(F0, factors0)`` in the container of ``blocks``.
      n_restarts: restarts from ``jax.random.split(key, n_restarts)`` (random init only), run
        together under ``vmap``; the one with the lowest final J is returned.
      l2_F, l1_F, l2, l1: penalties (``l2``/``l1`` one number or one per block), in
        ``penalty_units``. The authors' code is ``l2_F=1, l1_F=1, unit_columns=True``, raw.
      unit_columns: rescale every column of every W_b to unit L2 norm after each update, F
        untouched (authors' code; J may then rise).
      block_weights: "none" (paper), "frobenius" (w_b = 1 / ||X_b||_F^2) or explicit weights.
      group_F, example_groups: group-sparse penalty on F; groups are the rows of F (whole factors
        switch off) when ``example_groups`` is None, else (factor x example group) with
        ``example_groups`` (N,) ints, e.g. the network's predicted class. The penalty only bites
        when W is bounded (``l2 > 0`` or ``unit_columns``): otherwise F / c, c W escapes it.
      dtype: float32 (default) or float64 (needs ``jax_enable_x64``): the factors and all arithmetic.
      block_dtype: the dtype the blocks are held in on the device, ``dtype`` when None;
        ``jnp.bfloat16`` halves the data's memory (and traffic) for 3 significant digits per
        entry: the fit is then exactly that of the rounded data, computed in ``dtype``. Needs
        ``one_pass``.
      one_pass: read the data once per iteration instead of twice (``jaxnmf._one_pass``): the
        same iterates up to rounding. None: on for a 16-bit ``block_dtype`` (each tile is then
        converted in cache, never a whole block), off otherwise (on this project's 2-core CPU it
        is no faster; see benchmarks/README.md).
      progress: show a progress bar.
      solver: "mu" (multiplicative updates, the paper) or "hals" (same objective and options,
        usually far fewer iterations to a given J; see ``jaxnmf._hals``). Both never increase J
        (except with ``unit_columns``).
      penalty_units: "relative" (default) or "raw": the units of l2_F, l1_F, l2, l1 and group_F
        (see above).
      checkpoint: a file (``.npz``) where the loop's state is saved, atomically, after the first
        chunk of iterations that ends ``checkpoint_every`` or more iterations after the last save,
        and at the end. A fit started again with the same data and options resumes from it
        (bit-identical on a CPU to a fit never stopped; a finished fit returns at once); a
        checkpoint of other data or options is refused with a ValueError (``jaxnmf._checkpoint``).
      checkpoint_every: iterations between checkpoints (rounded up to whole chunks of ~50).
      signed: None, or the keys of blocks whose W_b is unconstrained (semi-NMF; names of a mapping,
        positions of a sequence): such a block may hold negative data (e.g. mean-centred pixels, so
        that a concept can say "red, not green"), its W_b is set to its exact least-squares
        minimiser at every step, and F (still >= 0) takes the semi-NMF update of Ding, Li & Jordan
        under MU (``jaxnmf._mu``; HALS's F update is exact as it is). l1 must be 0 on a signed block.

    Returns:
      ``NMFResult``, its ``settings`` a ``FitSettings``. When no factor is active
      (``result.collapsed``) a ``RuntimeWarning`` is issued and ``converged`` is False.

    Interrupting: a Ctrl-C (SIGINT) while ``fit`` iterates (called from the main thread) stops it at
    the end of the running chunk of about 50 iterations; ``fit`` then returns the state reached with
    ``converged=False``, ``settings.interrupted_at`` the iteration, and a ``RuntimeWarning``. A
    second Ctrl-C raises ``KeyboardInterrupt`` as usual.

    Corner cases: with ``solver="mu"`` an explicit ``init`` whose F0 (or every W0_b) is all zero is
    refused (MU never moves zeros), and components that are zero in it are warned about (they stay
    zero). Data near the dtype's limits is rescaled internally (see ``_Scaling``); a block whose
    weight is below rounding against the others' is warned about and fitted to F alone.
    """
    key = P.check_key(key)
    progress = P.check_bool(progress, "progress")
    checkpoint_every = P.check_positive_int(checkpoint_every, "checkpoint_every")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a file path or None, got {type(checkpoint).__name__}")
        checkpoint = Path(checkpoint)
        if checkpoint.is_dir():
            raise ValueError(f"checkpoint: {checkpoint} is a folder; give a file name")
    if one_pass is not None:
        one_pass = P.check_bool(one_pass, "one_pass")
    dtype = _check_dtype(dtype)
    block_dtype = _check_block_dtype(block_dtype, dtype)
    if one_pass is None:
        one_pass = block_dtype.itemsize == 2
    elif block_dtype.itemsize == 2 and not one_pass:
        raise ValueError(f"block_dtype={block_dtype} needs one_pass: the two-pass step would convert whole blocks "
                         "to dtype at every iteration")
    bl, stats, st = P.check_fit(blocks, rank, max_iter=max_iter, tol=tol, init=init, n_restarts=n_restarts,
                                l2_F=l2_F, l2=l2, l1_F=l1_F, l1=l1, unit_columns=unit_columns,
                                block_weights=block_weights, group_F=group_F, example_groups=example_groups,
                                check_every=check_every, solver=solver, penalty_units=penalty_units,
                                signed=signed, convert=lambda x: _to_device(x, block_dtype))
    init = st["init"]  # a name, or the explicit (F0, [W0_b])
    n, rows = bl.arrays[0].shape[1], [x.shape[0] for x in bl.arrays]
    settings = FitSettings.resolved(st, dtype=dtype, block_dtype=block_dtype, one_pass=bool(one_pass),
                                    raw_penalties=raw_penalties(st, stats.sq_norm, rows, n))
    rank, max_iter, n_restarts, check_every, tol = (settings.rank, settings.max_iter, settings.n_restarts,
                                                    settings.check_every, settings.tol)
    weights, groups, n_groups = settings.weights, settings.example_groups, settings.n_groups
    raw = settings.raw_penalties

    scaling = _Scaling.of(stats, weights, dtype, rows, n)
    arrays = scaling.blocks(bl.arrays)
    params = scaling.params(weights, raw, raw.group_F, dtype)
    sq_norms = jnp.asarray(stats.sq_norm / scaling.s ** 2, dtype)
    means = stats.mean / scaling.s
    if scaling.floored.any():
        names = [lb for lb, f in zip(bl.labels, scaling.floored) if f]
        warnings.warn(f"block_weights: {', '.join(names)} {'carries' if len(names) == 1 else 'carry'} less than {float(jnp.finfo(dtype).eps) ** 2:.2g} of "
                      f"the weighted objective (w_b max(X_b)^2 against the largest block's) in {dtype}: they do not "
                      "influence F, and each is fitted to F alone. Use block_weights='frobenius' to give every "
                      "block an equal say.", RuntimeWarning, stacklevel=2)
    if isinstance(init, tuple):
        f0, w0 = init
        states = MUState(jnp.asarray(f0, dtype), tuple(jnp.asarray(w / s, dtype) for w, s in zip(w0, scaling.s)))
        states = jax.tree.map(lambda a: a[None], states)
    elif init == "random":
        keys = jax.random.split(key, n_restarts) if n_restarts > 1 else key[None]
        states = jax.vmap(lambda k: init_random(k, n, rows, means, rank, dtype=dtype))(keys)
    else:
        state = init_nndsvd(arrays, np.asarray(params.weights, np.float64), scaling.data_scale, means, rank, key,
                            fill_zeros=init == "nndsvda", dtype=dtype)
        states = jax.tree.map(lambda a: a[None], state)
    groups_j = None if groups is None else jnp.asarray(groups)
    if not settings.unit_columns:
        states = balance(states, params, groups_j, n_groups)

    step_fn = OnePassStep(settings.solver) if one_pass else _STEPS[settings.solver]
    if one_pass:
        states = _with_statistics_restarts(arrays, states, params)
    carry = _initial_carry_restarts(arrays, states, params, groups_j, n_groups=n_groups, exact=tol > 0)
    # chunks of about _CHUNK iterations, a multiple of check_every, that waste little past max_iter
    n_chunks = math.ceil(max_iter / _CHUNK)
    length = check_every * math.ceil(max_iter / (n_chunks * check_every))
    traces, first, saved_at = [], 0, 0
    if checkpoint is not None:
        fingerprint = _checkpoint.fingerprint(
            shapes=[(x.shape, str(x.dtype)) for x in arrays], max=stats.max, sq_norm=stats.sq_norm, mean=stats.mean,
            settings=settings, key=jax.random.key_data(key), layout=(length, n_restarts), init=init)
        resumed = _checkpoint.load(checkpoint, fingerprint, carry)
        if resumed is not None:
            first, carry, trace = resumed
            traces, saved_at = [trace], first
    with _deferred_interrupt() as interrupted, \
            tqdm(total=max_iter, initial=first, desc="coupled NMF", unit="it", disable=not progress,
                 leave=False) as bar:
        for start in range(first, max_iter, length):
            if interrupted:
                break
            carry, losses = _run_restarts(arrays, carry, params, sq_norms, jnp.asarray(tol, dtype), max_iter,
                                          start, groups_j, length=length, check_every=check_every,
                                          unit_columns=settings.unit_columns, n_groups=n_groups,
                                          step_fn=step_fn, exact_checks=tol > 0, signed=settings.signed)
            traces.append(np.asarray(losses, np.float64))
            bar.update(min(length, max_iter - start))
            bar.set_postfix(loss=float(np.min(np.asarray(carry.loss, np.float64)) * scaling.c))
            done = bool(jnp.all(carry.converged | ~carry.finite)) or start + length >= max_iter
            if checkpoint is not None and (done or start + length - saved_at >= checkpoint_every):
                saved_at = start + length
                _checkpoint.save(checkpoint, fingerprint, saved_at if not done else max_iter, carry,
                                 np.concatenate(traces, axis=1))
            if done:
                break

    final = np.asarray(objective_restarts(arrays, carry.state, params, groups_j, n_groups=n_groups), np.float64)
    final = final * scaling.c
    best = int(np.argmin(np.where(np.isfinite(final), final, np.inf)))
    n_iter = int(carry.n_iter[best])
    trace = np.concatenate([t[best] for t in traces])[:n_iter] * scaling.c
    state = jax.tree.map(lambda a: a[best], carry.state)
    rel = np.asarray(relative_errors(arrays, state, params.data_scale, sq_norms), np.float64)
    active = active_factors(state.F, state.factors, np.asarray(params.weights, np.float64),
                            np.asarray(sq_norms, np.float64))
    collapsed = not active.any()
    if interrupted:
        settings = dataclasses.replace(settings, interrupted_at=n_iter)
        warnings.warn(f"fit interrupted (KeyboardInterrupt) at iteration {n_iter} of {max_iter}: the result is the "
                      "state reached then, with converged=False (settings.interrupted_at = the iteration). Press "
                      "Ctrl-C twice to abort instead.", RuntimeWarning, stacklevel=2)
    if collapsed:
        warnings.warn(collapse_message(settings), RuntimeWarning, stacklevel=2)
    if not bool(carry.finite[best]):
        warnings.warn(f"iteration {n_iter + 1} gave a non-finite objective (an overflow or NaN in the updates); the "
                      f"fit stopped there and returns iterate {n_iter}, the last finite one, with finite=False and "
                      "converged=False. Try dtype=float64, smaller penalties, or look for extreme values in the "
                      "blocks.", RuntimeWarning, stacklevel=2)
    return NMFResult(
        F=state.F, loss=float(final[best]), factors=bl.rebuild([w * s for w, s in zip(state.factors, scaling.s)]),
        losses=trace,
        relative_errors=bl.rebuild([float(r) for r in rel]), n_iter=n_iter,
        converged=bool(carry.converged[best]) and not collapsed and not interrupted, finite=bool(carry.finite[best]),
        restart_losses=final, block_weights=bl.rebuild([float(w) for w in weights]), active=active,
        collapsed=collapsed, settings=settings)


def transform(result: NMFResult, new_blocks, *, example_groups=None, max_iter: int = 500,
              tol: float = 1e-5) -> jax.Array:
    """F (rank, N_new) for new examples, the block factors of ``result`` held fixed.

    Solves min_{F >= 0} J(F, W) with the weights and F-penalties of the fit, by multiplicative
    updates of F alone (Eq. 3.2, first line; the semi-NMF rule when the fit had signed blocks); stops when ||F_t - F_{t-10}|| / ||F_{t-10}|| < tol.
    ``new_blocks``: the same blocks (container, names, rows) as the fit, any number of columns.
    ``example_groups``: (N_new,) group of each new example, required when the fit had example
    groups and a group penalty (e.g. the network's predicted class); otherwise ignored.

    l2_F and l1_F are the fit's raw values (``result.settings.raw_penalties``), per entry of F.
    The group penalty keeps the fit's shrinkage per entry: in relative units each group's weight is
    group_F' S sqrt(|g_new|) / N (S and N of the fit, |g_new| the group's size among the new
    examples), so a batch drawn like the fit's examples is shrunk like them whatever its size, and
    the training columns get exactly the fit's weights; in raw units it is group_F as given.
    """
    if not isinstance(result, NMFResult):
        raise TypeError(f"result must be the NMFResult of jaxnmf.fit, got {type(result).__name__}")
    bl = P.as_blocks(new_blocks, "new_blocks")
    fitted = P.as_blocks(result.factors, "result.factors")
    if bl.keys != fitted.keys:
        raise ValueError(f"new_blocks have blocks {list(bl.keys)}, the fit had {list(fitted.keys)}")
    for label, x, w in zip(bl.labels, bl.arrays, fitted.arrays):
        if x.shape[0] != w.shape[0]:
            raise ValueError(f"{label} of new_blocks has {x.shape[0]} rows, the fit had {w.shape[0]}")
    max_iter = P.check_positive_int(max_iter, "max_iter")
    tol = P.scalar(tol, "tol")
    st = result.settings
    n_new = bl.arrays[0].shape[1]
    groups, n_groups, group_F = _transform_groups(st, int(result.F.shape[1]), example_groups, n_new)
    dtype = st.dtype
    bl = bl.map(lambda x: _to_device(x, dtype))
    stats = P.block_stats(bl, st.signed)
    scaling = _Scaling.of(stats, st.weights, dtype, [x.shape[0] for x in bl.arrays], n_new)
    params = scaling.params(st.weights, st.raw_penalties, group_F, dtype)
    arrays = scaling.blocks(bl.arrays)
    factors = tuple(jnp.asarray(w / s, dtype) for w, s in zip(fitted.arrays, scaling.s))
    F0 = jnp.full((st.rank, n_new), float(jnp.mean(result.F)) or 1.0, dtype)
    F, _ = _run_transform(arrays, F0, factors, params, jnp.asarray(tol, dtype),
                          None if groups is None else jnp.asarray(groups), length=max_iter, check_every=10,
                          n_groups=n_groups, signed=any(st.signed))
    return F


def _transform_groups(st: FitSettings, n_fit: int, example_groups, n_new: int):
    """(groups (N_new,) or None, n_groups, group weights (n_groups,)) of ``transform``'s penalty."""
    raw = st.raw_penalties.group_F
    if st.example_groups is None or st.group_F == 0:
        if st.group_F == 0 or st.penalty_units == "raw":
            return None, 1, raw[:1]
        return None, 1, raw * np.sqrt(n_new / n_fit)  # group_F' S sqrt(N_new) / N
    if example_groups is None:
        raise ValueError(f"example_groups: the fit had example groups and group_F={st.group_F}, so transform needs "
                         f"the group of each new example, an (N_new,) = ({n_new},) array of ints in "
                         f"[0, {st.n_groups})")
    given = np.asarray(example_groups)
    if given.shape != (n_new,) or not np.issubdtype(given.dtype, np.integer):
        raise ValueError(f"example_groups must be (N_new,) = ({n_new},) integers, got shape {given.shape} "
                         f"dtype {given.dtype}")
    # the fit's groups keep their indices; a group the fit never saw gets a new one
    labels = np.concatenate([st.group_labels, np.setdiff1d(given, st.group_labels)])
    order = np.argsort(labels)
    groups = order[np.searchsorted(labels, given, sorter=order)].astype(np.int32)
    n_groups = len(labels)
    if st.penalty_units == "raw":
        return groups, n_groups, np.full(n_groups, raw[0])
    fit_sizes = np.bincount(st.example_groups, minlength=st.n_groups)
    unit = raw[fit_sizes > 0][0] / np.sqrt(fit_sizes[fit_sizes > 0][0])  # group_F' S / N, the same for every group
    return groups, n_groups, unit * np.sqrt(np.bincount(groups, minlength=n_groups))


def _check_objective_factors(F, fac: P.Blocks, bl: P.Blocks, signed: tuple[bool, ...] = ()) -> jax.Array:
    """F as a JAX array after checking F (rank, N) and every W_b (rows_b, rank): float32 or float64,
    finite, non-negative (except the W_b of ``signed`` blocks), shapes matching the blocks."""
    dtype = getattr(F, "dtype", None) or np.asarray(F).dtype
    if jnp.dtype(dtype) not in (jnp.float32, jnp.float64):
        raise TypeError(f"F must be float32 or float64 (rank, N), got dtype {dtype}")
    F = jnp.asarray(F)
    n = bl.arrays[0].shape[1]
    if F.ndim != 2 or F.shape[1] != n:
        raise ValueError(f"F must be (rank, N) with N = {n} (the blocks' columns), got shape {F.shape}")
    rank = F.shape[0]
    for label, x, w in zip(fac.labels, bl.arrays, fac.arrays):
        if tuple(w.shape) != (x.shape[0], rank):
            raise ValueError(f"factors: {label} has shape {tuple(w.shape)}, expected (rows, rank) = "
                             f"{(x.shape[0], rank)} (rank from F {F.shape})")
    for b, (name, a) in enumerate([("F", F)] + [(f"factors: {lb}", w) for lb, w in zip(fac.labels, fac.arrays)]):
        a = np.asarray(a)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} must be finite")
        if (a < 0).any() and not (b > 0 and signed and signed[b - 1]):
            raise ValueError(f"{name} must be non-negative" + (" (or a signed block: signed=[...])" if b else ""))
    return F


def objective(blocks, F, factors, *, l2_F: float = 0.0, l2: Any = 0.0, l1_F: float = 0.0, l1: Any = 0.0,
              block_weights: Any = "none", group_F: float = 0.0, example_groups=None,
              penalty_units: str = "relative", signed=None) -> jax.Array:
    """J(F, W) of Eq. 3.1 with penalties (see ``fit``, same arguments, ``penalty_units`` and
    ``signed``), by explicit residuals, in F's dtype.

    F: (rank, N); factors: W_b (rows_b, rank) in the container of ``blocks``.
    """
    bl = P.as_blocks(blocks)
    fac = P.as_blocks(factors, "factors")
    if fac.keys != bl.keys:
        raise ValueError(f"factors have blocks {list(fac.keys)}, blocks have {list(bl.keys)}")
    if not isinstance(penalty_units, str) or penalty_units not in P.PENALTY_UNITS:
        raise ValueError(f"penalty_units must be one of {P.PENALTY_UNITS}, got {penalty_units!r}")
    signed = P.check_signed(signed, bl)
    F = _check_objective_factors(F, fac, bl, signed)
    P.block_stats(bl, signed)  # every block finite, and non-negative unless signed
    arrays = tuple(jnp.asarray(x, F.dtype) for x in bl.arrays)
    sq = np.array([float(jnp.sum(x * x)) for x in arrays])
    if isinstance(block_weights, str) and block_weights == "frobenius":
        weights = np.where(sq > 0, 1.0 / np.where(sq > 0, sq, 1.0), 1.0)
    else:
        weights = P.resolve_block_weights(block_weights, bl, None)
    groups, n_groups = P.check_groups(example_groups, F.shape[1])
    st = dict(weights=weights, l2=P.per_block(l2, bl, "l2"), l1=P.per_block(l1, bl, "l1"), l2_F=P.scalar(l2_F, "l2_F"),
              l1_F=P.scalar(l1_F, "l1_F"), group_F=P.scalar(group_F, "group_F"), example_groups=groups,
              n_groups=n_groups, penalty_units=penalty_units)
    raw = raw_penalties(st, sq, [x.shape[0] for x in arrays], F.shape[1])
    params = make_params(len(arrays), weights=weights, l2=raw.l2, l1=raw.l1, l2_F=raw.l2_F, l1_F=raw.l1_F,
                         group_F=raw.group_F, dtype=F.dtype)
    return _objective(arrays, F, tuple(jnp.asarray(w, F.dtype) for w in fac.arrays), params,
                      None if groups is None else jnp.asarray(groups), n_groups)
