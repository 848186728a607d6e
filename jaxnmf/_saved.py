"""A fit on disk: `save_fit` writes an `NMFResult` to one ``.npz`` file, `load_fit` reads it back, so
that ``jaxnmf.transform(load_fit(path), new_blocks)`` explains new data in another process.

Format (version 1), one NumPy ``.npz`` archive, no pickled objects:

- ``meta``: a JSON string: ``{"format": "jaxnmf.fit", "version": 1, "container": "dict" | "list" |
  "tuple", "keys": [block names or positions], "rows": [rows_b], "dtype": "float32" | "float64",
  "loss", "n_iter", "converged", "finite", "collapsed", "relative_errors": [per block],
  "block_weights": [per block], "settings": {...}}``. ``settings`` holds the fields of the fit's
  ``FitSettings`` by name: an array is written as ``{"array": name}`` (stored under that name, in
  its dtype), a dtype as ``{"dtype": "float32"}``, ``raw_penalties`` as a mapping of its fields, a
  tuple as a list; everything else as JSON. ``load_fit`` builds the ``FitSettings`` from them (a
  field a fit saved before it existed takes its default, e.g. ``signed=()``).
- ``F`` (d, N); ``factor_<i>`` (rows_b, d) for block i in the order of ``keys``; ``losses``;
  ``restart_losses``; ``active`` (d,) bool; and the settings' arrays.

The file is written to a temporary name and renamed, so a reader never finds half of it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ._checkpoint import write_npz_atomic
from ._fit import NMFResult
from ._settings import FitSettings

__all__ = ["load_fit", "save_fit"]

FORMAT, VERSION = "jaxnmf.fit", 1
_CONTAINERS = {"dict": dict, "list": list, "tuple": tuple}


def save_fit(result: NMFResult, path: str | os.PathLike) -> Path:
    """Write ``result`` to ``path`` (a ``.npz`` file; the suffix is added if missing) and return
    the path written. See the module docstring for the format."""
    if not isinstance(result, NMFResult):
        raise TypeError(f"result must be the NMFResult of jaxnmf.fit, got {type(result).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    if path.is_dir():
        raise IsADirectoryError(f"path: {path} is a folder; give a file name")
    factors = result.factors
    if isinstance(factors, dict):
        container, keys, arrays = "dict", list(factors), list(factors.values())
    else:
        container, keys, arrays = type(factors).__name__, list(range(len(factors))), list(factors)
    if container not in _CONTAINERS or not all(isinstance(k, (str, int)) for k in keys):
        raise TypeError(f"result.factors must be a dict with str keys, a list or a tuple, got {container}")
    per_block = lambda values: [float(values[k]) for k in keys] if container == "dict" else [float(v) for v in values]
    stored: dict[str, np.ndarray] = {}
    meta = {"format": FORMAT, "version": VERSION, "container": container, "keys": keys,
            "rows": [int(np.shape(w)[0]) for w in arrays], "dtype": str(np.asarray(result.F).dtype),
            "loss": float(result.loss), "n_iter": int(result.n_iter), "converged": bool(result.converged),
            "finite": bool(result.finite), "collapsed": bool(result.collapsed),
            "relative_errors": per_block(result.relative_errors), "block_weights": per_block(result.block_weights),
            "settings": _encode(result.settings, "settings", stored)}
    arrays_out = {"meta": np.array(json.dumps(meta)), "F": np.asarray(result.F),
                  "losses": np.asarray(result.losses), "restart_losses": np.asarray(result.restart_losses),
                  "active": np.asarray(result.active, bool), **stored,
                  **{f"factor_{i}": np.asarray(w) for i, w in enumerate(arrays)}}
    write_npz_atomic(path, arrays_out)
    return path


def load_fit(path: str | os.PathLike) -> NMFResult:
    """Read a fit written by `save_fit`. F and the factors come back as JAX arrays of the saved
    dtype (float64 needs ``jax_enable_x64``), the rest as `fit` returned them.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable fit of this format (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no saved fit at {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {name: archive[name] for name in archive.files}
        meta = json.loads(str(data["meta"]))
    except Exception as error:  # zip, npy or JSON damage, or a missing entry
        raise ValueError(f"path: {path} is not a readable saved fit ({type(error).__name__}: {error})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"path: {path} is not a {FORMAT} file of version {VERSION} "
                         f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    dtype = jnp.dtype(meta["dtype"])
    if jnp.zeros((), dtype).dtype != dtype:
        raise ValueError(f"path: {path} holds a {dtype} fit; enable float64 first "
                         "(jax.config.update('jax_enable_x64', True))")
    try:
        keys, container = meta["keys"], _CONTAINERS[meta["container"]]
        rebuild = (lambda values: dict(zip(keys, values))) if container is dict else container
        factors = [jnp.asarray(data[f"factor_{i}"]) for i in range(len(keys))]  # each in its saved dtype
        if [w.shape[0] for w in factors] != meta["rows"]:
            raise ValueError("the factors' rows differ from the recorded ones")
        return NMFResult(
            F=jnp.asarray(data["F"], dtype), loss=meta["loss"], factors=rebuild(factors), losses=data["losses"],
            relative_errors=rebuild(meta["relative_errors"]), n_iter=meta["n_iter"], converged=meta["converged"],
            finite=meta["finite"], restart_losses=data["restart_losses"], block_weights=rebuild(meta["block_weights"]),
            active=data["active"], collapsed=meta["collapsed"],
            settings=FitSettings(**_decode(meta["settings"], data)))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"path: {path} is not a consistent saved fit ({type(error).__name__}: {error})") from None


def _encode(value, name: str, stored: dict):
    """``value`` as JSON, its arrays moved to ``stored`` under names derived from ``name``."""
    if isinstance(value, Mapping):
        return {str(k): _encode(v, f"{name}.{k}", stored) for k, v in value.items()}
    if isinstance(value, (np.ndarray, jnp.ndarray)):
        stored[name] = np.asarray(value)
        return {"array": name}
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return {"dtype": str(np.dtype(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{name}.{i}", stored) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"result.settings[{name!r}]: cannot save a {type(value).__name__}")


def _decode(value, data: dict):
    if isinstance(value, dict):
        if set(value) == {"array"}:
            return data[value["array"]]
        if set(value) == {"dtype"}:
            return jnp.dtype(value["dtype"])
        return {k: _decode(v, data) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, data) for v in value]
    return value
