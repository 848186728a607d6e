"""The solvers under test, each as a zero-argument callable on fixed inputs (for ``timing``).

All start from the same factors (``cases.init_factors``) and solve the same problem: the coupled
objective J = sum_b ||X_b - W_b F||^2 with unit block weights and no penalties.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxnmf
from jaxnmf import reference
from jaxnmf._one_pass import OnePassStep, with_statistics
from jaxnmf._tiles import pack_narrow

_HIGHEST = lax.Precision.HIGHEST  # jaxnmf's precision (matters on GPUs, where the default is TF32)


def jax_steps() -> dict[str, Callable]:
    """The pure jaxnmf steps: MU and HALS."""
    return {"jaxnmf MU": jaxnmf.mu_step, "jaxnmf HALS": jaxnmf.hals_step}


@functools.partial(jax.jit, static_argnames=("step",))
def _jit_step(step, blocks, state, params, sq_norms):
    return step(blocks, state, params, sq_norms)


@functools.partial(jax.jit, static_argnames=("step",))
def _jit_vmap_step(step, blocks, states, params, sq_norms):
    return jax.vmap(step, in_axes=(None, 0, None, None))(blocks, states, params, sq_norms)


def _sq_norms(blocks: Sequence) -> jax.Array:
    """(B,) ||X_b||^2 in float32, so that the timed step does not recompute it (``fit`` passes it too)."""
    return jnp.stack([jnp.vdot(y, y) for y in (x.astype(jnp.float32) for x in blocks)])


def jax_step(step: Callable, blocks: Sequence[jax.Array], F0: np.ndarray, W0: Sequence[np.ndarray]) -> Callable:
    """One jitted jaxnmf step (``mu_step`` or ``hals_step``) from (F0, W0): what a fit iterates."""
    blocks = tuple(blocks)
    state = jaxnmf.MUState(jnp.asarray(F0), tuple(jnp.asarray(w) for w in W0))
    params = jaxnmf.make_params(len(blocks))
    sq_norms = _sq_norms(blocks)
    return lambda: _jit_step(step, blocks, state, params, sq_norms)


def jax_one_pass_steps(blocks: Sequence[jax.Array], F0: np.ndarray, W0: Sequence[np.ndarray]) -> dict[str, Callable]:
    """The jitted one-pass steps (``jaxnmf._one_pass``) a fit with ``one_pass=True`` iterates: MU,
    HALS, and MU on the blocks rounded to bfloat16 (held as ``NarrowBlock``s, made here: half the
    data's size again)."""
    blocks = tuple(blocks)
    narrow = tuple(jax.block_until_ready(pack_narrow(x, jnp.bfloat16)) for x in blocks)
    params = jaxnmf.make_params(len(blocks))
    state = jaxnmf.MUState(jnp.asarray(F0), tuple(jnp.asarray(w) for w in W0))
    fns = {}
    for name, data, solver in [("jaxnmf MU, one pass", blocks, "mu"), ("jaxnmf HALS, one pass", blocks, "hals"),
                               ("jaxnmf MU, one pass, bfloat16 blocks", narrow, "mu")]:
        start = with_statistics(data, state, params)
        fns[name] = functools.partial(_jit_step, OnePassStep(solver), data, start, params, _sq_norms(data))
    return fns


def jax_vmap_step(step: Callable, blocks: Sequence[jax.Array], inits: Sequence[tuple]) -> Callable:
    """One jitted step of several restarts at once under ``vmap`` (the data shared)."""
    blocks = tuple(blocks)
    states = jaxnmf.MUState(jnp.stack([jnp.asarray(f) for f, _ in inits]),
                            tuple(jnp.stack([jnp.asarray(ws[b]) for _, ws in inits]) for b in range(len(blocks))))
    params = jaxnmf.make_params(len(blocks))
    sq_norms = _sq_norms(blocks)
    return lambda: _jit_vmap_step(step, blocks, states, params, sq_norms)


def reference_step(blocks: Sequence[np.ndarray], F0: np.ndarray, W0: Sequence[np.ndarray]) -> Callable:
    """One step of the NumPy reference (``jaxnmf.reference.mu_step``) from (F0, W0)."""
    ones, zeros = [1.0] * len(blocks), [0.0] * len(blocks)
    return lambda: reference.mu_step(list(blocks), F0, list(W0), ones, zeros, zeros, 0.0, 0.0)


@jax.jit
def _floor_jax(blocks, F, factors):
    wtx = sum(jnp.matmul(w.T, x, precision=_HIGHEST) for w, x in zip(factors, blocks))
    return wtx, tuple(jnp.matmul(x, F.T, precision=_HIGHEST) for x in blocks)


def floor_jax(blocks: Sequence[jax.Array], F0: np.ndarray, W0: Sequence[np.ndarray]) -> Callable:
    """The GEMM floor in JAX (jitted): sum_b W_b^T X_b (d, N) and every X_b F^T (rows_b, d)."""
    blocks, F, factors = tuple(blocks), jnp.asarray(F0), tuple(jnp.asarray(w) for w in W0)
    return lambda: _floor_jax(blocks, F, factors)


@jax.jit
def _read_all(blocks):
    return sum(jnp.sum(x) for x in blocks)


def data_pass(blocks: Sequence[jax.Array]) -> Callable:
    """One read of all the data in JAX (a jitted sum): the memory-bandwidth bound of a pass."""
    blocks = tuple(blocks)
    return lambda: _read_all(blocks)


def floor_numpy(blocks: Sequence[np.ndarray], F0: np.ndarray, W0: Sequence[np.ndarray]) -> Callable:
    """The GEMM floor in NumPy: the same two products."""
    def products():
        wtx = sum(w.T @ x for w, x in zip(W0, blocks))
        return wtx, [x @ F0.T for x in blocks]
    return products


def sklearn_mu(x: np.ndarray, f0: np.ndarray, w0: np.ndarray, max_iter: int) -> Callable:
    """scikit-learn's MU NMF of one block, X (rows, N) ~ W H with W = W_b, H = F, from (w0, f0);
    ``max_iter`` iterations exactly (tol=0). Returns (W, H)."""
    from sklearn.decomposition import NMF

    def run():
        model = NMF(n_components=f0.shape[0], solver="mu", init="custom", beta_loss="frobenius",
                    max_iter=max_iter, tol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter reached, by design
            w = model.fit_transform(x, W=w0, H=f0)
        return w, model.components_
    return run


def jaxnmf_fit(blocks: Sequence[jax.Array], rank: int, max_iter: int, *, solver: str = "mu", init=None,
               n_restarts: int = 1, seed: int = 0) -> Callable:
    """A whole ``jaxnmf.fit`` call, tol=0 (exactly ``max_iter`` iterations), from the explicit
    ``init`` (F0, W0) or, when it is None, from ``n_restarts`` random inits under ``vmap``."""
    kwargs = dict(init=init) if init is not None else dict(init="random", n_restarts=n_restarts)
    if solver != "mu":
        kwargs["solver"] = solver
    return lambda: jaxnmf.fit(list(blocks), rank, key=jax.random.key(seed), max_iter=max_iter, tol=0, **kwargs)


def objective(blocks: Sequence[jax.Array], F: np.ndarray, Ws: Sequence[np.ndarray]) -> float:
    """J = sum_b ||X_b - W_b F||^2 by explicit residuals (jaxnmf.objective, float32), for the
    solvers that do not report it per iteration."""
    return float(jaxnmf.objective(list(blocks), jnp.asarray(F, jnp.float32),
                                  [jnp.asarray(w, jnp.float32) for w in Ws]))
