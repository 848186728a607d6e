"""The report section of a TCAV run (`experiments.tcav.tcav`): verdicts on the controls first,
then which concepts matter to which classes, a heatmap and a calibration plot."""
from __future__ import annotations

import html
import warnings
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from scipy import stats as sps

from experiments.report import Section, jsonable
from experiments.tcav import TCAVResult

__all__ = ["control_verdicts", "tcav_section"]


def control_verdicts(result: TCAVResult) -> dict:
    """The controls' numbers and one-line verdicts.

    Negative controls: the share of their uncorrected tests with p < alpha (expected alpha) and
    of control sets with any family-wise significant (layer, class) (expected at most alpha).
    All controls share one null sample of M sets, so these shares are not binomial: given the
    null, the true size of a level-alpha Monte-Carlo test is Beta(k, M + 1 - k) distributed,
    k = floor(alpha (M + 1)); the share among n control sets adds binomial noise. The test is
    called calibrated when both shares stay below alpha plus 2.58 standard deviations of the two
    together, ``sqrt(var_Beta + alpha (1 - alpha) / n)`` (a one-sided 0.5% check).
    Positive controls: the share of (set, layer) cases, layers not constant, where the set is
    family-wise significant for its expected class with a positive effect.
    """
    alpha, out = result.alpha, {}
    if result.negative is not None:
        p = result.negative.p_values
        finite = np.isfinite(p)
        k_raw, n_raw = int(np.sum(p[finite] < alpha)), int(finite.sum())
        family = np.nan_to_num(result.negative.p_family, nan=1.0) < alpha
        k_fam, n_fam = int(np.any(family, axis=(1, 2)).sum()), family.shape[0]
        m = result.negative.n_null
        k = max(int(np.floor(alpha * (m + 1))), 1)
        upper = float(alpha + 2.58 * np.sqrt(sps.beta.var(k, m + 1 - k) + alpha * (1 - alpha) / max(n_fam, 1)))
        rate, family_rate = k_raw / max(n_raw, 1), k_fam / max(n_fam, 1)
        calibrated = bool(n_raw and rate <= upper and family_rate <= upper)
        out["negative"] = dict(tests=n_raw, significant=k_raw, rate=rate, sets=n_fam, sets_with_any=k_fam,
                               family_rate=family_rate, upper_bound=upper, calibrated=calibrated,
                               verdict=(f"{'calibrated' if calibrated else 'NOT calibrated'}: {k_raw} of {n_raw} "
                                        f"negative-control tests ({100 * rate:.1f}%) significant at alpha {alpha:g} "
                                        f"uncorrected, {k_fam} of {n_fam} random sets ({100 * family_rate:.1f}%) with "
                                        f"any class significant family-wise (expected {100 * alpha:g}%, at most "
                                        f"{100 * upper:.1f}% by chance)"))
    if result.positive is not None:
        layers = np.flatnonzero(~result.constant_layers)
        rows = np.arange(len(result.positive_names))
        own_p = result.positive.p_family[rows[:, None], layers[None, :], result.positive_classes[:, None]]
        own_effect = result.positive.effect[rows[:, None], layers[None, :], result.positive_classes[:, None]]
        found = (np.nan_to_num(own_p, nan=1.0) < alpha) & (own_effect > 0)
        out["positive"] = dict(cases=int(found.size), found=int(found.sum()),
                               rate=float(found.mean()) if found.size else float("nan"),
                               per_layer={result.layers[l]: float(found[:, i].mean()) for i, l in enumerate(layers)},
                               verdict=(f"{int(found.sum())} of {found.size} positive-control cases "
                                        f"(class-defining sets, layers) significant for their own class "
                                        f"with a positive effect"))
    return out


