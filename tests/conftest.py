"""Shared test settings (float64 available, strict rank promotion, XLA's expensive optimisations
off, one compilation cache) and the CIFAR mock."""
import contextlib
import os

import jax
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
# The tests' programs are small: compiling them costs more than running them, and XLA's expensive
# passes (semantics-preserving; rounding may differ, which every comparison here tolerates) take
# 20-37% of a compile-bound file's time (test_solver, test_evaluate). Runs the tests start as subprocesses inherit it through the environment.
# The benchmarks and users' runs keep every optimisation.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
jax.config.update("jax_disable_most_optimizations", True)


def pytest_configure(config):
    """JAX's persistent compilation cache in pytest's cache folder, shared by the xdist workers and
    by the runs tests start as subprocesses (through the environment): many test files compile the
    same small networks and fits. Entries are keyed by the program, the compiler and the JAX
    version, so a stale one is never used."""
    if getattr(config, "cache", None) is None:
        return
    folder = str(config.cache.mkdir("xla-compilation-cache"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def unbound_getitems(*args, generator, serialized=False):
    # tfds 4.9.10's mock sets `__getitems__` on a MagicMock instance as a plain partial, so it is
    # called without `self`; take the keys from the last positional argument either way.
    del serialized
    return [generator[key] for key in args[-1]]


@pytest.fixture
def mock_cifar_data(monkeypatch):
    """``with mock_cifar_data(n):`` tfds mock CIFAR (random images, n per split, no download)
    whose CIFAR-100 coarse labels follow the real fine-to-coarse mapping."""
    from experiments import data

    def consistent(*args, generator, serialized=False):
        records = unbound_getitems(*args, generator=generator, serialized=serialized)
        for record in records:
            if "coarse_label" in record:
                record["coarse_label"] = data.CIFAR100_FINE_TO_COARSE[record["label"]]
        return records

    @contextlib.contextmanager
    def start(num_examples):
        monkeypatch.setattr(mocking, "_getitems", consistent)
        with tfds.testing.mock_data(num_examples=num_examples):
            yield

    return start
