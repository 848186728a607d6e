"""Does the coupled NMF recover known concepts better than the usual alternatives? Measured side by side.

    python -m experiments.evaluate [--out runs/evaluate] [--model-path runs/quickstart/model] [--data-seed 1]
                                   [--rank 12 | --rank auto [--rank-grid 6,9,12,16,20,24,28,32]]

Trains (or loads with ``--model-path``) ONE network exactly as ``experiments.quickstart`` does,
probes it with the quickstart's probe images (``shapes``: every image's colour, position, size,
background and shape are known), builds the blocks once (pixels, stage1:avg, stage2:avg, stage3,
stage4, pool) and runs on the same images, with the same rank d:

- jaxnmf coupled (pixels + layers, the pipeline's options, NNDSVDa start),
- jaxnmf on the activation blocks only, and on the pixel blocks only,
- jaxnmf coupled with the pixel blocks centred per pixel and signed (semi-NMF, ``fit(signed=...)``),
- single-layer NMF (scikit-learn, as DFF and CRAFT do) on each analysed layer separately,
- k-means (d clusters; score of an image for a cluster: minus its distance to the centroid),
- PCA (d components; scores: the projections; a component's sign is arbitrary, so PCA alone is
  credited max(AUC, 1 - AUC), i.e. each component and its negation are candidate factors),
- a TopK sparse autoencoder (d latents by default, k active per image; scores: the latent codes),

the last three on the concatenated activation blocks, each scaled to unit Frobenius norm (the
weighting of the coupled fit: examples are samples, neurons features). For each method it reports
the best-factor ROC AUC of every ground-truth attribute (``jaxnmf.attribute_auc``: each value of
the attribute is credited to the factor that separates it best; the attribute's AUC is the mean
over its values), their mean and worst, the relative reconstruction error of what the method
reconstructs, and its seconds (jaxnmf's include compiling). It also fits the coupled NMF from
``--restarts-for-stability`` random starts and reports how reproducibly each factor of the best
of them comes back in the others (``jaxnmf.factor_stability``).

``--rank auto`` chooses d without labels before anything is compared: ``jaxnmf.rank_curve`` of
the coupled blocks over ``--rank-grid`` (bi-cross-validation: fits on 80 % of the images and of each
block's rows, predicts the held-out entries; ``--rank-curve-restarts`` random starts per rank, the
coupled fit's objective and weights, solved by ``--rank-curve-solver``, HALS by default) and ``jaxnmf.choose_rank`` (the rank after which no added factor lowers the
held-out error by 2 % of itself); every method then gets that rank. The curve is a table and a
figure (``rank_curve.png``, also inside report.html) and goes to summary.json (``rank_choice``).

Writes to ``--out``: ``summary.json`` (every number), ``evaluation.md`` (the table, to quote),
``report.html`` (the table, per-value AUCs and stability; works offline), ``run.json`` and the
network (``model/``, ``checkpoints/``) when trained here. ``--smoke``: the smallest setting, in
seconds (used by the tests).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

# light imports only: ``--help`` answers without jax (the heavy modules are imported in main)
from experiments.cli import DATASETS, help_text
from experiments.quickstart import DEFAULTS, SMOKE

WITH_ATTRIBUTES = ("shapes",)  # the datasets whose images carry ground-truth attributes (experiments.data)
SMOKE_EXTRA = dict(restarts_for_stability=2, sae_steps=100, rank_grid=(2, 3, 4))
RANK_GRID = (6, 9, 12, 16, 20, 24, 28, 32)
RANK_TOL = 0.02  # jaxnmf.choose_rank's tol: the gain per added factor a factor must buy


def rank_arg(text: str):
    """--rank: a positive int, or "auto" (chosen by jaxnmf.choose_rank)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def grid_arg(text: str) -> tuple:
    """--rank-grid: comma-separated positive ints."""
    try:
        grid = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    return grid
SAE_LEARNING_RATE = 1e-3

