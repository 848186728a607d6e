"""The command line of the experiment scripts: ``RunConfig`` (every option of a run) and its parser.

Light on purpose: this module imports nothing beyond the standard library, so that ``--help``
of a script answers at once; ``experiments.pipeline`` (jax, flax, the data...) is imported by
``run_cli`` only once the command line has been parsed. Each ``RunConfig`` field carries its
help text, its group and, where it takes one of a few values, its choices
(``dataclasses.field(metadata=...)``); ``add_arguments`` reads them, so a new option is
documented where it is declared. The values themselves are checked by
``experiments.pipeline.check_config`` (before any work, with errors naming the option).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from pathlib import Path

    from experiments.pipeline import FittedRun
    from experiments.report import Section

VARIANTS = ("project", "paper", "authors")
DATASETS = ("shapes", "digits", "cifar10", "cifar100")  # experiments.data.load_dataset
MODELS = ("resnet18", "vgg11")  # models.LAYERS (tests/test_cli.py checks they agree)

# the groups of options in ``--help``, in this order
DATA = "data"
NETWORK = "network and training"
FACTORISATION = "factorisation"
VALIDATION = "validation (TCAV)"
RUN = "output and run"
GROUPS = {
    DATA: "what the network learns from and what probes it",
    NETWORK: "the CNN that is explained: trained here, or loaded with --model-path",
    FACTORISATION: "the blocks (pixels, layer activations) and the coupled NMF fitted to them",
    VALIDATION: "concept vectors (CAVs) of the factors, tested with TCAV on held-out images",
    RUN: "where the run is written, and how",
}


def option(default, group: str, help: str, *, choices: Sequence[str] | None = None, none: str | None = None,
           metavar: str | None = None):
    """A ``RunConfig`` field with its command-line documentation: ``help`` says what it does,
    ``none`` what a default of None means, ``choices`` the values it takes (shown in ``--help``;
    ``check_config`` refuses any other)."""
    return dataclasses.field(default=default, metadata=dict(group=group, help=help, choices=choices, none=none,
                                                            metavar=metavar))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every option of a run (the scripts' command-line options map one to one onto these;
    each field's help is its ``metadata["help"]``, shown by ``--help``).

    variant: "project" (this project's defaults: blocks scaled to unit Frobenius norm, no
    penalties), "paper" (Eq. 3.1 as published: no block weights, no penalties) or "authors"
    (the authors' code: l2_F = l1_F = 1, unit-norm columns of every W_b, no block weights, raw
    penalty units). ``block_weights``/``l2_F``/.../``penalty_units`` left at None take the
    variant's values; penalties are in ``jaxnmf.fit``'s "relative" units except for "authors".
    """

    dataset: str = option(
        "shapes", DATA, "what the network is trained on: shapes (drawn here, no download), digits (scikit-learn's "
        "8x8 digits), cifar10 or cifar100 (downloaded by tensorflow-datasets)", choices=DATASETS)
    probe_dataset: str | None = option(
        None, DATA, "what the network is probed with: the test split of this dataset (an empty value: --dataset's)",
        choices=DATASETS, none="the test split of --dataset")
    train_restrict: str | None = option(
        None, DATA, "shapes only: train on part of the attribute space, e.g. 'colour=red,blue;size=0' (the probe "
        "images keep every value)", none="no restriction", metavar="ATTR=V,V;...")
    model: str = option("resnet18", NETWORK, "the network's architecture", choices=MODELS)
    width: int = option(8, NETWORK, "channels of the network's first stage (64 in the paper; 4 or 8 is tiny)")
    n_train: int = option(5000, DATA, "shapes only: images drawn for the train split (digits and CIFAR use their "
                                      "whole train split)")
    n_test: int = option(1200, DATA, "shapes only: images drawn for the test split, which the probe images come "
                                     "from")
    n_probe: int = option(1000, DATA, "probe images: the columns of every block, a class-balanced draw from the "
                                      "probe split")
    epochs: int = option(30, NETWORK, "training epochs; with --train-preset plateau the most it may take "
                                      "(unused with --model-path)")
    train_preset: str = option(
        "plateau", NETWORK, "training recipe: plateau (until the loss on 10% of the train images, held out, "
        "stops improving: the learning rate decays twice on plateaus, the third plateau ends it), fast (a cosine "
        "schedule over exactly --epochs) or authors (the paper's SGD with step decay, docs/method.md); --epochs "
        "and --batch-size apply to all three", choices=("plateau", "fast", "authors"))
    batch_size: int = option(64, NETWORK, "training batch size")
    model_path: str | None = option(
        None, NETWORK, "load this trained model (a folder written by models.save_model) instead of training one",
        none="train one", metavar="DIR")
    layers: tuple[str, ...] | None = option(
        None, FACTORISATION, "layers whose activations are blocks; 'NAME:avg' averages a spatial layer over "
        "positions", none="the authors' layers: resnet18 stage3 stage4 pool; vgg11 pool1 pool2 pool3 pool4 pool5",
        metavar="LAYER")
    pixels: bool = option(True, FACTORISATION, "include the pixel blocks (--no-pixels: activations only, paper "
                                               "Sec. 5)")
    rank: int = option(12, FACTORISATION, "d, the number of factors of the coupled NMF")
    restarts: int = option(1, FACTORISATION, "fits from random starts, the lowest objective kept (1: one fit "
                                             "from an NNDSVD start)")
    solver: str = option("mu", FACTORISATION, "updates: mu (multiplicative, the paper's) or hals (same objective, "
                                              "far fewer iterations)", choices=("mu", "hals"))
    block_dtype: str = option(
        "float32", FACTORISATION, "how the blocks are held: bfloat16 takes half the memory (the fit is then that of "
        "the data rounded to 3 digits)", choices=("float32", "bfloat16"))
    devices: int = option(1, FACTORISATION, "shard the blocks' examples (columns) over this many devices for the fit "
                                          "(jax.sharding: F sharded, the W_b replicated); --n-probe must be a "
                                          "multiple of it")
    iterations: int = option(300, FACTORISATION, "most iterations of the fit")
    tol: float = option(1e-5, FACTORISATION, "stop when the objective decreases by less than this (relative); 0 "
                                             "runs every iteration")
    variant: str = option(
        "project", FACTORISATION, "the objective's defaults: project (blocks scaled to unit Frobenius norm, no "
        "penalties), paper (Eq. 3.1 as published) or authors (the authors' code: --l2-F = --l1-F = 1, unit-norm "
        "columns, raw units); docs/method.md", choices=VARIANTS)
    block_weights: str | None = option(
        None, FACTORISATION, "weight of each block: none, or frobenius (1 / its squared Frobenius norm)",
        choices=("none", "frobenius"), none="the variant's")
    block_emphasis: tuple[str, ...] | None = option(
        None, FACTORISATION, "with frobenius block weights, multiply chosen blocks' weights: NAME=FACTOR items, NAME a "
        "block (a --layers entry) or pixels for every pixel block, e.g. stage1:avg=8 stage2:avg=8 pool=4 pixels=2 "
        "(README, concept recovery against baselines); none for equal weights", metavar="NAME=FACTOR",
        none="every block the same weight")
    l2_F: float | None = option(None, FACTORISATION, "L2 penalty on the example factor F (in --penalty-units)",
                                none="the variant's")
    l1_F: float | None = option(None, FACTORISATION, "L1 penalty on F (in --penalty-units)", none="the variant's")
    l2: float | None = option(None, FACTORISATION, "L2 penalty on every block's factor W_b (in --penalty-units)",
                              none="the variant's")
    l1: float | None = option(None, FACTORISATION, "L1 penalty on every W_b (in --penalty-units)",
                              none="the variant's")
    group_F: float = option(0.0, FACTORISATION, "group-sparse penalty on F, switching whole factors off (paper "
                                                "Sec. 5); needs --l2 > 0 to bite")
    penalty_units: str | None = option(
        None, FACTORISATION, "units of the penalties: relative (the same value means the same on any data) or raw "
        "(jaxnmf.fit)", choices=("relative", "raw"), none="the variant's")
    example_groups: str = option(
        "rows", FACTORISATION, "groups of --group-F: rows (whole rows of F) or predicted (factor x the network's "
        "predicted class)", choices=("rows", "predicted"))
    tcav: bool = option(False, VALIDATION, "test the factors' concepts with TCAV on held-out images (slower)")
    tcav_layers: tuple[str, ...] | None = option(
        None, VALIDATION, "layers where TCAV trains concept vectors", metavar="LAYER",
        none="the first three of stage3 stage4 pool pool4 pool5 that the model has")
    tcav_images: int = option(800, VALIDATION, "held-out images for TCAV: half choose concepts and train CAVs, "
                                               "half are scored")
    data_dir: str | None = option(None, DATA, "CIFAR only: the tensorflow-datasets data folder",
                                  none="$TFDS_DATA_DIR, else ~/tensorflow_datasets", metavar="DIR")
    out: str = option("runs/quickstart", RUN, "the run's folder: report.html, run.json, model/, checkpoints/ (a "
                                              "killed run resumes there)", metavar="DIR")
    overwrite: bool = option(False, RUN, "replace a run of other options in --out (and its network if that "
                                         "differs)")
    seed: int = option(0, RUN, "seed of the drawn data, training, the probe images, the fit and TCAV")

    def solver_options(self) -> dict:
        """The ``jaxnmf.fit`` options the variant and the explicit settings give."""
        base = {"project": dict(block_weights="frobenius", l2_F=0.0, l1_F=0.0, l2=0.0, l1=0.0, unit_columns=False,
                                penalty_units="relative"),
                "paper": dict(block_weights="none", l2_F=0.0, l1_F=0.0, l2=0.0, l1=0.0, unit_columns=False,
                              penalty_units="relative"),
                "authors": dict(block_weights="none", l2_F=1.0, l1_F=1.0, l2=0.0, l1=0.0, unit_columns=True,
                                penalty_units="raw"),
                }[self.variant]
        for name in ("block_weights", "l2_F", "l1_F", "l2", "l1", "penalty_units"):
            if getattr(self, name) is not None:
                base[name] = getattr(self, name)
        return base

    def emphasis(self) -> dict[str, float]:
        """``block_emphasis`` as {block name or "pixels": factor}; ValueError naming the option when malformed."""
        out = {}
        for item in self.block_emphasis or ():
            name, _, factor = str(item).rpartition("=")
            try:
                value = float(factor)
            except ValueError:
                value = float("nan")
            if not name or not (0 < value < float("inf")):
                raise ValueError(f"--block-emphasis: {item!r} is not NAME=FACTOR with a positive finite FACTOR")
            out[name] = value
        return out

    def fit_options(self, blocks) -> dict:
        """``solver_options`` with ``--block-emphasis`` resolved to explicit weights for ``blocks``
        (``experiments.matrices.emphasised_weights``)."""
        options = self.solver_options()
        if self.block_emphasis:
            from experiments.matrices import emphasised_weights
            options["block_weights"] = emphasised_weights(blocks, self.emphasis())
        return options

    def resolved_layers(self) -> tuple[str, ...]:
        import models  # flax and jax: imported only when a run needs them
        return tuple(self.layers) if self.layers else models.DEFAULT_LAYERS[self.model]


