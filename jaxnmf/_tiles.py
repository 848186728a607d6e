"""Reading a data block: 16-bit storage and row tiles.

A block X_b (rows, N) is a JAX array, or a ``NarrowBlock`` (bfloat16 or float16 held as its bit
pattern). Products with a block and explicit residuals are formed over tiles of contiguous rows
(``fold_row_tiles``), so no full-size temporary (or float32 copy of a narrow block) is made.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def dot(a, b):
    """a @ b at the highest precision, accumulated in the wider dtype of the two."""
    return jnp.matmul(a, b, precision=_HIGHEST, preferred_element_type=jnp.promote_types(a.dtype, b.dtype))



@functools.partial(jax.tree_util.register_dataclass, data_fields=["bits"], meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class NarrowBlock:
    """A block (rows, N) held in a 16-bit float dtype (bfloat16, float16), stored as its bit
    pattern ``bits`` (uint16). XLA's CPU backend cannot slice a bfloat16 array: it would convert
    the whole block to float32 first (a full-size copy each call), so tiles are cut from the bits
    and converted one by one (``row_slice``, ``fold_row_tiles``)."""

    bits: jax.Array
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    def astype(self, dtype) -> jax.Array:
        """The values as ``dtype``: a full-size array, for tiles and small blocks only."""
        return lax.bitcast_convert_type(self.bits, self.dtype).astype(dtype)


def pack_narrow(x: jax.Array, dtype) -> NarrowBlock:
    """``x`` rounded to the 16-bit float ``dtype``, as a ``NarrowBlock``."""
    return NarrowBlock(lax.bitcast_convert_type(x.astype(dtype), jnp.uint16), np.dtype(dtype))


def row_slice(x, start, size: int):
    """Rows [start, start + size) of a block (a JAX array or a ``NarrowBlock``); ``size`` static."""
    if isinstance(x, NarrowBlock):
        return NarrowBlock(lax.dynamic_slice_in_dim(x.bits, start, size), x.dtype)
    return lax.dynamic_slice_in_dim(x, start, size)


TILE_BYTES = 8 << 20  # tiles of the explicit residuals, device statistics and narrow-block products: 8 MB was
#                       as fast as 32 MB on the paper-like case, with a quarter of the temporaries


def tile_rows(x, itemsize: int, tile_bytes: int = TILE_BYTES) -> int:
    """Rows per tile of block x (rows, N) so that a tile of ``itemsize``-byte entries is about ``tile_bytes``."""
    return int(max(1, min(x.shape[0], tile_bytes // (itemsize * x.shape[1]))))


def fold_row_tiles(x, tile: int, fn, init):
    """acc = fn(start, rows [start, start + size) of x, acc) over the row tiles of block x, in order.

    Full tiles run under ``fori_loop`` (one compiled body), the last, shorter tile after it; the
    tile passed to ``fn`` has the block's type (convert it with ``.astype``)."""
    rows = x.shape[0]
    n_full = rows // tile
    acc = lax.fori_loop(0, n_full, lambda i, acc: fn(i * tile, row_slice(x, i * tile, tile), acc), init)
    if n_full * tile < rows:
        acc = fn(n_full * tile, row_slice(x, n_full * tile, rows - n_full * tile), acc)
    return acc



def times(x, M: jax.Array) -> jax.Array:
    """X M (rows, k) for a block X (rows, N); a ``NarrowBlock`` tile by tile (no full-size copy)."""
    if not isinstance(x, NarrowBlock):
        return dot(x.astype(M.dtype), M)
    tile = tile_rows(x, M.dtype.itemsize)
    out = jnp.zeros((x.shape[0], M.shape[1]), M.dtype)
    return fold_row_tiles(x, tile, lambda start, x_t, out: lax.dynamic_update_slice_in_dim(
        out, dot(x_t.astype(M.dtype), M), start, 0), out)


def t_times(x, Q: jax.Array) -> jax.Array:
    """X^T Q (N, k) for a block X (rows, N) and Q (rows, k); a ``NarrowBlock`` tile by tile."""
    if not isinstance(x, NarrowBlock):
        return dot(x.astype(Q.dtype).T, Q)
    tile = tile_rows(x, Q.dtype.itemsize)
    return fold_row_tiles(x, tile, lambda start, x_t, acc: acc + dot(
        x_t.astype(Q.dtype).T, lax.dynamic_slice_in_dim(Q, start, x_t.shape[0])),
        jnp.zeros((x.shape[1], Q.shape[1]), Q.dtype))

