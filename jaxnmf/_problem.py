"""Boundary code shared by the JAX solver and the NumPy reference.

Everything a user passes to ``fit`` is checked here, once, before any numerical work:
the jitted core and the reference only ever see clean arrays and resolved settings.
Errors name the block or the argument and say what is wrong.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._tiles import NarrowBlock, fold_row_tiles, tile_rows

INITS = ("random", "nndsvd", "nndsvda")
BLOCK_WEIGHTS = ("none", "frobenius")
_STAT_CHUNK_BYTES = 64 << 20  # NumPy rows are scanned in float64 chunks of about this size


@dataclass(frozen=True)
class Blocks:
    """The user's blocks, flattened to a tuple, with what is needed to rebuild the container.

    ``keys`` are the mapping keys (or positions for a sequence); ``labels`` are the names
    used in messages ("block 'stage3'" or "block 2").
    """

    keys: tuple
    arrays: tuple
    is_mapping: bool
    container: type

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(f"block {k!r}" if self.is_mapping else f"block {k}" for k in self.keys)

    def map(self, fn) -> "Blocks":
        """The same blocks with ``fn`` applied to every array."""
        return dataclasses.replace(self, arrays=tuple(fn(x) for x in self.arrays))

    def rebuild(self, values: Sequence) -> Any:
        """Put one value per block back into the user's container type."""
        values = list(values)
        if self.is_mapping:
            return dict(zip(self.keys, values))
        return self.container(values) if self.container in (list, tuple) else values


@dataclass(frozen=True)
class BlockStats:
    """Per-block statistics computed in float64 in one pass over each block."""

    max: np.ndarray  # (B,) the largest |entry|
    sq_norm: np.ndarray  # (B,) ||X_b||_F^2
    mean: np.ndarray  # (B,) the mean entry; for a signed block the root-mean-square entry (a positive scale)


def as_blocks(blocks: Any, arg: str = "blocks") -> Blocks:
    """Flatten a sequence or mapping of 2-D arrays; check container, rank and N."""
    if isinstance(blocks, Mapping):
        keys, arrays, is_mapping = tuple(blocks.keys()), tuple(blocks.values()), True
    elif isinstance(blocks, Sequence) and not isinstance(blocks, (str, bytes)):
        keys, arrays, is_mapping = tuple(range(len(blocks))), tuple(blocks), False
    else:
        raise TypeError(f"{arg} must be a sequence or a mapping of 2-D arrays, got {type(blocks).__name__}")
    if not arrays:
        raise ValueError(f"{arg} is empty: give at least one 2-D array")
    out = Blocks(keys, arrays, is_mapping, type(blocks))
    checked = []
    for label, x in zip(out.labels, arrays):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        if len(x.shape) != 2:
            raise ValueError(f"{label} must be 2-D (rows, N), got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{label} is empty: shape {tuple(x.shape)}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
                or x.dtype == np.bool_ or "bfloat16" in str(x.dtype)):
            raise TypeError(f"{label} has non-numeric dtype {x.dtype}")
        checked.append(x)
    n = checked[0].shape[1]
    for label, x in zip(out.labels, checked):
        if x.shape[1] != n:
            raise ValueError(
                f"{label} has {x.shape[1]} columns but {out.labels[0]} has {n}: "
                "every block needs one column per example (same N)")
    return Blocks(keys, tuple(checked), is_mapping, type(blocks))