DATA, NETWORK, METHODS, STABILITY, RUN = ("data", "network and training", "methods", "stability",
                                          "output and run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {title: parser.add_argument_group(title, text) for title, text in {
        DATA: "the probe images (the quickstart's by default)",
        NETWORK: "the CNN whose representations are compared: trained as the quickstart does, or loaded",
        METHODS: "the methods compared and their settings",
        STABILITY: "the coupled NMF refitted from random starts",
        RUN: "where the evaluation is written, and how"}.items()}

    def add(group, flag, default, text, none=None, **kwargs):
        groups[group].add_argument(flag, default=default, help=help_text(text, default, none), **kwargs)

    add(DATA, "--dataset", DEFAULTS.dataset, "the dataset the network is trained and probed on; only datasets with "
        "ground-truth attributes can be evaluated: shapes (digits, cifar10 and cifar100 have none)",
        metavar="{" + ",".join(DATASETS) + "}")
    add(DATA, "--data-seed", None, "shapes only: seed of the drawn probe images (the test split), so that one "
        "network can be evaluated on shapes drawn anew; the network's training images keep --seed",
        none="--seed, the quickstart's probe images", type=int)
    add(DATA, "--n-probe", DEFAULTS.n_probe, "probe images: the examples every method is fitted to (a class-"
        "balanced draw from the test split)", type=int)
    add(NETWORK, "--model-path", None, "load this trained model (a folder written by models.save_model, e.g. "
        "runs/quickstart/model) instead of training one", none="train one as the quickstart does", metavar="DIR")
    add(METHODS, "--rank", DEFAULTS.rank, "d: factors of every NMF, clusters of k-means, components of PCA; the "
        "autoencoder has --sae-width times as many latents. 'auto': chosen without labels from the coupled "
        "blocks' bi-cross-validation curve over --rank-grid (jaxnmf.rank_curve, jaxnmf.choose_rank)",
        type=rank_arg, metavar="{d,auto}")
    add(METHODS, "--rank-grid", ",".join(map(str, RANK_GRID)), "--rank auto: the ranks tried (comma-separated)",
        type=grid_arg)
    add(METHODS, "--rank-curve-restarts", 2, "--rank auto: random starts per rank of the curve (its stability "
        "needs 2)", type=int)
    add(METHODS, "--rank-curve-solver", "hals", "--rank auto: the solver of the curve's fits (same objective and "
        "weights as the coupled fit; hals converges within --iterations where mu does not, and an unconverged "
        "fit makes the curve noisy)", choices=("mu", "hals"))
    add(METHODS, "--iterations", DEFAULTS.iterations, "most iterations of every NMF (jaxnmf and scikit-learn)",
        type=int)
    add(METHODS, "--block-emphasis", None, "the coupled fits' Frobenius block weights with chosen blocks "
        "multiplied: NAME=FACTOR items, NAME one of the quickstart's layers or pixels, e.g. stage1:avg=8 "
        "stage2:avg=8 pool=4 pixels=2 (the quickstart's --block-emphasis); none for equal weights",
        none="the quickstart's: " + " ".join(DEFAULTS.block_emphasis or ()),
        nargs="+", metavar="NAME=FACTOR")
    add(METHODS, "--sae-width", 1, "latents of the TopK sparse autoencoder, as a multiple of --rank", type=int)
    add(METHODS, "--sae-k", None, "latents active per image in the TopK sparse autoencoder",
        none="a quarter of the latents, at least 1", type=int)
    add(METHODS, "--sae-steps", 2000, f"full-batch Adam steps (learning rate {SAE_LEARNING_RATE:g}) training the "
        "autoencoder", type=int)
    add(STABILITY, "--restarts-for-stability", 3, "coupled fits from random starts (keys differing); each factor "
        "of the lowest-objective one is matched to the others' (Hungarian, on cosines)", type=int)
    add(RUN, "--out", "runs/evaluate", "the evaluation's folder: summary.json, evaluation.md, report.html (and "
        "model/ when a network is trained)", metavar="DIR")
    add(RUN, "--seed", DEFAULTS.seed, "seed of the network's data and training, the probe draw and every method",
        type=int)
    groups[RUN].add_argument("--overwrite", action="store_true", help=help_text(
        "replace an evaluation of other options in --out (and its network if that differs)", False))
    groups[RUN].add_argument("--smoke", action="store_true", help="the smallest setting, in seconds (used by the "
                             "tests): the quickstart's smoke sizes, 2 stability fits, 100 autoencoder steps")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad options before any work, naming the option (light: no jax)."""
    def fail(option, problem):
        raise ValueError(f"--{option.replace('_', '-')}: {problem}")

    if args.dataset not in DATASETS:
        fail("dataset", f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.dataset not in WITH_ATTRIBUTES:
        fail("dataset", f"{args.dataset} has no ground-truth attributes to measure concept recovery against; "
                        f"choose {' or '.join(WITH_ATTRIBUTES)}")
    auto = args.rank == "auto"
    for name in ("n_probe", "iterations", "sae_width", "sae_steps", "rank_curve_restarts",
                 *(() if auto else ("rank",))):
        if getattr(args, name) < 1:
            fail(name, f"must be >= 1, got {getattr(args, name)}")
    if auto and not args.smoke:
        grid = args.rank_grid
        if not grid or min(grid) < 1 or len(set(grid)) != len(grid):
            fail("rank_grid", f"expected distinct positive ints, got {','.join(map(str, grid))}")
        if max(grid) > 0.8 * args.n_probe:
            fail("rank_grid", f"{max(grid)} exceeds the images the curve fits (80 % of --n-probe {args.n_probe})")
    if args.sae_k is not None and not auto and not 1 <= args.sae_k <= args.rank * args.sae_width:
        fail("sae_k", f"must lie in [1, {args.rank * args.sae_width}] (the autoencoder's latents, --rank x "
                      f"--sae-width), got {args.sae_k}")
    if args.block_emphasis and args.block_emphasis != ["none"]:
        emphasis = dataclasses.replace(DEFAULTS, block_emphasis=tuple(args.block_emphasis)).emphasis()
        unknown = sorted(set(emphasis) - set(DEFAULTS.layers) - {"pixels"})
        if unknown:
            fail("block_emphasis", f"no block named {', '.join(unknown)}; blocks: pixels, {', '.join(DEFAULTS.layers)}")
    if args.restarts_for_stability < 2:
        fail("restarts_for_stability", f"stability compares fits: at least 2, got {args.restarts_for_stability}")
    if args.model_path is not None and not (Path(args.model_path) / "model.json").exists():
        fail("model_path", f"no trained model at {args.model_path} (expected model.json written by "
                           f"models.save_model)")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The evaluation's own options (the network's and the blocks' are a ``RunConfig``)."""

    data_seed: int
    restarts_for_stability: int
    sae_width: int
    sae_k: int
    sae_steps: int
    overwrite: bool = False
    rank_grid: tuple | None = None  # --rank auto: the ranks of the curve (None: --rank as given)
    rank_curve_restarts: int = 2
    rank_curve_solver: str = "hals"
    sae_k_given: int | None = None  # --sae-k as given (the default, a quarter of the latents, needs the rank)


