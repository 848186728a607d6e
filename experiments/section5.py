"""Section 5 read quantitatively: the group-sparsity path, and concepts of seen and unseen attributes.

Two studies for ``pipeline.run(..., studies=...)`` (the cross-dataset script uses both):

``sparsity_path``: the fit of the run repeated along a path of ``group_F`` values
(``jaxnmf.group_sparsity_path``, warm-started from weak to strong), with the number of active
factors, the relative error of every block and J at each value: where factors switch off and
what that costs in fit.

``seen_unseen``: for a network trained on part of an attribute space (``--train-restrict``) and
probed with all of it, how well single factors recover each attribute value (best-factor ROC
AUC, ``jaxnmf.attribute_auc``), split into the values the network was trained on (*seen*) and the
others (*unseen*), against three controls on the same probe images, fitted with the same rank
and options:

- *trained on everything*: the same architecture, data size, epochs and seed, without the
  restriction (an upper reference for the unseen values);
- *random network*: the architecture with its initial weights (what the architecture gives
  without learning);
- *pixels only*: the probe images' pixel blocks (what the images give without a network).
"""
from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence

import jax
import numpy as np
from matplotlib.figure import Figure

import jaxnmf
import models
from experiments import data as data_lib
from experiments.matrices import build_blocks
from experiments.pipeline import FittedRun, RunConfig, load_data, parse_restrict, trained_model
from experiments.report import Section, html_table

__all__ = ["PATH", "sparsity_path", "seen_unseen"]

PATH = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # group_F values in relative units


def _fit_options(cfg: RunConfig, blocks) -> dict:
    return dict(key=jax.random.key(cfg.seed), max_iter=cfg.iterations, tol=cfg.tol, solver=cfg.solver,
                **cfg.fit_options(blocks))


def sparsity_path(values: Sequence[float] = PATH):
    """The study: a ``FittedRun`` -> report section with the path's table and figure."""

    def study(run: FittedRun) -> Section:
        cfg = run.cfg
        points = jaxnmf.group_sparsity_path(run.blocks, cfg.rank, sorted({*values, cfg.group_F}),
                                            **_fit_options(cfg, run.blocks))
        names = list(run.blocks)
        rows = [dict(group_F=p.group_F, active=p.n_active, loss=p.result.loss, n_iter=p.result.n_iter,
                     relative_errors={b: float(p.result.relative_errors[b]) for b in names}) for p in points]
        fig = Figure(figsize=(9, 3.2), layout="constrained")
        ax_active, ax_error = fig.subplots(1, 2)
        x = np.arange(len(rows))
        ax_active.plot(x, [r["active"] for r in rows], "o-")
        ax_active.set(ylabel="active factors", ylim=(0, cfg.rank + 0.5))
        for b in names:
            ax_error.plot(x, [r["relative_errors"][b] for r in rows], "o-", label=b)
        ax_error.set(ylabel="relative error ||X - WF|| / ||X||", ylim=(0, 1.05))
        ax_error.legend(fontsize=7)
        for ax in (ax_active, ax_error):
            ax.set_xticks(x, [f"{r['group_F']:g}" for r in rows])
            ax.set_xlabel("group_F (relative units)")
            ax.axvline(x[[r["group_F"] for r in rows].index(cfg.group_F)], color="grey", ls=":", lw=1)
        table = html_table(["group_F", "active factors", *[f"rel. error {b}" for b in names], "J", "iterations"],
                           [[f"{r['group_F']:g}" + (" (this run)" if r["group_F"] == cfg.group_F else ""),
                             str(r["active"]), *[f"{r['relative_errors'][b]:.3f}" for b in names],
                             f"{r['loss']:.4g}", str(r["n_iter"])] for r in rows], numeric=tuple(range(1, len(names) + 4)))
        text = f"""
<p class="how">The fit repeated for each value of the group penalty group_F (relative units, with
the run's other options), each started from the fit before it. A factor switched off stays off.
Choose the largest value before the relative errors rise sharply; the dotted line marks this
run's value, {cfg.group_F:g}. This run's own fit started cold at that value and kept
{run.result.n_active} of {cfg.rank} factors; the path's warm start can differ by a factor or two.</p>
{table}"""
        return Section("Sparsity path", text, {"sparsity_path": fig}, {"points": rows})

    return study


def _seen_values(cfg: RunConfig, dataset: data_lib.Dataset) -> dict[str, set[int]]:
    """Attribute -> indices of the values the network was trained on (attributes restricted only)."""
    restrict = parse_restrict(cfg.train_restrict) or {}
    seen = {}
    for attribute, kept in restrict.items():
        names = dataset.attribute_names[attribute]
        seen[attribute] = {v if isinstance(v, int) else names.index(v) for v in kept}
    return seen


