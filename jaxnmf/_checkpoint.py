"""Checkpoints of a running fit, so that a long fit killed at any point resumes where it was.

``fit(..., checkpoint=path)`` writes the state of the loop (every restart's factors, objective,
iteration count and convergence flags, and the objective trace so far) to ``path`` after each
chunk of iterations once ``checkpoint_every`` iterations have passed since the last write, and
after the last chunk. A fit started again with the same data and options finds the file and
continues from it; on a CPU the result is bit-identical to a fit that was never stopped.

The file is one ``.npz`` (``leaf_<i>``: the loop state's arrays, ``trace``: (R, iterations
run), ``meta``: JSON with the format, the fingerprint and the next iteration), written to a
temporary name, flushed and renamed: a kill leaves the previous checkpoint or the new one.

The fingerprint identifies the problem: shapes and dtypes of the blocks, their per-block
statistics (maximum, squared norm, mean: ``fit`` computes them anyway; a hash of every entry
would cost a pass over data that may not fit in memory), every resolved option, the key and the
chunk layout. A checkpoint with another fingerprint is refused, never silently continued.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT, VERSION = "jaxnmf.fit-checkpoint", 1


def fingerprint(**parts: Any) -> str:
    """A SHA-256 of ``parts``, by name: arrays by dtype, shape and bytes; mappings (e.g. a
    ``FitSettings``) by their keys and values in order, lists and tuples by their items, both
    recursively and delimited; the rest through ``repr``."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(name.encode())
        _digest(digest, parts[name])
    return digest.hexdigest()


def _digest(digest, value: Any) -> None:
    if isinstance(value, (np.ndarray, jax.Array)):
        a = np.asarray(value)
        digest.update(f"{a.dtype}{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key, item in value.items():
            digest.update(repr(key).encode())
            _digest(digest, item)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _digest(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())


def write_npz_atomic(path: Path, arrays: dict) -> None:
    """``np.savez`` of ``arrays`` to a temporary name beside ``path``, flushed, then renamed over it:
    a reader or a kill finds the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save(path: Path, key: str, next_start: int, carry, trace: np.ndarray) -> None:
    """Write the loop state ``carry`` (any pytree of arrays) reached before iteration ``next_start``."""
    leaves = jax.tree.leaves(carry)
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": key, "next_start": int(next_start)}
    arrays = {"meta": np.array(json.dumps(meta)), "trace": trace,
              **{f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}}
    write_npz_atomic(path, arrays)


def load(path: Path, key: str, template):
    """``(next_start, carry, trace)`` from the checkpoint at ``path``, or None when there is none.

    ``template`` is the fresh loop state: it gives the tree, the shapes, dtypes and shardings.

    Raises:
        ValueError: the file is unreadable, of another format, or of another fit (fingerprint).
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {name: archive[name] for name in archive.files}
        meta = json.loads(str(data["meta"]))
    except Exception as error:
        raise ValueError(f"checkpoint: {path} is unreadable ({type(error).__name__}: {error}); remove it to start "
                         "the fit afresh") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"checkpoint: {path} is not a fit checkpoint of this version")
    if meta["fingerprint"] != key:
        raise ValueError(f"checkpoint: {path} holds a fit of other data or other options; remove it, or give "
                         "another checkpoint path")
    leaves, treedef = jax.tree.flatten(template)
    saved = [data.get(f"leaf_{i}") for i in range(len(leaves))]
    if any(s is None or s.shape != leaf.shape or s.dtype != leaf.dtype for s, leaf in zip(saved, leaves)):
        raise ValueError(f"checkpoint: {path} does not match this fit's state (shapes or dtypes differ)")
    restored = [jax.device_put(jnp.asarray(s), leaf.sharding) for s, leaf in zip(saved, leaves)]
    return meta["next_start"], jax.tree.unflatten(treedef, restored), data["trace"]
