"""A fit of blocks sharded over the example axis (jax.sharding, 8 simulated CPU devices) equals the
single-device fit up to reduction order, and keeps F sharded over the examples."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import jax, numpy as np, jaxnmf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
assert len(jax.devices()) == 8, jax.devices()
rng = np.random.default_rng(0)
concepts = rng.gamma(0.5, size=(5, 400))
blocks = {"pixels": (rng.random((96, 5)) @ concepts + 0.05 * rng.random((96, 400))).astype(np.float32),
          "layer": (rng.random((40, 5)) @ concepts + 0.05 * rng.random((40, 400))).astype(np.float32)}
examples = NamedSharding(Mesh(np.array(jax.devices()), ("examples",)), P(None, "examples"))
sharded = {name: jax.device_put(x, examples) for name, x in blocks.items()}
fits = {}
for solver in ("mu", "hals"):
    one = jaxnmf.fit(blocks, 5, key=jax.random.key(0), max_iter=100, tol=0, solver=solver)
    many = jaxnmf.fit(sharded, 5, key=jax.random.key(0), max_iter=100, tol=0, solver=solver)
    assert abs(many.loss - one.loss) <= 1e-5 * one.loss, (solver, one.loss, many.loss)
    F1, F8 = np.asarray(one.F), np.asarray(many.F)
    assert np.abs(F8 - F1).max() <= 1e-4 * np.abs(F1).max(), solver
    assert many.F.sharding.spec == P(None, "examples"), many.F.sharding
    assert all(w.sharding.is_fully_replicated for w in many.factors.values())  # the W_b on every device
    fits[solver] = one, many
one, many = fits["mu"]  # restarts under vmap and transform, sharded too
restarts = jaxnmf.fit(sharded, 5, key=jax.random.key(1), max_iter=30, tol=0, init="random", n_restarts=3)
alone = jaxnmf.fit(blocks, 5, key=jax.random.key(1), max_iter=30, tol=0, init="random", n_restarts=3)
np.testing.assert_allclose(restarts.restart_losses, alone.restart_losses, rtol=1e-5)
new = {name: jax.device_put(x[:, :80], examples) for name, x in blocks.items()}
np.testing.assert_allclose(np.asarray(jaxnmf.transform(many, new)),
                           np.asarray(jaxnmf.transform(one, {k: v[:, :80] for k, v in blocks.items()})),
                           rtol=1e-3, atol=1e-4 * float(np.abs(np.asarray(one.F)).max()))
print("ok")
"""


def test_a_fit_sharded_over_examples_on_8_devices_equals_the_single_device_fit():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.heavy  # 40-60 s: a whole smoke run in a process with 2 simulated devices
def test_the_pipeline_fits_on_2_devices_like_on_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        done = subprocess.run([sys.executable, "-m", "experiments.quickstart", "--smoke", "--out", str(out),
                               "--devices", str(devices)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        runs[devices] = json.loads((out / "summary.json").read_text())
        assert (out / "report.html").exists()
    assert runs[2]["config"]["devices"] == 2
    one, two = (runs[d]["fit"] for d in (1, 2))
    assert two["n_iter"] == one["n_iter"]
    assert abs(two["loss"] - one["loss"]) <= 1e-4 * one["loss"], (one["loss"], two["loss"])
