"""The paper's experiment (Section 4): CIFAR-100, ResNet-18 and VGG-11, d = 20, 10,000 probe images.

    python -m experiments.paper [--models resnet18 vgg11] [--dataset cifar100] [--out runs/paper] ...

For each model: train (the fast recipe by default, ``--train-preset authors`` for the authors'
100-epoch SGD recipe) or load a trained model (``--model-path``, one model only), probe the
10,000 test images (pixels + the authors' layers), fit d = 20 and write a report with Table 1
and Figures 2, 4 and 5. With both models, ``figure3_eigenvalues.png`` plots the mean of the
top-K eigenvalues of every layer's neuron similarity for both (Figure 3; K = 3 for ResNet-18,
10 for VGG-11). Meant for a GPU; the first run downloads CIFAR (``pip install -e '.[cifar]'``).
``--smoke`` runs it at tiny size (used by the tests on mock data).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

# the light command line: ``--help`` imports no jax nor matplotlib; run_cli imports the pipeline once parsed
from experiments.cli import (MODELS, NETWORK, RunConfig, argument_group, config_from_args, parser_for,
                             refuse_smoke_overrides, run_cli)

DEFAULTS = RunConfig(dataset="cifar100", model="resnet18", width=64, n_probe=10_000, epochs=30, batch_size=128, train_preset="fast",
                     rank=20, iterations=500, variant="project", out="runs/paper")
SMOKE = dict(width=4, n_probe=40, epochs=1, batch_size=16, rank=3, iterations=10, tcav=False)


def eigenvalue_figure(summaries: dict[str, dict], path: Path) -> None:
    """Figure 3: mean of the top-K eigenvalues of each layer's similarity matrix, per model."""
    from matplotlib.figure import Figure

    from experiments._atomic import savefig_atomic

    fig = Figure(figsize=(4.5 * len(summaries), 3.4), layout="constrained")
    for ax, (model, summary) in zip(fig.subplots(1, len(summaries), squeeze=False)[0], summaries.items()):
        layers = summary["neurons"]["layers"]
        ax.plot(range(len(layers)), [v["mean_top_k"] for v in layers.values()], "o-")
        ax.set_xticks(range(len(layers)), list(layers), rotation=30)
        ax.set_title(f"{model}: mean of top-{summary['neurons']['top_eig_k']} eigenvalues")
        ax.set_xlabel("layer (shallow to deep)")
        ax.set_ylabel("mean eigenvalue (1 = independent concepts)")
    savefig_atomic(fig, path, dpi=120)


def build_parser():
    # one spelling: --models lists the networks, each run sets RunConfig.model (no --model option)
    parser = parser_for("python -m experiments.paper", __doc__, DEFAULTS, hide=("model",))
    argument_group(parser, NETWORK).add_argument(
        "--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="{" + ",".join(MODELS) + "}",
        help="the networks, one run and report each in --out/<model> (default: " + " ".join(MODELS) + ")")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # before any figure of the runs
    base = config_from_args(args)
    if args.smoke:
        refuse_smoke_overrides(parser, sys.argv[1:] if argv is None else argv, SMOKE)
        base = dataclasses.replace(base, **SMOKE)
    if base.model_path and len(args.models) > 1:
        parser.error("--model-path: give one model with --models when loading a trained one")
    out = Path(base.out)
    summaries = {}
    for name in args.models:
        cfg = dataclasses.replace(base, model=name, out=str(out / name))
        run_cli(parser, cfg)
        summaries[name] = json.loads((Path(cfg.out) / "summary.json").read_text())
    if len(summaries) > 1:
        eigenvalue_figure(summaries, out / "figure3_eigenvalues.png")
        print(f"figure 3: {out / 'figure3_eigenvalues.png'}")


if __name__ == "__main__":
    sys.exit(main())
