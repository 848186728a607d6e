"""One run of the method, end to end: data -> trained CNN -> blocks -> coupled NMF -> report.

``run(RunConfig(...))`` is what ``experiments.quickstart`` and ``experiments.paper`` call; the
scripts only choose defaults and parse options. Every run writes one folder (``config.out``):
``report.html`` and its files (see ``experiments.report``), ``model/`` (the trained network,
its training data and test accuracy) and ``checkpoints/`` (orbax, one per epoch: a killed run
resumes training from the last one when started again with the same options).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

import jaxnmf
import models
from experiments import data as data_lib
from experiments.matrices import build_blocks
from experiments.report import Section, write_report

VARIANTS = ("project", "paper", "authors")
_TOP_EIG_K = {"resnet18": 3, "vgg11": 10}  # the authors' K of the mean of the top-K eigenvalues


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every option of a run (the scripts' command-line options map one to one onto these).

    variant: "project" (this project's defaults: blocks scaled to unit Frobenius norm, no
    penalties), "paper" (Eq. 3.1 as published: no block weights, no penalties) or "authors"
    (the authors' code: l2_F = l1_F = 1, unit-norm columns of every W_b, no block weights).
    ``block_weights``/``l2_F``/... left at None take the variant's values.
    """

    dataset: str = "shapes"
    model: str = "resnet18"
    width: int = 8
    n_train: int = 5000  # shapes only (digits and CIFAR use their whole train split)
    n_test: int = 1200  # shapes only
    n_probe: int = 1000
    epochs: int = 6
    train_preset: str = "fast"  # or "authors" (shared/notes/method.md)
    batch_size: int = 128
    model_path: str | None = None  # load this trained model (models.save_model) instead of training
    layers: tuple[str, ...] | None = None  # default: the authors' layers of the model
    rank: int = 12
    restarts: int = 1
    iterations: int = 300
    tol: float = 1e-5
    variant: str = "project"
    block_weights: str | None = None
    l2_F: float | None = None
    l1_F: float | None = None
    l2: float | None = None
    l1: float | None = None
    tcav: bool = False
    tcav_layers: tuple[str, ...] | None = None
    data_dir: str | None = None  # CIFAR only
    out: str = "runs/quickstart"
    seed: int = 0

    def solver_options(self) -> dict:
        """The ``jaxnmf.fit`` options the variant and the explicit settings give."""
        base = {"project": dict(block_weights="frobenius", l2_F=0.0, l1_F=0.0, l2=0.0, l1=0.0, unit_columns=False),
                "paper": dict(block_weights="none", l2_F=0.0, l1_F=0.0, l2=0.0, l1=0.0, unit_columns=False),
                "authors": dict(block_weights="none", l2_F=1.0, l1_F=1.0, l2=0.0, l1=0.0, unit_columns=True),
                }[self.variant]
        for name in ("block_weights", "l2_F", "l1_F", "l2", "l1"):
            if getattr(self, name) is not None:
                base[name] = getattr(self, name)
        return base

    def resolved_layers(self) -> tuple[str, ...]:
        return tuple(self.layers) if self.layers else models.DEFAULT_LAYERS[self.model]