def _numpy_stats(x: np.ndarray, label: str) -> tuple[float, float, float, float]:
    """(min, max, sum of squares, sum) of a NumPy array in float64, in row chunks of about
    ``_STAT_CHUNK_BYTES`` so that no full-size temporary is made (memory-mapped arrays too)."""
    rows, n = x.shape
    step = max(1, _STAT_CHUNK_BYTES // max(1, n * 8))
    lo, hi, sq, tot = np.inf, -np.inf, 0.0, 0.0
    for r in range(0, rows, step):
        c = np.asarray(x[r:r + step], dtype=np.float64)
        if not np.isfinite(c).all():
            raise ValueError(f"{label} contains NaN or Inf")
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
        sq += float(np.einsum("ij,ij->", c, c))
        tot += float(c.sum())
    return lo, hi, sq, tot


@jax.jit
def _device_row_stats(x):
    """Two passes over a block on its device (a JAX array or a ``NarrowBlock``), in row tiles:
    (all finite, min, max, per-row sums of (x / max)^2 (rows,), per-row sums of x / max (rows,)),
    in float32 or wider. Dividing by the largest entry keeps the squares of any finite data in
    range (1e-30 squared underflows float32)."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    tile = tile_rows(x, dtype.itemsize)

    def extremes(start, x_t, acc):
        x_t = x_t.astype(dtype)
        return acc[0] & jnp.isfinite(x_t).all(), jnp.minimum(acc[1], x_t.min()), jnp.maximum(acc[2], x_t.max())

    finite, lo, hi = fold_row_tiles(x, tile, extremes, (jnp.array(True), jnp.array(jnp.inf, dtype),
                                                        jnp.array(-jnp.inf, dtype)))
    scale = jnp.where(hi > 0, hi, 1)
    # XLA's CPU code divides by multiplying with the reciprocal, which flushes to 0 once it is subnormal
    # (scale > 1 / tiny, near the dtype's maximum): such a scale is divided out in two halves
    big, root = scale > 1 / (4 * jnp.finfo(dtype).tiny), jnp.sqrt(scale)

    def sums(start, x_t, acc):
        x_t = x_t.astype(dtype)
        y = jnp.where(big, lax.optimization_barrier(x_t / root) / root, x_t / scale)  # barrier: XLA would fold it back
        return tuple(lax.dynamic_update_slice_in_dim(a, v, start, 0)
                     for a, v in zip(acc, (jnp.sum(y * y, axis=1), jnp.sum(y, axis=1))))

    sq, tot = fold_row_tiles(x, tile, sums, (jnp.zeros(x.shape[0], dtype), jnp.zeros(x.shape[0], dtype)))
    return finite, lo, hi, sq, tot


def _device_stats(x: jax.Array, label: str) -> tuple[float, float, float, float]:
    """(min, max, sum of squares, sum) of a JAX array without moving it to the host: row sums on
    the device in the array's precision (float32 at least), their totals in float64 here."""
    finite, lo, hi, sq, tot = jax.device_get(_device_row_stats(x))
    if not finite:
        raise ValueError(f"{label} contains NaN or Inf")
    scale = float(hi) if hi > 0 else 1.0
    return (float(lo), float(hi), float(np.sum(sq, dtype=np.float64)) * scale ** 2,
            float(np.sum(tot, dtype=np.float64)) * scale)


def block_stats(blocks: Blocks, signed: tuple[bool, ...] = ()) -> BlockStats:
    """Check each block is finite and non-negative (a ``signed`` block may be negative); return the
    largest |entry|, squared norm and mean (root-mean-square for a signed block).

    NumPy arrays (memory-mapped too) are read in float64 row chunks; JAX arrays and
    ``NarrowBlock``s are reduced on their device in row tiles (rows in float32 or the array's
    wider dtype, the totals in float64).
    """
    maxs, sq, means = [], [], []
    for b, (label, x) in enumerate(zip(blocks.labels, blocks.arrays)):
        lo, hi, s, tot = (_device_stats if isinstance(x, (jax.Array, NarrowBlock)) else _numpy_stats)(x, label)
        size = x.shape[0] * x.shape[1]
        if signed and signed[b]:
            maxs.append(max(hi, -lo)), sq.append(s), means.append(float(np.sqrt(s / size)))
            continue
        if lo < 0:
            raise ValueError(f"{label} has negative entries (min {lo:.3g}); NMF needs non-negative data "
                             "(or mark the block signed: fit(..., signed=[...]) lets its factor take both signs)")
        maxs.append(hi), sq.append(s), means.append(tot / size)
    return BlockStats(np.array(maxs), np.array(sq), np.array(means))


def check_signed(signed: Any, blocks: Blocks) -> tuple[bool, ...]:
    """The blocks whose W_b is unconstrained (semi-NMF): None or a collection of block keys (names of a
    mapping, positions of a sequence). Returns (B,) bools, or () when none is signed."""
    if signed is None:
        return ()
    if isinstance(signed, (str, bytes)) or not isinstance(signed, (Sequence, set, frozenset)):
        raise TypeError(f"signed must be None or a list of block keys, e.g. signed=[{blocks.keys[0]!r}], "
                        f"got {signed!r}")
    unknown = [k for k in signed if k not in blocks.keys]
    if unknown:
        raise ValueError(f"signed names {unknown}, which are not blocks; the blocks are {list(blocks.keys)}")
    flags = tuple(k in signed for k in blocks.keys)
    return flags if any(flags) else ()


def _float(value: Any, arg: str) -> float:
    if isinstance(value, (str, bytes)) or np.iscomplexobj(value):
        raise TypeError(f"{arg} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be a real number, got {value!r}") from None


def per_block(value: Any, blocks: Blocks, arg: str, *, positive: bool = False) -> np.ndarray:
    """Resolve a scalar, a sequence (one per block) or a mapping (by block key) to (B,) floats."""
    b = len(blocks.keys)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{arg} must be a number, one per block or a mapping by block, got {value!r}")
    if np.ndim(value) == 0 and not isinstance(value, Mapping):
        vals = np.full(b, _float(value, arg))
    elif isinstance(value, Mapping):
        if set(value.keys()) != set(blocks.keys):
            raise ValueError(f"{arg} has keys {sorted(map(repr, value))} but blocks have {sorted(map(repr, blocks.keys))}")
        vals = np.array([_float(value[k], f"{arg}[{k!r}]") for k in blocks.keys])
    else:
        try:
            vals = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise TypeError(f"{arg} must be a number, one per block or a mapping by block, got {value!r}") from None
        if vals.shape[0] != b:
            raise ValueError(f"{arg} has {vals.shape[0]} values for {b} blocks: give one number or one per block")
    if not np.isfinite(vals).all():
        raise ValueError(f"{arg} must be finite, got {vals}")
    if positive and (vals <= 0).any():
        raise ValueError(f"{arg} must be positive, got {vals}")
    if (vals < 0).any():
        raise ValueError(f"{arg} must be >= 0, got {vals}")
    return vals


def scalar(value: Any, arg: str) -> float:
    v = _float(value, arg)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{arg} must be a finite number >= 0, got {value!r}")
    return v


def resolve_block_weights(block_weights: Any, blocks: Blocks, stats: BlockStats) -> np.ndarray:
    """w_b of the weighted objective sum_b w_b ||X_b - W_b F||^2, shape (B,).

    "none": w_b = 1 (the paper). "frobenius": w_b = 1 / ||X_b||_F^2, i.e. every block scaled
    to unit Frobenius norm (an all-zero block gets w_b = 1: it has nothing to fit).
    Otherwise explicit positive weights, one per block.
    """
    if isinstance(block_weights, str):
        if block_weights == "none":
            return np.ones(len(blocks.keys))
        if block_weights == "frobenius":
            return np.where(stats.sq_norm > 0, 1.0 / np.where(stats.sq_norm > 0, stats.sq_norm, 1.0), 1.0)
        raise ValueError(f"block_weights must be one of {BLOCK_WEIGHTS} or explicit weights, got {block_weights!r}")
    return per_block(block_weights, blocks, "block_weights", positive=True)


def check_rank(rank: Any, blocks: Blocks) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    n = blocks.arrays[0].shape[1]
    rows = sum(x.shape[0] for x in blocks.arrays)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank > min(n, rows):
        raise ValueError(
            f"rank {rank} is larger than the data allows: min(N={n}, total rows={rows}) = {min(n, rows)}")
    return int(rank)


def check_init(init: Any, blocks: Blocks, rank: int, signed: tuple[bool, ...] = ()
               ) -> str | tuple[np.ndarray, list[np.ndarray]]:
    """Return an init name, or explicit (F0 (rank, N), [W0_b (rows_b, rank)]) as float64 arrays
    (W0_b of a ``signed`` block may be negative)."""
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} or explicit factors (F0, W0s), got {init!r}")
        return init
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise TypeError("explicit init must be a pair (F0, factors) with factors in the same container as blocks")
    f0, w0 = init
    n = blocks.arrays[0].shape[1]
    f0 = np.asarray(f0, dtype=np.float64)
    if f0.shape != (rank, n):
        raise ValueError(f"init F0 has shape {f0.shape}, expected (rank, N) = {(rank, n)}")
    if isinstance(w0, Mapping):
        if set(w0.keys()) != set(blocks.keys):
            raise ValueError(f"init factors have keys {sorted(map(repr, w0))}, blocks have {sorted(map(repr, blocks.keys))}")
        w0 = [w0[k] for k in blocks.keys]
    elif len(w0) != len(blocks.keys):
        raise ValueError(f"init has {len(w0)} block factors for {len(blocks.keys)} blocks")
    ws = []
    for label, x, w in zip(blocks.labels, blocks.arrays, w0):
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (x.shape[0], rank):
            raise ValueError(f"init factor of {label} has shape {w.shape}, expected (rows, rank) = {(x.shape[0], rank)}")
        ws.append(w)
    for b, (name, a) in enumerate([("F0", f0)] + [(f"factor of {lb}", w) for lb, w in zip(blocks.labels, ws)]):
        if not np.isfinite(a).all():
            raise ValueError(f"init {name} must be finite")
        if (a < 0).any() and not (b > 0 and signed and signed[b - 1]):
            raise ValueError(f"init {name} must be non-negative")
    return f0, ws


