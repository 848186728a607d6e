"""``FitSettings``: the resolved options of a fit, as ``NMFResult.settings`` holds them.

A frozen dataclass, one typed field per option, that also reads as a read-only mapping of field
names to values (``settings.solver == settings["solver"]``; ``dict(settings)``, ``**settings``,
``settings.get``), so code written for the former dict keeps working. Arrays are held read-only and
``dataclasses.replace`` gives a changed copy.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["FitSettings", "RawPenalties"]


def _frozen(value) -> np.ndarray:
    """A read-only copy of ``value`` as a NumPy array (its dtype kept)."""
    a = np.array(value)
    a.flags.writeable = False
    return a


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b))
    return a == b


class _Record(Mapping):
    """A frozen dataclass read as a mapping from its field names to their values; equal to another of
    its type when every field is (arrays: same dtype and entries)."""

    def __getitem__(self, name: str) -> Any:
        if not isinstance(name, str) or name not in self.__dataclass_fields__:
            raise KeyError(f"{name!r} is not a field of {type(self).__name__} (fields: {', '.join(self)})")
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in dataclasses.fields(self))

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_equal(self[k], other[k]) for k in self)


@dataclass(frozen=True, eq=False)
class RawPenalties(_Record):
    """The penalties of J in raw units (Eq. 3.1), as the fit used them (``fit``'s ``penalty_units``).

    Fields:
      l2: (B,) float64, l2_b, the weight of ||W_b||^2 per block.
      l1: (B,) float64, l1_b, of 2 sum(W_b) per block.
      l2_F: float, of ||F||^2. l1_F: float, of 2 sum(F).
      group_F: (n_groups,) float64, group_F_g, of 2 sum_k ||F[k, g]||_2 per example group (one entry
        when the groups are the rows of F).

    Built from a mapping of these names (``RawPenalties(**raw)``); arrays are held read-only.
    """

    l2: np.ndarray
    l1: np.ndarray
    l2_F: float
    l1_F: float
    group_F: np.ndarray

    def __post_init__(self):
        for name in ("l2", "l1", "group_F"):
            object.__setattr__(self, name, _frozen(np.asarray(getattr(self, name), np.float64)))
        for name in ("l2_F", "l1_F"):
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True, eq=False)
class FitSettings(_Record):
    """The resolved options of a fit (``NMFResult.settings``): what ran, and what ``transform`` needs.

    B is the number of blocks, N the number of examples of the fit.

    Fields:
      rank: d, the number of factors. max_iter: the iteration limit. n_restarts: restarts run.
      check_every: iterations between convergence checks. tol: the relative decrease of J below
        which the fit stopped (0: ran ``max_iter``).
      solver: "mu" or "hals".
      init: "nndsvda", "nndsvd", "random", or "explicit" (factors given by the caller).
      dtype: the factors' and the arithmetic's dtype (float32 or float64).
      block_dtype: the dtype the blocks were held in on the device (``dtype`` unless 16-bit).
      one_pass: the one-pass step ran (``jaxnmf._one_pass``).
      weights: (B,) float64, w_b of sum_b w_b ||X_b - W_b F||^2.
      penalty_units: "relative" or "raw": the units of l2, l1, l2_F, l1_F and group_F below.
      l2, l1: (B,) float64, the per-block penalties as given. l2_F, l1_F, group_F: floats, the
        F-penalties and the group penalty as given.
      example_groups: (N,) int32, the group index in [0, n_groups) of every example, or None (the
        groups are the rows of F). n_groups: the number of groups (1 without example groups).
      group_labels: (n_groups,) the user's group of each index (ints, sorted), or None.
      unit_columns: every column of every W_b was rescaled to unit norm after each update.
      raw_penalties: ``RawPenalties``, the penalties in Eq. 3.1's raw units that the fit used.
      signed: (B,) bools, True for a block whose W_b is unconstrained (semi-NMF), or () when no
        block is signed (also in fits saved before signed blocks existed).
      interrupted_at: the iteration a Ctrl-C stopped the fit at, or None.
      streamed: the fit read its blocks from disk (``fit_streamed``).
      tile_bytes: bytes of stored data per tile of a streamed fit, or None.

    Arrays are read-only copies; ``signed`` becomes a tuple of bools, the dtypes ``numpy.dtype``s and
    a mapping given as ``raw_penalties`` a ``RawPenalties``, so a saved fit's JSON builds it as is.
    """

    rank: int
    max_iter: int
    n_restarts: int
    check_every: int
    tol: float
    solver: str
    init: str
    dtype: np.dtype
    block_dtype: np.dtype
    one_pass: bool
    weights: np.ndarray
    penalty_units: str
    l2: np.ndarray
    l1: np.ndarray
    l2_F: float
    l1_F: float
    group_F: float
    example_groups: np.ndarray | None
    n_groups: int
    group_labels: np.ndarray | None
    unit_columns: bool
    raw_penalties: RawPenalties
    signed: tuple[bool, ...] = ()
    interrupted_at: int | None = None
    streamed: bool = False
    tile_bytes: int | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # frozen: only here
        for name in ("weights", "l2", "l1"):
            set_(name, _frozen(np.asarray(getattr(self, name), np.float64)))
        for name in ("example_groups", "group_labels"):
            value = getattr(self, name)
            set_(name, None if value is None else _frozen(value))
        for name in ("dtype", "block_dtype"):
            set_(name, jnp.dtype(getattr(self, name)))
        set_("signed", tuple(bool(v) for v in self.signed))
        if not isinstance(self.raw_penalties, RawPenalties):
            set_("raw_penalties", RawPenalties(**self.raw_penalties))

    @classmethod
    def resolved(cls, checked: Mapping, **options: Any) -> "FitSettings":
        """The settings of a fit from ``_problem.check_fit``'s resolved options ``checked`` (an explicit
        ``(F0, factors0)`` init recorded as "explicit") and the fields the fit adds (``options``:
        dtype, block_dtype, one_pass, raw_penalties, ...)."""
        init = checked["init"]
        return cls(**{**checked, "init": init if isinstance(init, str) else "explicit", **options})