def _figure(result: TCAVResult, class_names) -> Figure:
    d, n_layers, c = result.scores.shape
    panels = n_layers + (result.negative is not None)
    fig = Figure(figsize=(min(3 + 0.4 * c * n_layers + 3, 22), 1.6 + 0.3 * max(d, 6)), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    image = None
    effects = np.abs(result.uniform.effect[np.isfinite(result.uniform.effect)])
    lim = float(effects.max()) if effects.size and effects.max() > 0 else 1.0
    for l, (ax, layer) in enumerate(zip(axes, result.layers)):
        shown = np.ma.masked_where(~result.significant[:, l], result.uniform.effect[:, l])
        image = ax.imshow(shown, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_title(layer + (" (constant gradient: not tested)" if result.constant_layers[l] else ""), fontsize=9)
        ax.set_xticks(range(c), class_names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(d), result.names, fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:n_layers]), label="effect: score - null mean (grey: not significant)",
                     shrink=0.8)
    if result.negative is not None:
        ax = axes[-1]
        p = np.sort(result.negative.p_values[np.isfinite(result.negative.p_values)])
        ax.plot([0, 1], [0, 1], color="grey", lw=1, label="uniform")
        ax.plot(p, np.arange(1, p.size + 1) / max(p.size, 1), lw=1.5, label="negative controls")
        ax.set_xlabel("p-value", fontsize=8)
        ax.set_ylabel("share of tests <= p", fontsize=8)
        ax.set_title("calibration", fontsize=9)
        ax.legend(fontsize=7)
    return fig