def check_mu_init(init: tuple, blocks: Blocks) -> None:
    """Multiplicative updates never move an exact zero: an explicit init whose F0 (or every W0_b) is
    all zero is refused; a component k whose row F0[k] or whose columns W0_b[:, k] in every block are
    all zero stays zero for ever, which is warned about (it is then inactive in the result)."""
    f0, ws = init
    if not f0.any() or not any(w.any() for w in ws):
        raise ValueError(("init: F0 is all zero" if not f0.any() else "init: every block factor is all zero")
                         + "; multiplicative updates (solver='mu') never move zeros, so nothing would be fitted: "
                           "give positive entries, or use solver='hals', which can")
    dead = [k for k in range(f0.shape[0]) if not f0[k].any() or not any(w[:, k].any() for w in ws)]
    if dead:
        warnings.warn(f"init: components {dead} are zero (a zero row of F0 or zero columns of every W0_b); "
                      "multiplicative updates (solver='mu') keep them zero, so the fit has at most "
                      f"{f0.shape[0] - len(dead)} active factors. Give them positive entries or use solver='hals'.",
                      RuntimeWarning, stacklevel=4)


def check_groups(example_groups: Any, n: int) -> tuple[np.ndarray | None, int]:
    """Example groups for the group-sparse penalty: None (groups = rows of F) or (N,) ints."""
    if example_groups is None:
        return None, 1
    g = np.asarray(example_groups)
    if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"example_groups must be (N,) = ({n},) integers, got shape {g.shape} dtype {g.dtype}")
    if (g < 0).any():
        raise ValueError("example_groups must be >= 0")
    _, inverse = np.unique(g, return_inverse=True)
    return inverse.astype(np.int32), int(inverse.max()) + 1


