"""jaxnmf: coupled non-negative matrix factorisation in JAX, for reading what a CNN has learned.

Saini & Papalexakis, "Analyzing Representations inside Convolutional Neural Networks", SDM 2021:
pixel blocks D_i (pixels x N) and activation blocks A_j (neurons x N) of N probe images are
factorised jointly as X_b ~ W_b F with one shared example factor F (d x N).

    >>> import jax, numpy as np, jaxnmf
    >>> X = {"pixels": np.random.rand(64, 100), "layer": np.random.rand(32, 100)}
    >>> res = jaxnmf.fit(X, rank=5, key=jax.random.key(0), max_iter=50)
    >>> res.F.shape, res.factors["layer"].shape
    ((5, 100), (32, 5))
"""
from ._fit import NMFResult, aligned_empty, fit, objective, transform
from ._settings import FitSettings
from ._stream import fit_streamed
from ._path import PathPoint, group_sparsity_path
from ._saved import load_fit, save_fit
from ._mu import MUState, Params, make_params, mu_step
from ._hals import hals_step
from . import analysis, heatmaps, reference
from .heatmaps import concept_heatmap, concept_heatmaps
from .heatmaps import overlay as overlay_heatmap, upsample as upsample_heatmap
from .stability import FactorStability, factor_stability, match_factors
from .rank import RankCurve, choose_rank, rank_curve
from .analysis import (attribute_auc, class_weights, factor_table, latent_images, masked_top_images,
                       mean_top_eigenvalues, median_masks, nearest_neighbours, neighbour_factor_distribution,
                       neuron_similarity, similarity_eigenvalues)

__all__ = [
    "fit", "fit_streamed", "transform", "objective", "NMFResult", "FitSettings", "save_fit", "load_fit", "aligned_empty", "group_sparsity_path", "PathPoint", "mu_step", "hals_step", "MUState", "Params",
    "make_params",
    "analysis", "heatmaps", "reference",
    "concept_heatmap", "concept_heatmaps", "upsample_heatmap", "overlay_heatmap",
    "class_weights", "factor_table", "neuron_similarity", "similarity_eigenvalues", "mean_top_eigenvalues",
    "latent_images", "median_masks", "masked_top_images", "nearest_neighbours", "neighbour_factor_distribution",
    "attribute_auc",
    "match_factors", "factor_stability", "FactorStability",
    "rank_curve", "choose_rank", "RankCurve",
]
