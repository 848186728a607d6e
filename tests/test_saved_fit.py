"""A fit saved with ``jaxnmf.save_fit`` and read with ``jaxnmf.load_fit`` in another process explains
new data exactly as the fit it came from."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxnmf

ROOT = Path(__file__).resolve().parents[1]


def probe_blocks(seed=0, n=200):
    rng = np.random.default_rng(seed)
    concepts = rng.gamma(0.5, size=(4, n))
    block = lambda rows: (rng.random((rows, 4)) @ concepts + 0.01 * rng.random((rows, n))).astype(np.float32)
    return {"pixels": block(60), "stage3": block(30)}


@pytest.fixture(scope="module")
def fitted():
    """A converged float32 fit (its F is then the minimiser given the W_b, which transform finds)."""
    blocks = probe_blocks()
    res = jaxnmf.fit(blocks, 4, key=jax.random.key(0), max_iter=3000, tol=1e-7, solver="hals", dtype=np.float32)
    assert res.converged
    return blocks, res


def assert_same(a, b):
    for field in dataclasses.fields(jaxnmf.NMFResult):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "settings":  # equal fields, arrays in dtype and entries (tests/test_settings.py)
            assert type(x) is type(y) is jaxnmf.FitSettings and x == y
            assert all(type(x[key]) is type(y[key]) for key in x)
        elif isinstance(x, (dict, list, tuple)):
            assert type(x) is type(y) and len(x) == len(y)
            for k in (x if isinstance(x, dict) else range(len(x))):
                np.testing.assert_array_equal(x[k], y[k])
                assert np.asarray(x[k]).dtype == np.asarray(y[k]).dtype
        else:
            np.testing.assert_array_equal(x, y)
            assert np.asarray(x).dtype == np.asarray(y).dtype, field.name


def test_a_saved_fit_reads_back_equal(fitted, tmp_path):
    blocks, res = fitted
    path = jaxnmf.save_fit(res, tmp_path / "fit")
    assert path.name == "fit.npz" and not list(tmp_path.glob(".*tmp"))
    assert_same(jaxnmf.load_fit(path), res)
    groups = np.repeat(np.arange(4), 50)  # settings with example groups and raw group weights
    grouped = jaxnmf.fit(blocks, 4, key=jax.random.key(0), max_iter=20, group_F=1e-3, example_groups=groups)
    assert_same(jaxnmf.load_fit(jaxnmf.save_fit(grouped, tmp_path / "grouped.npz")), grouped)


def test_a_list_of_float64_blocks_reads_back_as_a_list(tmp_path):
    blocks = list(probe_blocks(1).values())
    res = jaxnmf.fit(blocks, 3, key=jax.random.key(1), max_iter=30, dtype=np.float64)
    loaded = jaxnmf.load_fit(jaxnmf.save_fit(res, tmp_path / "fit.npz"))
    assert isinstance(loaded.factors, list) and loaded.F.dtype == np.float64
    assert_same(loaded, res)


def test_a_new_process_explains_new_images_like_the_fit_itself(fitted, tmp_path):
    blocks, res = fitted
    new = probe_blocks(seed=5, n=80)
    path = jaxnmf.save_fit(res, tmp_path / "fit.npz")
    np.savez(tmp_path / "data.npz", **{f"probe_{k}": v for k, v in blocks.items()},
             **{f"new_{k}": v for k, v in new.items()})
    script = """
import sys, jax, numpy as np
jax.config.update("jax_enable_x64", True)  # as in this test process (tests/conftest.py), so the arithmetic is the same
import jaxnmf
fit = jaxnmf.load_fit(sys.argv[1])
data = np.load(sys.argv[2])
probe = {k: data["probe_" + k] for k in fit.factors}
new = {k: data["new_" + k] for k in fit.factors}
np.savez(sys.argv[3], probe=np.asarray(jaxnmf.transform(fit, probe, max_iter=20000, tol=0)),
         new=np.asarray(jaxnmf.transform(fit, new)))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "data.npz"),
                           str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    F = np.asarray(res.F)
    assert np.linalg.norm(out["probe"] - F) / np.linalg.norm(F) < 1e-4  # the probe images' own concepts
    here = np.asarray(jaxnmf.transform(res, new))
    np.testing.assert_array_equal(out["new"], here)  # new images: what the original fit gives


def test_damaged_foreign_or_missing_files_are_refused_naming_the_file(fitted, tmp_path):
    _, res = fitted
    path = jaxnmf.save_fit(res, tmp_path / "fit.npz")
    with pytest.raises(FileNotFoundError, match="no saved fit at"):
        jaxnmf.load_fit(tmp_path / "absent.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.npz is not a readable saved fit"):
        jaxnmf.load_fit(truncated)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, meta=np.array('{"format": "something else", "version": 1}'))
    with pytest.raises(ValueError, match="foreign.npz is not a jaxnmf.fit file"):
        jaxnmf.load_fit(foreign)
    with pytest.raises(TypeError, match="result must be the NMFResult"):
        jaxnmf.save_fit({"F": 1}, tmp_path / "x.npz")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        jaxnmf.save_fit(res, tmp_path / "dir.npz" if (tmp_path / "dir.npz").mkdir() is None else None)
