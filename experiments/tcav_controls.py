"""How often TCAV fires on random image sets, and whether it finds one-class sets, per statistic.

    python -m experiments.tcav_controls --model-path runs/quickstart/model [--dataset shapes] [--seeds 5]

For a trained model (``models.save_model``), draws CAV and score images from the dataset's test
split (disjoint halves), and for every seed and score statistic runs `experiments.tcav.tcav` with
one positive control per class (``--n-concept`` images of that class, which must come out
significant for it) and ``--negative-controls`` random sets (which must come out significant at
the nominal rate). Prints one line per (seed, statistic): the share of negative-control tests
with p < 0.05, the share of negative sets with any family-wise significant class, and the share
of (class, layer) positive-control cases found. Each seed draws its own null and controls, so the
spread over seeds shows how much a single run varies.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import models
from experiments import data as data_lib
from experiments import tcav as T
from experiments.tcav_report import control_verdicts


def _images(dataset: str, n: int, seed: int) -> data_lib.Dataset:
    if dataset == "shapes":
        return data_lib.make_shapes(n, seed=seed, split="test")
    test = data_lib.load_dataset(dataset, "test")
    return test.subset(np.random.default_rng(seed).permutation(len(test))[:n])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.tcav_controls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    network = parser.add_argument_group("network", "the trained CNN whose layers are tested")
    network.add_argument("--model-path", required=True, metavar="DIR",
                         help="the trained model: a folder written by models.save_model (required)")
    data = parser.add_argument_group("data", "the test images CAVs are trained on and scored with")
    data.add_argument("--dataset", default="shapes", choices=("shapes", "digits"),
                      help="where the test images come from (default: shapes)")
    data.add_argument("--images", type=int, default=800,
                      help="images drawn per seed: the first half trains CAVs, the second is scored (default: 800)")
    data.add_argument("--n-concept", type=int, default=50,
                      help="images per concept set, positive controls and random ones (default: 50)")
    tcav = parser.add_argument_group("validation (TCAV)", "the tests and their controls")
    tcav.add_argument("--layers", nargs="+", default=["stage3", "stage4", "pool"], metavar="LAYER",
                      help="layers tested (default: stage3 stage4 pool)")
    tcav.add_argument("--statistics", nargs="+", default=["cosine", "sign"], choices=T.STATISTICS,
                      help="score statistics, each run in turn (default: cosine sign)")
    tcav.add_argument("--negative-controls", type=int, default=300,
                      help="random image sets per run, which must come out significant at the nominal rate "
                           "(default: 300)")
    run = parser.add_argument_group("run")
    run.add_argument("--seeds", type=int, default=5,
                     help="independent runs, each with its own images, null and controls (default: 5)")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    model, variables, _ = models.load_model(args.model_path)
    for seed in range(args.seeds):
        images = _images(args.dataset, args.images, 1000 + seed)
        half = args.images // 2
        cav, score = slice(0, half), slice(half, args.images)
        rng = np.random.default_rng(seed)
        positive = {f"class {c}": (rng.permutation(np.flatnonzero(images.labels[cav] == c))[:args.n_concept], c)
                    for c in range(len(images.class_names)) if np.sum(images.labels[cav] == c) >= args.n_concept}
        if not positive:
            parser.error(f"--n-concept: no class has {args.n_concept} CAV images; lower it or raise --images")
        for statistic in args.statistics:
            start = time.perf_counter()
            r = T.tcav(model, variables, tuple(args.layers), np.stack([s for s, _ in positive.values()]),
                       cav_images=images.images[cav], score_images=images.images[score],
                       cav_labels=images.labels[cav], score_labels=images.labels[score], positive_controls=positive,
                       negative_controls=args.negative_controls, statistic=statistic, seed=seed)
            v = control_verdicts(r)
            neg, pos = v["negative"], v["positive"]
            per_layer = ", ".join(f"{layer} {rate:.2f}" for layer, rate in pos["per_layer"].items())
            print(f"seed {seed} {statistic:9s} negatives: {100 * neg['rate']:.1f}% of {neg['tests']} tests, "
                  f"{100 * neg['family_rate']:.1f}% of {neg['sets']} sets family-wise; positives: {pos['found']} of "
                  f"{pos['cases']} ({per_layer}); {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
