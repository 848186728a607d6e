"""Write files so that nobody ever reads half of one.

Each function writes to a temporary file in the destination's folder (``.<name>.<pid>.tmp``) and
then moves it onto the destination in one step (``os.replace``). A write that fails or is
interrupted leaves the previous file as it was and removes the temporary one; only a killed
process (``kill -9``, power loss) can leave a ``.tmp`` file behind, never a truncated result.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib.figure import Figure

__all__ = ["TEMPORARY_GLOB", "atomic_file", "savefig_atomic", "savez_atomic", "write_bytes_atomic",
           "write_text_atomic"]

TEMPORARY_GLOB = ".*.tmp"  # the temporary files of this module, for cleaning a folder


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f:`` a binary file that becomes ``path`` when the block ends
    without an exception (flushed to disk first); on an exception ``path`` is untouched."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``Path(path).write_bytes(data)``, atomically."""
    with atomic_file(path) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text, encoding="utf-8")``, atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def savez_atomic(path: str | os.PathLike, **arrays) -> None:
    """``np.savez_compressed(path, **arrays)``, atomically (``path`` is used as given)."""
    with atomic_file(path) as f:
        np.savez_compressed(f, **arrays)


def savefig_atomic(fig: Figure, path: str | os.PathLike, **savefig_kwargs) -> bytes:
    """Save ``fig`` as a PNG file at ``path``, atomically; returns the file's bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig_kwargs)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return data
