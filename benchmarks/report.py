"""Targets, the markdown report, the objective-against-time plot and the JSON file of a run."""
from __future__ import annotations

import json
import pathlib
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

from experiments._atomic import write_text_atomic

from .timing import ratio

STEP_ROWS = ("jaxnmf MU", "jaxnmf HALS", "jaxnmf MU, one pass", "jaxnmf HALS, one pass",
             "jaxnmf MU, one pass, bfloat16 blocks", "NumPy reference MU", "scikit-learn MU", "GEMM floor (JAX)",
             "GEMM floor (NumPy)", "one data pass (JAX)")


@dataclass(frozen=True)
class Target:
    """A target of issue 6 / 2 (ratio at most ``limit``) and the ratio measured in this run.

    ``lower_bound``: the measurement only bounds the ratio from below (HALS never reached MU's
    objective within its run)."""

    name: str
    measured: float | None
    limit: float
    lower_bound: bool = False

    @property
    def status(self) -> str:
        if self.measured is None:
            return "n/a"
        if self.lower_bound:
            return "MISS" if self.measured > self.limit else "open"
        return "PASS" if self.measured <= self.limit else "MISS"

    @property
    def verdict(self) -> str:
        """PASS/MISS and by how much."""
        if self.status == "PASS":
            return f"PASS ({1 - self.measured / self.limit:.0%} under the limit)"
        if self.status == "MISS":
            return f"MISS ({'>' if self.lower_bound else ''}{self.measured / self.limit:.2f}x the limit)"
        return "open (not reached within the run)" if self.status == "open" else "n/a"


def case_targets(case: dict) -> list[Target]:
    """Every target that the sections run for this case can be checked against."""
    out = []
    for rank, steps in case.get("coupled", {}).items():
        mu = steps["jaxnmf MU"]["seconds"]
        out.append(Target(f"jaxnmf MU step / NumPy reference step, d={rank}",
                          ratio(mu, steps["NumPy reference MU"]["seconds"]), 0.5))
        out.append(Target(f"jaxnmf MU step / GEMM floor (JAX), d={rank}", ratio(mu, steps["GEMM floor (JAX)"]["seconds"]), 1.2))
    traces = case.get("traces")
    if traces:
        fit = traces["coupled"]["jaxnmf MU"]
        out.append(Target(f"jaxnmf.fit MU per iteration / NumPy reference step, d={traces['rank']}",
                          ratio(fit["seconds_per_iter"], fit["alongside"]["NumPy reference MU"]), 0.5))
        out.append(Target(f"jaxnmf.fit MU per iteration / GEMM floor (JAX), d={traces['rank']}",
                          ratio(fit["seconds_per_iter"], fit["alongside"]["GEMM floor (JAX)"]), 1.2))
    if "restarts" in case:
        r = case["restarts"]
        out.append(Target(f"{r['n_restarts']} restarts under vmap / {r['n_restarts']} single fits "
                          f"({r['iters']} iterations each), d={r['rank']}", r["fit_ratio"], 0.7))
        out.append(Target(f"{r['n_restarts']} restarts under vmap / {r['n_restarts']} single MU steps "
                          f"(per iteration), d={r['rank']}", r["step_ratio"], 0.7))
    if traces and "hals_target" in traces:
        h = traces["hals_target"]
        out.append(Target(f"HALS time to MU's objective after {h['mu_iterations']} iterations / MU's time, "
                          f"d={traces['rank']}", h["ratio"], 0.25, lower_bound=not h["reached"]))
    for m in case.get("memory", []):
        if m["solver"].startswith("jaxnmf") and "ratio" in m:
            out.append(Target(f"peak memory / data size, {m['solver']}", m["ratio"], 1.3))
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _sec(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g} s"


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if abs(n_bytes) >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _step_cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    cell = f"{_sec(entry['seconds'])} ({entry['gflops']:.1f} GFLOP/s)" if entry.get("gflops") else _sec(entry["seconds"])
    if entry.get("gb_per_s"):
        cell += f", {entry['gb_per_s']:.0f} GB/s"
    return cell


def _steps_table(per_rank: dict, ratios: list[tuple[str, str, str]]) -> list[str]:
    """Solvers as rows, ranks as columns; then the ratios (label, numerator, denominator)."""
    ranks = list(per_rank)
    rows = [[name] + [_step_cell(per_rank[r].get(name)) for r in ranks]
            for name in STEP_ROWS if any(name in per_rank[r] for r in ranks)]
    for label, num, den in ratios:
        if all(num in per_rank[r] and den in per_rank[r] for r in ranks):
            rows.append([f"**{label}**"] + [_x(ratio(per_rank[r][num]["seconds"], per_rank[r][den]["seconds"]))
                                            for r in ranks])
    return _table(["seconds per iteration"] + [f"d={r}" for r in ranks], rows)


