"""One folder per run: a self-contained HTML report of the paper's Section 4 analyses.

:func:`write_report` writes into ``out_dir``:

- ``report.html``: opens offline in any browser; CSS inline, every figure and thumbnail
  embedded as a base64 PNG data URI, no external request.
- the figures as PNG files (listed under ``"figures"`` in ``summary.json``).
- ``summary.json``: configuration, data sizes, fit diagnostics, the factor table, per-layer
  eigenvalues and mean of the top K, neighbours, attribute AUCs (strict JSON: NaN -> null).
- ``factors.npz``: ``F`` (d, N), every block factor under its block name (rows_b, d),
  ``labels`` (N,) (absent for unlabelled images), ``superlabels`` (N,) when the dataset has
  them, and ``probe_indices`` (N,).

Unlabelled images (``dataset.labels`` None) get the same report less its class-based parts (the
class columns of the factor table, the neighbour image's class, the class AUC); the report says
which were left out and why (``UNLABELLED_NOTE``).

Every file is written atomically (``experiments._atomic``), ``report.html`` last: a reader never
finds half a file, and a folder with ``report.html`` holds every other file of the report.

Other features add a section through :class:`Section`.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxnmf.analysis import (
    attribute_auc,
    factor_table,
    latent_images,
    masked_top_images,
    mean_top_eigenvalues,
    median_masks,
    nearest_neighbours,
    neighbour_factor_distribution,
    neuron_similarity,
    similarity_eigenvalues,
)
from experiments._atomic import savefig_atomic, savez_atomic, write_text_atomic

__all__ = ["Section", "UNLABELLED_NOTE", "write_report"]

_RESERVED_NPZ_KEYS = ("F", "labels", "superlabels", "probe_indices")
_THUMBS_PER_FACTOR = 8
_FACTORS_PER_BAND = 10


@dataclass(frozen=True)
class Section:
    """An extra section of the report, e.g. TCAV scores with a heatmap.

    Attributes:
        title: the section heading.
        html: trusted HTML inserted as is after the heading; it must not load external
            resources (the report is meant to open offline).
        figures: file stem -> matplotlib Figure; each is saved as ``extra_<stem>.png`` and
            embedded after ``html``. Stems use letters, digits, ``_`` and ``-`` only.
        data: JSON-serialisable numbers for ``summary.json`` (under ``extra_sections``).
        headline: one plain-text line for the report's summary ("At a glance"), e.g. whether
            the section's test passed its controls; empty for none.
        concepts: concept name as the report writes it ("factor 3") -> one plain-text line on
            that concept for the summary's table (e.g. what TCAV found for it).
    """

    title: str
    html: str = ""
    figures: Mapping[str, Figure] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    headline: str = ""
    concepts: Mapping[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def jsonable(x):
    """Plain JSON types from numpy/jax containers; non-finite floats -> None, else str()."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, bool, type(None))):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, np.bool_):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if hasattr(x, "__array__"):
        return jsonable(np.asarray(x).tolist())
    return str(x)


def _rgb(images: np.ndarray) -> np.ndarray:
    """(..., H, W, C) with C in {1, 3} and values in [0, 1] -> (..., H, W, 3) float."""
    images = np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _mosaic(images: np.ndarray, n_cols: int, pad: int = 1) -> np.ndarray:
    """(n, H, W, 3) -> one (rows*(H+pad)-pad, n_cols*(W+pad)-pad, 3) image, white gaps."""
    n, height, width, _ = images.shape
    n_rows = -(-n // n_cols)
    out = np.ones((n_rows * (height + pad) - pad, n_cols * (width + pad) - pad, 3))
    for i, image in enumerate(images):
        r, c = divmod(i, n_cols)
        out[r * (height + pad):r * (height + pad) + height,
            c * (width + pad):c * (width + pad) + width] = image
    return out


def _png_uri(image: np.ndarray, scale: int) -> str:
    """(H, W, 3) in [0, 1] -> PNG data URI, upscaled ``scale`` times by nearest neighbour."""
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, (big * 255).round().astype(np.uint8), format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _Figures:
    """Saves figures as PNG files in the report folder and returns them as data URIs."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names: list[str] = []

    def save(self, fig: Figure, name: str) -> str:
        path = self.folder / f"{name}.png"
        data = savefig_atomic(fig, path, dpi=100)
        self.names.append(path.name)
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(uri: str, alt: str, css: str = "figure") -> str:
    return f'<img class="{css}" src="{uri}" alt="{html.escape(alt)}">'


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]],
           numeric: Sequence[int] = ()) -> str:
    """HTML table; header cells are escaped, row cells are trusted HTML; the columns in
    ``numeric`` are right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _describe(value, explanations: Mapping[str, str]) -> str:
    if value is None:
        return "not recorded in the configuration"
    text = str(value)
    return f"{text} ({explanations[text]})" if text in explanations else text


_BLOCK_WEIGHTS = {
    "none": "every block enters the objective unscaled, as the paper's authors did, so the "
            "largest activation blocks dominate the fit",
    "frobenius": "each block is divided by its Frobenius norm, so every block weighs the same",
}
_VARIANTS = {
    "project": "this project's defaults: the paper's objective (Eq. 3.1) with every block divided by "
               "its Frobenius norm and penalties in relative units",
    "paper": "the paper's objective (Eq. 3.1) as written: blocks unscaled, no penalty",
    "authors": "the authors' published code: lam_F = 1 as raw L2 and L1 penalties on F, and "
               "unit-norm columns of every P and O after each update without rescaling F "
               "(the objective may then rise between iterations)",
}
_SOLVERS = {
    "mu": "multiplicative updates (the paper's Eq. 3.2)",
    "hals": "hierarchical alternating least squares (exact row-by-row minimisation)",
}
# below this test accuracy (0.6 for more than 20 classes) the summary warns about the network
LOW_ACCURACY, LOW_ACCURACY_MANY_CLASSES = 0.8, 0.6
_GLANCE_THUMBS = 4
UNLABELLED_NOTE = ("The probe images have no labels, so the parts of this report that need a class for every image "
                   "are left out: the class columns of the factor table (Table 1: class weights, top superclass and "
                   "their entropy), the top classes of each concept in the summary, the class of the neighbour "
                   "image and the class AUC. Everything else is found without labels and is complete.")

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1180px;
       margin: 0 auto; padding: 1em 1.5em; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-top: 0.6em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; vertical-align: middle; }