def check_bool(value: Any, arg: str) -> bool:
    """``value`` as a bool; only True, False (or NumPy bools) are accepted: bool("no") is True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{arg} must be True or False, got {value!r}")
    return bool(value)


def check_key(key: Any, arg: str = "key") -> jax.Array:
    """A ``jax.random`` key: a typed key (``jax.random.key``) or a raw uint32 (2,) one (``PRNGKey``)."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        return key
    if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,):
        return key
    raise TypeError(f"{arg} must be a jax.random key, e.g. jax.random.key(0), got {key!r}")


def check_positive_int(value: Any, arg: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


SOLVERS = ("mu", "hals")
PENALTY_UNITS = ("relative", "raw")


def check_fit(blocks: Any, rank: Any, *, max_iter: Any, tol: Any, init: Any, n_restarts: Any, l2_F: Any, l2: Any,
              l1_F: Any, l1: Any, unit_columns: Any, block_weights: Any, group_F: Any, example_groups: Any,
              check_every: Any, solver: Any, penalty_units: Any, signed: Any = None, convert=None
              ) -> tuple[Blocks, BlockStats, dict]:
    """Check every ``fit`` argument (shared by ``jaxnmf.fit`` and ``jaxnmf.reference.fit``).

    ``convert`` (``fit``: onto the device) is applied to every block after the cheap checks and
    before the statistics, which are then taken from the converted blocks.

    Returns the flattened blocks, their statistics and the resolved settings: rank, max_iter,
    n_restarts, check_every, tol, solver, init (a name or explicit (F0, [W0_b])), weights (B,),
    l2 (B,), l1 (B,), l2_F, l1_F, group_F (as given, in ``penalty_units``), example_groups ((N,)
    ints in [0, n_groups) or None), n_groups, group_labels (the given group of each index, or
    None), unit_columns, penalty_units, signed ((B,) bools, or () when no block is signed), as a
    dict: the fits complete it into their ``FitSettings`` (``FitSettings.resolved``).
    """
    bl = as_blocks(blocks)
    rank = check_rank(rank, bl)
    signed = check_signed(signed, bl)
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(penalty_units, str) or penalty_units not in PENALTY_UNITS:
        raise ValueError(f"penalty_units must be one of {PENALTY_UNITS}, got {penalty_units!r}")
    init = check_init(init, bl, rank, signed)
    if solver == "mu" and isinstance(init, tuple):
        check_mu_init(init, bl)
    n_restarts = check_positive_int(n_restarts, "n_restarts")
    if n_restarts > 1 and not (isinstance(init, str) and init == "random"):
        raise ValueError("n_restarts > 1 needs init='random': NNDSVD and explicit inits are deterministic")
    groups, n_groups = check_groups(example_groups, bl.arrays[0].shape[1])
    settings = dict(
        rank=rank, max_iter=check_positive_int(max_iter, "max_iter"), n_restarts=n_restarts,
        check_every=check_positive_int(check_every, "check_every"), tol=scalar(tol, "tol"), solver=solver,
        init=init, l2=per_block(l2, bl, "l2"), l1=per_block(l1, bl, "l1"), l2_F=scalar(l2_F, "l2_F"),
        l1_F=scalar(l1_F, "l1_F"), group_F=scalar(group_F, "group_F"), example_groups=groups, n_groups=n_groups,
        group_labels=None if groups is None else np.unique(np.asarray(example_groups)),
        unit_columns=check_bool(unit_columns, "unit_columns"), penalty_units=penalty_units, signed=signed)
    l1_signed = [lb for lb, s, v in zip(bl.labels, signed, settings["l1"]) if s and v > 0]
    if l1_signed:
        raise ValueError(f"l1: {', '.join(l1_signed)} is signed, and the l1 penalty 2 l1 sum(W_b) is only a norm of a "
                         "non-negative W_b: give l1=0 for signed blocks (l2 is allowed)")
    if convert is not None:
        bl = bl.map(convert)
    stats = block_stats(bl, signed)
    settings["weights"] = resolve_block_weights(block_weights, bl, stats)
    return bl, stats, settings