def flag(name: str) -> str:
    """The command-line option of a ``RunConfig`` field: "n_probe" -> "--n-probe"."""
    return "--" + name.replace("_", "-")


def _shown(value, none: str | None) -> str:
    if value is None:
        return none or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


def help_text(text: str, default, none: str | None = None) -> str:
    """One line of help: what the option does, then its default ('%' escaped for argparse)."""
    return f"{text} (default: {_shown(default, none)})".replace("%", "%%")


def argument_group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The group ``title`` of ``parser`` (made by ``add_arguments``), or a new one at the end."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def add_arguments(parser: argparse.ArgumentParser, defaults: RunConfig, *, hide: Sequence[str] = ()) -> None:
    """Command-line options, one per ``RunConfig`` field, in the groups of ``GROUPS``, each with its
    help, choices and default (``defaults``'s value). Fields in ``hide`` get no option: they keep
    ``defaults``'s value (a script that sets them itself)."""
    groups = {title: parser.add_argument_group(title, description) for title, description in GROUPS.items()}
    for f in dataclasses.fields(RunConfig):
        default = getattr(defaults, f.name)
        if f.name in hide:
            parser.set_defaults(**{f.name: default})
            continue
        meta = f.metadata
        group = groups[meta["group"]]
        text = help_text(meta["help"], default, meta["none"])
        # the choices are listed (metavar) but checked by check_config, whose errors name the option
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else meta["metavar"]
        if f.type in ("bool",):
            action = group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default)
            action.help = text  # BooleanOptionalAction would append a default of its own
        elif f.name in ("layers", "tcav_layers", "block_emphasis"):
            group.add_argument(flag(f.name), nargs="+", default=default, metavar=metavar, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            group.add_argument(flag(f.name), type=kind, default=default, metavar=metavar, help=text)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}
    for name in ("layers", "tcav_layers", "block_emphasis"):
        values[name] = tuple(values[name]) if values[name] else None
    if values["block_emphasis"] == ("none",):  # turns a script's default emphasis off
        values["block_emphasis"] = None
    for name in ("train_restrict", "probe_dataset"):  # an empty value on the command line means none
        values[name] = values[name] or None
    return RunConfig(**values)


