"""Per-image concept heatmaps: where in an image each concept of a spatial layer sits.

A spatial layer's activation block ``A`` (rows = positions x channels of an (H, W, C) map,
columns = images) is approximated by ``O F`` with ``O`` (H*W*C, d) its factor and ``F`` (d, N)
the shared example factor. At position (h, w) of image n the reconstruction is, summed over the
channels, ``R[h, w, n] = sum_c sum_k O[(h,w,c), k] F[k, n]``; the heatmap of concept k is the
share of it that concept k carries:

    heat[n, k, h, w] = sum_c O[(h,w,c), k] F[k, n]  /  sum_c sum_k' O[(h,w,c), k'] F[k', n]

(0 where the denominator is 0). Shares lie in [0, 1] and sum to 1 over the concepts at every
position where the reconstruction is not 0, so heatmaps of different concepts and images compare
directly, with no per-image rescaling.

Row order: ``experiments.matrices.build_blocks`` flattens an NHWC activation channel-major, row
``c*H*W + h*W + w`` (``order="chw"``, the default); ``order="hwc"`` reads rows
``(h*W + w)*C + c``.

`upsample` takes a heatmap to the image's size (nearest: each position a block of pixels, or
bilinear), `overlay` lays it over the image.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["concept_heatmap", "concept_heatmaps", "overlay", "upsample"]

_ORDERS = ("chw", "hwc")


def _positions_by_concept(O, spatial_shape: Sequence[int], order: str) -> np.ndarray:
    """(H*W, d): sum over channels of O at each position."""
    O = np.asarray(O, dtype=np.float64)
    if O.ndim != 2:
        raise ValueError(f"O must be (H*W*C, d), got shape {O.shape}")
    if len(spatial_shape) != 3 or any(int(s) < 1 for s in spatial_shape):
        raise ValueError(f"spatial_shape must be (H, W, C) of the layer, got {tuple(spatial_shape)}")
    height, width, channels = (int(s) for s in spatial_shape)
    if O.shape[0] != height * width * channels:
        raise ValueError(f"O has {O.shape[0]} rows, but a layer of shape (H, W, C) = {(height, width, channels)} "
                         f"has {height * width * channels}")
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    if np.any(O < 0):
        raise ValueError("O must be non-negative (a factor of the coupled NMF)")
    d = O.shape[1]
    if order == "chw":
        return O.reshape(channels, height * width, d).sum(axis=0)
    return O.reshape(height * width, channels, d).sum(axis=1)


def concept_heatmaps(O, F, spatial_shape: Sequence[int], *, images=None, concepts=None,
                     order: str = "chw") -> np.ndarray:
    """Heatmaps of several concepts in several images (see the module docstring's equation).

    Args:
        O: (H*W*C, d) non-negative factor of a spatial layer's block.
        F: (d, N) non-negative example factor (the fit's, or ``jaxnmf.transform``'s for new images).
        spatial_shape: (H, W, C) of the layer.
        images: column indices of F (default all N).
        concepts: factor indices (default all d).
        order: the block's row order, "chw" (``build_blocks``: row c*H*W + h*W + w) or "hwc"
            (row (h*W + w)*C + c).

    Returns:
        (len(images), len(concepts), H, W) float64 in [0, 1]: ``heat[i, j, h, w]`` is the share of
        image ``images[i]``'s reconstruction at (h, w) that concept ``concepts[j]`` carries, 0 where
        the reconstruction is 0.
    """
    S = _positions_by_concept(O, spatial_shape, order)  # (P, d)
    F = np.asarray(F, dtype=np.float64)
    d = S.shape[1]
    if F.ndim != 2 or F.shape[0] != d:
        raise ValueError(f"F must be (d, N) with d = {d} (O's columns), got shape {F.shape}")
    if np.any(F < 0):
        raise ValueError("F must be non-negative")
    images = np.arange(F.shape[1]) if images is None else np.atleast_1d(np.asarray(images))
    concepts = np.arange(d) if concepts is None else np.atleast_1d(np.asarray(concepts))
    for name, index, size in (("images", images, F.shape[1]), ("concepts", concepts, d)):
        if not np.issubdtype(index.dtype, np.integer) or index.ndim != 1 or np.any((index < 0) | (index >= size)):
            raise ValueError(f"{name} must be integers in [0, {size}), got {index.tolist()}")
    height, width = int(spatial_shape[0]), int(spatial_shape[1])
    # contribution of concept k at position p in image n: S[p, k] F[k, n]
    parts = S.T[None, :, :] * F[:, images].T[:, :, None]  # (n, d, P)
    total = parts.sum(axis=1, keepdims=True)  # (n, 1, P)
    share = np.divide(parts[:, concepts, :], total, out=np.zeros((len(images), len(concepts), S.shape[0])),
                      where=total > 0)
    return share.reshape(len(images), len(concepts), height, width)


def concept_heatmap(O, F, spatial_shape: Sequence[int], image: int, concept: int, *, order: str = "chw") -> np.ndarray:
    """(H, W) share of image ``image``'s reconstruction that concept ``concept`` carries at each
    position: ``sum_c O[(h,w,c), k] F[k, n] / sum_c sum_k' O[(h,w,c), k'] F[k', n]`` (0 where the
    denominator is 0). Arguments as in `concept_heatmaps`."""
    return concept_heatmaps(O, F, spatial_shape, images=[image], concepts=[concept], order=order)[0, 0]


def upsample(heatmap, size: Sequence[int], method: str = "nearest") -> np.ndarray:
    """(H, W) heatmap -> (H_img, W_img) = ``size``.

    ``"nearest"``: pixel (i, j) takes position (floor(i H / H_img), floor(j W / W_img)), so an
    integer ratio makes each position a block of pixels with the position's exact value;
    ``"bilinear"``: linear in each axis between position centres (half-pixel centres, edges
    clamped, as PIL and ``jax.image.resize`` do); values stay within the heatmap's range.
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {heatmap.shape}")
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be (H_img, W_img), got {tuple(size)}")
    out_h, out_w = int(size[0]), int(size[1])
    height, width = heatmap.shape
    if method == "nearest":
        rows = np.arange(out_h) * height // out_h
        cols = np.arange(out_w) * width // out_w
        return heatmap[rows[:, None], cols[None, :]]
    if method != "bilinear":
        raise ValueError(f"method must be 'nearest' or 'bilinear', got {method!r}")

    def axis(n_out, n_in):
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
        low = np.floor(x).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, x - low

    r0, r1, fr = axis(out_h, height)
    c0, c1, fc = axis(out_w, width)
    top = heatmap[r0][:, c0] * (1 - fc)[None, :] + heatmap[r0][:, c1] * fc[None, :]
    bottom = heatmap[r1][:, c0] * (1 - fc)[None, :] + heatmap[r1][:, c1] * fc[None, :]
    return top * (1 - fr)[:, None] + bottom * fr[:, None]


def overlay(image, heatmap, *, alpha: float = 0.6, method: str = "nearest", cmap: str = "inferno") -> np.ndarray:
    """The image with a heatmap laid over it: (H_img, W_img, 3) RGB in [0, 1].

    ``image`` is (H_img, W_img, C) in [0, 1] with C in {1, 3}; ``heatmap`` (H, W) with values in
    [0, 1] (a share, not rescaled), upsampled with `upsample` (``method``). Each pixel is
    ``(1 - alpha) * image + alpha * cmap(heat)``.
    """
    import matplotlib  # the colour map only

    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H, W, C) with C in (1, 3), got shape {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    heat = np.clip(upsample(heatmap, image.shape[:2], method), 0.0, 1.0)
    colours = matplotlib.colormaps[cmap](heat)[..., :3]
    return (1 - alpha) * rgb + alpha * colours
