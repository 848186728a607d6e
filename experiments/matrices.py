"""The data blocks of the coupled factorisation, built for a probe set of N images.

Blocks, in this order (method.md, "Data matrices"), all float32, column n = probe image n:

- Pixel blocks, one per input channel: ``(H*W, N)``, row ``h*W + w``, values in [0, 1]. Named
  ``"pixels_r"``, ``"pixels_g"``, ``"pixels_b"`` for RGB images, ``"pixels"`` for one channel,
  and ``"pixels_0"``, ``"pixels_1"``, ... for any other number of channels.
- Activation blocks, one per layer spec, named by the spec:

  - ``"name"``: the layer's output flattened whole, channel-major as in the authors' PyTorch
    code: ``(C*H*W, N)``, row ``c*H*W + h*W + w`` of an NHWC ``(B, H, W, C)`` activation;
    ``(C, N)`` for a ``(B, C)`` one.
  - ``"name:avg"``: the mean over H and W of an NHWC activation, ``(C, N)``, row ``c``. Small,
    and it keeps what early layers carry (background, colour) without their spatial size.

Blocks are stored in Fortran (column-major) order, so that each batch of probe images fills a
contiguous slab; that changes nothing about indexing. When the blocks together exceed a memory
budget they are written to ``.npy`` files and memory-mapped instead of held in memory.

Example::

    fn = jax.jit(lambda x: models.capture_activations(model, variables, x, ["stage3", "stage1"]))
    blocks = build_blocks(probe.images, fn, ["stage3", "stage1:avg"])
    # {"pixels_r": (1024, N), "pixels_g": ..., "pixels_b": ..., "stage3": (16384, N),
    #  "stage1:avg": (64, N)}
"""
from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

_AVG = ":avg"