def tcav_section(result: TCAVResult, class_names: Sequence[str], title: str = "TCAV (Figure 6)",
                 notes: Sequence[str] = ()) -> Section:
    """The section: control verdicts, per-concept findings, figure, significant tests, and in
    ``data`` every test (scores, nulls, effects, intervals, p-values) for ``summary.json``."""
    d, n_layers, c = result.scores.shape
    class_names = [str(x) for x in class_names]
    if len(class_names) != c:
        raise ValueError(f"class_names must name the {c} classes, got {len(class_names)}")
    verdicts = control_verdicts(result)
    n_concept = result.concept_sets.shape[1]
    lines = [html.escape(verdicts[k]["verdict"]) for k in ("negative", "positive") if k in verdicts]
    if "negative" not in verdicts:
        lines.append("No negative controls were run: the calibration of this test was not checked here.")
    constant = [layer for layer, flag in zip(result.layers, result.constant_layers) if flag]
    if constant:
        lines.append(f"Not tested (the {result.target} gradient is the same for every image of a class, so every "
                     f"score would be 0 or 1): {html.escape(', '.join(constant))}.")
    lines.extend(html.escape(n) for n in notes)
    findings, rows, tests, per_concept = [], [], [], {}
    for k, name in enumerate(result.names):
        hits = [(result.layers[l], class_names[j], result.uniform.effect[k, l, j])
                for l, j in zip(*np.nonzero(result.significant[k]))]
        summary = ", ".join(f"{'raises' if e > 0 else 'lowers'} {cls} at {layer}" for layer, cls, e in hits[:6])
        finding = (f"{summary or 'no significant class'}{' (and more)' if len(hits) > 6 else ''}; "
                   f"{'beats' if result.beats_classes[k] else 'does not beat'} the class-matched null")
        findings.append(f"<li><b>{html.escape(name)}</b>: {html.escape(finding)}</li>")
        short = ", ".join(f"{'raises' if e > 0 else 'lowers'} {cls} at {layer}" for layer, cls, e in hits[:3])
        per_concept[name] = (f"TCAV: {short or 'no significant class'}{f' (+{len(hits) - 3} more)' if len(hits) > 3 else ''}"
                             + ("; beats the class-matched null" if result.beats_classes[k] else ""))
        for l, layer in enumerate(result.layers):
            for j, cls in enumerate(class_names):
                tests.append(jsonable(dict(
                    concept=name, layer=layer, **{"class": cls}, score=result.scores[k, l, j],
                    null_mean=result.uniform.null_mean[l, j], effect=result.uniform.effect[k, l, j],
                    interval=result.uniform.interval[k, l, j], p_value=result.uniform.p_values[k, l, j],
                    p_family=result.uniform.p_family[k, l, j], matched_null_mean=result.matched.null_mean[k, l, j],
                    matched_p_family=result.matched.p_family[k, l, j], significant=result.significant[k, l, j])))
    rows = [e for e in tests if e["significant"]]
    shown = sorted(sorted(rows, key=lambda e: -abs(e["effect"]))[:60], key=lambda e: (e["concept"], e["layer"]))
    table = "".join(
        f"<tr><td>{html.escape(e['concept'])}</td><td>{html.escape(e['layer'])}</td><td>{html.escape(e['class'])}"
        f'</td><td class="num">{e["score"]:.2f}</td><td class="num">{e["null_mean"]:.2f}</td>'
        f'<td class="num">{e["effect"]:+.2f} [{e["interval"][0]:+.2f}, {e["interval"][1]:+.2f}]</td>'
        f'<td class="num">{e["p_family"]:.3f}</td>'
        f'<td class="num">{"-" if e["matched_p_family"] is None else format(e["matched_p_family"], ".3f")}</td></tr>'
        for e in shown)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no held-out sets: all NaN
        mean_accuracy = np.nanmean(result.cav_accuracy, axis=0)
    accuracy = "".join(f'<tr><td>{html.escape(layer)}</td><td class="num">{a:.2f}</td></tr>'
                       for layer, a in zip(result.layers, mean_accuracy))
    statistic = {"cosine": f"the mean rate at which the class's {result.target} rises along the unit CAV, relative "
                           "to the size of its gradient (in [-1, 1])",
                 "sign": f"the share of the class's score images whose {result.target} rises along the CAV",
                 "magnitude": f"the positive share of the summed rates at which the class's {result.target} rises "
                              "along the CAV"}[result.statistic]
    text = f"""
<p><b>Controls.</b> {'<br>'.join(lines)}</p>
<ul>{''.join(findings)}</ul>
<p class="how">How to read this (protocol of Kim et al. 2018, calibrated): each concept is a set of
{n_concept} images (a factor's top images among held-out <i>CAV images</i>, chosen through
<code>jaxnmf.transform</code>). At each layer a ridge classifier separates their activations from a
random set's; its normal is the concept activation vector (CAV). The score of (concept, class) is
{html.escape(statistic)}, averaged over {result.n_negatives} CAVs
against different random sets, computed on other held-out <i>score images</i>. It is compared with
the same statistic of {result.uniform.n_null} random image sets (Monte-Carlo p-value; family-wise
over each concept's classes and layers by max-T) and of {result.matched.n_null} random sets with the
concept's class histogram ("beats the class-matched null": the concept carries more than its
classes). The effect is the score minus the random sets' mean, with the interval of the null's
2.5-97.5% range. Significant cells (family-wise p &lt; {result.alpha:g}) are coloured: red raises the
class, blue lowers it. The negative controls (random sets tested as concepts) show how often the test
fires by chance; the positive controls (sets of one class) show that it finds what is there.</p>
<details><summary>{len(rows)} of {len(tests)} tests significant{' (the 60 largest effects in the table)' if len(rows) > 60 else ''}:
the table (the heatmap below shows them all)</summary>
<table><thead><tr><th>concept</th><th>layer</th><th>class</th><th>score</th><th>null mean</th>
<th>effect [interval]</th><th>p (family)</th><th>p, class-matched (family)</th></tr></thead>
<tbody>{table}</tbody></table></details>
<p class="how">Held-out accuracy of the concept CAVs (a concept's own score images against the other score images;
0.5 is chance):</p>
<table><thead><tr><th>layer</th><th>CAV accuracy</th></tr></thead><tbody>{accuracy}</tbody></table>"""
    data = jsonable(dict(layers=result.layers, class_names=class_names, concepts=result.names,
                         target=result.target, statistic=result.statistic, n_concept=n_concept,
                         n_null=result.uniform.n_null, n_matched=result.matched.n_null,
                         n_negatives=result.n_negatives, alpha=result.alpha, constant_layers=constant,
                         class_counts=result.class_counts,
                         cav_accuracy={layer: result.cav_accuracy[:, l] for l, layer in enumerate(result.layers)},
                         beats_classes=dict(zip(result.names, result.beats_classes)), controls=verdicts,
                         n_significant=len(rows)))
    data["tests"] = tests
    headline = "TCAV: " + "; ".join(
        [verdicts[k]["verdict"] for k in ("negative", "positive") if k in verdicts]
        or ["no negative controls were run, so its calibration was not checked"]) + (
        f"; {int(np.sum(result.beats_classes))} of {d} concepts beat the class-matched null.")
    return Section(title, text, {"tcav": _figure(result, class_names)}, data, headline=headline,
                   concepts=per_concept)