def _traces_table(traces: dict) -> list[str]:
    rows = []
    for problem, solvers in (("coupled", traces["coupled"]), (f"single block {traces['single_block']}", traces["single"])):
        for name, t in solvers.items():
            per_iter = t.get("seconds_per_iter", t["times"][-1] / t["iterations"][-1])
            rows.append([problem, name, str(t["iterations"][-1]), _sec(t["times"][-1]), _sec(per_iter),
                         _sec(t.get("fixed_seconds")), _sec(t.get("full_call_seconds")), f"{t['objective'][-1]:.6g}"])
    return _table(["problem", "solver", "iterations", "time", "s/iteration", "fixed s/call", "one call, measured",
                   "objective reached"], rows)


def _case_markdown(name: str, case: dict) -> list[str]:
    blocks = " + ".join(f"{b} {r}" for b, r in case["blocks"].items())
    lines = [f"## Case `{name}`: {case['description']}", "",
             f"Blocks (rows): {blocks}; N = {case['n']}; data {_gb(case['data_bytes'])} in float32.", ""]
    if "coupled" in case:
        lines += [f"### Coupled problem, one step from the same factors (median of {case['settings']['repeats']}, "
                  "round-robin)", ""]
        lines += _steps_table(case["coupled"], [("jaxnmf MU / NumPy reference", "jaxnmf MU", "NumPy reference MU"),
                                                ("jaxnmf MU / GEMM floor (JAX)", "jaxnmf MU", "GEMM floor (JAX)"),
                                                ("jaxnmf HALS / jaxnmf MU", "jaxnmf HALS", "jaxnmf MU"),
                                                ("MU one pass / MU", "jaxnmf MU, one pass", "jaxnmf MU"),
                                                ("HALS one pass / HALS", "jaxnmf HALS, one pass", "jaxnmf HALS"),
                                                ("MU one pass, bfloat16 blocks / MU", "jaxnmf MU, one pass, bfloat16 blocks",
                                                 "jaxnmf MU"),
                                                ("NumPy reference / GEMM floor (NumPy)", "NumPy reference MU",
                                                 "GEMM floor (NumPy)"),
                                                ("GEMM floor (JAX) / one data pass", "GEMM floor (JAX)",
                                                 "one data pass (JAX)")]) + [""]
    if "single" in case:
        s = case["single"]
        lines += [f"### Single block `{s['block']}` ({s['rows']} x {case['n']})", ""]
        lines += _steps_table(s["per_rank"], [("jaxnmf MU / NumPy reference", "jaxnmf MU", "NumPy reference MU"),
                                              ("jaxnmf MU / scikit-learn MU", "jaxnmf MU", "scikit-learn MU"),
                                              ("jaxnmf MU / GEMM floor (JAX)", "jaxnmf MU", "GEMM floor (JAX)")])
        fixed = ", ".join(f"d={r}: {_sec(v['scikit-learn MU']['fixed_seconds'])}" for r, v in s["per_rank"].items()
                          if "scikit-learn MU" in v)
        lines += ["", f"scikit-learn: seconds per iteration from calls of 1 and 1 + {case['settings']['sklearn_iters']} "
                      f"iterations; fixed cost per call {fixed}.", ""]
    if "traces" in case:
        t = case["traces"]
        lines += [f"### Objective against time, d={t['rank']} (plot: objective_vs_time.png)", ""]
        lines += _traces_table(t) + [""]
        lines += ["jaxnmf: time = fixed + iterations x s/iteration, the line through the median times of calls of "
                  "50 and 100 iterations; the objective comes from one call of all the iterations (\"one call, "
                  "measured\"). scikit-learn: the same line from its step timing. NumPy reference: the sum of its "
                  "timed steps.", ""]
        mu = t["coupled"]["jaxnmf MU"]
        timed_with = ", ".join(f"{name} {_sec(v)}" for name, v in mu["alongside"].items())
        ratios = ", ".join(_x(ratio(mu["seconds_per_iter"], v)) for v in mu["alongside"].values())
        lines += [f"Timed in the same rounds as the coupled jaxnmf MU fit: {timed_with}; the fit's seconds per "
                  f"iteration over them: {ratios}.", ""]
        if "hals_target" in t:
            h = t["hals_target"]
            got = (f"after {h['hals_iterations']} iterations, {_sec(h['hals_seconds'])}" if h["reached"] else
                   f"not within {h['hals_iterations']} iterations ({_sec(h['hals_seconds'])})")
            lines += [f"HALS reached MU's objective after {h['mu_iterations']} iterations ({h['target_objective']:.6g}, "
                      f"MU: {_sec(h['mu_seconds'])}) {got}: ratio {_x(h['ratio'])}.", ""]
    if "restarts" in case:
        r = case["restarts"]
        n = r["n_restarts"]
        lines += [f"### {n} restarts, d={r['rank']}", ""]
        lines += _table(["", f"{n} under vmap", f"{n} one after another", "ratio"], [
            [f"whole fits, {r['iters']} iterations", _sec(r["fit_vmap_seconds"]), _sec(sum(r["fit_single_seconds"])),
             _x(r["fit_ratio"])],
            ["one MU step", _sec(r["step_vmap_seconds"]), _sec(n * r["step_single_seconds"]), _x(r["step_ratio"])]]) + [""]
    if "memory" in case:
        rows = [[m["solver"], _gb(m["data_bytes"]), _gb(m["peak_bytes"] - m["baseline_bytes"]), _x(m["ratio"])]
                if "ratio" in m else [m["solver"], "-", "-", f"failed: {m['error']}"] for m in case["memory"]]
        lines += [f"### Peak memory, d={case['settings']['trace_rank']}, {case['settings']['memory_iters']} iterations "
                  "from NumPy input (own process)", ""]
        lines += _table(["solver", "data", "peak - baseline", "ratio"], rows) + [""]
    lines += ["### Targets (issue 6 / 2; defined on the paper-like case)", ""]
    lines += _table(["target", "measured", "limit", "verdict"],
                    [[t.name, _x(t.measured), _x(t.limit), t.verdict] for t in case_targets(case)]) + [""]
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    blas = "; ".join(f"{b.get('internal_api')} {b.get('version')} {b.get('architecture')}, {b.get('num_threads')} threads"
                     for b in m["blas"])
    env = ", ".join(f"{k}={v!r}" for k, v in m["openblas_env"].items())
    lines = ["# jaxnmf benchmark", "",
             f"`{results['command']}`: {results['mode']} mode, {results['total_seconds']:.0f} s in all.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB; device {m['device']}"
             + (f" (nominal memory bandwidth {m['device_peak_gb_per_s']} GB/s)" if m["device_peak_gb_per_s"] else "") + "; "
             f"load average {m['load_start']:.1f} at the start, {m['load_end']:.1f} at the end.",
             f"Versions: Python {m['python']}, jax {m['jax']}, numpy {m['numpy']}, scikit-learn {m['sklearn']}. "
             f"NumPy BLAS: {blas}. Environment: {env}.", ""]
    for name, case in results["cases"].items():
        lines += _case_markdown(name, case)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plot and files
