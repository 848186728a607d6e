"""Benchmark cases: shapes of the coupled problem, synthetic data, shared initial factors, flop counts.

A case is a list of blocks X_b (rows_b, N) like the paper's: three pixel blocks (one per colour
channel, H*W rows) and activation blocks of ResNet-18 layers for 32x32 inputs (stage3 is
256 x 8 x 8 = 16384 neurons, stage4 512 x 4 x 4 = 8192, the pooled features 512).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jaxnmf

TRUE_RANK = 30  # rank of the synthetic data's signal (ranks 10 and 20 under-fit it, 50 over-fits)
_CHUNK_BYTES = 32 << 20  # blocks are generated in row chunks of about this size


@dataclass(frozen=True)
class Case:
    """Shapes of one coupled problem: ``blocks`` are (name, rows) pairs, ``n`` the examples N."""

    name: str
    n: int
    blocks: tuple[tuple[str, int], ...]
    description: str

    @property
    def rows(self) -> list[int]:
        return [r for _, r in self.blocks]

    @property
    def nbytes(self) -> int:
        """Size of the data in float32."""
        return 4 * sum(self.rows) * self.n

    @property
    def single_block(self) -> str:
        """The largest block: the single-block case (and scikit-learn's problem)."""
        return max(self.blocks, key=lambda b: b[1])[0]


def _pixels(side: int) -> tuple[tuple[str, int], ...]:
    return tuple((f"pixels_{c}", side * side) for c in "rgb")


CASES = {
    "tiny": Case("tiny", 300, _pixels(4) + (("stage3", 128), ("stage4", 64), ("pool", 8)),
                 "smoke-test size"),
    "small": Case("small", 2000, _pixels(16) + (("stage3", 2048), ("stage4", 1024), ("pool", 64)),
                  "the paper-like case scaled down"),
    "paper": Case("paper", 10000, _pixels(32) + (("stage3", 16384), ("stage4", 8192), ("pool", 512)),
                  "paper-like: CIFAR pixels + ResNet-18 stage3, stage4 and pooled features, d=20, N=10000"),
    "resnet18": Case("resnet18", 10000, _pixels(32) + (("stage1", 65536), ("stage2", 32768), ("stage3", 16384),
                                                        ("stage4", 8192)),
                     "CIFAR pixels + all four ResNet-18 stages, N=10000"),
}


def make_blocks(case: Case, seed: int = 0, *, dtype=np.float32, aligned: bool = False) -> dict[str, np.ndarray]:
    """Synthetic non-negative blocks: X_b = W_b G + noise, G (TRUE_RANK, N) shared.

    W_b is sparse (70% zeros, like silent neurons), G and W_b exponential (the signal's entries
    average about 9), the noise uniform in [0, 1). Computed in float32 row chunks and written into
    the final arrays of ``dtype`` (``jnp.bfloat16`` rounds), so that building the data needs no
    more memory than the data. ``aligned``: allocate with ``jaxnmf.aligned_empty`` (``fit`` then
    uses the arrays in place on a CPU). The same seed gives the same data in every process.
    """
    rng = np.random.default_rng(seed)
    g = rng.exponential(size=(TRUE_RANK, case.n)).astype(np.float32)
    chunk = max(1, _CHUNK_BYTES // (4 * case.n))
    blocks = {}
    for name, rows in case.blocks:
        w = (rng.exponential(size=(rows, TRUE_RANK)) * (rng.random((rows, TRUE_RANK)) < 0.3)).astype(np.float32)
        x = jaxnmf.aligned_empty((rows, case.n), dtype) if aligned else np.empty((rows, case.n), dtype)
        for start in range(0, rows, chunk):
            part = w[start:start + chunk] @ g
            part += rng.random(part.shape, dtype=np.float32)
            x[start:start + chunk] = part
        blocks[name] = x
    return blocks


def to_device(blocks: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Move the blocks to the default device one at a time, releasing each host array as it goes
    (the caller's dict is emptied), so that the data is never held twice in full."""
    out = {}
    for name in list(blocks):
        out[name] = jax.block_until_ready(jnp.asarray(blocks.pop(name)))
    return out


def host_views(blocks: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """NumPy arrays of device blocks for the NumPy solvers: views without a copy on the CPU
    (read-only), a host copy on an accelerator."""
    return {name: np.asarray(x) for name, x in blocks.items()}


def init_factors(blocks: dict[str, np.ndarray], rank: int, seed: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """Initial factors every solver starts from: F0 (rank, N), W0_b (rows_b, rank), float32.

    scikit-learn's random rule per block: sqrt(mean / rank) |N(0, 1)| (the mean of all the data
    for F0)."""
    rng = np.random.default_rng((seed, rank))
    means = {name: float(x.mean(dtype=np.float64)) for name, x in blocks.items()}
    n = next(iter(blocks.values())).shape[1]
    total = sum(means[k] * x.size for k, x in blocks.items()) / sum(x.size for x in blocks.values())
    F0 = (np.sqrt(total / rank) * np.abs(rng.standard_normal((rank, n)))).astype(np.float32)
    W0 = [(np.sqrt(means[k] / rank) * np.abs(rng.standard_normal((x.shape[0], rank)))).astype(np.float32)
          for k, x in blocks.items()]
    return F0, W0


def mu_flops(rows: list[int], n: int, rank: int) -> float:
    """Floating-point operations of the products of one MU step: W_b^T X_b and X_b F^T
    (4 R d N, the floor), W^T W F and W F F^T (4 d^2 N + 4 R d^2); elementwise work is not
    counted. HALS forms the same products."""
    r = sum(rows)
    return 4.0 * r * rank * n + 4.0 * rank * rank * n + 4.0 * r * rank * rank


def floor_flops(rows: list[int], n: int, rank: int) -> float:
    """Operations of the two unavoidable products, sum_b W_b^T X_b and X_b F^T for every b."""
    return 4.0 * sum(rows) * rank * n


def bytes_read(rows: list[int], n: int) -> int:
    """Bytes of data one step reads: the data twice (one pass per product), float32."""
    return 2 * 4 * sum(rows) * n