def check_config(cfg: RunConfig) -> None:
    """Refuse bad options before any work, naming the option."""
    def fail(option, problem):
        raise ValueError(f"--{option.replace('_', '-')}: {problem}")

    if cfg.dataset not in ("shapes", "digits", "cifar10", "cifar100"):
        fail("dataset", f"unknown dataset {cfg.dataset!r}; choose shapes, digits, cifar10 or cifar100")
    if cfg.model not in models.LAYERS:
        fail("model", f"unknown model {cfg.model!r}; choose {sorted(models.LAYERS)}")
    if cfg.variant not in VARIANTS:
        fail("variant", f"unknown variant {cfg.variant!r}; choose {VARIANTS}")
    if cfg.train_preset not in ("fast", "authors"):
        fail("train_preset", f"choose 'fast' or 'authors', got {cfg.train_preset!r}")
    if cfg.block_weights not in (None, "none", "frobenius"):
        fail("block_weights", f"choose 'none' or 'frobenius', got {cfg.block_weights!r}")
    for name in ("width", "n_train", "n_test", "n_probe", "epochs", "batch_size", "rank", "restarts", "iterations"):
        if getattr(cfg, name) < 1:
            fail(name, f"must be >= 1, got {getattr(cfg, name)}")
    for name in ("tol", "l2_F", "l1_F", "l2", "l1"):
        value = getattr(cfg, name)
        if value is not None and not value >= 0:
            fail(name, f"must be >= 0, got {value}")
    if cfg.dataset == "shapes" and cfg.n_probe > cfg.n_test:
        fail("n_probe", f"{cfg.n_probe} probe images but the test split has --n-test {cfg.n_test}")
    valid = (*models.LAYERS[cfg.model], "softmax")
    for spec in (*cfg.resolved_layers(), *(cfg.tcav_layers or ())):
        if spec.removesuffix(":avg") not in valid:
            fail("layers", f"unknown layer {spec!r} for {cfg.model}; valid: {', '.join(valid)} (':avg' appended "
                           "to a spatial layer averages it over positions)")
    if cfg.rank > cfg.n_probe:
        fail("rank", f"rank {cfg.rank} exceeds the number of probe images {cfg.n_probe}")
    if cfg.model_path is not None and not (Path(cfg.model_path) / "model.json").exists():
        fail("model_path", f"no trained model at {cfg.model_path} (expected model.json written by models.save_model)")


def load_data(cfg: RunConfig) -> tuple[data_lib.Dataset, data_lib.Dataset]:
    """Train and test splits of the configured dataset."""
    if cfg.dataset == "shapes":
        kw = [dict(n=cfg.n_train, seed=cfg.seed), dict(n=cfg.n_test, seed=cfg.seed)]
    elif cfg.dataset == "digits":
        kw = [dict(seed=cfg.seed)] * 2
    else:
        kw = [dict(data_dir=cfg.data_dir)] * 2
    return (data_lib.load_dataset(cfg.dataset, "train", **kw[0]), data_lib.load_dataset(cfg.dataset, "test", **kw[1]))


def trained_model(cfg: RunConfig, train: data_lib.Dataset, test: data_lib.Dataset, out: Path):
    """Load ``cfg.model_path`` or train (resuming from ``out/checkpoints``) and save to ``out/model``."""
    if cfg.model_path is not None:
        model, variables, meta = models.load_model(cfg.model_path)
        print(f"loaded {cfg.model_path}: trained on {meta['dataset']}, test accuracy {meta['test_accuracy']:.3f}")
        return model, variables, meta
    model = models.build_model(cfg.model, num_classes=len(train.class_names), width=cfg.width)
    preset = models.TrainConfig.authors() if cfg.train_preset == "authors" else models.TrainConfig()
    # short runs (the CPU quickstart) train best without the warm-up of the fast schedule
    tc = dataclasses.replace(preset, epochs=cfg.epochs, batch_size=cfg.batch_size,
                             warmup_epochs=preset.warmup_epochs if cfg.epochs >= 10 else 0)
    print(f"training {cfg.model} (width {cfg.width}) on {len(train)} {cfg.dataset} images for {cfg.epochs} epochs")
    result = models.train(model, train.images, train.labels, test.images, test.labels, tc, seed=cfg.seed,
                          checkpoint_dir=out / "checkpoints")
    meta = dict(dataset=f"{cfg.dataset} train split ({len(train)} images)", test_accuracy=float(result.test_accuracy),
                seed=cfg.seed, train_config=dataclasses.asdict(tc))
    models.save_model(out / "model", cfg.model, dict(num_classes=len(train.class_names), width=cfg.width),
                      result.variables, meta)
    print(f"test accuracy {result.test_accuracy:.3f}")
    return model, result.variables, meta


