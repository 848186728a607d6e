"""Explain your own model and images: the whole method on any Flax network and any image set.

Python::

    from experiments.explain import explain, explain_new
    report = explain(model, variables, images, layers=["block2", "block3"], out="runs/mine")
    explain_new("runs/mine", new_images, out="runs/mine/new")   # concept scores of new images

Command line::

    python -m experiments.explain --images DIR|FILE.npy|FILE.npz --model MODEL_DIR [--labels CSV]
        [--layers LAYER ...] [--out DIR] [--rank 12] ...
    python -m experiments.explain --run RUN_DIR --images NEW [--out DIR]

``model_or_fn`` is a Flax Linen module whose ``apply(variables, images, ...)`` returns logits (its
layers are module paths as Flax reports them, ``models.layer_paths``; the project's ResNet-18 and
VGG-11 take their layer names, ``models.LAYERS``), or any JAX function ``images -> {layer:
activation}``. Every layer must be non-negative (after its ReLU). ``--model`` is a folder written
by ``models.save_model`` (any Linen module: ``models.model_spec``).

Images: a folder of PNG/JPEG files (``DIR/*.png``, or ``DIR/<class>/*.png``, whose folder names
are then the labels), resized with PIL's bilinear filter to the model's input size when their size
differs (``input_shape`` of the saved model's metadata, else ``--image-size``, else the size of
the images, which must then all agree), converted to RGB or grey as the model takes; or a
``.npy``/``.npz`` array (N, H, W, C), floats in [0, 1] or uint8 (divided by 255), used as they are.
Labels (optional): ``--labels`` a CSV of ``filename,label`` rows (a header row ``filename,label`` is
allowed; for arrays the filename is the image's index), or the folder structure. Without labels the
classes are the network's predictions (argmax of its logits) when it gives logits, and the report
says so; for a function without logits, the report leaves its class-based parts out.

The fit is ``jaxnmf.fit`` with the quickstart's defaults (rank 12, 300 iterations, tol 1e-5, one
NNDSVD start, the "project" variant: blocks scaled to unit Frobenius norm, no penalties). The
folder ``out`` receives what a quickstart run writes (``report.html``, ``summary.json``,
``factors.npz``, ``fit.npz``, ``model/``, ``run.json``) plus ``explain.json`` (the layers, the
input shape, the class names), ``probe_images.npy`` (uint8) and the report's concept heatmaps.

``explain_new(run, images)`` (``--run``): loads ``run/fit.npz`` and ``run/model/``, builds the new
images' blocks with the run's layers, ``jaxnmf.transform``s them, and writes their concept
scores (``concept_scores.csv``), their nearest probe images in concept space (probe F from
``run/factors.npz``) and heatmaps to a small report. ``run`` may be a folder of this module or of
the quickstart / paper pipeline.
"""
from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import hashlib
import html
import io
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULTS = dict(rank=12, iterations=300, tol=1e-5, restarts=1, variant="project", solver="mu", seed=0,
                pixels=True)  # the quickstart's, but its rank 24 and block emphasis, which are tuned to its layers
_HEATMAP_IMAGES = 4  # top images per concept with a heatmap in the report
_NEW_NEIGHBOURS = 5


# ----------------------------------------------------------------------------- images and labels
@dataclasses.dataclass(frozen=True)
class LoadedImages:
    """Images read by `load_images`: (N, H, W, C) float32 in [0, 1], one name per image, and the
    class of each image from the folder structure (``labels`` into ``class_names``) or None."""

    images: np.ndarray
    names: list[str]
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    resized: int = 0  # how many files were resized


def as_unit_images(images, argument: str = "images") -> np.ndarray:
    """(N, H, W, C) float32 in [0, 1] from floats in [0, 1] or uint8; a ValueError naming
    ``argument`` otherwise."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{argument}: expected an array (N, H, W, C), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{argument}: no images")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{argument}: expected floats in [0, 1] or uint8, got dtype {images.dtype}")
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 1:
        raise ValueError(f"{argument}: float images must lie in [0, 1], got values in [{np.nanmin(images):.4g}, "
                         f"{np.nanmax(images):.4g}] (uint8 images are divided by 255)")
    return images.astype(np.float32)


def load_images(path, *, size: Sequence[int] | None = None, channels: int | None = None) -> LoadedImages:
    """Read images from a folder of PNG/JPEG files or a ``.npy``/``.npz`` array (module docstring).

    Args:
        path: the folder or the file.
        size: (H, W) the files of a folder are resized to (PIL, bilinear) when theirs differs;
            default the files' own size (they must then all agree). Arrays are never resized:
            ``size`` given, an array of another size is refused.
        channels: 1 (grey) or 3 (RGB) that files are converted to; arrays must have it.

    Raises:
        ValueError: naming ``images``: no such file, an unreadable file, no image, mixed sizes,
            the wrong size or channel count of an array.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"images: no file or folder {path}")
    if path.is_dir():
        return _load_folder(path, size, channels)
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.files)
                if "images" not in keys and len(keys) != 1:
                    raise ValueError(f"it holds {keys}: name the array 'images'")
                array = archive["images" if "images" in keys else keys[0]]
        else:
            raise ValueError(f"expected a folder, a .npy or a .npz file, got {path.suffix or 'no suffix'}")
    except Exception as error:
        raise ValueError(f"images: cannot read {path} ({type(error).__name__}: {error})") from None
    try:
        images = as_unit_images(array)
    except ValueError as error:
        raise ValueError(f"images: {path.name}: {str(error).removeprefix('images: ')}") from None
    if size is not None and tuple(images.shape[1:3]) != tuple(size):
        raise ValueError(f"images: {path.name} holds {images.shape[1]}x{images.shape[2]} images, the model takes "
                         f"{size[0]}x{size[1]} (arrays are not resized; resize them, or give a folder of image "
                         f"files)")
    if channels is not None and images.shape[-1] != channels:
        raise ValueError(f"images: {path.name} holds images of {images.shape[-1]} channels, the model takes "
                         f"{channels}")
    return LoadedImages(images, [str(i) for i in range(len(images))])