th { background: #f1f1f4; } tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { image-rendering: pixelated; image-rendering: crisp-edges; }
img.figure { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.4em 0.8em; }
.how { color: #444; }
code { background: #f1f1f4; padding: 0 0.25em; }
ul.glance { background: #f4f8fc; border-left: 4px solid #3b7dd8; padding: 0.5em 0.8em 0.5em 2em; }
details > summary { cursor: pointer; color: #3b5b8c; margin: 0.4em 0; }
"""


# ----------------------------------------------------------------------------- figures
def _objective_figure(losses: np.ndarray) -> Figure:
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(1, losses.shape[0] + 1), losses, color="C0")
    if losses.size and np.all(losses > 0):
        ax.set_yscale("log")
    ax.set(title="Objective J per iteration (best restart)", xlabel="iteration",
           ylabel="objective J")
    ax.grid(alpha=0.3)
    return fig


def _restarts_figure(restart_losses: np.ndarray) -> Figure:
    fig = Figure(figsize=(7, 3.0), layout="constrained")
    ax = fig.subplots()
    index = np.arange(restart_losses.shape[0])
    best = int(np.argmin(restart_losses))
    ax.scatter(index, restart_losses, color="C0", label="restart")
    ax.scatter([best], [restart_losses[best]], color="C3", zorder=3, label="best (reported)")
    ax.set(title="Final objective of each restart", xlabel="restart", ylabel="final objective J")
    ax.set_xticks(index)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _top_images_figure(images: np.ndarray, table: list[dict]) -> Figure:
    d = len(table)
    n_cols = min(_THUMBS_PER_FACTOR, min(len(row["top_images"]) for row in table))
    height, width = images.shape[1:3]
    rows = [_rgb(images[row["top_images"][:n_cols]]) for row in table]
    mosaic = _mosaic(np.concatenate(rows), n_cols)
    fig = Figure(figsize=(1.5 + 0.7 * n_cols, 0.5 + 0.7 * d), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks((np.arange(d) * (height + 1) + height / 2), [f"factor {k}" for k in range(d)])
    ax.set_xticks((np.arange(n_cols) * (width + 1) + width / 2), range(1, n_cols + 1))
    ax.set(title="Top images of each factor (largest F[k, n] first)", xlabel="rank")
    return fig


def _similarity_figure(similarities: Mapping[str, np.ndarray],
                       neurons: Mapping[str, int]) -> Figure:
    n = len(similarities)
    n_cols = min(n, 3)
    n_rows = -(-n // n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.7 * n_rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for ax, (layer, S) in zip(axes, similarities.items()):
        im = ax.imshow(S, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set(title=f"{layer} ({neurons[layer]} neurons)", xlabel="factor", ylabel="factor")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.85)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig


def _eigenvalues_figure(eigenvalues: Mapping[str, np.ndarray]) -> Figure:
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    for layer, values in eigenvalues.items():
        ax.plot(np.arange(1, values.shape[0] + 1), values, marker="o", markersize=3, label=layer)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="identity (all 1)")
    ax.set(title="Eigenvalues of each layer's similarity matrix, largest first",
           xlabel="eigenvalue rank", ylabel="eigenvalue")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _mean_top_figure(mean_top: Mapping[str, float], k: int) -> Figure:
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    layers = list(mean_top)
    values = [mean_top[layer] for layer in layers]
    ax.plot(range(len(layers)), values, marker="o", color="C1")
    for i, v in enumerate(values):
        ax.annotate(f"{v:.2f}", (i, v), textcoords="offset points", xytext=(0, 6), ha="center")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="identity (1)")
    ax.set_xticks(range(len(layers)), layers)
    ax.set(title=f"Mean of the top {k} eigenvalues per layer (lower: concepts more separate)",
           xlabel="layer (shallow to deep)", ylabel=f"mean of top {k} eigenvalues")
    ax.margins(y=0.2)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _pixels_figure(latent, masks, top, masked) -> Figure:
    d, height, width = masks.shape
    kinds = [("latent image", _rgb(latent)), ("median mask", _rgb(masks[..., None] * 1.0)),
             ("top image", _rgb(top)), ("mask over top image", _rgb(masked))]
    n_bands = -(-d // _FACTORS_PER_BAND)
    n_cols = -(-d // n_bands)  # bands of equal width: 12 factors are two bands of 6, not 10 and 2
    fig = Figure(figsize=(2.0 + 1.0 * n_cols, 0.4 + 4.2 * n_bands), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_bands, 1, squeeze=False)).ravel()
    for band, ax in enumerate(axes):
        factors = np.arange(band * n_cols, min(d, (band + 1) * n_cols))
        cells = np.ones((len(kinds), n_cols, height, width, 3))
        for row, (_, images) in enumerate(kinds):
            cells[row, :len(factors)] = images[factors]
        ax.imshow(_mosaic(cells.reshape(-1, height, width, 3), n_cols), interpolation="nearest")
        ax.set_yticks(np.arange(len(kinds)) * (height + 1) + height / 2, [k for k, _ in kinds])
        ax.set_xticks(np.arange(len(factors)) * (width + 1) + width / 2, factors)
        ax.set_xlabel("factor")
    return fig


def _neighbours_figure(query_image, neighbour_images, distribution, query_factor) -> Figure:
    n_cols = min(10, neighbour_images.shape[0])
    fig = Figure(figsize=(14, 3.6), layout="constrained")
    ax_query, ax_grid, ax_bar = fig.subplots(
        1, 3, gridspec_kw={"width_ratios": [1, 3.2, 2.6]})
    ax_query.imshow(_rgb(query_image), interpolation="nearest")
    ax_query.set(title="chosen image", xticks=[], yticks=[])
    ax_grid.imshow(_mosaic(_rgb(neighbour_images), n_cols), interpolation="nearest")
    ax_grid.set(title=f"its {neighbour_images.shape[0]} nearest neighbours in F "
                      "(row by row, nearest first)", xticks=[], yticks=[])
    colours = ["C3" if k == query_factor else "C0" for k in range(distribution.shape[0])]
    ax_bar.bar(np.arange(distribution.shape[0]), distribution, color=colours)
    ax_bar.set(title="their dominant factors (red: the chosen image's)",
               xlabel="dominant factor", ylabel="share of neighbours")
    ax_bar.set_xticks(np.arange(distribution.shape[0]))
    ax_bar.tick_params(axis="x", labelsize=10 if distribution.shape[0] <= 20 else 6)
    return fig


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class _Probe:
    """The probe images and their labels, in the order of F's columns."""

    indices: np.ndarray        # (N,) into the dataset
    images: np.ndarray         # (N, H, W, C)
    labels: np.ndarray | None  # (N,); None for unlabelled images
    superlabels: np.ndarray | None
    class_names: list[str]     # empty for unlabelled images
    superclass_names: list[str] | None


def _intro_section(config, notes, probe: _Probe, dataset_size: int, d: int,
                   pixel_blocks, layer_blocks) -> str:
    n, height, width, channels = probe.images.shape
    settings = html_table(["setting", "value"], [[html.escape(str(k)), html.escape(str(v))]
                                             for k, v in config.items()])
    notes_html = "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
    return f"""
{notes_html}
<p>This report describes what a trained network has learned, found without labels by a coupled
non-negative matrix factorisation (Saini &amp; Papalexakis, SDM 2021). The {n} probe images are
described by several data blocks (listed below: pixels of each colour channel, activations of
chosen layers), one column per image. Each block is approximated as
<code>X_b &asymp; W_b F</code>, all blocks sharing F, every entry non-negative.</p>
<ul>
<li><b>F</b> ({d} &times; {n}): column n says how strongly each of the d = {d} <b>latent
concepts</b> (factors) is present in probe image n.</li>
<li><b>W_b</b> (rows of block b &times; {d}): column k says which pixels (pixel blocks) or which
neurons (activation blocks) carry concept k.</li>
</ul>
<p>A latent concept is therefore a group of images that score high on it together with the pixel
pattern and the neurons they share. Class labels were not used to find the concepts; they only
name them afterwards (Table&nbsp;1). Read the factor table first, then look a concept up in the
other sections by its number.</p>
<p><b>Blocks</b>: pixels {html.escape(", ".join(pixel_blocks) or "none")}; layers
{html.escape(", ".join(layer_blocks) or "none")}.
<b>Block weights</b>: {html.escape(_describe(config.get("block_weights"), _BLOCK_WEIGHTS))}.
<b>Variant</b>: {html.escape(_describe(config.get("variant"), _VARIANTS))}.
<b>Solver</b>: {html.escape(_describe(config.get("solver"), _SOLVERS))}.</p>
<h3>Settings</h3>
{settings}
<p>Data: {n} probe images of {height}&times;{width}&times;{channels} drawn from {dataset_size};
{f"{len(probe.class_names)} classes" if probe.labels is not None else "no labels"}.</p>"""


def _glance_section(config, probe: _Probe, fit: Mapping, table: list[dict], attribute_aucs: Mapping | None,
                    extra_sections: Sequence[Section]) -> tuple[str, dict]:
    """The summary at the top: the network, the probe set, whether the fit can be read, each concept
    in one line, and what the other sections' checks found. Every statement is kept in
    ``summary.json`` (``glance``) next to the numbers it is made from."""
    n, height, width, channels = probe.images.shape
    n_classes, d = len(probe.class_names), len(table)
    statements: list[str] = []
    accuracy = config.get("model_test_accuracy")
    floor = LOW_ACCURACY if n_classes <= 20 else LOW_ACCURACY_MANY_CLASSES
    network = {"model": config.get("model"), "trained_on": config.get("trained_on"), "test_accuracy": accuracy,
               "low_accuracy": accuracy is not None and accuracy < floor, "low_accuracy_below": floor}
    if accuracy is None:
        statements.append("Network: its test accuracy was not recorded, so how well it learned its task is unknown.")
    else:
        statements.append(f"Network: {config.get('model', 'the network')} trained on {config.get('trained_on', '?')}, "
                          f"test accuracy {accuracy:.3f}." + (
                              f" WARNING: below {floor:g}. The concepts of a network that often errs partly "
                              "describe its errors; train it longer (--epochs) before reading them."
                              if network["low_accuracy"] else ""))
    probe_name = config.get("probe_dataset") or config.get("dataset")
    statements.append(f"Probe set: {n} images{f' of {probe_name}' if probe_name else ''} "
                      f"({height}x{width}x{channels}), "
                      + (f"{n_classes} classes." if probe.labels is not None else "unlabelled."))
    if fit["n_active"] == 0:
        state = "No concept is active (F is zero or negligible): nothing in this report should be read."
    elif not fit["finite"]:
        state = (f"The fit stopped at a non-finite step after {fit['n_iter']} iterations; the last finite iterate is "
                 "shown. Rescale the data or lower the penalties.")
    elif fit["converged"]:
        state = f"The fit converged by its own test after {fit['n_iter']} iterations."
    else:
        state = (f"The fit did NOT converge: it stopped at the iteration limit ({fit['n_iter']} iterations); raise "
                 "--iterations or loosen --tol before relying on small differences between concepts.")
    errors = fit["relative_errors"]
    statements.append(f"{state} {fit['n_active']} of {d} concepts are active; relative error "
                      + ", ".join(f"{b} {float(e):.2f}" for b, e in errors.items()) + ".")
    statements += [section.headline for section in extra_sections if section.headline]

    credited: dict[int, list[tuple[float, str]]] = {k: [] for k in range(d)}
    for attribute, result in (attribute_aucs or {}).items():
        if attribute == "class":
            continue
        for value, best in result["values"].items():
            credited[best["factor"]].append((best["auc"], f"{attribute} {value}"))
    concepts, rows = [], []
    total_mass = sum(row["mass"] for row in table) or 1.0
    scale = max(1, 64 // height)  # as in the factor table
    for row in table:
        k = row["factor"]
        matches = [f"{name} ({auc:.2f})" for auc, name in sorted(credited[k], reverse=True) if auc >= 0.8][:3]
        checks = [section.concepts[f"factor {k}"] for section in extra_sections if f"factor {k}" in section.concepts]
        concept = {"factor": k, "active": bool(fit["active"][k]), "share": row["mass"] / total_mass,
                   "top_classes": [c["name"] for c in row["top_classes"][:2]], "ground_truth": matches,
                   "checks": checks}
        concepts.append(concept)
        thumbs = _rgb(probe.images[row["top_images"][:_GLANCE_THUMBS]])
        rows.append([f"<b>{k}</b>" + ("" if concept["active"] else " (inactive)"), f"{100 * concept['share']:.1f}%",
                     html.escape(", ".join(f'{c["name"]} {c["weight"]:.2f}' for c in row["top_classes"][:2])
                                 or ("no labels" if probe.labels is None else "-")),
                     html.escape("; ".join(matches) or ("-" if attribute_aucs else "no ground truth")),
                     html.escape("; ".join(checks) or "-"),
                     _img(_png_uri(_mosaic(thumbs, thumbs.shape[0]), scale), f"top images of factor {k}", "thumbs")])
    items = "".join(f"<li>{html.escape(text)}</li>" for text in statements)
    text = f"""
<ul class="glance">{items}</ul>
{html_table(["concept", "share", "top classes", "ground truth it recovers (AUC >= 0.8)", "checks", "top images"],
            rows, numeric=(1,))}
<p class="how">One row per concept (factor of F); the sections below explain each column: "share"
and "top classes" come from the factor table, "ground truth" from the attribute AUCs (when the
dataset records attributes), "checks" from the validation sections.</p>"""
    return text, {"statements": statements, "network": network, "concepts": concepts}


def _fit_section(result, factors, kinds, figures: _Figures) -> tuple[str, dict]:
    losses = np.asarray(result.losses, dtype=np.float64)
    restart_losses = np.asarray(result.restart_losses, dtype=np.float64)
    spread: dict[str, Any] = {"n_restarts": restart_losses.shape[0]}
    if restart_losses.size:
        best = restart_losses.min()
        spread.update(best=best, median=np.median(restart_losses), worst=restart_losses.max(),
                      relative_spread=(restart_losses.max() - best) / best if best > 0 else None)
    summary = {"loss": float(result.loss), "n_iter": int(result.n_iter),
               "converged": bool(result.converged), "finite": bool(result.finite),
               "n_active": int(result.n_active), "active": [bool(a) for a in result.active],
               "relative_errors": dict(result.relative_errors), "losses": losses,
               "restart_losses": restart_losses, "restart_spread": spread}
    error_rows = [[html.escape(b), kinds.get(b, "other"), str(factors[b].shape[0]),
                   f"{float(e):.4f}"] for b, e in result.relative_errors.items()]
    text = f"""
<p class="how">The objective J (paper, Eq. 3.1) should fall and level off. The relative error
<code>||X_b - W_b F|| / ||X_b||</code> says how much of each block the concepts leave
unexplained (0 = none, 1 = all).</p>
<p>Final objective {float(result.loss):.6g} after {int(result.n_iter)} iterations;
{"converged" if result.converged else "<b>not converged</b> (stopped at the iteration limit)" if result.finite
 else "<b>stopped at a non-finite step</b> (the last finite iterate is shown)"};
{int(result.n_active)} of {len(result.active)} factors active.</p>
{_img(figures.save(_objective_figure(losses), "objective"), "objective curve")}
{html_table(["block", "kind", "rows", "relative error"], error_rows, numeric=(2, 3))}"""
    if restart_losses.shape[0] > 1:
        text += f"""
<p>{restart_losses.shape[0]} restarts from different random starts; the best is reported.
Final objective: best {spread["best"]:.6g}, median {spread["median"]:.6g},
worst {spread["worst"]:.6g} (worst is {100 * (spread["relative_spread"] or 0):.2f}% above best).
A large spread means the concepts depend on the start.</p>
{_img(figures.save(_restarts_figure(restart_losses), "restarts"), "restart objectives")}"""
    else:
        text += "<p>A single start was run: the spread across restarts is not available.</p>"
    return text, summary


def _share_and_thumbs(row: dict, total_mass: float, images: np.ndarray) -> tuple[str, str]:
    """A factor-table row's share of the total activation and its strip of top images (HTML)."""
    thumbs = _rgb(images[row["top_images"][:_THUMBS_PER_FACTOR]])
    share = f'{100 * row["mass"] / total_mass if total_mass else 0:.1f}%'
    return share, _img(_png_uri(_mosaic(thumbs, thumbs.shape[0]), max(1, 64 // images.shape[1])),
                       f'top images of factor {row["factor"]}', "thumbs")


def _factor_section(table: list[dict], probe: _Probe, figures: _Figures) -> str:
    if probe.labels is None:
        return _unlabelled_factor_section(table, probe, figures)
    images = probe.images
    total_mass = sum(row["mass"] for row in table)
    rows = []
    for row in table:
        share, thumbs = _share_and_thumbs(row, total_mass, images)
        superclass = row["top_superclass"]
        rows.append([
            f'<b>{row["factor"]}</b>',
            share,
            "<br>".join(f'{html.escape(c["name"])} ({c["weight"]:.2f})'
                        for c in row["top_classes"]),
            "&ndash;" if superclass is None
            else f'{html.escape(superclass["name"])} ({superclass["weight"]:.2f})',
            f'{row["entropy"]:.2f}',
            thumbs,
        ])
    figures.save(_top_images_figure(images, table), "top_images")
    n_classes = len(probe.class_names)
    n_top = len(table[0]["top_images"])
    return f"""
<p class="how">Paper Table 1. For factor k, the weight of class c is the share of the factor's
total activation that falls on images of that class:
<code>w_k(c) = &Sigma;<sub>n in c</sub> F[k,n] / &Sigma;<sub>n</sub> F[k,n]</code>. A concept
that is one class has one weight near 1; a concept shared by several classes (a colour, a
background, a shape) spreads its weight. The entropy of the weights measures that spread: 0 for
a single class, log {n_classes} = {np.log(n_classes):.2f} for all classes equally.
"Share" is the factor's part of the total activation <code>&Sigma;<sub>k,n</sub> F[k,n]</code>.
The images are the {min(_THUMBS_PER_FACTOR, n_top)} with the largest F[k, n], largest first
(the top {n_top} are listed in summary.json).</p>
{html_table(["factor", "share", "top classes (weight)", "top superclass (weight)", "entropy",
         "top images"], rows, numeric=(0, 1, 4))}"""


def _unlabelled_factor_section(table: list[dict], probe: _Probe, figures: _Figures) -> str:
    images = probe.images
    total_mass = sum(row["mass"] for row in table)
    rows = [[f'<b>{row["factor"]}</b>', *_share_and_thumbs(row, total_mass, images)] for row in table]
    figures.save(_top_images_figure(images, table), "top_images")
    n_top = len(table[0]["top_images"])
    return f"""
<p class="note">Left out: the class weights, top superclass and entropy columns of Table 1, which need a
label for every probe image; these images have none.</p>
<p class="how">"Share" is the factor's part of the total activation <code>&Sigma;<sub>k,n</sub> F[k,n]</code>.
The images are the {min(_THUMBS_PER_FACTOR, n_top)} with the largest F[k, n], largest first (the top {n_top}
are listed in summary.json): what they have in common is the concept.</p>
{html_table(["factor", "share", "top images"], rows, numeric=(0, 1))}"""


def _neurons_section(factors, layer_blocks, top_eig_k: int, d: int,
                     figures: _Figures) -> tuple[str, dict]:
    similarities = {b: neuron_similarity(factors[b]) for b in layer_blocks}
    eigenvalues = {b: similarity_eigenvalues(S) for b, S in similarities.items()}
    mean_top = {b: mean_top_eigenvalues(S, top_eig_k) for b, S in similarities.items()}
    neurons = {b: factors[b].shape[0] for b in layer_blocks}
    summary = {"top_eig_k": top_eig_k,
               "layers": {b: {"neurons": neurons[b], "eigenvalues": eigenvalues[b],
                              "mean_top_k": mean_top[b]} for b in layer_blocks}}
    rows = [[html.escape(b), str(neurons[b]), f"{mean_top[b]:.3f}"] for b in layer_blocks]
    text = f"""
<p class="how">Paper Figures 2 and 3. Entry (i, j) of a heatmap is the cosine similarity of
columns i and j of the layer's neuron factor: near 1 when concepts i and j use the same neurons,
0 when they use different ones. A layer whose matrix is close to the identity separates the
concepts. Its eigenvalues (sorted, largest first) average to 1; the mean of the top K = {top_eig_k}
is 1 for the identity and grows towards d / K = {d / top_eig_k:.1f} as concepts share neurons.</p>
{_img(figures.save(_similarity_figure(similarities, neurons), "neuron_similarity"),
      "cosine similarity heatmaps")}
{_img(figures.save(_eigenvalues_figure(eigenvalues), "eigenvalues"), "eigenvalues")}
{_img(figures.save(_mean_top_figure(mean_top, top_eig_k), "mean_top_eigenvalues"),
      "mean of the top eigenvalues per layer")}
{html_table(["layer", "neurons", f"mean of top {top_eig_k} eigenvalues"], rows, numeric=(1, 2))}"""
    return text, summary


def _pixels_section(factors, pixel_blocks, table: list[dict], probe: _Probe,
                    figures: _Figures) -> str:
    height, width = probe.images.shape[1:3]
    latent = latent_images([factors[b] for b in pixel_blocks], (height, width))
    masks = median_masks(latent)
    top = [row["top_images"][0] for row in table]
    masked = masked_top_images(probe.images, masks, top)
    fig = _pixels_figure(latent, masks, probe.images[top], masked)
    return f"""
<p class="how">Paper Figures 4a-c and 5a-c. The latent image of factor k is column k of the
pixel factor{"s" if len(pixel_blocks) > 1 else ""} ({html.escape(", ".join(pixel_blocks))})
reshaped to {height}&times;{width}: where images of the concept tend to be bright. Each channel is
divided by its own maximum, as the paper's authors did, so it shows where each channel is active
but not how strongly one channel is active relative to another. The mask (white) keeps the pixels
where the latent image, averaged over channels, is above its median (the authors thresholded each
channel separately); it is then laid over the factor's top image, pixels outside the mask black.
</p>
{_img(figures.save(fig, "pixels"), "latent images, masks and masked top images")}"""


def _neighbours_section(F, image: int, k: int, probe: _Probe,
                        figures: _Figures) -> tuple[str, dict]:
    neighbours = nearest_neighbours(F, image, k)
    distribution = neighbour_factor_distribution(F, neighbours)
    own_factor = int(np.argmax(F[:, image]))
    summary = {"image": image, "dataset_index": probe.indices[image],
               "dominant_factor": own_factor, "neighbours": neighbours,
               "distribution": distribution}
    fig = _neighbours_figure(probe.images[image], probe.images[neighbours], distribution,
                             own_factor)
    text = f"""
<p class="how">Paper Figures 4d and 5d. Each image is a point in concept space (its column of
F); its nearest neighbours there (Euclidean distance) are the images the factorisation sees as
alike. The bars give the share of the {k} neighbours whose strongest factor
(<code>argmax<sub>k</sub> F[k, n]</code>) is each factor.</p>
<p>Chosen image: probe image {image} (dataset index {probe.indices[image]}{
"" if probe.labels is None else ", class " + html.escape(probe.class_names[probe.labels[image]])}); its strongest factor is
{own_factor}.</p>
{_img(figures.save(fig, "neighbours"), "nearest neighbours")}"""
    return text, summary


def _attributes_section(F, dataset, probe: _Probe) -> tuple[str, dict]:
    known = {**({} if probe.labels is None else {"class": probe.labels}),
             **{a: np.asarray(v)[probe.indices] for a, v in dataset.attributes.items()}}
    value_names = {"class": probe.class_names, **dataset.attribute_names}
    aucs = attribute_auc(F, known)
    summary = {a: {"mean": r["mean"],
                   "values": {value_names[a][v]: {"factor": k, "auc": auc}
                              for v, (k, auc) in r["values"].items()}}
               for a, r in aucs.items()}
    mean_rows = [[html.escape(a), "&ndash;" if r["mean"] is None else f'{r["mean"]:.3f}']
                 for a, r in aucs.items()]
    value_rows = [[html.escape(a), html.escape(str(value_names[a][v])), str(k), f"{auc:.3f}"]
                  for a, r in aucs.items() for v, (k, auc) in r["values"].items()]
    text = f"""
<p class="how">The dataset records ground truth, so we can check whether single concepts
recover it. For each value of an attribute (e.g. a colour), each factor ranks the images by
F[k, n]; the ROC AUC is the chance that an image with that value ranks above one without it
(1 = perfectly separated, 0.5 = chance). The value is credited to its best factor. The class
label is included for comparison.</p>
{html_table(["attribute", "mean AUC over its values (best factor each)"], mean_rows, numeric=(1,))}
<details><summary>Every value's best factor ({len(value_rows)} rows)</summary>
{html_table(["attribute", "value", "best factor", "AUC"], value_rows, numeric=(2, 3))}</details>"""
    return text, summary


def _page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    ids = [f"s{i}-{_slug(t)}" for i, (t, _) in enumerate(sections)]
    nav = " ".join(f'<a href="#{i}">{html.escape(t)}</a>' for i, (t, _) in zip(ids, sections))
    body = "\n".join(f'<section id="{i}"><h2>{html.escape(t)}</h2>{content}</section>'
                     for i, (t, content) in zip(ids, sections))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<nav>{nav}</nav>
{body}
<p class="how">Files next to this page: the figures as PNG, <code>summary.json</code> (all numbers
above) and <code>factors.npz</code> (F, every block factor, labels, probe indices).</p>
</body></html>
"""


# ----------------------------------------------------------------------------- report
def write_report(
    out_dir,
    *,
    config: Mapping[str, Any],
    dataset,
    probe_indices,
    result,
    pixel_blocks: Sequence[str],
    layer_blocks: Sequence[str],
    top_eig_k: int = 3,
    n_neighbours: int = 30,
    neighbour_image: int | None = None,
    extra_sections: Sequence[Section] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Analyse a fit and write the report folder (see the module docstring for its files).

    Args:
        out_dir: folder to write (created if missing; files in it are overwritten).
        config: the run's settings, shown in the report and stored in ``summary.json``. Read
            by name when present: ``model`` (named in the title), ``block_weights``
            (``"none"``, ``"frobenius"`` or per-block weights) and ``variant`` (``"paper"`` or
            ``"authors"``), explained in the introduction.
        dataset: has ``images`` (M, H, W, C) in [0, 1] with C in {1, 3}, ``labels`` (M,)
            or None for unlabelled images (the class-based parts are then left out, and the
            report says so), ``class_names`` (unused without labels), ``superlabels`` (M,) or None, ``superclass_names`` or None,
            ``attributes`` (name -> (M,) int) and ``attribute_names`` (name -> value names).
        probe_indices: (N,) indices into the dataset of the probe images, in F's column order.
        result: fit result with ``F`` (d, N), ``factors`` (block name -> (rows_b, d)),
            ``losses``, ``loss``, ``relative_errors``, ``n_iter``, ``converged`` and
            ``restart_losses``.
        pixel_blocks: names of the pixel blocks in channel order (R, G, B, or one grey).
        layer_blocks: names of the activation blocks, shallow to deep.
        top_eig_k: K of the mean of the top-K eigenvalues (the authors: 3 ResNet-18, 10 VGG-11).
        n_neighbours: k of the neighbour analysis, 1 <= k < N.
        neighbour_image: column of F of the image whose neighbours are shown; default the top
            image of the factor of largest mass ``sum_n F[k, n]``.
        extra_sections: further sections, appended in order; titles must be unique.
        notes: short remarks shown at the top of the report (plain text).

    Returns:
        The path of ``report.html``.
    """
    F = np.asarray(result.F, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"result.F must be 2-D (d, N), got shape {F.shape}")
    d, n = F.shape
    if not 1 <= n_neighbours < n:
        raise ValueError(f"n_neighbours must be in [1, {n - 1}] for {n} probe images, "
                         f"got {n_neighbours}")
    if neighbour_image is not None and not 0 <= neighbour_image < n:
        raise ValueError(f"neighbour_image must be in [0, {n}), got {neighbour_image}")
    all_images = np.asarray(dataset.images)
    if all_images.ndim != 4 or all_images.shape[-1] not in (1, 3):
        raise ValueError(f"dataset.images must be (M, H, W, C) with C in (1, 3), "
                         f"got {all_images.shape}")
    probe_indices = np.asarray(probe_indices)
    if probe_indices.shape != (n,) or not np.issubdtype(probe_indices.dtype, np.integer):
        raise ValueError(f"probe_indices must be {n} integers (one per column of result.F), "
                         f"got shape {probe_indices.shape} and dtype {probe_indices.dtype}")
    if probe_indices.min() < 0 or probe_indices.max() >= all_images.shape[0]:
        raise ValueError(f"probe_indices must lie in [0, {all_images.shape[0]}) for a dataset "
                         f"of {all_images.shape[0]} images")
    factors = {name: np.asarray(W) for name, W in result.factors.items()}
    for argument, names in (("pixel_blocks", pixel_blocks), ("layer_blocks", layer_blocks)):
        missing = [b for b in names if b not in factors]
        if missing:
            raise ValueError(f"{argument} names blocks {missing} that result.factors lacks "
                             f"(it has {sorted(factors)})")
    if len(pixel_blocks) not in (0, 1, 3):
        raise ValueError(f"pixel_blocks must name 1 (grey) or 3 (RGB) blocks, got {pixel_blocks}")
    if layer_blocks and not 1 <= top_eig_k <= d:
        raise ValueError(f"top_eig_k must be in [1, {d}] for d = {d} factors, got {top_eig_k}")
    clashes = sorted(set(factors) & set(_RESERVED_NPZ_KEYS))
    if clashes:
        raise ValueError(f"block names {clashes} clash with the arrays factors.npz reserves")
    titles = [section.title for section in extra_sections]
    stems = [stem for section in extra_sections for stem in section.figures]
    if len(set(titles)) < len(titles):
        raise ValueError(f"extra_sections titles must be unique, got {titles}")
    if any(not re.fullmatch(r"[A-Za-z0-9_-]+", s) for s in stems) or len(set(stems)) < len(stems):
        raise ValueError(f"extra_sections figure names must be unique file stems of letters, "
                         f"digits, '_' and '-', got {stems}")

    labelled = dataset.labels is not None
    probe = _Probe(
        indices=probe_indices, images=all_images[probe_indices],
        labels=np.asarray(dataset.labels)[probe_indices] if labelled else None,
        superlabels=(None if dataset.superlabels is None
                     else np.asarray(dataset.superlabels)[probe_indices]),
        class_names=list(dataset.class_names) if labelled else [],
        superclass_names=(None if dataset.superclass_names is None
                          else list(dataset.superclass_names)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _Figures(out_dir)
    kinds = {**{b: "pixels" for b in pixel_blocks}, **{b: "activations" for b in layer_blocks}}
    if labelled:
        table = factor_table(F, probe.labels, probe.class_names, probe.superlabels, probe.superclass_names)
    else:  # one class for every image: the table's mass and top images, without its class columns
        table = [{**row, "top_classes": [], "top_superclass": None, "entropy": None}
                 for row in factor_table(F, np.zeros(n, int), ["all images"])]
        notes = [*notes, UNLABELLED_NOTE]
    if neighbour_image is None:
        neighbour_image = table[int(np.argmax([row["mass"] for row in table]))]["top_images"][0]
    summary: dict[str, Any] = {
        "config": config,
        "notes": list(notes),
        "data": {"dataset_size": all_images.shape[0], "n_probe": n,
                 "image_shape": probe.images.shape[1:], "labelled": labelled,
                 "n_classes": len(probe.class_names) if labelled else None,
                 "class_names": probe.class_names, "superclass_names": probe.superclass_names,
                 "rank": d, "pixel_blocks": list(pixel_blocks), "layer_blocks": list(layer_blocks),
                 "blocks": {b: {"rows": W.shape[0], "kind": kinds.get(b, "other")}
                            for b, W in factors.items()}},
        "factor_table": table,
    }

    sections = [("How to read this report",
                 _intro_section(config, notes, probe, all_images.shape[0], d,
                                pixel_blocks, layer_blocks))]
    text, summary["fit"] = _fit_section(result, factors, kinds, figures)
    sections.append(("Fit diagnostics", text))
    sections.append(("Factors (Table 1)", _factor_section(table, probe, figures)))
    if layer_blocks:
        text, summary["neurons"] = _neurons_section(factors, layer_blocks, top_eig_k, d, figures)
    else:
        text = "<p>No activation block was factorised in this run.</p>"
    sections.append(("Neurons per layer", text))
    sections.append(("Pixels", _pixels_section(factors, pixel_blocks, table, probe, figures)
                     if pixel_blocks else "<p>No pixel block was factorised in this run.</p>"))
    text, summary["neighbours"] = _neighbours_section(F, neighbour_image, n_neighbours, probe,
                                                      figures)
    sections.append(("Neighbours", text))
    if getattr(dataset, "attributes", None):
        text, summary["attribute_auc"] = _attributes_section(F, dataset, probe)
        sections.append(("Ground-truth attributes", text))
    summary["extra_sections"] = {}
    for section in extra_sections:
        embedded = "".join(_img(figures.save(fig, f"extra_{stem}"), stem)
                           for stem, fig in section.figures.items())
        sections.append((section.title, section.html + embedded))
        summary["extra_sections"][section.title] = section.data
    text, summary["glance"] = _glance_section(config, probe, summary["fit"], table, summary.get("attribute_auc"),
                                              extra_sections)
    sections.insert(0, ("At a glance", text))
    summary["figures"] = figures.names

    # each file is written atomically, and report.html last: once it exists, the others are whole
    write_text_atomic(out_dir / "summary.json", json.dumps(jsonable(summary), indent=1, allow_nan=False))
    arrays = {"F": F, "probe_indices": probe_indices, **factors}
    if labelled:
        arrays["labels"] = probe.labels
    if probe.superlabels is not None:
        arrays["superlabels"] = probe.superlabels
    savez_atomic(out_dir / "factors.npz", **arrays)
    path = out_dir / "report.html"
    write_text_atomic(path, _page(f"Concepts learned by {config.get('model', 'the network')}", sections))
    return path