# --------------------------------------------------------------------------------------------

def plot(results: dict, path: pathlib.Path) -> None:
    """Objective against wall time, one row per case, coupled and single-block problems."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = [(name, c["traces"]) for name, c in results["cases"].items() if "traces" in c]
    if not cases:
        return
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 4.5 * len(cases)), squeeze=False)
    for (name, traces), row in zip(cases, axes):
        for ax, (problem, solvers) in zip(row, (("coupled", traces["coupled"]),
                                                (f"single block {traces['single_block']}", traces["single"]))):
            for solver, t in solvers.items():
                style = "-" if solver.startswith("jaxnmf") else "o-"
                ax.plot(t["times"], t["objective"], style, markersize=3, label=solver)
            mu = solvers["jaxnmf MU"]
            ax.axhline(mu["objective"][-1], color="grey", ls=":", lw=1,
                       label=f"MU after {len(mu['objective'])} iterations")
            if problem == "coupled" and traces.get("hals_target", {}).get("reached"):
                h = traces["hals_target"]
                ax.plot([h["hals_seconds"]], [h["target_objective"]], "k*", markersize=12, label="HALS reaches it")
            ax.set(xscale="log", yscale="log", xlabel="wall time (s)", ylabel="objective J",
                   title=f"{name}, {problem}, d={traces['rank']}")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log(message: str) -> None:
    """A progress line on stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_outputs(out_dir: pathlib.Path, results: dict, text: str) -> None:
    """results.json and results.md in ``out_dir``, each atomically (``experiments._atomic``), so that a
    reader never sees a half-written file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1))
    write_text_atomic(out_dir / "results.md", text + "\n")


def publish(out_dir: pathlib.Path, results: dict, markdown_of: Callable[[dict], str]) -> dict:
    """The end of a single benchmark: its markdown written next to results.json and printed; returns
    ``results``."""
    text = markdown_of(results)
    write_outputs(out_dir, results, text)
    print(text)
    return results


def write(results: dict, out_dir: pathlib.Path) -> str:
    """results.json, results.md and objective_vs_time.png in ``out_dir``; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results, targets={name: [dict(asdict(t), status=t.status, verdict=t.verdict)
                                            for t in case_targets(c)] for name, c in results["cases"].items()})
    text = markdown(results)
    write_outputs(out_dir, results, text)
    plot(results, out_dir / "objective_vs_time.png")
    return text