def _load_folder(folder: Path, size, channels) -> LoadedImages:
    from PIL import Image, UnidentifiedImageError

    is_image = lambda p: p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    direct = sorted(p for p in folder.iterdir() if is_image(p))
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = {d.name: sorted(p for p in d.iterdir() if is_image(p)) for d in subfolders}
    nested = {name: files for name, files in nested.items() if files}
    if direct and nested:
        raise ValueError(f"images: {folder} holds image files and class folders ({sorted(nested)}); use one: "
                         f"DIR/*.png (no labels) or DIR/<class>/*.png")
    if not direct and not nested:
        raise ValueError(f"images: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file in {folder} or its subfolders")
    files = direct or [p for name in nested for p in nested[name]]
    class_names = list(nested) if nested else None
    labels = (np.array([i for i, name in enumerate(nested) for _ in nested[name]]) if nested else None)
    mode = {None: None, 1: "L", 3: "RGB"}.get(channels, "?")
    if mode == "?":
        raise ValueError(f"images: image files can be read as 1 (grey) or 3 (RGB) channels; the model takes "
                         f"{channels}: give a .npy array instead")
    arrays, resized = [], 0
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                if mode is None:
                    mode = "L" if image.mode in ("L", "LA", "I", "I;16", "1") else "RGB"
                image = image.convert(mode)
                if size is None:
                    size = (image.height, image.width)
                if (image.height, image.width) != tuple(size):
                    image = image.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
                    resized += 1
                arrays.append(np.asarray(image, dtype=np.uint8))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ValueError(f"images: cannot read {file} ({type(error).__name__}: {error})") from None
    images = np.stack(arrays).astype(np.float32) / 255.0
    if images.ndim == 3:
        images = images[..., None]
    names = [str(p.relative_to(folder)) for p in files]
    return LoadedImages(images, names, labels, class_names, resized)


def read_labels_csv(path, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(labels (N,) into class names, class names) from a CSV of ``filename,label`` rows, one per
    image of ``names`` (a file's name relative to the folder, or its base name; for arrays its
    index). Class names are the labels sorted (numerically when they are all integers)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"labels: cannot read {path} ({type(error).__name__}: {error})") from None
    if rows and [c.strip().lower() for c in rows[0]] == ["filename", "label"]:
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows) if len(row) != 2]
    if bad:
        raise ValueError(f"labels: {path} row {bad[0] + 1} has {len(rows[bad[0]])} fields; expected filename,label")
    if len(rows) != len(names):
        raise ValueError(f"labels: {path} has {len(rows)} labels for {len(names)} images")
    given = {row[0].strip(): row[1].strip() for row in rows}
    by_base = {Path(name).name: name for name in names}
    lookup = {}
    for filename, label in given.items():
        name = filename if filename in names else by_base.get(Path(filename).name)
        if name is None:
            raise ValueError(f"labels: {path} names {filename!r}, which is not one of the images (e.g. {names[0]!r})")
        lookup[name] = label
    missing = [name for name in names if name not in lookup]
    if missing:
        raise ValueError(f"labels: {path} has no label for {len(missing)} images, e.g. {missing[0]!r}")
    values = [lookup[name] for name in names]
    numeric = all(v.lstrip("-").isdigit() for v in values)
    class_names = sorted(set(values), key=int if numeric else str)
    index = {c: i for i, c in enumerate(class_names)}
    return np.array([index[v] for v in values]), class_names


# ----------------------------------------------------------------------------- the network
def _spec_layers(layers: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(spec.removesuffix(":avg") for spec in layers))


def _input_channels(variables) -> int | None:
    """The input channels of the first 4-D ``kernel`` (the first convolution), or None."""
    def walk(tree):
        if isinstance(tree, Mapping):
            for key, value in tree.items():
                if key == "kernel" and getattr(value, "ndim", 0) == 4:
                    return int(value.shape[2])
                found = walk(value)
                if found is not None:
                    return found
        return None
    return walk(variables.get("params", variables)) if isinstance(variables, Mapping) else None