def _auc_split(F, attributes: dict[str, np.ndarray], seen: dict[str, set[int]]) -> dict[str, dict]:
    """Attribute -> {"seen": mean AUC, "unseen": mean AUC} of the best factor per value."""
    aucs = jaxnmf.attribute_auc(F, attributes)
    out = {}
    for attribute, kept in seen.items():
        per_value = aucs[attribute]["values"]
        split = {kind: [auc for v, (_, auc) in per_value.items() if (v in kept) == (kind == "seen")]
                 for kind in ("seen", "unseen")}
        out[attribute] = {kind: float(np.mean(v)) if v else None for kind, v in split.items()}
    return out


def seen_unseen(run: FittedRun) -> Section:
    """The study: seen/unseen best-factor AUC of this run's fit and of the three controls."""
    cfg = run.cfg
    if not cfg.train_restrict or run.probe.name != "shapes":
        raise ValueError("seen_unseen needs a shapes network trained with --train-restrict and probed with shapes")
    images = run.probe.images[run.probe_indices]
    attributes = {a: np.asarray(v)[run.probe_indices] for a, v in run.probe.attributes.items()}
    seen = _seen_values(cfg, run.probe)
    layers = cfg.resolved_layers()

    def all_blocks(model, variables) -> dict:
        capture = lambda x: models.capture_activations(model, variables, x, tuple(dict.fromkeys(
            spec.removesuffix(":avg") for spec in layers)))
        return build_blocks(images, capture, layers, progress=False)

    def as_run(blocks: dict) -> dict:  # the run's kinds of blocks
        return {k: v for k, v in blocks.items() if cfg.pixels or not k.startswith("pixels")}

    everything = dataclasses.replace(cfg, train_restrict=None, probe_dataset=None, model_path=None)
    train, test, _ = load_data(everything)
    model, variables, meta = trained_model(everything, train, test, run.out / "control_trained_on_everything")
    random_blocks = all_blocks(run.model, models.init_variables(run.model, jax.random.key(cfg.seed),
                                                                (1, *images.shape[1:])))
    conditions = {  # key in summary.json: (label, blocks)
        "this_network": ("this network (trained on the seen values)", run.blocks),
        "trained_on_everything": (f"trained on everything (test accuracy {meta['test_accuracy']:.3f})",
                                  as_run(all_blocks(model, variables))),
        "random_network": ("random network (initial weights)", as_run(random_blocks)),
        "pixels_only": ("pixels only", {k: v for k, v in random_blocks.items() if k.startswith("pixels")}),
    }
    penalties = sorted({cfg.group_F, 0.0}, reverse=True)  # the run's value, and none
    rows, data = [], {"trained_on_everything_test_accuracy": float(meta["test_accuracy"])}
    for key, (label, blocks) in conditions.items():
        data[key] = {}
        for group_F in penalties:
            result = (run.result if key == "this_network" and group_F == cfg.group_F else
                      jaxnmf.fit(blocks, cfg.rank, group_F=group_F, **_fit_options(cfg, blocks)))
            split = _auc_split(np.asarray(result.F), attributes, seen)
            errors = [float(e) for e in result.relative_errors.values()]
            data[key][f"group_F={group_F:g}"] = dict(auc=split, active=result.n_active,
                                                     mean_relative_error=float(np.mean(errors)))
            rows.append([html.escape(label), f"{group_F:g}",
                         *[("&ndash;" if split[a][k] is None else f"{split[a][k]:.3f}")
                           for a in seen for k in ("seen", "unseen")],
                         f"{result.n_active} of {cfg.rank}", f"{np.mean(errors):.3f}"])
    header = ["network", "group_F", *[f"{a}: {k}" for a in seen for k in ("seen", "unseen")], "active factors",
              "mean rel. error"]
    described = "; ".join(f"{a}: seen {', '.join(run.probe.attribute_names[a][v] for v in sorted(kept))}"
                          for a, kept in seen.items())
    text = f"""
<p class="how">Does the network have concepts for attribute values it never saw? For each value,
the best single factor's ROC AUC (0.5 = chance, 1 = perfect), averaged over the values the
network was trained on (seen) and the others (unseen), with the same rank and options on the
same {len(images)} probe images, at this run's group penalty and without one (a penalty can
leave a control with one factor, and its AUCs near 0.5 then say little). Controls: the same
architecture trained on every value, the architecture with its initial weights, and the pixels
alone. {html.escape(described)}.</p>
{html_table(header, rows, numeric=tuple(range(2, len(header))))}"""
    return Section("Seen and unseen attribute values", text, {}, {"conditions": data, "seen": {
        a: sorted(run.probe.attribute_names[a][v] for v in kept) for a, kept in seen.items()}})