def run(cfg: RunConfig, *, extra_notes: Sequence[str] = ()) -> Path:
    """Run the whole method with ``cfg``; return the path of ``report.html``."""
    check_config(cfg)
    t0 = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_data(cfg)
    if cfg.n_probe > len(test):
        raise ValueError(f"--n-probe: {cfg.n_probe} probe images but the test split has {len(test)}")
    model, variables, meta = trained_model(cfg, train, test, out)

    idx = (np.arange(len(test)) if cfg.n_probe == len(test)
           else data_lib.probe_indices(test.labels, cfg.n_probe, seed=cfg.seed))
    layers = cfg.resolved_layers()
    base_layers = tuple(dict.fromkeys(spec.removesuffix(":avg") for spec in layers))
    blocks = build_blocks(test.images[idx], lambda x: models.capture_activations(model, variables, x, base_layers),
                          layers, out_dir=out / "blocks")
    pixel_blocks = [name for name in blocks if name.startswith("pixels")]

    options = cfg.solver_options()
    print(f"fitting rank {cfg.rank} to {len(blocks)} blocks ({sum(b.shape[0] for b in blocks.values())} rows x "
          f"{cfg.n_probe} images), variant {cfg.variant}")
    result = jaxnmf.fit(blocks, cfg.rank, key=jax.random.key(cfg.seed), max_iter=cfg.iterations, tol=cfg.tol,
                        init="random" if cfg.restarts > 1 else "nndsvda", n_restarts=cfg.restarts, progress=True,
                        **options)
    print(f"{result.n_iter} iterations, objective {result.loss:.4g}, converged {result.converged}")

    sections: list[Section] = []
    if cfg.tcav:
        from experiments import tcav  # imported only when asked for
        t_tcav = time.perf_counter()
        tcav_layers = cfg.tcav_layers or tuple(layer for layer in ("stage3", "stage4", "pool4", "pool5")
                                               if layer in models.LAYERS[cfg.model])[:2]
        scores = tcav.tcav_scores(model, variables, test.images[idx], test.labels[idx], result.F, tcav_layers,
                                  n_concept=min(50, cfg.n_probe // 3), seed=cfg.seed)
        sections.append(tcav.tcav_section(scores, test.class_names))
        print(f"TCAV on {', '.join(tcav_layers)}: {time.perf_counter() - t_tcav:.0f} s")

    config = dict(dataclasses.asdict(cfg), layers=list(layers), **{f"fit_{k}": v for k, v in options.items()},
                  trained_on=meta.get("dataset"), model_test_accuracy=meta.get("test_accuracy"))
    config["variant"] = "authors" if cfg.variant == "authors" else "paper"
    config["variant_name"] = cfg.variant
    config["block_weights"] = options["block_weights"]
    notes = [*extra_notes, f"Network test accuracy: {meta.get('test_accuracy', float('nan')):.3f} "
                           f"(trained on {meta.get('dataset')})."]
    report = write_report(out, config=config, dataset=test, probe_indices=idx, result=result,
                          pixel_blocks=pixel_blocks, layer_blocks=[b for b in blocks if b not in pixel_blocks],
                          top_eig_k=min(_TOP_EIG_K[cfg.model], cfg.rank),
                          n_neighbours=min(30, cfg.n_probe - 1), extra_sections=sections, notes=notes)
    (out / "timing.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return report


def add_arguments(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """Command-line options, one per ``RunConfig`` field, with ``defaults`` shown."""
    for f in dataclasses.fields(RunConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name in ("layers", "tcav_layers"):
            parser.add_argument(flag, nargs="+", default=default, metavar="LAYER")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=default, help=f"(default: {default})")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}
    for name in ("layers", "tcav_layers"):
        values[name] = tuple(values[name]) if values[name] else None
    return RunConfig(**values)