def parser_for(prog: str, doc: str, defaults: RunConfig, *, hide: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The command line of an experiment script: every ``RunConfig`` option (but ``hide``) plus ``--smoke``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # one spelling per option: no prefixes
    add_arguments(parser, defaults, hide=hide)
    argument_group(parser, RUN).add_argument(
        "--smoke", action="store_true", help="the smallest setting, in seconds (used by the tests): overrides the sizes and turns TCAV "
                                             "off")
    return parser


def refuse_smoke_overrides(parser: argparse.ArgumentParser, argv: Sequence[str], smoke: dict) -> None:
    """A usage error when the command line sets an option that ``--smoke`` overrides (``smoke``: the
    option values --smoke sets), so that e.g. ``--smoke --rank 50`` is not silently run at rank 4."""
    given = []
    for name in smoke:
        spellings = (flag(name), "--no-" + flag(name)[2:])
        if any(tok in spellings or tok.startswith(flag(name) + "=") for tok in argv):
            given.append(f"{flag(name)} (--smoke sets {_shown(smoke[name], None)})")
    if given:
        parser.error(f"{given[0].split(' ')[0]}: --smoke overrides {', '.join(given)}; drop --smoke or the option")


def run_cli(parser: argparse.ArgumentParser, cfg: RunConfig, *, extra_notes: Sequence[str] = (),
            studies: Sequence[Callable[[FittedRun], Section]] = ()) -> Path:
    """``run(cfg)``, turning a refused option into the parser's usage error; prints the report path."""
    from experiments.pipeline import run  # the heavy part: imported once the command line is parsed

    from experiments.data import DatasetUnavailable

    try:
        report = run(cfg, extra_notes=extra_notes, studies=studies)
    except DatasetUnavailable as err:  # one clear message, not the chained traceback of tfds
        parser.exit(2, f"{parser.prog}: error: --dataset {cfg.dataset} (--data-dir {cfg.data_dir}): {err}\n")
    except ValueError as err:
        parser.error(str(err))
    print(f"report: {report}")
    return report
