"""The group-sparsity path: one fit per value of ``group_F``, each started from the previous one.

The group penalty 2 group_F sum_k ||F[k, :]|| switches whole factors off as group_F grows; a
path from small values upwards shows where each factor switches off and what that costs in fit,
so that a value can be chosen by looking (``PathPoint.n_active``, ``relative_errors``). Each fit
after the first starts from the factors of the one before (a warm start): a factor switched off
stays off, so the number of active factors never rises along the path.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from ._fit import NMFResult, fit

__all__ = ["PathPoint", "group_sparsity_path"]


@dataclass(frozen=True)
class PathPoint:
    """One value of the path: ``group_F`` (in the fit's ``penalty_units``) and its fit."""

    group_F: float
    result: NMFResult

    @property
    def n_active(self) -> int:
        return self.result.n_active


def group_sparsity_path(blocks, rank: int, group_F: Sequence[float], *, key, **fit_options: Any) -> list[PathPoint]:
    """Fits ``blocks`` at each value of ``group_F`` (non-decreasing, >= 0), warm-started.

    The first fit starts as ``fit_options`` say (``init``, ``n_restarts``); each later one from
    the previous fit's (F, W_b), with one restart. Other options (``l2``, ``example_groups``,
    ``solver``, ``max_iter``, ``penalty_units``, ...) are the same for every value; the group
    penalty needs ``l2 > 0`` to bite (see ``fit``). A value that switches every factor off gives a
    point with ``result.collapsed`` True (``fit``'s warning is not repeated for each point).
    Returns one ``PathPoint`` per value, in order.
    """
    values = [float(v) for v in group_F]
    if not values:
        raise ValueError("group_F: give at least one value")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"group_F: every value must be finite and >= 0, got {values}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"group_F: the path must be non-decreasing (warm starts go from weak to strong), got {values}")
    if "group_F" in fit_options:
        raise ValueError("group_F: give the path as the third argument, not as a fit option")
    points: list[PathPoint] = []
    options = dict(fit_options)
    for value in values:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="every factor is zero", category=RuntimeWarning)
            # the warm start keeps the factors the previous point switched off: zero, on purpose
            warnings.filterwarnings("ignore", message="init: components", category=RuntimeWarning)
            result = fit(blocks, rank, key=key, group_F=value, **options)
        points.append(PathPoint(value, result))
        options.update(init=(result.F, result.factors), n_restarts=1)
    return points
