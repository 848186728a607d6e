"""The work of ``python -m experiments.evaluate`` (imported once its command line is parsed):
one network, one set of blocks, every method on them, and the evaluation's files."""
from __future__ import annotations

import dataclasses
import html
import json
import time
from pathlib import Path

import jax
import numpy as np

import jaxnmf
from experiments import baselines, pipeline, run_folder
from experiments import data as data_lib
from experiments._atomic import write_text_atomic
from experiments.matrices import build_blocks
from experiments.report import html_table, jsonable


@dataclasses.dataclass(frozen=True)
class Measured:
    """One method's scores on the probe images and what it cost."""

    id: str
    label: str
    input: str
    scores: np.ndarray  # (d', N) non-negative
    factor_of: np.ndarray  # (d',) the factor each score row belongs to
    relative_error: float | None
    error_of: str  # what the relative error is measured on
    seconds: float
    info: dict


def evaluate(cfg, settings) -> Path:
    """Run the evaluation of ``cfg`` (a ``RunConfig``: network, blocks, rank) with the
    ``experiments.evaluate.Settings``; return the path of ``report.html``."""
    pipeline.check_config(cfg)
    t_start = time.perf_counter()
    out = Path(cfg.out).resolve()
    options = {**dataclasses.asdict(cfg), **{k: v for k, v in dataclasses.asdict(settings).items() if k != "overwrite"},
               "evaluation": True}
    if settings.rank_grid is not None:
        options["rank"] = "auto"
    run_folder.start(out, options, network_options=pipeline.NETWORK_OPTIONS, overwrite=settings.overwrite)
    train, test, probe = pipeline.load_data(cfg)
    if settings.data_seed != cfg.seed:  # the network keeps its data; the probe images are drawn anew
        probe = data_lib.make_shapes(cfg.n_test, seed=settings.data_seed, split="test")
    if not probe.attributes:
        raise ValueError(f"--dataset: {probe.name} has no ground-truth attributes to evaluate against")
    if cfg.n_probe > len(probe):
        raise ValueError(f"--n-probe: {cfg.n_probe} probe images but the probe split has {len(probe)}")
    model, variables, meta = pipeline.trained_model(cfg, train, test, out)

    idx = pipeline.probe_selection(cfg, probe)
    layers = cfg.resolved_layers()
    capture = pipeline.capture_for(model, variables, layers)
    blocks = build_blocks(probe.images[idx], capture, layers, out_dir=out / "blocks", progress=False)
    blocks = {name: np.asarray(block) for name, block in blocks.items()}
    pixel_names = [name for name in blocks if name.startswith("pixels")]
    layer_names = [name for name in blocks if name not in pixel_names]
    attributes = {a: np.asarray(v)[idx] for a, v in probe.attributes.items()}
    rank_choice = None
    if settings.rank_grid is not None:
        rank_choice = choose_rank(blocks, cfg, settings)
        cfg = dataclasses.replace(cfg, rank=rank_choice["chosen"])
        settings = dataclasses.replace(settings, sae_k=(
            min(settings.sae_k_given, cfg.rank * settings.sae_width) if settings.sae_k_given is not None
            else max(1, cfg.rank * settings.sae_width // 4)))
    print(f"evaluating on {len(idx)} {probe.name} probe images (data seed {settings.data_seed}), rank {cfg.rank}: "
          f"{len(blocks)} blocks, {sum(b.shape[0] for b in blocks.values())} rows")

    measured = [
        _coupled("coupled", "jaxnmf coupled (pixels + layers)", blocks, cfg, "pixels + " + " ".join(layer_names)),
        _coupled("activations_only", "jaxnmf activations only", {n: blocks[n] for n in layer_names}, cfg,
                 " ".join(layer_names)),
        _coupled("pixels_only", "jaxnmf pixels only", {n: blocks[n] for n in pixel_names}, cfg,
                 " ".join(pixel_names)),
        _coupled("coupled_signed_pixels", "jaxnmf coupled, centred pixels signed (semi-NMF)",
                 {n: centred(b) if n in pixel_names else b for n, b in blocks.items()}, cfg,
                 "mean-centred pixels (signed W) + " + " ".join(layer_names), signed=pixel_names),
    ]
    for name in layer_names:
        measured.append(_timed(f"nmf[{name}]", f"NMF on {name} alone (scikit-learn)", name,
                               f"{name} ({blocks[name].shape[0]} rows)",
                               lambda name=name: baselines.sklearn_nmf(blocks[name], cfg.rank, max_iter=cfg.iterations,
                                                                       seed=cfg.seed)))
    pooled = np.concatenate([blocks[n].astype(np.float64) / _norm(blocks[n]) for n in layer_names])
    pooled_input = f"the {len(layer_names)} activation blocks, each at unit Frobenius norm, stacked"
    measured.append(_timed("kmeans", "k-means on the activations", pooled_input, "the stacked activations",
                           lambda: baselines.kmeans(pooled, cfg.rank, seed=cfg.seed)))
    measured.append(_timed("pca", "PCA on the activations (sign-free AUC)", pooled_input, "the stacked activations",
                           lambda: baselines.pca(pooled, cfg.rank, seed=cfg.seed)))
    latents = cfg.rank * settings.sae_width
    measured.append(_timed("topk_sae", f"TopK SAE on the activations ({latents} latents, k = {settings.sae_k})",
                           pooled_input, "the stacked activations",
                           lambda: baselines.topk_sae(pooled, latents, settings.sae_k, steps=settings.sae_steps,
                                                      learning_rate=_sae_rate(), seed=cfg.seed)))
    for m in measured:
        print(f"  {m.label}: {m.seconds:.1f} s")

    results = [_score(m, attributes, probe.attribute_names) for m in measured]
    stability = _stability(blocks, cfg, settings, attributes, probe.attribute_names)
    summary = dict(
        dataset=probe.name, split=probe.split, n_probe=int(len(idx)), rank=cfg.rank, seed=cfg.seed,
        data_seed=settings.data_seed, layers=list(layers), blocks={n: list(b.shape) for n, b in blocks.items()},
        attributes=list(attributes), attribute_values={a: list(probe.attribute_names[a]) for a in attributes},
        network=dict(model=cfg.model, width=cfg.width, trained_on=meta.get("dataset"),
                     test_accuracy=meta.get("test_accuracy"), model_path=cfg.model_path),
        solver_options=cfg.solver_options(), block_emphasis=cfg.emphasis(), iterations=cfg.iterations, solver=cfg.solver,
        methods=results, stability=stability, rank_choice=rank_choice)
    summary["seconds_total"] = time.perf_counter() - t_start
    summary["out"] = str(out)

    if rank_choice is not None:
        summary["rank_choice"]["figure"] = "rank_curve.png"
        _rank_figure(rank_choice, out / "rank_curve.png")
    write_text_atomic(out / "summary.json", json.dumps(jsonable(summary), indent=1, allow_nan=False))
    write_text_atomic(out / "evaluation.md", markdown(summary))
    path = out / "report.html"
    write_text_atomic(path, page(summary))
    run_folder.finish(out, options)
    print(markdown(summary))
    print(f"done in {summary['seconds_total']:.0f} s")
    return path


def choose_rank(blocks: dict, cfg, settings) -> dict:
    """--rank auto: ``jaxnmf.rank_curve`` of the coupled blocks over ``settings.rank_grid`` (the coupled
    fit's objective, block weights and iterations, solved by ``settings.rank_curve_solver``;
    ``settings.rank_curve_restarts`` random starts per rank, key of ``cfg.seed``) and
    ``jaxnmf.choose_rank`` with tol ``RANK_TOL``; returns the curve (JSON-able) with the chosen rank."""
    from experiments.evaluate import RANK_TOL

    t = time.perf_counter()
    curve = jaxnmf.rank_curve(blocks, list(settings.rank_grid), key=jax.random.fold_in(jax.random.key(cfg.seed), 7),
                              held_out=0.2, n_restarts=settings.rank_curve_restarts, max_iter=cfg.iterations,
                              tol=cfg.tol, solver=settings.rank_curve_solver, **cfg.fit_options(blocks))
    chosen = jaxnmf.choose_rank(curve, tol=RANK_TOL)
    e = curve.bcv_error
    gains = [None] + [float((e[i - 1] - e[i]) / (e[i - 1] * (curve.ranks[i] - curve.ranks[i - 1])))
                      for i in range(1, len(e))]
    seconds = time.perf_counter() - t
    print(f"  rank curve over {[int(r) for r in curve.ranks]} ({seconds:.0f} s): BCV error "
          + ", ".join(f"{r}: {x:.3f}" for r, x in zip(curve.ranks, e)) + f"; chosen rank {chosen}")
    return dict(curve.as_dict(), gain_per_factor=gains, chosen=chosen, tol=RANK_TOL, held_out=0.2,
                restarts=settings.rank_curve_restarts, solver=settings.rank_curve_solver, seconds=seconds,
                rule=f"the smallest rank after which every step of the grid lowers the BCV error by less than "
                     f"{RANK_TOL:g} of itself per added factor (jaxnmf.choose_rank)")


def _rank_figure(rc: dict, path: Path) -> bytes:
    from matplotlib.figure import Figure

    from experiments._atomic import savefig_atomic

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for key, label, style in (("bcv_error", "bi-cross-validation (held-out rows x columns)", "o-"),
                              ("held_out_error", "held-out columns (transform)", "s--"),
                              ("train_error", "training", "^:")):
        ax.plot(rc["ranks"], rc[key], style, label=label)
    ax.axvline(rc["chosen"], color="0.4", lw=1)
    ax.text(rc["chosen"], ax.get_ylim()[1], f" chosen {rc['chosen']}", va="top", fontsize=8)
    ax.set_xlabel("rank d")
    ax.set_ylabel("weighted relative error")
    stab = [(r, s) for r, s in zip(rc["ranks"], rc["stability"]) if s is not None]
    if stab:
        ax2 = ax.twinx()
        ax2.plot(*zip(*stab), "x-", color="tab:gray", label="stability")
        ax2.set_ylabel("stability (mean matched cosine)")
        ax2.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper right" if not stab else "center right")
    fig.tight_layout()
    return savefig_atomic(fig, path, dpi=100)


def _sae_rate() -> float:
    from experiments.evaluate import SAE_LEARNING_RATE

    return SAE_LEARNING_RATE


def _norm(x: np.ndarray) -> float:
    norm = float(np.linalg.norm(x.astype(np.float64)))
    return norm if norm > 0 else 1.0


def _timed(id_, label, input_, error_of, fn) -> Measured:
    t = time.perf_counter()
    s = fn()
    return Measured(id_, label, input_, s.scores, s.factor_of, s.relative_error, error_of, time.perf_counter() - t,
                    s.info)


def _fit(blocks: dict, cfg, key, init: str, signed=None) -> jaxnmf.NMFResult:
    return jaxnmf.fit(blocks, cfg.rank, key=key, max_iter=cfg.iterations, tol=cfg.tol, init=init, n_restarts=1,
                      solver=cfg.solver, signed=signed, **cfg.fit_options(blocks))


def centred(block: np.ndarray) -> np.ndarray:
    """A block with each row's mean over the probe images subtracted (rows, N), for a signed fit."""
    x = block.astype(np.float32)
    return x - x.mean(axis=1, keepdims=True)


def weighted_relative_error(result: jaxnmf.NMFResult, blocks: dict) -> float:
    """sqrt(sum_b w_b ||X_b - W_b F||^2 / sum_b w_b ||X_b||^2): the fit's relative error on the
    weighted data it fits (the root mean square of the per-block errors for frobenius weights)."""
    num = den = 0.0
    for name, block in blocks.items():
        size = float(result.block_weights[name]) * float(np.sum(block.astype(np.float64) ** 2))
        num += size * float(result.relative_errors[name]) ** 2
        den += size
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _coupled(id_, label, blocks, cfg, input_, signed=None) -> Measured:
    t = time.perf_counter()
    result = _fit(blocks, cfg, jax.random.key(cfg.seed), "nndsvda", signed)
    F = np.asarray(result.F, dtype=np.float64)
    seconds = time.perf_counter() - t
    info = dict(n_iter=result.n_iter, converged=bool(result.converged), n_active=result.n_active,
                relative_errors={n: float(v) for n, v in result.relative_errors.items()}, init="nndsvda")
    return Measured(id_, label, input_, F, np.arange(cfg.rank), weighted_relative_error(result, blocks),
                    "the weighted blocks it fits", seconds, info)


def _score(m: Measured, attributes: dict, value_names: dict) -> dict:
    """AUCs of one method: per attribute, the mean over its values of the best score row's AUC."""
    aucs = jaxnmf.attribute_auc(m.scores, attributes)
    d = int(m.factor_of.max()) + 1
    per_attribute, per_value = {}, {}
    for a, r in aucs.items():
        per_attribute[a] = r["mean"]
        per_value[a] = {str(value_names[a][v]): dict(factor=int(m.factor_of[k]), auc=auc,
                                                     **({"negated": bool(k >= d)} if m.id == "pca" else {}))
                        for v, (k, auc) in r["values"].items()}
    known = [v for v in per_attribute.values() if v is not None]
    values = [x["auc"] for vs in per_value.values() for x in vs.values()]
    return dict(id=m.id, label=m.label, input=m.input, per_attribute=per_attribute, per_value=per_value,
                mean=float(np.mean(known)), worst=float(np.min(known)), worst_value=float(np.min(values)),
                relative_error=m.relative_error, relative_error_of=m.error_of, seconds=m.seconds, info=m.info)


def _stability(blocks, cfg, settings, attributes, value_names) -> dict:
    """Coupled fits from ``settings.restarts_for_stability`` random starts (keys fold_in(seed, r));
    each factor of the lowest-objective fit is matched to the others' (``jaxnmf.factor_stability``)."""
    t = time.perf_counter()
    fits = [_fit(blocks, cfg, jax.random.fold_in(jax.random.key(cfg.seed), r), "random")
            for r in range(settings.restarts_for_stability)]
    order = sorted(range(len(fits)), key=lambda r: fits[r].loss)
    Fs = [np.asarray(fits[r].F, dtype=np.float64) for r in order]
    stab = jaxnmf.factor_stability(Fs)
    reference = jaxnmf.attribute_auc(Fs[0], attributes)
    best_for = {k: [] for k in range(cfg.rank)}
    for a, r in reference.items():
        for v, (k, auc) in r["values"].items():
            best_for[k].append(dict(attribute=a, value=str(value_names[a][v]), auc=auc))
    per_fit = []
    for r in order:
        scores = jaxnmf.attribute_auc(np.asarray(fits[r].F), attributes)
        means = [x["mean"] for x in scores.values() if x["mean"] is not None]
        per_fit.append(dict(restart=r, loss=fits[r].loss, mean_auc=float(np.mean(means)), n_iter=fits[r].n_iter,
                            relative_error=weighted_relative_error(fits[r], blocks)))
    seconds = time.perf_counter() - t
    print(f"  stability ({len(fits)} random starts): mean matched cosine {stab.mean:.3f}, {seconds:.1f} s")
    return dict(restarts=len(fits), init="random", keys="jax.random.fold_in(jax.random.key(seed), r)",
                reference_restart=order[0], per_factor=stab.per_factor, mean=stab.mean,
                min_per_factor=stab.cosines.min(axis=0), cosines=stab.cosines, permutations=stab.permutations,
                best_for=best_for, fits=per_fit, seconds=seconds)


# ----------------------------------------------------------------------------- output
def _num(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _seconds(x) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _context(s: dict) -> str:
    acc = s["network"]["test_accuracy"]
    return (f"{s['n_probe']} {s['dataset']} probe images ({s['split']} split, data seed {s['data_seed']}), "
            f"rank d = {s['rank']}, seed {s['seed']}; network {s['network']['model']} (width "
            f"{s['network']['width']}, test accuracy {_num(acc)}, trained on {s['network']['trained_on']}); layers "
            f"{', '.join(s['layers'])}.")


NOTES = (
    "AUC: for each value of an attribute, the ROC AUC of the factor that separates it best "
    "(`jaxnmf.attribute_auc`); an attribute's AUC is the mean over its values; mean and worst are over the "
    "attributes.",
    "PCA's components have no sign, so PCA alone is credited max(AUC, 1 - AUC) (each component and its negation "
    "are candidates). k-means scores an image by minus its distance to each centroid; the TopK SAE by its codes.",
    "Rel. error: ||X - X_hat||_F / ||X||_F of what the method reconstructs: jaxnmf the weighted blocks it fits "
    "(each scaled by the square root of its block weight), single-layer NMF its layer, k-means (centroids), PCA and the SAE the stacked "
    "activation blocks (each at unit Frobenius norm).",
    "Seconds: wall-clock on this machine; jaxnmf's include compiling the solver.",
)


def markdown(s: dict) -> str:
    attrs = s["attributes"]
    lines = [f"Concept recovery, best-factor ROC AUC per ground-truth attribute: {_context(s)}", "",
             "| method | " + " | ".join(attrs) + " | mean | worst | rel. error | seconds |",
             "|---|" + "---:|" * (len(attrs) + 4)]
    for m in s["methods"]:
        cells = [_num(m["per_attribute"][a]) for a in attrs] + [_num(m["mean"]), _num(m["worst"]),
                                                                 _num(m["relative_error"]), _seconds(m["seconds"])]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    st = s["stability"]
    lines += ["", *(f"- {note}" for note in NOTES),
              f"- Stability: jaxnmf coupled from {st['restarts']} random starts; each factor of the lowest-objective "
              f"fit matched to the others' (Hungarian, cosine of rows of F): mean matched cosine {st['mean']:.3f}, "
              f"per factor " + ", ".join(f"{c:.2f}" for c in st["per_factor"]) + ".", ""]
    rc = s.get("rank_choice")
    if rc:
        lines += [f"Rank chosen without labels (--rank auto): d = {rc['chosen']}; {rc['rule']}.", "",
                  "| rank | BCV error | gain per factor | held-out columns | training | stability | converged |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for i, r in enumerate(rc["ranks"]):
            lines.append(f"| {r}{' (chosen)' if r == rc['chosen'] else ''} | {rc['bcv_error'][i]:.4f} | "
                         f"{_pct(rc['gain_per_factor'][i])} | {rc['held_out_error'][i]:.4f} | "
                         f"{rc['train_error'][i]:.4f} | {_num(rc['stability'][i])} | {rc['converged'][i]} |")
        lines.append("")
    return "\n".join(lines)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 0 auto; padding: 1em 1.5em; color: #1d1d1f;
       line-height: 1.45; }
h2 { border-bottom: 2px solid #ddd; padding-top: 0.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; }
th { background: #f1f1f4; } tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.how { color: #444; }
"""


def _rank_section(s: dict) -> str:
    rc = s.get("rank_choice")
    if not rc:
        return ""
    import base64

    esc = html.escape
    rows = [[f"{r}{' (chosen)' if r == rc['chosen'] else ''}", f"{rc['bcv_error'][i]:.4f}",
             _pct(rc["gain_per_factor"][i]), f"{rc['held_out_error'][i]:.4f}", f"{rc['train_error'][i]:.4f}",
             _num(rc["stability"][i]), str(rc["converged"][i])] for i, r in enumerate(rc["ranks"])]
    table = html_table(["rank", "BCV error", "gain per factor", "held-out columns", "training", "stability",
                        "converged"], rows, numeric=(1, 2, 3, 4, 5))
    img = ""
    path = Path(s["out"]) / rc["figure"] if rc.get("figure") and s.get("out") else None
    if path is not None and path.exists():
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        img = f'<img src="{uri}" alt="rank curve: errors and stability against the rank">'
    return f"""<section id="rank"><h2>Rank chosen without labels</h2>
<p class="how">--rank auto: <code>jaxnmf.rank_curve</code> of the coupled blocks ({rc['n_train']} images fitted,
{rc['n_held_out']} held out; 20 % of each block's rows held out too; {rc['restarts']} random starts per rank,
solver {esc(str(rc.get('solver')))}) and
<code>jaxnmf.choose_rank</code>: {esc(rc['rule'])}. Chosen: d = {rc['chosen']}. BCV error: the held-out rows of the
held-out images, predicted from factors fitted without them.</p>{img}{table}</section>"""


def page(s: dict) -> str:
    """The evaluation as one self-contained HTML page (nothing loaded from elsewhere)."""
    esc = html.escape
    attrs = s["attributes"]
    main_rows = [[esc(m["label"]), *(_num(m["per_attribute"][a]) for a in attrs), _num(m["mean"]),
                  _num(m["worst"]), _num(m["relative_error"]), _seconds(m["seconds"])] for m in s["methods"]]
    main = html_table(["method", *attrs, "mean", "worst", "rel. error", "seconds"], main_rows,
                      numeric=range(1, len(attrs) + 5))
    value_rows = []
    for a in attrs:
        for v in s["attribute_values"][a]:
            cells = []
            for m in s["methods"]:
                x = m["per_value"][a].get(str(v))
                cells.append("–" if x is None else f'{x["auc"]:.3f} ({x["factor"]}{"&minus;" if x.get("negated") else ""})')
            value_rows.append([esc(a), esc(str(v)), *cells])
    values = html_table(["attribute", "value", *(m["label"] for m in s["methods"])], value_rows,
                        numeric=range(2, len(s["methods"]) + 2))
    st = s["stability"]
    stab_rows = [[str(k), f"{st['per_factor'][k]:.3f}", f"{st['min_per_factor'][k]:.3f}",
                  esc(", ".join(f"{b['attribute']}={b['value']} ({b['auc']:.2f})" for b in st["best_for"][k]) or "–")]
                 for k in range(len(st["per_factor"]))]
    stab = html_table(["factor", "mean matched cosine", "lowest over the fits", "best factor of (AUC)"], stab_rows,
                      numeric=(1, 2))
    fit_rows = [[str(f["restart"]), f"{f['loss']:.5g}", _num(f["relative_error"]), _num(f["mean_auc"]),
                 str(f["n_iter"])] for f in st["fits"]]
    fits = html_table(["start", "objective", "rel. error", "mean AUC", "iterations"], fit_rows, numeric=(1, 2, 3, 4))
    inputs = html_table(["method", "fitted to"], [[esc(m["label"]), esc(m["input"])] for m in s["methods"]])
    notes = "".join(f"<li>{esc(n)}</li>" for n in NOTES)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Concept recovery: jaxnmf against the baselines</title><style>{_CSS}</style></head>
<body><h1>Concept recovery: jaxnmf against the baselines</h1>
<p class="how">{esc(_context(s))}</p>
<section id="table"><h2>Best-factor AUC per attribute</h2>{main}<ul class="how">{notes}</ul></section>
<section id="values"><h2>Every value</h2>
<p class="how">AUC of the best factor for each attribute value, and that factor (&minus;: PCA's negated
component).</p>{values}</section>
<section id="stability"><h2>Stability of the coupled factors</h2>
<p class="how">jaxnmf coupled fitted from {st['restarts']} random starts (keys differing). Each factor of the fit
with the lowest objective is matched to a factor of every other fit by the Hungarian algorithm on the cosine
similarity of rows of F; its stability is the mean matched cosine (1: it comes back in every fit). Mean over the
factors: {st['mean']:.3f}.</p>{stab}{fits}</section>
{_rank_section(s)}
<section id="inputs"><h2>What each method is fitted to</h2>{inputs}</section>
<p class="how">All numbers: <code>summary.json</code> next to this page.</p>
</body></html>
"""
