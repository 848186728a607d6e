"""Fits sharded over the example axis against the single-device fit, on 1, 2, 4 and 8 simulated CPU
devices (issue 14's targets).

    python -m benchmarks.sharded [--case small] [--rank 20] [--iterations 100] [--devices 1 2 4 8]

Each device count runs in its own process: ``--xla_force_host_platform_device_count`` must be in
XLA_FLAGS before JAX starts. In it, the case's blocks (``benchmarks.cases``) are fitted by MU (tol
0) from the same initial factors twice: on one device, and with every block sharded
``P(None, "examples")`` over the devices (F then stays sharded, the W_b replicated; ``jaxnmf.fit``
is the same call). Reported per device count:

- the relative difference of the final objectives (target: at most 1e-5);
- seconds per iteration of each, the median over ``--repeats`` of (time of a fit of 2k iterations
  minus that of k iterations) / k, so that compilation, initialisation and copies cancel; and their
  ratio (target: sharded at most 1.3 x the single-device step). The simulated devices share this
  machine's cores, so the ratio measures the cost of the sharded program, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

OBJECTIVE_TARGET, OVERHEAD_TARGET = 1e-5, 1.3

_WORKER = r"""
import json, sys, time
import jax, numpy as np, jaxnmf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from benchmarks import cases
case, rank, k, repeats = cases.CASES[sys.argv[1]], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
blocks = cases.make_blocks(case)
f0, w0 = cases.init_factors(blocks, rank)
examples = NamedSharding(Mesh(np.array(jax.devices()), ("examples",)), P(None, "examples"))
layouts = {"single": {name: jax.device_put(x, jax.devices()[0]) for name, x in blocks.items()},
           "sharded": {name: jax.device_put(x, examples) for name, x in blocks.items()}}

def fit(layout, iterations):
    start = time.perf_counter()
    res = jaxnmf.fit(layouts[layout], rank, key=jax.random.key(0), init=(f0, w0), max_iter=iterations, tol=0)
    jax.block_until_ready(res.F)
    return time.perf_counter() - start, res

out = {"devices": len(jax.devices())}
for layout in layouts:
    fit(layout, k), fit(layout, 2 * k)  # compile both lengths
    per_iteration = []
    for _ in range(repeats):
        t1, _ = fit(layout, k)
        t2, res = fit(layout, 2 * k)
        per_iteration.append((t2 - t1) / k)
    out[layout] = {"seconds_per_iteration": per_iteration, "loss": res.loss,
                   "F_sharding": str(res.F.sharding.spec) if hasattr(res.F.sharding, "spec") else "single"}
print(json.dumps(out))
"""


def measure(devices: int, case: str, rank: int, iterations: int, repeats: int) -> dict:
    """One process with ``devices`` simulated CPU devices; its measurements."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, "-c", _WORKER, case, str(rank), str(iterations), str(repeats)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{devices} devices: the worker failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict]) -> str:
    """The markdown table with PASS/MISS against the targets."""
    lines = ["| devices | objective rel. diff | single s/it | sharded s/it | ratio | objective | overhead |",
             "|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        single = statistics.median(r["single"]["seconds_per_iteration"])
        sharded = statistics.median(r["sharded"]["seconds_per_iteration"])
        diff = abs(r["sharded"]["loss"] - r["single"]["loss"]) / abs(r["single"]["loss"])
        ratio = sharded / single
        lines.append(f"| {r['devices']} | {diff:.1e} | {single:.4f} | {sharded:.4f} | {ratio:.2f} | "
                     f"{'PASS' if diff <= OBJECTIVE_TARGET else f'MISS ({diff / OBJECTIVE_TARGET:.1f}x)'} | "
                     f"{'PASS' if ratio <= OVERHEAD_TARGET else f'MISS ({ratio / OVERHEAD_TARGET:.2f}x the target)'} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="small", help="a case of benchmarks.cases (default: small)")
    parser.add_argument("--rank", type=int, default=20, help="factors d (default: 20)")
    parser.add_argument("--iterations", type=int, default=50, help="k: the fits run k and 2k iterations (default: 50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed (k, 2k) pairs per layout (default: 3)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="device counts (default: 1 2 4 8)")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    from benchmarks import cases
    if args.case not in cases.CASES:
        parser.error(f"--case: choose one of {', '.join(cases.CASES)}")
    rows = []
    for devices in args.devices:
        if devices < 1 or cases.CASES[args.case].n % devices:
            parser.error(f"--devices: counts must be >= 1 and divide the case's N = {cases.CASES[args.case].n}, "
                         f"got {devices}")
        print(f"{devices} device(s) ...", file=sys.stderr, flush=True)
        rows.append(measure(devices, args.case, args.rank, args.iterations, args.repeats))
    print(report(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
