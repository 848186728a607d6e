"""One run of the method, end to end: data -> trained CNN -> blocks -> coupled NMF -> report.

``run(RunConfig(...))`` is what ``experiments.quickstart`` and ``experiments.paper`` call; the
scripts only choose defaults and parse options. Every run writes one folder (``config.out``):
``report.html`` and its files (see ``experiments.report``), ``fit.npz`` (the fit itself, for
``jaxnmf.load_fit`` and ``jaxnmf.transform`` on new images), ``model/`` (the trained network,
its training data and test accuracy) and ``checkpoints/`` (orbax, one per epoch: a killed run
resumes training from the last one when started again with the same options). ``run.json`` holds
the run's options and ``"complete": true`` once every result is written (``experiments.run_folder``:
a folder of another run is refused unless ``--overwrite``); every file is written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxnmf
import models
from experiments import data as data_lib
from experiments import run_folder
from experiments._atomic import write_text_atomic
# the command line and the options of a run live in the light ``experiments.cli`` (``--help`` without
# jax); they are imported from here too
from experiments.cli import (DATASETS, VARIANTS, RunConfig, add_arguments, config_from_args,  # noqa: F401
                             parser_for, run_cli)
from experiments.matrices import build_blocks
from experiments.report import Section, write_report

_TOP_EIG_K = {"resnet18": 3, "vgg11": 10}  # the authors' K of the mean of the top-K eigenvalues


def check_config(cfg: RunConfig) -> None:
    """Refuse bad options before any work, naming the option."""
    def fail(option, problem):
        raise ValueError(f"--{option.replace('_', '-')}: {problem}")

    for option in ("dataset", "probe_dataset"):
        if getattr(cfg, option) not in ((None,) if option == "probe_dataset" else ()) + DATASETS:
            fail(option, f"unknown dataset {getattr(cfg, option)!r}; choose shapes, digits, cifar10 or cifar100")
    if cfg.train_restrict is not None and cfg.dataset != "shapes":
        fail("train_restrict", "only the shapes dataset has attributes to restrict")
    if cfg.example_groups not in ("rows", "predicted"):
        fail("example_groups", f"choose 'rows' or 'predicted', got {cfg.example_groups!r}")
    if not (math.isfinite(cfg.group_F) and cfg.group_F >= 0):
        fail("group_F", f"must be a finite number >= 0, got {cfg.group_F}")
    if cfg.model not in models.LAYERS:
        fail("model", f"unknown model {cfg.model!r}; choose {sorted(models.LAYERS)}")
    if cfg.model_path is not None and (Path(cfg.model_path) / "model.json").exists():
        _check_saved_network(cfg, fail)  # before the layers, which are read from --model
    if cfg.variant not in VARIANTS:
        fail("variant", f"unknown variant {cfg.variant!r}; choose {VARIANTS}")
    if cfg.train_preset not in ("plateau", "fast", "authors"):
        fail("train_preset", f"choose 'plateau', 'fast' or 'authors', got {cfg.train_preset!r}")
    if cfg.solver not in ("mu", "hals"):
        fail("solver", f"choose 'mu' or 'hals', got {cfg.solver!r}")
    if cfg.block_dtype not in ("float32", "bfloat16"):
        fail("block_dtype", f"choose 'float32' or 'bfloat16', got {cfg.block_dtype!r}")
    if isinstance(cfg.devices, bool) or not isinstance(cfg.devices, int) or cfg.devices < 1:
        fail("devices", f"must be a whole number >= 1, got {cfg.devices!r}")
    if cfg.devices > 1:
        available = len(jax.devices())
        if cfg.devices > available:
            fail("devices", f"{cfg.devices} asked for, but JAX sees {available} {jax.default_backend()} device(s) "
                            "(on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=K simulates K)")
        if cfg.n_probe % cfg.devices:
            fail("devices", f"--n-probe {cfg.n_probe} is not a multiple of {cfg.devices}: each device holds the same "
                            "number of examples")
        if cfg.block_dtype != "float32":
            fail("devices", "sharded blocks are float32; leave --block-dtype at float32")
    if cfg.penalty_units not in (None, "relative", "raw"):
        fail("penalty_units", f"choose 'relative' or 'raw', got {cfg.penalty_units!r}")
    if cfg.block_weights not in (None, "none", "frobenius"):
        fail("block_weights", f"choose 'none' or 'frobenius', got {cfg.block_weights!r}")
    if cfg.block_emphasis:
        emphasis = cfg.emphasis()  # a malformed item: ValueError naming --block-emphasis
        if cfg.solver_options()["block_weights"] != "frobenius":
            fail("block_emphasis", "multiplies frobenius block weights; the variant or --block-weights gives "
                                   f"{cfg.solver_options()['block_weights']!r}")
        unknown = sorted(set(emphasis) - set(cfg.resolved_layers()) - {"pixels"})
        if unknown:
            fail("block_emphasis", f"no block named {', '.join(unknown)}; blocks: pixels, "
                                   f"{', '.join(cfg.resolved_layers())}")
    for name in ("width", "n_train", "n_test", "n_probe", "epochs", "batch_size", "rank", "restarts", "iterations"):
        if getattr(cfg, name) < 1:
            fail(name, f"must be >= 1, got {getattr(cfg, name)}")
    for name in ("tol", "l2_F", "l1_F", "l2", "l1"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            fail(name, f"must be a finite number >= 0, got {value}")
    if (cfg.probe_dataset or cfg.dataset) == "shapes" and cfg.n_probe > cfg.n_test:
        fail("n_probe", f"{cfg.n_probe} probe images but the test split has --n-test {cfg.n_test}")
    valid = tuple(dict.fromkeys((*models.LAYERS[cfg.model], "softmax")))
    for spec in (*cfg.resolved_layers(), *(cfg.tcav_layers or ())):
        if spec.removesuffix(":avg") not in valid:
            fail("layers", f"unknown layer {spec!r} for {cfg.model}; valid: {', '.join(valid)} (':avg' appended "
                           "to a spatial layer averages it over positions)")
    if cfg.rank > cfg.n_probe:
        fail("rank", f"rank {cfg.rank} exceeds the number of probe images {cfg.n_probe}")
    if cfg.model_path is not None and not (Path(cfg.model_path) / "model.json").exists():
        fail("model_path", f"no trained model at {cfg.model_path} (expected model.json written by models.save_model)")
    _check_out(Path(cfg.out), fail)


def _check_saved_network(cfg: RunConfig, fail) -> None:
    """--model and --width must describe the network saved at --model-path: the layers, the report and
    run.json are read from them."""
    try:
        saved = json.loads((Path(cfg.model_path) / "model.json").read_text())
        name, width = saved["model_name"], saved["model_kwargs"].get("width", 64)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        fail("model_path", f"{cfg.model_path}/model.json is unreadable ({type(error).__name__}: {error})")
    if (name, width) != (cfg.model, cfg.width):
        fail("model_path", f"{cfg.model_path} holds a {name} of width {width}, but the options say --model "
                           f"{cfg.model} --width {cfg.width}: pass --model {name} --width {width}")


def _check_out(out: Path, fail) -> None:
    """--out must be, or be creatable as, a folder this process can write in (tried with a temporary file)."""
    existing = out.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        fail("out", f"{out} " + ("is a file" if existing == out.resolve() else f"lies under the file {existing}")
             + ": give a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        fail("out", f"cannot write in {existing} ({error.strerror or error}): choose another --out")


def parse_restrict(text: str | None) -> dict[str, list[str]] | None:
    """"colour=red,blue;size=0" -> {"colour": ["red", "blue"], "size": ["0"]} (digits become ints)."""
    if not text:
        return None
    out = {}
    for part in text.split(";"):
        if "=" not in part:
            raise ValueError(f"--train-restrict: expected 'attribute=value,value;...', got {part!r}")
        key, values = part.split("=", 1)
        out[key.strip()] = [int(v) if v.strip().isdigit() else v.strip() for v in values.split(",")]
    return out


def _load(name: str, split: str, cfg: RunConfig, restrict=None) -> data_lib.Dataset:
    if name == "shapes":
        n = cfg.n_train if split == "train" else cfg.n_test
        return data_lib.load_dataset(name, split, n=n, seed=cfg.seed, restrict=restrict)
    if name == "digits":
        return data_lib.load_dataset(name, split, seed=cfg.seed)
    return data_lib.load_dataset(name, split, data_dir=cfg.data_dir)


def load_data(cfg: RunConfig) -> tuple[data_lib.Dataset, data_lib.Dataset, data_lib.Dataset]:
    """(train, test) splits the network learns from (restricted as asked) and the probe split."""
    restrict = parse_restrict(cfg.train_restrict)
    train, test = _load(cfg.dataset, "train", cfg, restrict), _load(cfg.dataset, "test", cfg, restrict)
    probe = test if cfg.probe_dataset in (None, cfg.dataset) and restrict is None else _load(
        cfg.probe_dataset or cfg.dataset, "test", cfg)
    return train, test, probe


# the options ``trained_model``'s network depends on (the run folder's ``model/`` and ``checkpoints/``)
NETWORK_OPTIONS = ("dataset", "train_restrict", "model", "width", "n_train", "n_test", "epochs", "train_preset",
                   "batch_size", "seed", "model_path")


def trained_model(cfg: RunConfig, train: data_lib.Dataset, test: data_lib.Dataset, out: Path):
    """Load ``cfg.model_path`` or train (resuming from ``out/checkpoints``) and save to ``out/model``."""
    if cfg.model_path is not None:
        model, variables, meta = models.load_model(cfg.model_path)
        print(f"loaded {cfg.model_path}: trained on {meta['dataset']}, test accuracy {meta['test_accuracy']:.3f}")
        return model, variables, meta
    model = models.build_model(cfg.model, num_classes=len(train.class_names), width=cfg.width)
    preset = {"authors": models.TrainConfig.authors, "fast": models.TrainConfig,
              "plateau": models.TrainConfig.until_plateau}[cfg.train_preset]()
    # short runs (the CPU quickstart) warm up for one epoch only (measured on shapes: 1.00 test
    # accuracy after 4 of 6 epochs, batch 64; 0.42 without warm-up at batch 128)
    tc = dataclasses.replace(preset, epochs=cfg.epochs, batch_size=cfg.batch_size,
                             warmup_epochs=preset.warmup_epochs if cfg.epochs >= 10 else min(1, cfg.epochs - 1))
    until = "until its held-out loss stops improving, at most" if cfg.train_preset == "plateau" else "for"
    print(f"training {cfg.model} (width {cfg.width}) on {len(train)} {cfg.dataset} images {until} {cfg.epochs} epochs")
    result = models.train(model, train.images, train.labels, test.images, test.labels, tc, seed=cfg.seed,
                          checkpoint_dir=out / "checkpoints")
    if result.stopped == "max_epochs" and cfg.train_preset == "plateau":
        last = result.history[-1]
        warnings.warn(f"training reached --epochs {cfg.epochs} while the loss on its held-out images was still falling "
                      f"(held-out accuracy {last['validation_accuracy']:.3f}): more epochs may improve the network; a "
                      "larger --epochs lets it finish", RuntimeWarning, stacklevel=2)
    meta = dict(dataset=f"{cfg.dataset} train split ({len(train)} images)", test_accuracy=float(result.test_accuracy),
                seed=cfg.seed, train_config=dataclasses.asdict(tc), input_shape=list(train.images.shape[1:]),
                class_names=list(train.class_names),  # experiments.explain reads these
                epochs_trained=len(result.history), stopped=result.stopped,
                validation_accuracy=result.history[-1].get("validation_accuracy") if result.history else None)
    models.save_model(out / "model", cfg.model, dict(num_classes=len(train.class_names), width=cfg.width),
                      result.variables, meta)
    print(f"test accuracy {result.test_accuracy:.3f} after {len(result.history)} epochs (stopped: {result.stopped})")
    return model, result.variables, meta


def check_not_collapsed(result: jaxnmf.NMFResult, cfg: RunConfig, options: dict) -> None:
    """Stop the run, before any report, when the fit switched every factor off (F = 0): a report
    on it would show concepts that are not there. The error names the penalties and a smaller value."""
    if not result.collapsed:
        return
    given = {"group_F": cfg.group_F, **{k: options[k] for k in ("l2", "l1", "l2_F", "l1_F")}}
    given = {k: v for k, v in given.items() if v > 0}
    if not given:
        raise ValueError("the fit has no active factor (F = 0) without any penalty: the probe data carry no "
                         "signal to factorise; no report written")
    name = "group_F" if "group_F" in given else max(given, key=given.get)
    flag = "--" + name.replace("_", "-")
    others = ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in given.items() if k != name)
    raise ValueError(
        f"{flag} {given[name]:g} ({options['penalty_units']} units{', with ' + others if others else ''}) switched "
        f"off all {cfg.rank} factors: F = 0, relative error 1 on every block, so no report is written. "
        f"Use a smaller value, e.g. {flag} {given[name] / 10:g}.")


@dataclasses.dataclass(frozen=True)
class FittedRun:
    """What a run has built by the time it fits, for studies that add report sections
    (``run(..., studies=...)``): the network, the probe images (``probe.images[probe_indices]``),
    the blocks as fitted and the fit."""

    cfg: RunConfig
    out: Path
    model: Any
    variables: dict
    probe: data_lib.Dataset
    probe_indices: np.ndarray
    blocks: dict
    result: jaxnmf.NMFResult


def run(cfg: RunConfig, *, extra_notes: Sequence[str] = (),
        studies: Sequence[Callable[[FittedRun], Section]] = ()) -> Path:
    """Run the whole method with ``cfg``; return the path of ``report.html``. Each of ``studies``
    is called with the ``FittedRun`` after the fit and returns a section of the report."""
    check_config(cfg)
    t0 = time.perf_counter()
    out = Path(cfg.out).resolve()
    run_folder.start(out, dataclasses.asdict(cfg), network_options=NETWORK_OPTIONS, overwrite=cfg.overwrite)
    train, test, probe = load_data(cfg)
    if cfg.n_probe > len(probe):
        raise ValueError(f"--n-probe: {cfg.n_probe} probe images but the probe split has {len(probe)}")
    model, variables, meta = trained_model(cfg, train, test, out)
    same_labels = probe is test  # the probe images' labels are the network's classes

    idx = probe_selection(cfg, probe)
    layers = cfg.resolved_layers()
    capture = capture_for(model, variables, layers)
    blocks = build_blocks(probe.images[idx], capture, layers, out_dir=out / "blocks")
    if not cfg.pixels:
        blocks = {name: x for name, x in blocks.items() if not name.startswith("pixels")}
    examples = None  # with --devices K: every block's columns split over K devices, the W_b replicated
    if cfg.devices > 1:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:cfg.devices]), ("examples",))
        examples = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "examples"))
    for name in list(blocks):  # onto the device one block at a time: the data is never held twice
        if examples is not None:
            blocks[name] = jax.device_put(blocks[name], examples)
        elif cfg.block_dtype == "bfloat16":  # fit uses these in place on a CPU, copies them to an accelerator
            narrow = jaxnmf.aligned_empty(blocks[name].shape, jnp.bfloat16)
            narrow[...] = blocks[name]
            blocks[name] = narrow
        else:
            blocks[name] = jax.device_put(blocks[name])
    pixel_blocks = [name for name in blocks if name.startswith("pixels")]
    predicted = predicted_classes(capture, probe.images[idx])

    options = cfg.fit_options(blocks)
    print(f"fitting rank {cfg.rank} to {len(blocks)} blocks ({sum(b.shape[0] for b in blocks.values())} rows x "
          f"{cfg.n_probe} images), variant {cfg.variant}")
    result = jaxnmf.fit(blocks, cfg.rank, key=jax.random.key(cfg.seed), max_iter=cfg.iterations, tol=cfg.tol,
                        init="random" if cfg.restarts > 1 else "nndsvda", n_restarts=cfg.restarts, progress=True,
                        group_F=cfg.group_F, example_groups=predicted if cfg.example_groups == "predicted" else None,
                        solver=cfg.solver, block_dtype=jnp.dtype(cfg.block_dtype), **options)
    check_not_collapsed(result, cfg, options)
    print(f"{result.n_iter} iterations, objective {result.loss:.4g}, converged {result.converged}, "
          f"{result.n_active} of {cfg.rank} factors active")

    sections: list[Section] = []
    fitted = FittedRun(cfg, out, model, variables, probe, idx, blocks, result)
    sections += [study(fitted) for study in studies]
    if cfg.tcav:
        from experiments import validate  # imported only when asked for
        t_tcav = time.perf_counter()
        tcav_layers = cfg.tcav_layers or tuple(layer for layer in ("stage3", "stage4", "pool", "pool4", "pool5")
                                               if layer in models.LAYERS[cfg.model])[:3]
        held = validate.held_out_images(probe, idx, train, cfg.tcav_images, same_labels, cfg.seed)
        groups_of = (lambda images: predicted_classes(capture, images)) if cfg.example_groups == "predicted" else None
        sections.append(validate.tcav_step(model, variables, result, capture, layers, cfg.pixels, held, tcav_layers,
                                           train.class_names, seed=cfg.seed, groups_of=groups_of))
        print(f"TCAV on {', '.join(tcav_layers)}: {time.perf_counter() - t_tcav:.0f} s")

    # the options as given, with what the variant resolved them to (one meaning of each name)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None and k != "overwrite"}
    config.update(options, layers=list(layers), trained_on=meta.get("dataset"),
                  model_test_accuracy=meta.get("test_accuracy"))
    trained = ""
    if meta.get("epochs_trained") is not None:
        why = {"plateau": "a plateau of its held-out loss", "max_epochs": "the epoch limit",
               "epochs": "the epoch limit"}.get(meta.get("stopped"), meta.get("stopped"))
        trained = f"; {meta['epochs_trained']} epochs, stopped by {why}"
    notes = [*extra_notes, f"Network test accuracy: {meta.get('test_accuracy', float('nan')):.3f} "
                           f"(trained on {meta.get('dataset')}{trained})."]
    notes.append(f"Probe images: {len(idx)} from the {probe.name} {probe.split} split; the network agrees with "
                 f"their labels on {np.mean(predicted == probe.labels[idx]):.3f} of them." if same_labels else
                 f"Probe images: {len(idx)} from {probe.name} ({probe.split}), not the network's training "
                 f"distribution; classes in the tables are {probe.name}'s, TCAV uses the network's predictions.")
    jaxnmf.save_fit(result, out / "fit.npz")  # jaxnmf.load_fit: explain new images against this fit
    report = write_report(out, config=config, dataset=probe, probe_indices=idx, result=result,
                          pixel_blocks=pixel_blocks, layer_blocks=[b for b in blocks if b not in pixel_blocks],
                          top_eig_k=min(_TOP_EIG_K[cfg.model], cfg.rank),
                          n_neighbours=min(30, cfg.n_probe - 1), extra_sections=sections, notes=notes)
    write_text_atomic(out / "timing.json", json.dumps({"seconds": time.perf_counter() - t0}))
    run_folder.finish(out, dataclasses.asdict(cfg))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return report


def probe_selection(cfg: RunConfig, probe: data_lib.Dataset) -> np.ndarray:
    """(n_probe,) indices of the probe images: the whole split, or a class-balanced draw (seed ``cfg.seed``)."""
    return (np.arange(len(probe)) if cfg.n_probe == len(probe)
            else data_lib.probe_indices(probe.labels, cfg.n_probe, seed=cfg.seed))


def capture_for(model, variables, layers: Sequence[str]) -> Callable:
    """images -> {layer: activation} for the base layers of the specs ``layers`` (``"stage1:avg"`` ->
    ``"stage1"``) and ``"softmax"`` (the network's predictions)."""
    base_layers = tuple(dict.fromkeys(spec.removesuffix(":avg") for spec in layers))
    capture_layers = tuple(dict.fromkeys((*base_layers, "softmax")))
    return lambda x: models.capture_activations(model, variables, x, capture_layers)


def predicted_classes(capture, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(n,) the network's predicted class of each image; ``capture`` returns at least "softmax"."""
    return np.concatenate([np.argmax(np.asarray(capture(images[i:i + batch_size])["softmax"]), axis=1)
                           for i in range(0, len(images), batch_size)])