def config_from_args(args: argparse.Namespace):
    """(``RunConfig``, ``Settings``) of the command line: the quickstart's network and blocks."""
    smoke = SMOKE if args.smoke else {}
    auto = args.rank == "auto"
    extra = SMOKE_EXTRA if args.smoke else {}
    grid = tuple(sorted(extra.get("rank_grid", args.rank_grid))) if auto else None
    cfg = dataclasses.replace(DEFAULTS, dataset=args.dataset, model_path=args.model_path, seed=args.seed,
                              out=args.out, tcav=False, rank=max(grid) if auto else args.rank,
                              iterations=args.iterations, n_probe=args.n_probe,
                              block_emphasis=(None if args.block_emphasis == ["none"] else
                                              tuple(args.block_emphasis) if args.block_emphasis else
                                              DEFAULTS.block_emphasis))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in smoke.items() if not (auto and k == "rank")})
    latents = cfg.rank * args.sae_width
    settings = Settings(
        data_seed=args.seed if args.data_seed is None else args.data_seed,
        restarts_for_stability=extra.get("restarts_for_stability", args.restarts_for_stability),
        sae_width=args.sae_width,
        sae_k=min(args.sae_k, latents) if args.sae_k is not None else max(1, latents // 4),
        sae_steps=extra.get("sae_steps", args.sae_steps), overwrite=args.overwrite, rank_grid=grid,
        rank_curve_restarts=args.rank_curve_restarts, rank_curve_solver=args.rank_curve_solver,
        sae_k_given=args.sae_k)
    return cfg, settings


def main(argv=None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        if args.data_seed is not None and args.dataset != "shapes":
            raise ValueError("--data-seed: only shapes images are drawn with a seed")
        cfg, settings = config_from_args(args)
        from experiments import _evaluation  # the heavy part: jax, flax, scikit-learn

        path = _evaluation.evaluate(cfg, settings)
    except ValueError as err:
        parser.error(str(err))
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    sys.exit(main() and None)