def _images_fit(model_or_fn, variables, shape, apply_kwargs) -> None:
    """A ValueError naming ``images`` when images of ``shape`` do not go through the network."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import models

    x = jax.ShapeDtypeStruct((1, *shape[1:]), jnp.float32)
    try:
        if isinstance(model_or_fn, nn.Module):
            kwargs = models.inference_kwargs(model_or_fn) if apply_kwargs is None else dict(apply_kwargs)
            jax.eval_shape(lambda v, x: model_or_fn.apply(v, x, **kwargs), variables, x)
        else:
            jax.eval_shape(model_or_fn, x)
    except Exception as error:  # flax's shape errors, XLA's, a user's function's
        text = str(error).split(" (https")[0].splitlines()[0]
        channels = _input_channels(variables) if isinstance(model_or_fn, nn.Module) else None
        hint = f" (the model's first convolution takes {channels} channels)" if channels and channels != shape[-1] else ""
        raise ValueError(f"images: images of shape {tuple(shape[1:])} do not go through the model{hint}: "
                         f"{type(error).__name__}: {text}") from None


def predicted_classes(model, variables, images, apply_kwargs=None, batch_size: int = 256) -> np.ndarray:
    """(N,) argmax of the logits of a Flax module (inference mode)."""
    import jax

    import models

    kwargs = models.inference_kwargs(model) if apply_kwargs is None else dict(apply_kwargs)
    logits = jax.jit(lambda v, x: model.apply(v, x, **kwargs))
    out = [np.argmax(np.asarray(logits(variables, images[i:i + batch_size])), axis=-1)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).reshape(-1)


# ----------------------------------------------------------------------------- heatmaps in a report
def _uri(figure_or_image) -> str:
    buffer = io.BytesIO()
    if hasattr(figure_or_image, "savefig"):
        figure_or_image.savefig(buffer, format="png", dpi=100)
    else:
        import matplotlib.image
        matplotlib.image.imsave(buffer, np.clip(figure_or_image, 0, 1), format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _big(image: np.ndarray, target: int = 64) -> np.ndarray:
    """(H, W, C) -> nearest-neighbour upscaled RGB of about ``target`` pixels a side."""
    scale = max(1, target // max(image.shape[:2]))
    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    return np.repeat(np.repeat(np.clip(rgb, 0, 1), scale, axis=0), scale, axis=1)


def heatmap_figure(images, heat, rows: Sequence[Sequence[int]], row_labels: Sequence[str], title: str):
    """A grid of overlays: row r shows images ``rows[r]`` with ``heat[r][i]`` (H', W') laid over
    each (nearest-neighbour upsampling; the colour is the concept's share, 0 to 1)."""
    from matplotlib.figure import Figure

    from jaxnmf.heatmaps import overlay

    n_cols = max(1, max(len(r) for r in rows))
    fig = Figure(figsize=(1.2 + 1.3 * n_cols, 0.6 + 1.3 * len(rows)), layout="constrained")
    axes = np.array(fig.subplots(len(rows), n_cols, squeeze=False))
    for r, (indices, label) in enumerate(zip(rows, row_labels)):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(indices):
                ax.imshow(overlay(_big(images[indices[c]]), heat[r][c], method="nearest"), interpolation="nearest")
                ax.set_xlabel(f"image {indices[c]}", fontsize=7)
            else:
                ax.set_axis_off()
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def _heatmap_section(result, blocks_shapes: Mapping[str, tuple], images: np.ndarray):
    """The report's section: for each spatial layer, each concept's top images with its heatmap."""
    from experiments.report import Section
    from jaxnmf.heatmaps import concept_heatmaps

    F = np.asarray(result.F, np.float64)
    d = F.shape[0]
    figures, data = {}, {}
    for i, (layer, shape) in enumerate(blocks_shapes.items()):
        top = [list(np.argsort(-F[k], kind="stable")[:_HEATMAP_IMAGES]) for k in range(d)]
        O = np.asarray(result.factors[layer])
        heat = [concept_heatmaps(O, F, shape, images=top[k], concepts=[k])[:, 0] for k in range(d)]
        figures[f"heatmaps_{i}"] = heatmap_figure(
            images, heat, top, [f"concept {k}" for k in range(d)],
            f"{layer} ({shape[0]}x{shape[1]} positions): share of each position carried by the concept")
        data[layer] = {"positions": list(shape[:2]), "top_images": {f"factor {k}": top[k] for k in range(d)}}
    if not figures:
        return None
    text = """
<p class="how">For a spatial layer (rows: positions x channels) the heatmap of concept k in image n is the
share of the layer's reconstruction at each position that concept k carries,
<code>&Sigma;<sub>c</sub> O[(h,w,c), k] F[k, n] / &Sigma;<sub>c</sub> &Sigma;<sub>k'</sub> O[(h,w,c), k'] F[k', n]</code>
(<code>jaxnmf.concept_heatmaps</code>), from 0 (dark) to 1 (bright, yellow): where in the image the concept
sits. Each row shows a concept's top images; positions are upsampled to pixels by nearest neighbour, so each
position is a block of pixels. Layers: """ + html.escape(", ".join(blocks_shapes)) + ".</p>"
    return Section(title="Concept heatmaps", html=text, figures=figures, data=data)


# ----------------------------------------------------------------------------- explain
@dataclasses.dataclass(frozen=True)
class _ImageSet:
    """What ``experiments.report.write_report`` reads of a dataset."""

    images: np.ndarray
    labels: np.ndarray | None
    class_names: list[str]
    superlabels: None = None
    superclass_names: None = None
    attributes: Mapping = dataclasses.field(default_factory=dict)
    attribute_names: Mapping = dataclasses.field(default_factory=dict)


def _digest(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def explain(model_or_fn, variables, images, *, layers: Sequence[str], out, labels=None,
            class_names: Sequence[str] | None = None, rank: int = DEFAULTS["rank"],
            iterations: int = DEFAULTS["iterations"], tol: float = DEFAULTS["tol"],
            restarts: int = DEFAULTS["restarts"], variant: str = DEFAULTS["variant"],
            solver: str = DEFAULTS["solver"], pixels: bool = DEFAULTS["pixels"], seed: int = DEFAULTS["seed"],
            apply_kwargs: Mapping | None = None, metadata: Mapping | None = None, notes: Sequence[str] = (),
            options: Mapping | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Fit the coupled NMF to a network's activations on ``images`` and write the report.

    Args:
        model_or_fn: a Flax Linen module (``apply(variables, images, **apply_kwargs)`` returns
            logits) or a JAX function ``images -> {layer: activation}``.
        variables: the module's variables (unused for a function; may be None).
        images: (N, H, W, C) floats in [0, 1] or uint8.
        layers: layer specs, ``"name"`` or ``"name:avg"`` (averaged over positions); names are
            module paths (``models.layer_paths``), the project models' ``models.LAYERS``, or the
            function's keys.
        out: the run folder (``run.json`` marks it; a folder of another run is refused unless
            ``overwrite``).
        labels: (N,) class of each image (ints into ``class_names``, or strings), or None: then
            the network's predicted classes when it gives logits, else no classes.
        class_names: names of the classes (default the labels' values, or ``metadata
            ["class_names"]`` for predicted classes).
        rank, iterations, tol, restarts, variant, solver, pixels, seed: the fit, with the
            quickstart's defaults (``experiments.quickstart.DEFAULTS``).
        apply_kwargs: keyword arguments of ``apply`` (default ``models.inference_kwargs``).
        metadata: the saved model's metadata (``dataset``, ``test_accuracy``, ``class_names``),
            shown in the report and saved with the model.
        notes: remarks shown at the top of the report.
        options: what ``run.json`` records (default the arguments and a digest of the images).

    Returns:
        The path of ``report.html``.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jaxnmf
    import models
    from experiments import run_folder
    from experiments._atomic import write_bytes_atomic, write_text_atomic
    from experiments.cli import VARIANTS, RunConfig
    from experiments.matrices import _parse_layers, build_blocks
    from experiments.report import write_report

    t0 = time.perf_counter()
    images = as_unit_images(images)
    n = images.shape[0]
    is_module = isinstance(model_or_fn, nn.Module)
    if not is_module and not callable(model_or_fn):
        raise TypeError(f"model_or_fn: expected a Flax Linen module or a function images -> {{layer: activation}}, "
                        f"got {type(model_or_fn).__name__}")
    specs = _parse_layers(layers)
    base = _spec_layers(specs)
    for name, value, low in (("rank", rank, 1), ("iterations", iterations, 1), ("restarts", restarts, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    if rank > n:
        raise ValueError(f"rank: {rank} factors for {n} images; give at most {n}")
    if n < 2:
        raise ValueError("images: at least 2 images are needed")
    if labels is not None and np.size(labels) != n:
        raise ValueError(f"labels: {np.size(labels)} labels for {n} images")
    if variant not in VARIANTS:
        raise ValueError(f"variant: choose one of {VARIANTS}, got {variant!r}")
    if solver not in ("mu", "hals"):
        raise ValueError(f"solver: choose 'mu' or 'hals', got {solver!r}")
    _images_fit(model_or_fn, variables, images.shape, apply_kwargs)
    capture = models.activation_function(model_or_fn, variables, base, input_shape=images.shape,
                                         apply_kwargs=apply_kwargs)
    models.check_non_negative(capture, images[:512], base)  # build_blocks checks every image
    metadata = dict(metadata or {})

    label_source = "given"
    if labels is not None:
        labels = np.asarray(labels).reshape(-1) if np.ndim(labels) else np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels: {labels.size} labels for {n} images")
        if not np.issubdtype(labels.dtype, np.integer):  # class names as labels
            values = [str(v) for v in labels]
            names = sorted(set(values)) if class_names is None else [str(c) for c in class_names]
            unknown = sorted(set(values) - set(names))
            if unknown:
                raise ValueError(f"labels: {unknown[:3]} are not among class_names {names}")
            labels, class_names = np.array([names.index(v) for v in values]), names
        class_names = list(class_names) if class_names is not None else [str(c) for c in range(int(labels.max()) + 1)]
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise ValueError(f"labels: values must lie in [0, {len(class_names)}) (one per class name), got "
                             f"[{labels.min()}, {labels.max()}]")
    elif is_module:
        labels = predicted_classes(model_or_fn, variables, images, apply_kwargs)
        known = list(class_names or metadata.get("class_names") or [])
        class_names = [f"predicted {c}" for c in (known if len(known) > labels.max() else range(labels.max() + 1))]
        label_source = "predicted"
    else:
        label_source = "none"

    out = Path(out).resolve()
    if options is None:
        options = dict(images=f"{n} images {images.shape[1:]} sha1 {_digest(images)}", labels=_digest(labels),
                       model=type(model_or_fn).__name__ if is_module else getattr(model_or_fn, "__name__", "function"),
                       variables=_digest(*(np.asarray(x) for x in jax.tree.leaves(variables))) if is_module else None)
    options = {**options, "layers": list(specs), "rank": rank, "iterations": iterations, "tol": tol,
               "restarts": restarts, "variant": variant, "solver": solver, "pixels": pixels, "seed": seed}
    run_folder.start(out, options, network_options=("model", "variables"), overwrite=overwrite)

    blocks = build_blocks(images, capture, list(specs), out_dir=out / "blocks", progress=progress)
    if not pixels:
        blocks = {k: v for k, v in blocks.items() if not k.startswith("pixels")}
    pixel_blocks = [b for b in blocks if b.startswith("pixels")]
    layer_blocks = [b for b in blocks if b not in pixel_blocks]
    shapes = jax.eval_shape(capture, jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
    spatial = {spec: tuple(shapes[layer].shape[1:]) for spec, (layer, average) in specs.items()
               if not average and len(shapes[layer].shape) == 4}

    solver_options = RunConfig(variant=variant).solver_options()
    if progress:
        print(f"fitting rank {rank} to {len(blocks)} blocks ({sum(b.shape[0] for b in blocks.values())} rows x "
              f"{n} images), variant {variant}")
    result = jaxnmf.fit({k: jax.device_put(v) for k, v in blocks.items()}, rank, key=jax.random.key(seed),
                        max_iter=iterations, tol=tol, init="random" if restarts > 1 else "nndsvda",
                        n_restarts=restarts, progress=progress, solver=solver, **solver_options)
    if result.collapsed:
        raise ValueError("the fit has no active factor (F = 0): the blocks carry no signal to factorise; no report "
                         "written")
    jaxnmf.save_fit(result, out / "fit.npz")
    notes = list(notes)
    if is_module:
        saved_meta = {"dataset": metadata.get("dataset"), "test_accuracy": metadata.get("test_accuracy"),
                      **metadata, "input_shape": list(images.shape[1:])}
        if label_source == "given":
            saved_meta.setdefault("class_names", list(class_names))
        try:
            models.save_model(out / "model", *models.model_spec(model_or_fn), variables, saved_meta)
        except (ValueError, TypeError) as error:  # a class that cannot be imported back, fields that are not JSON
            notes.append(f"The network was not saved to model/ ({error}); explain_new then needs it as model_or_fn.")
    buffer = io.BytesIO()
    np.save(buffer, (images * 255).round().astype(np.uint8))
    write_bytes_atomic(out / "probe_images.npy", buffer.getvalue())
    description = {"layers": list(specs), "pixels": pixels, "input_shape": list(images.shape[1:]),
                   "labels": label_source, "class_names": class_names, "spatial_layers": {k: list(v) for k, v in spatial.items()},
                   "apply_kwargs": None if apply_kwargs is None else dict(apply_kwargs), "model": is_module}
    write_text_atomic(out / "explain.json", json.dumps(description, indent=1))

    if label_source == "predicted":
        notes.append("No labels were given: the classes in this report are the network's predicted classes (argmax "
                     "of its logits on each image), not ground truth.")
    elif label_source == "none":
        notes.append("No labels were given and the network is a function without logits, so no class is known for "
                     "the images.")
    sections = [s for s in [_heatmap_section(result, {b: spatial[b] for b in layer_blocks if b in spatial}, images)]
                if s is not None]
    if not spatial:
        notes.append("No spatial layer was analysed (only vectors or ':avg' layers), so the report has no concept "
                     "heatmaps.")
    config = {"model": type(model_or_fn).__name__ if is_module else getattr(model_or_fn, "__name__", "a function"),
              "trained_on": metadata.get("dataset"), "model_test_accuracy": metadata.get("test_accuracy"),
              "layers": list(specs), "rank": rank, "iterations": iterations, "tol": tol, "restarts": restarts,
              "variant": variant, "solver": solver, "pixels": pixels, "seed": seed, "labels": label_source,
              **solver_options}
    report = write_report(out, config=config, dataset=_ImageSet(images, labels, list(class_names or [])),
                          probe_indices=np.arange(n), result=result, pixel_blocks=pixel_blocks,
                          layer_blocks=layer_blocks, top_eig_k=min(3, rank), n_neighbours=min(30, n - 1),
                          extra_sections=sections, notes=notes)
    write_text_atomic(out / "timing.json", json.dumps({"seconds": time.perf_counter() - t0}))
    run_folder.finish(out, options)
    if progress:
        print(f"done in {time.perf_counter() - t0:.0f} s")
    return report


# ----------------------------------------------------------------------------- new images against a run
def _run_description(run: Path) -> dict:
    """The layers, pixels, input shape, class names and example groups of a run folder (this
    module's ``explain.json``, or a pipeline run's ``run.json``)."""
    from experiments import run_folder

    if (run / "explain.json").is_file():
        try:
            return json.loads((run / "explain.json").read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"run: {run}/explain.json is unreadable ({error})") from None
    marker = run_folder.read_marker(run)
    if marker is None:
        raise ValueError(f"run: {run} is not a run folder (no explain.json or readable run.json)")
    from experiments.cli import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in marker["options"].items() if k in fields}
    cfg = RunConfig(**options)
    meta = {}
    try:
        meta = json.loads((run / "model" / "model.json").read_text())["metadata"]
    except (OSError, ValueError, KeyError):
        pass
    return {"layers": list(cfg.resolved_layers()), "pixels": cfg.pixels, "input_shape": meta.get("input_shape"),
            "labels": "given", "class_names": meta.get("class_names"), "apply_kwargs": None, "model": True,
            "example_groups": cfg.example_groups, "pipeline": True}


def _pipeline_probe_images(run: Path, probe_indices: np.ndarray) -> np.ndarray | None:
    """The probe images of a pipeline run, loaded again from its options (None when that fails,
    e.g. CIFAR not on this machine: the report then lists the neighbours by index)."""
    from experiments import run_folder
    from experiments.cli import RunConfig

    try:
        from experiments.pipeline import load_data

        fields = {f.name for f in dataclasses.fields(RunConfig)}
        options = {k: tuple(v) if isinstance(v, list) else v
                   for k, v in run_folder.read_marker(run)["options"].items() if k in fields}
        probe = load_data(RunConfig(**options))[2]
        return np.asarray(probe.images)[probe_indices]
    except Exception as error:  # any failure only costs the thumbnails
        print(f"probe images of {run} not shown ({type(error).__name__}: {error})")
        return None


def explain_new(run, images, *, out=None, names: Sequence[str] | None = None, model_or_fn=None, variables=None,
                n_neighbours: int = _NEW_NEIGHBOURS, progress: bool = True) -> Path:
    """Concept scores, nearest probe images and heatmaps of new images against a saved run.

    Args:
        run: a run folder written by `explain` or by the pipeline (``fit.npz``, ``factors.npz``,
            ``model/``).
        images: (M, H, W, C) floats in [0, 1] or uint8, of the run's input shape.
        out: where the small report goes (default ``run/new``).
        names: one name per image (default its index).
        model_or_fn, variables: the network, when it is not ``run/model`` (a function, say); it
            must give the blocks the run was fitted to.
        n_neighbours: probe images shown per new image.

    Returns:
        The path of ``out/report.html``. ``out`` also holds ``concept_scores.csv`` (one row per
        image: F of each concept, the share of each, the dominant concept), ``summary.json`` and
        the heatmaps as PNG.
    """
    import jax
    import jax.numpy as jnp

    import jaxnmf
    import models
    from experiments._atomic import savefig_atomic, write_text_atomic
    from experiments.matrices import _parse_layers, build_blocks
    from jaxnmf.heatmaps import concept_heatmaps

    run = Path(run).resolve()
    if not (run / "fit.npz").is_file():
        raise ValueError(f"run: {run} has no fit.npz (a folder written by experiments.explain or the pipeline)")
    description = _run_description(run)
    fit = jaxnmf.load_fit(run / "fit.npz")
    meta = {}
    if model_or_fn is None:
        if not (run / "model" / "model.json").is_file():
            raise ValueError(f"run: {run} has no saved model (model/); pass the network as model_or_fn")
        model_or_fn, variables, meta = models.load_model(run / "model")
    images = as_unit_images(images)
    shape = description.get("input_shape")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"images: the new images are {tuple(images.shape[1:])}, the run's network takes "
                         f"{tuple(shape)}")
    m = images.shape[0]
    names = [str(i) for i in range(m)] if names is None else list(names)
    specs = _parse_layers(description["layers"])
    _images_fit(model_or_fn, variables, images.shape, description.get("apply_kwargs"))
    capture = models.activation_function(model_or_fn, variables, _spec_layers(specs), input_shape=images.shape,
                                         apply_kwargs=description.get("apply_kwargs"))
    models.check_non_negative(capture, images[:512], _spec_layers(specs))
    blocks = build_blocks(images, capture, list(specs), progress=False)
    if not description["pixels"]:
        blocks = {k: v for k, v in blocks.items() if not k.startswith("pixels")}
    fitted = {k: int(np.shape(w)[0]) for k, w in fit.factors.items()}
    given = {k: int(v.shape[0]) for k, v in blocks.items()}
    if fitted != given:
        raise ValueError(f"run: {run}/fit.npz was fitted to blocks {fitted} (name: rows), but this network gives "
                         f"{given} for these images: the run folder belongs to another model (or to images of another size)")
    groups = None
    if fit.settings.get("example_groups") is not None and fit.settings.get("group_F", 0):
        groups = predicted_classes(model_or_fn, variables, images, description.get("apply_kwargs"))
    F_new = np.asarray(jaxnmf.transform(fit, {k: jnp.asarray(v) for k, v in blocks.items()}, example_groups=groups),
                       np.float64)
    with np.load(run / "factors.npz") as saved:
        F_probe = np.asarray(saved["F"], np.float64)
        probe_indices = np.asarray(saved["probe_indices"])
    probe_images = None
    if (run / "probe_images.npy").is_file():
        probe_images = np.load(run / "probe_images.npy").astype(np.float32) / 255.0
    elif description.get("pipeline"):  # a pipeline run: draw its probe split again for the thumbnails
        probe_images = _pipeline_probe_images(run, probe_indices)
    distances = np.linalg.norm(F_new.T[:, None, :] - F_probe.T[None, :, :], axis=-1)  # (M, N)
    k_near = min(n_neighbours, F_probe.shape[1])
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k_near]
    share = F_new / np.where(F_new.sum(0, keepdims=True) > 0, F_new.sum(0, keepdims=True), 1.0)
    dominant = np.argmax(F_new, axis=0)
    d = F_new.shape[0]

    out = run / "new" if out is None else Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [["image", "dominant_concept", *[f"F_{k}" for k in range(d)], *[f"share_{k}" for k in range(d)]]]
    rows += [[names[i], int(dominant[i]), *[f"{F_new[k, i]:.6g}" for k in range(d)],
              *[f"{share[k, i]:.4f}" for k in range(d)]] for i in range(m)]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    write_text_atomic(out / "concept_scores.csv", text.getvalue())

    spatial = {b: tuple(v) for b, v in (description.get("spatial_layers") or {}).items() if b in fit.factors}
    if not spatial and description.get("pipeline"):
        shapes = jax.eval_shape(capture, jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
        spatial = {spec: tuple(shapes[layer].shape[1:]) for spec, (layer, average) in specs.items()
                   if not average and len(shapes[layer].shape) == 4}
    top_concepts = [list(np.argsort(-F_new[:, i], kind="stable")[:3]) for i in range(m)]
    figures = []
    for j, (layer, layer_shape) in enumerate(spatial.items()):
        O = np.asarray(fit.factors[layer])
        heat = concept_heatmaps(O, F_new, layer_shape)  # (M, d, H', W')
        shown = list(range(min(m, 24)))
        n_cols = len(top_concepts[0])
        fig = heatmap_figure(np.repeat(images[shown][:, None], n_cols, axis=1).reshape(-1, *images.shape[1:]),
                             [heat[i, top_concepts[i]] for i in shown],
                             [list(range(n_cols * r, n_cols * (r + 1))) for r in range(len(shown))],
                             [f"{names[i]}" for i in shown],
                             f"{layer}: each image's strongest concepts, strongest first")
        for r, i in enumerate(shown):  # label the columns by concept instead of by image
            for c, k in enumerate(top_concepts[i]):
                fig.axes[r * n_cols + c].set_xlabel(f"concept {k} ({share[k, i]:.2f})", fontsize=7)
        savefig_atomic(fig, out / f"heatmaps_{j}.png", dpi=100)
        figures.append((layer, _uri(fig)))

    table = []
    class_names = description.get("class_names")
    for i in range(m):
        near = nearest[i]
        thumbs = ("".join(f'<img class="thumbs" src="{_uri(_big(probe_images[j], 48))}" alt="probe image {j}">'
                          for j in near) if probe_images is not None else ", ".join(map(str, near)))
        concepts = ", ".join(f"{k} ({share[k, i]:.2f})" for k in top_concepts[i])
        table.append(f"<tr><td>{html.escape(names[i])}</td><td><img class='thumbs' src='{_uri(_big(images[i], 48))}' "
                     f"alt='{html.escape(names[i])}'></td><td>{html.escape(concepts)}</td><td>{thumbs}</td></tr>")
    summary = {"run": str(run), "n_images": m, "rank": d, "names": names, "F": F_new.tolist(),
               "dominant_concept": dominant.tolist(), "nearest_probe_columns": nearest.tolist(),
               "nearest_probe_indices": probe_indices[nearest].tolist(),
               "nearest_distances": np.take_along_axis(distances, nearest, axis=1).tolist(),
               "layers": list(specs), "heatmap_layers": list(spatial), "class_names": class_names,
               "model_metadata": {k: meta.get(k) for k in ("dataset", "test_accuracy")}}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>New images explained by {html.escape(run.name)}</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 1180px; margin: 0 auto; padding: 1em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.3em; vertical-align: middle; }}
img {{ image-rendering: pixelated; }} img.figure {{ max-width: 100%; }} .how {{ color: #444; }}</style></head>
<body><h1>{m} new images explained by the run {html.escape(str(run))}</h1>
<p class="how">Each new image's concept scores are its column of F found by <code>jaxnmf.transform</code> with the
run's block factors held fixed (so concept k means what it means in the run's report,
<code>{html.escape(str(run / 'report.html'))}</code>). "Share" is F[k, n] / &Sigma;<sub>k'</sub> F[k', n]. The
nearest probe images are the run's probe images closest in concept space (Euclidean distance between columns of
F), nearest first. Every score is in <code>concept_scores.csv</code>, the neighbours in <code>summary.json</code>.</p>
<h2>Concept scores and nearest probe images</h2>
<table><thead><tr><th>image</th><th></th><th>strongest concepts (share)</th>
<th>{k_near} nearest probe images</th></tr></thead><tbody>{"".join(table)}</tbody></table>
<h2>Heatmaps</h2>
{"".join(f'<img class="figure" src="{uri}" alt="heatmaps of {html.escape(layer)}">' for layer, uri in figures)
 or "<p>No spatial layer in this run, so no heatmaps.</p>"}
</body></html>
"""
    path = out / "report.html"
    write_text_atomic(path, page)
    if progress:
        print(f"{m} new images: concept scores in {out / 'concept_scores.csv'}")
    return path


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, metavar="PATH",
                        help="a folder of PNG/JPEG files (DIR/*.png, or DIR/<class>/*.png for labels), or a .npy/.npz "
                             "array (N, H, W, C) in [0, 1] or uint8")
    parser.add_argument("--model", metavar="DIR", help="the network: a folder written by models.save_model (with --run: "
                                                       "default the run's model/)")
    parser.add_argument("--run", metavar="DIR", help="explain new images against this run folder's fit (fit.npz, "
                                                     "factors.npz, model/)")
    parser.add_argument("--labels", metavar="CSV", help="filename,label rows, one per image (default: the folder "
                                                        "structure, else the network's predicted classes)")
    parser.add_argument("--layers", nargs="+", metavar="LAYER",
                        help="layers to analyse, module paths as Flax reports them ('NAME:avg' averages over "
                             "positions; default for the project's resnet18/vgg11: the authors' layers)")
    parser.add_argument("--out", metavar="DIR", help="the run folder (default runs/explain; with --run: RUN/new)")
    parser.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"),
                        help="size image files are resized to (default: the saved model's input_shape, else the "
                             "files' own size)")
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"], help="number of concepts d (default 12)")
    parser.add_argument("--iterations", type=int, default=DEFAULTS["iterations"], help="most iterations (default 300)")
    parser.add_argument("--tol", type=float, default=DEFAULTS["tol"], help="relative tolerance (default 1e-5)")
    parser.add_argument("--restarts", type=int, default=DEFAULTS["restarts"], help="random restarts (default 1: NNDSVD)")
    parser.add_argument("--variant", default=DEFAULTS["variant"], help="project (default), paper or authors")
    parser.add_argument("--solver", default=DEFAULTS["solver"], help="mu (default) or hals")
    parser.add_argument("--pixels", action=argparse.BooleanOptionalAction, default=True,
                        help="include the pixel blocks (default on)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the fit (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace another run in --out")
    return parser


_FLAGS = {"images": "--images", "labels": "--labels", "layers": "--layers", "run": "--run", "model": "--model",
          "model_or_fn": "--model", "rank": "--rank", "iterations": "--iterations", "restarts": "--restarts",
          "variant": "--variant", "solver": "--solver", "activation_fn": "--layers"}


def _as_flag(message: str) -> str:
    """"layers: ..." -> "--layers: ...", so that a refused input names the command-line option."""
    head, sep, rest = message.partition(":")
    return f"{_FLAGS[head]}:{rest}" if sep and head in _FLAGS else message


def _model_folder(path: str) -> tuple[Any, dict, dict, str]:
    import models

    folder = Path(path)
    if not (folder / "model.json").is_file():
        raise ValueError(f"model: no saved model at {folder} (expected model.json written by models.save_model)")
    try:
        model, variables, meta = models.load_model(folder)
    except ValueError as error:
        raise ValueError(f"model: {error}") from None
    return model, variables, meta, json.loads((folder / "model.json").read_text())["model_name"]


def main(argv=None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except ValueError as error:
        parser.error(_as_flag(str(error)))


def _main(args) -> Path:
    import models

    if args.run is not None:
        run = Path(args.run)
        if not (run / "fit.npz").is_file():
            raise ValueError(f"run: {run} has no fit.npz (a folder written by experiments.explain or the pipeline)")
        for option in ("labels", "layers", "image_size"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option.replace('_', '-')}: not used with --run (the run fixes the layers and "
                                 f"the input size)")
        model_or_fn = variables = None
        if args.model is not None:
            model_or_fn, variables, _, _ = _model_folder(args.model)
            if (run / "model" / "model.json").is_file():
                theirs = json.loads((run / "model" / "model.json").read_text())
                ours = json.loads((Path(args.model) / "model.json").read_text())
                if (theirs["model_name"], theirs["model_kwargs"]) != (ours["model_name"], ours["model_kwargs"]):
                    raise ValueError(f"model: {args.model} holds {ours['model_name']} {ours['model_kwargs']}, but the "
                                     f"run {run} was fitted to {theirs['model_name']} {theirs['model_kwargs']}: drop "
                                     f"--model to use the run's network")
        description = _run_description(run.resolve())
        shape = description.get("input_shape")
        loaded = load_images(args.images, size=None if shape is None else shape[:2],
                             channels=None if shape is None else shape[2])
        report = explain_new(run, loaded.images, out=args.out, names=loaded.names, model_or_fn=model_or_fn,
                             variables=variables)
        print(f"report: {report}")
        return report

    if args.model is None:
        raise ValueError("model: give the network (--model DIR, a folder written by models.save_model), or --run")
    model, variables, meta, model_name = _model_folder(args.model)
    shape = meta.get("input_shape")
    size = tuple(args.image_size) if args.image_size else (tuple(shape[:2]) if shape else None)
    channels = shape[2] if shape else _input_channels(variables)
    loaded = load_images(args.images, size=size, channels=channels)
    layers = args.layers
    if not layers:
        if model_name in models.DEFAULT_LAYERS:
            layers = models.DEFAULT_LAYERS[model_name]
        else:
            valid = models.layer_paths(model, variables, (1, *loaded.images.shape[1:]))
            raise ValueError(f"layers: give the layers to analyse (--layers); {type(model).__name__}'s module paths "
                             f"are {tuple(valid)}")
    labels, class_names = loaded.labels, loaded.class_names
    if args.labels is not None:
        labels, class_names = read_labels_csv(args.labels, loaded.names)
    notes = []
    if loaded.resized:
        notes.append(f"{loaded.resized} of {len(loaded.names)} image files were resized to "
                     f"{loaded.images.shape[1]}x{loaded.images.shape[2]} (PIL, bilinear) to fit the network.")
    options = {"images": str(Path(args.images).resolve()), "images_sha1": _digest(loaded.images),
               "labels": args.labels, "model": str(Path(args.model).resolve()), "variables": _digest(
                   *(np.asarray(x) for x in __import__("jax").tree.leaves(variables)))}
    report = explain(model, variables, loaded.images, layers=layers, out=args.out or "runs/explain", labels=labels,
                     class_names=class_names, rank=args.rank, iterations=args.iterations, tol=args.tol,
                     restarts=args.restarts, variant=args.variant, solver=args.solver, pixels=args.pixels,
                     seed=args.seed, metadata=meta, notes=notes, options=options, overwrite=args.overwrite)
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
