"""Peak memory of one fit, measured in a fresh process so that nothing else in the run counts.

The child imports everything and starts the JAX backend, takes its resident memory then as the
baseline, builds the case's data in NumPy (in place, no temporary of the data's size; aligned
with ``jaxnmf.aligned_empty`` for the "aligned input" rows, in bfloat16 for the bfloat16 row),
runs the solver from that NumPy input, and reports the process's peak resident memory
(VmHWM). The figure compared with the target is (peak - baseline) / size of the data in
float32: float32 data itself counts 1.0 (bfloat16 data 0.5), compilation and every temporary
count on top.

    python -m benchmarks.memory CASE SOLVER RANK ITERS   # prints one JSON line
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import resource
import subprocess
import sys

# jaxnmf from NumPy arrays as NumPy allocates them (fit copies them once), from arrays made with
# jaxnmf.aligned_empty (used in place on a CPU), and from data built in bfloat16 (aligned).
SOLVERS = ("jaxnmf MU", "jaxnmf MU, aligned input", "jaxnmf HALS, aligned input",
           "jaxnmf MU, one pass, bfloat16 blocks, aligned input", "NumPy reference MU", "scikit-learn MU")


def _peak_rss() -> int:
    """Peak resident memory of this process so far, bytes: VmHWM of /proc/self/status on Linux.

    Not ``ru_maxrss``: Linux carries it across ``execve``, so a child started from a large parent
    reports at least the parent's resident size at the fork (the suite's own process, holding a
    case's data, made the children's peaks look up to 0.4 GB larger). Elsewhere ``ru_maxrss``."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _child(case_name: str, solver: str, rank: int, iters: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import psutil

    import jaxnmf
    from jaxnmf import reference

    from . import solvers
    from .cases import CASES, init_factors, make_blocks

    jax.block_until_ready(jnp.ones(8) * 2)  # start the backend before the baseline
    case = CASES[case_name]
    if solver == "scikit-learn MU":  # one block: scikit-learn has no coupled NMF
        case = dataclasses.replace(case, blocks=tuple(b for b in case.blocks if b[0] == case.single_block))
    baseline = psutil.Process().memory_info().rss
    bf16 = "bfloat16" in solver
    blocks = make_blocks(case, dtype=jnp.bfloat16 if bf16 else np.float32, aligned="aligned" in solver)
    after_data = psutil.Process().memory_info().rss
    F0, W0 = init_factors(blocks, rank)
    X = list(blocks.values())
    if solver.startswith("jaxnmf"):
        options = dict(solver="hals" if "HALS" in solver else "mu")
        if bf16:
            options["block_dtype"] = jnp.bfloat16
        result = jaxnmf.fit(X, rank, key=jax.random.key(0), init=(F0, W0), max_iter=iters, tol=0, **options)
        jax.block_until_ready(result.F)
    elif solver == "NumPy reference MU":
        reference.fit(X, rank, key=0, init=(F0, W0), max_iter=iters, tol=0)
    else:
        solvers.sklearn_mu(X[0], F0, W0[0], iters)()
    peak = _peak_rss()
    stats = jax.devices()[0].memory_stats() or {}
    return dict(solver=solver, data_bytes=case.nbytes, baseline_bytes=baseline, after_data_bytes=after_data,
                peak_bytes=peak, ratio=(peak - baseline) / case.nbytes,
                device_peak_bytes=stats.get("peak_bytes_in_use"))


def measure(case_name: str, solver: str, rank: int, iters: int) -> dict:
    """Run the child for one solver; its JSON result, or the error it ended with."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", case_name, solver, str(rank), str(iters)],
                          capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return dict(solver=solver, error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    name, which, rank_arg, iters_arg = sys.argv[1:5]
    print(json.dumps(_child(name, which, int(rank_arg), int(iters_arg))))
