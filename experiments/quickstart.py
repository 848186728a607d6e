"""The main job: the whole method on the embedded ``shapes`` dataset, on a CPU, in minutes.

    python -m experiments.quickstart [--out runs/quickstart] [--rank 12] [--tcav] ...

Trains a small ResNet-18 on procedurally drawn shapes (no download), probes it with test images
(pixels + the authors' layers + spatially averaged early stages), fits the coupled NMF, runs the
analyses and writes ``report.html``, whose path is printed at the end. ``--smoke`` runs the
smallest setting (seconds; used by the tests). Every option: ``--help``.
"""
from __future__ import annotations

import dataclasses
import sys

# the light command line: ``--help`` imports no jax; run_cli imports the pipeline once parsed
from experiments.cli import RunConfig, config_from_args, parser_for, refuse_smoke_overrides, run_cli

DEFAULTS = RunConfig(
    dataset="shapes", model="resnet18", width=8, n_train=5000, n_test=1800, n_probe=1000, epochs=6,
    layers=("stage1:avg", "stage2:avg", "stage3", "stage4", "pool"), rank=12, iterations=300,
    tcav=True, out="runs/quickstart")
SMOKE = dict(width=4, n_train=256, n_test=128, n_probe=96, epochs=1, batch_size=64, rank=4, iterations=20,
             tcav=False)


def build_parser():
    return parser_for("python -m experiments.quickstart", __doc__, DEFAULTS)


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        refuse_smoke_overrides(parser, sys.argv[1:] if argv is None else argv, SMOKE)
    cfg = config_from_args(args)
    run_cli(parser, dataclasses.replace(cfg, **SMOKE) if args.smoke else cfg)


if __name__ == "__main__":
    sys.exit(main())
