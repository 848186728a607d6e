"""A long fit with a checkpoint, killed with SIGKILL after a random checkpoint, resumes to the factors
of a fit never stopped, bit for bit (CPU); a checkpoint of other data or options is refused."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxnmf

ROOT = Path(__file__).resolve().parents[1]

FIT = """
import os, signal, sys
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
import jaxnmf
from jaxnmf import _checkpoint
kill_after = int(sys.argv[3])
if kill_after:
    save, saves = _checkpoint.save, []
    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        saves.append(1)
        if len(saves) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    _checkpoint.save = save_then_die
data = np.load(sys.argv[1])
blocks = {name: data[name] for name in data.files}
res = jaxnmf.fit(blocks, 4, key=jax.random.key(3), max_iter=300, tol=0, solver=sys.argv[4], init="random",
                 n_restarts=2, checkpoint=sys.argv[2], checkpoint_every=50)
np.savez(sys.argv[2] + ".result.npz", F=np.asarray(res.F), losses=res.losses, a=np.asarray(res.factors["a"]))
"""


def blocks(seed=0):
    rng = np.random.default_rng(seed)
    concepts = rng.gamma(0.5, size=(4, 120))
    return {"a": rng.random((40, 4)) @ concepts + 0.05 * rng.random((40, 120)),
            "b": rng.random((16, 4)) @ concepts}


def run(data, checkpoint, kill_after, solver):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", FIT, str(data), str(checkpoint), str(kill_after), solver],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == (-signal.SIGKILL if kill_after else 0), done.stderr[-3000:]


@pytest.mark.parametrize("solver", [pytest.param("mu", marks=pytest.mark.heavy), "hals"])  # 30-40 s each
def test_sigkill_after_a_random_checkpoint_then_resume_gives_the_uninterrupted_factors(tmp_path, solver):
    data = tmp_path / "blocks.npz"
    np.savez(data, **blocks())
    kill_after = int(np.random.default_rng(abs(hash(solver)) % 1000).integers(1, 6))  # of 6 saves
    run(data, tmp_path / "killed.npz", kill_after, solver)
    assert (tmp_path / "killed.npz").exists() and not (tmp_path / "killed.npz.result.npz").exists()
    run(data, tmp_path / "killed.npz", 0, solver)  # the same command again: resumes
    run(data, tmp_path / "whole.npz", 0, solver)  # never stopped
    resumed, whole = np.load(tmp_path / "killed.npz.result.npz"), np.load(tmp_path / "whole.npz.result.npz")
    for name in ("F", "a", "losses"):
        np.testing.assert_array_equal(resumed[name], whole[name])


def test_a_checkpoint_of_other_data_or_options_is_refused(tmp_path):
    path = tmp_path / "fit.npz"
    X = blocks()
    first = jaxnmf.fit(X, 3, key=jax.random.key(0), max_iter=40, tol=0, checkpoint=path, checkpoint_every=10)
    again = jaxnmf.fit(X, 3, key=jax.random.key(0), max_iter=40, tol=0, checkpoint=path)  # finished: returns it
    np.testing.assert_array_equal(np.asarray(again.F), np.asarray(first.F))
    other_data = {k: v * 1.5 for k, v in X.items()}
    for change in (dict(blocks=other_data), dict(rank=4), dict(l2=0.1), dict(key=jax.random.key(1)),
                   dict(solver="hals")):
        args = dict(blocks=X, rank=3, key=jax.random.key(0), max_iter=40, tol=0, checkpoint=path) | change
        with pytest.raises(ValueError, match="checkpoint: .*fit.npz holds a fit of other data or other options"):
            jaxnmf.fit(args.pop("blocks"), args.pop("rank"), **args)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint: .* is unreadable"):
        jaxnmf.fit(X, 3, key=jax.random.key(0), max_iter=40, checkpoint=path)
    with pytest.raises(ValueError, match="checkpoint: .* is a folder"):
        jaxnmf.fit(X, 3, key=jax.random.key(0), max_iter=40, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_every"):
        jaxnmf.fit(X, 3, key=jax.random.key(0), max_iter=40, checkpoint=path, checkpoint_every=0)