def build_blocks(
    images: np.ndarray,
    activation_fn: Callable[[jax.Array], Mapping[str, jax.Array]],
    layers: Sequence[str],
    *,
    batch_size: int = 256,
    memory_budget_bytes: int = 4 * 2**30,
    out_dir: str | pathlib.Path | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Builds the pixel and activation blocks of a probe set (see the module docstring).

    The images go through ``activation_fn`` in batches of ``batch_size`` (the last one padded
    to full size, so nothing is traced twice); flattening and averaging run under ``jit`` on the
    device. Before building, the blocks' shapes are taken from ``jax.eval_shape`` and their
    memory is printed.

    Args:
      images: ``(N, H, W, C)`` probe images, values in [0, 1].
      activation_fn: ``(B, H, W, C) float32 -> {layer: (B, h, w, c) or (B, c)}``, non-negative
        (post-ReLU) activations of at least the layers named in ``layers``; typically a jitted
        ``models.capture_activations``.
      layers: layer specs, ``"name"`` or ``"name:avg"``; the activation blocks follow this order.
      batch_size: images per call of ``activation_fn``.
      memory_budget_bytes: the most the blocks may take in memory; above it they are written to
        ``out_dir``.
      out_dir: where ``<block name>.npy`` files go (``:`` becomes ``-``) when the blocks exceed
        the budget; unused otherwise.
      progress: show the memory estimate and a progress bar.

    Returns:
      ``{block name: (rows, N) float32}``, pixel blocks first, then the layer specs in order;
      ``np.memmap`` arrays when written to ``out_dir``.

    Raises:
      ValueError: a bad argument or layer spec, a layer ``activation_fn`` does not return, a
        negative activation, or blocks over the budget without ``out_dir``.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, H, W, C), got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images: expected floating-point values in [0, 1], got {images.dtype}")
    if images.size and not 0.0 <= images.min() <= images.max() <= 1.0:
        raise ValueError(
            f"images: values must lie in [0, 1], got [{images.min()}, {images.max()}]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, (int, np.integer, float)):
        raise ValueError(f"memory_budget_bytes: expected a number of bytes, got {memory_budget_bytes!r}")
    if not callable(activation_fn):
        raise TypeError(f"activation_fn: expected a function of a (B, H, W, C) batch returning "
                        f"{{layer: activations}}, got {activation_fn!r}")
    n, height, width, channels = images.shape
    if n == 0:
        raise ValueError("images: the probe set is empty")
    specs = _parse_layers(layers)
    batch = min(batch_size, n)

    batch_shape = jax.ShapeDtypeStruct((batch, height, width, channels), jnp.float32)
    layer_shapes = jax.eval_shape(activation_fn, batch_shape)
    if not isinstance(layer_shapes, Mapping):
        raise TypeError(f"activation_fn: expected it to return a mapping {{layer: activations}}, got "
                        f"{type(layer_shapes).__name__}")
    for spec, (layer, average) in specs.items():
        if layer not in layer_shapes:
            raise ValueError(
                f"layers: {spec!r} names a layer activation_fn does not return; it returns "
                f"{sorted(layer_shapes)}")
        shape = layer_shapes[layer].shape
        if len(shape) not in (2, 4) or shape[0] != batch:
            raise ValueError(
                f"layers: layer {layer!r} has shape {shape}; expected (B, H, W, C) or (B, C) "
                f"with B = {batch}")
        if average and len(shape) != 4:
            raise ValueError(
                f"layers: {spec!r} averages over H and W, but {layer!r} has shape {shape}")

    rows = dict.fromkeys(_pixel_names(channels), height * width)
    for spec, (layer, average) in specs.items():
        shape = layer_shapes[layer].shape
        rows[spec] = shape[-1] if average else int(np.prod(shape[1:]))
    if len(rows) != len(specs) + channels:
        raise ValueError(
            f"layers: a layer spec repeats a pixel block name {_pixel_names(channels)}")

    total = 4 * n * sum(rows.values())
    to_disk = total > memory_budget_bytes
    if to_disk and out_dir is None:
        raise ValueError(
            f"memory_budget_bytes: the blocks need {_size(total)}, over the budget of "
            f"{_size(memory_budget_bytes)}; pass out_dir to write them to disk, or raise the "
            f"budget")
    if progress:
        where = f"memory-mapped in {out_dir}" if to_disk else "in memory"
        print(f"build_blocks: {len(rows)} blocks for {n} images, {_size(total)} {where}")
        for name, count in rows.items():
            print(f"  {name:<24} ({count}, {n})  {_size(4 * n * count)}")
    blocks = _allocate(rows, n, pathlib.Path(out_dir) if to_disk else None)

    @jax.jit
    def flattened(x):
        activations = activation_fn(x)
        out = {}
        for spec, (layer, average) in specs.items():
            a = activations[layer].astype(jnp.float32)
            if average:
                out[spec] = a.mean(axis=(1, 2))
            elif a.ndim == 4:
                out[spec] = a.transpose(0, 3, 1, 2).reshape(a.shape[0], -1)
            else:
                out[spec] = a
        return out

    pixel_names = _pixel_names(channels)
    padded = np.zeros((batch, height, width, channels), dtype=np.float32)
    with tqdm.tqdm(total=n, desc="blocks", unit="img", disable=not progress) as bar:
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            padded[: stop - start] = images[start:stop]
            padded[stop - start:] = 0.0
            pixels = padded[: stop - start].reshape(stop - start, height * width, channels)
            for c, name in enumerate(pixel_names):
                blocks[name][:, start:stop] = pixels[:, :, c].T
            for spec, values in flattened(padded).items():
                values = np.asarray(values)[: stop - start]
                if values.min() < 0.0:
                    raise ValueError(
                        f"activation_fn: layer {spec!r} has negative values (min {values.min()}); "
                        f"NMF blocks must be non-negative, so pass post-ReLU activations")
                blocks[spec][:, start:stop] = values.T
            bar.update(stop - start)

    for block in blocks.values():
        if isinstance(block, np.memmap):
            block.flush()
    return blocks


def _parse_layers(layers: Sequence[str]) -> dict[str, tuple[str, bool]]:
    """``{spec: (layer name, averaged)}`` in the order given."""
    if isinstance(layers, str) or not layers:
        raise ValueError(f"layers: expected a non-empty list of layer specs, got {layers!r}")
    specs = {}
    for spec in layers:
        if not isinstance(spec, str):
            raise ValueError(f"layers: expected strings, got {spec!r}")
        layer, average = (spec[: -len(_AVG)], True) if spec.endswith(_AVG) else (spec, False)
        if not layer or ":" in layer:
            raise ValueError(f"layers: bad spec {spec!r}; expected 'name' or 'name:avg'")
        if spec in specs:
            raise ValueError(f"layers: {spec!r} is given twice")
        specs[spec] = (layer, average)
    return specs


def _pixel_names(channels: int) -> tuple[str, ...]:
    if channels == 3:
        return ("pixels_r", "pixels_g", "pixels_b")
    if channels == 1:
        return ("pixels",)
    return tuple(f"pixels_{c}" for c in range(channels))


def _allocate(rows: Mapping[str, int], n: int,
              out_dir: pathlib.Path | None) -> dict[str, np.ndarray]:
    """Empty ``(rows, n)`` float32 Fortran-order blocks, in memory or as ``.npy`` memmaps."""
    if out_dir is None:
        return {name: np.empty((count, n), dtype=np.float32, order="F")
                for name, count in rows.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '-', name)}.npy" for name in rows}
    if len(set(files.values())) != len(files):
        raise ValueError(f"layers: block names {list(rows)} collide as file names in {out_dir}")
    return {name: np.lib.format.open_memmap(files[name], mode="w+", dtype=np.float32,
                                            shape=(count, n), fortran_order=True)
            for name, count in rows.items()}


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


def emphasised_weights(blocks: Mapping[str, object], emphasis: Mapping[str, float]) -> dict[str, float]:
    """Block weights w_b = m_b / ||X_b||_F^2 for ``jaxnmf.fit(block_weights=...)``: the Frobenius
    weights (every block the same total weight) with block b's multiplied by m_b.

    ``emphasis`` maps a block name, or ``"pixels"`` for every pixel block, to m_b > 0; other blocks
    keep m_b = 1, and names of blocks not in ``blocks`` are ignored (a fit of some of the blocks).
    ``blocks``: name -> (rows, N) NumPy or JAX array, any float dtype; norms in float64 (NumPy, by
    row chunks) or float32 (JAX). A block of norm 0 gets weight 0.
    """
    weights = {}
    for name, x in blocks.items():
        m = emphasis.get(name, emphasis.get("pixels", 1.0) if name.startswith("pixels") else 1.0)
        if isinstance(x, jax.Array):
            sq = float(jnp.sum(jnp.square(x.astype(jnp.float32))))
        else:
            x = np.asarray(x)
            step = max(1, (64 << 20) // (8 * x.shape[1]))
            sq = sum(float(np.sum(np.square(x[i:i + step].astype(np.float64)))) for i in range(0, x.shape[0], step))
        weights[name] = float(m) / sq if sq > 0 else 0.0
    return weights
