"""Cross-dataset study (paper Sec. 5, Table 2): a network probed with images it was not trained on.

    python -m experiments.cross_dataset            # offline: shapes, trained on part of the attribute space
    python -m experiments.cross_dataset --cifar    # CIFAR-10 network probed with CIFAR-100 (GPU)

Activations only (no pixel blocks) and a group-sparse example factor: the penalty
2 group_F sum_k ||F[k, :]||_2 switches whole factors off, so the rank is chosen by the data
(penalties in ``jaxnmf.fit``'s relative units: the default group_F = 0.05 with l2 = 0.01 kept 9 of
16 factors, relative errors 0.52 / 0.40 / 0.18 on stage3 / stage4 / pool, in the default run of this
script; a value that switches every factor off stops the run with an error instead of a report)
(``--example-groups predicted`` groups examples by the network's own predicted class instead;
no label of the probe set is used, unlike the authors' code, whose groups were superclasses).
The report's factor table names the concepts with the probe set's classes; TCAV scores use the
network's predicted classes.

Offline counterpart: the network learns three of the six shapes in three of the six colours
(``--train-restrict``) and is probed with all shapes and colours: does it have concepts for the
shapes it never saw?
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

# the light command line: ``--help`` imports no jax; run_cli imports the pipeline once parsed
from experiments.cli import (DATA, RUN, RunConfig, argument_group, config_from_args, flag, parser_for,
                             refuse_smoke_overrides, run_cli)

DEFAULTS = RunConfig(
    dataset="shapes", probe_dataset="shapes", train_restrict="shape=circle,square,triangle;colour=red,green,blue",
    model="resnet18", width=8, n_train=5000, n_test=1800, n_probe=1000, epochs=30, pixels=False, rank=16,
    iterations=400, group_F=0.05, l2=0.01, tcav=True, out="runs/cross_dataset")
CIFAR = dict(dataset="cifar10", probe_dataset="cifar100", train_restrict=None, width=64, n_probe=10_000, epochs=30, train_preset="fast",
             rank=30, out="runs/cross_dataset_cifar")
SMOKE = dict(width=4, n_train=256, n_test=128, n_probe=96, epochs=1, batch_size=64, rank=6, iterations=30,
             tcav=False)


def build_parser() -> argparse.ArgumentParser:
    parser = parser_for("python -m experiments.cross_dataset", __doc__, DEFAULTS)
    argument_group(parser, DATA).add_argument(
        "--cifar", action="store_true",
        help="CIFAR-10 network probed with CIFAR-100 (GPU); sets " + ", ".join(
            f"{flag(k)} {v if v is not None else 'none'}" for k, v in CIFAR.items())
        + " where left at their default (default: off, the offline shapes study)")
    studies = argument_group(parser, RUN).add_argument(
        "--studies", action=argparse.BooleanOptionalAction, default=True)
    studies.help = ("add the sparsity path and, with --train-restrict, the seen/unseen table with its three "
                    "controls (one more network is trained) (default: on)")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.cifar:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in CIFAR.items()
                                          if getattr(cfg, k) == getattr(DEFAULTS, k)})
    if args.smoke:
        refuse_smoke_overrides(parser, sys.argv[1:] if argv is None else argv, SMOKE)
        cfg = dataclasses.replace(cfg, **SMOKE)
    studies = []
    if args.studies:
        from experiments import section5
        studies.append(section5.sparsity_path())
        if cfg.train_restrict:
            studies.append(section5.seen_unseen)
    run_cli(parser, cfg, studies=studies, extra_notes=[
        "Cross-dataset study: activations only, group-sparse F "
        f"(group_F = {cfg.group_F}, groups = {cfg.example_groups}); network trained on {cfg.dataset}"
        + (f" restricted to {cfg.train_restrict}" if cfg.train_restrict else "")
        + f", probed with {cfg.probe_dataset or cfg.dataset}."])


if __name__ == "__main__":
    sys.exit(main())
