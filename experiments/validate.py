"""The pipeline's TCAV step: held-out images, concept sets through ``jaxnmf.transform``, controls.

The factorisation is fitted on the probe images. TCAV uses ``n_images`` other images of the probe
split (or, when the probe split has too few left, of the training split), cut in two halves:
the *CAV images*, among which each factor's concept set is its top images by the transformed F
and from which every random set is drawn, and the *score images*, on which the scores and the
CAVs' accuracy are computed. No image that was fitted, that chose a concept or trained a CAV is
scored. Positive controls are sets of one class (for ``shapes`` the class is the shape), for up
to ten classes; negative controls are uniform random sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import jaxnmf
from experiments import data as data_lib
from experiments import tcav as T
from experiments.matrices import build_blocks
from experiments.report import Section
from experiments.tcav_report import tcav_section
from experiments.tcav_stats import undetermined_rows

__all__ = ["HeldOut", "held_out_images", "tcav_step"]


@dataclass(frozen=True)
class HeldOut:
    """The TCAV images: ``cav`` and ``score`` halves, their labels (None: use the network's
    predictions) and where they came from, in words."""

    cav: np.ndarray
    score: np.ndarray
    cav_labels: np.ndarray | None
    score_labels: np.ndarray | None
    source: str


def held_out_images(probe: data_lib.Dataset, fitted: np.ndarray, train: data_lib.Dataset, n_images: int,
                    labelled: bool, seed: int) -> HeldOut:
    """``n_images`` images not in ``fitted`` (indices into ``probe``), split in two halves;
    from ``train`` when ``probe`` has too few left. ``labelled``: the probe's labels are the
    network's classes (else TCAV uses its predictions)."""
    rng = np.random.default_rng(seed + 7919)
    rest = np.setdiff1d(np.arange(len(probe)), fitted)
    if len(rest) >= n_images:
        source, pick = probe, rng.permutation(rest)[:n_images]
        where = f"{n_images} images of the {probe.name} {probe.split} split not used in the fit"
    elif len(train) >= n_images and labelled:
        source, pick = train, rng.permutation(len(train))[:n_images]
        where = f"{n_images} images of the {train.name} {train.split} split (the probe split had only {len(rest)} left)"
    else:
        raise ValueError(f"--tcav-images: TCAV needs {n_images} images outside the fitted probe images, the probe "
                         f"split has {len(rest)} left; lower --n-probe or --tcav-images")
    half = n_images // 2
    labels = source.labels[pick] if labelled else None
    return HeldOut(cav=source.images[pick[:half]], score=source.images[pick[half:]],
                   cav_labels=None if labels is None else labels[:half],
                   score_labels=None if labels is None else labels[half:], source=where)


def _transformed(result, images, capture, layers, pixels: bool, groups_of) -> np.ndarray:
    blocks = build_blocks(images, capture, layers, progress=False)
    if not pixels:
        blocks = {k: v for k, v in blocks.items() if not k.startswith("pixels")}
    groups = None if groups_of is None else groups_of(images)
    return np.asarray(jaxnmf.transform(result, blocks, example_groups=groups))


def tcav_step(model, variables, result, capture, layers, pixels: bool, held: HeldOut, tcav_layers,
              class_names, n_concept: int = 50, seed: int = 0, groups_of=None) -> Section:
    """TCAV of the fitted factors with controls; the report section (`tcav_report.tcav_section`).

    ``groups_of``: images -> (n,) example groups, when the fit had them (the pipeline's
    ``--example-groups predicted``: the network's predicted class), for ``jaxnmf.transform``.
    """
    n_concept = min(n_concept, len(held.cav) // 3)
    F_cav = _transformed(result, held.cav, capture, layers, pixels, groups_of)
    F_score = _transformed(result, held.score, capture, layers, pixels, groups_of)
    skipped = sorted(set(undetermined_rows(F_cav, n_concept)) | set(undetermined_rows(F_score, n_concept)))
    tested = [k for k in range(F_cav.shape[0]) if k not in skipped]
    if not tested:
        raise ValueError("TCAV: every factor is zero or constant on the held-out images; nothing to test")
    notes = [f"Held-out images: {held.source}; {len(held.cav)} CAV images, {len(held.score)} score images."]
    if skipped:
        notes.append(f"Not tested (zero or constant on the held-out images): factors {skipped}.")
    positive = {}
    if held.cav_labels is not None:
        for c in range(min(len(class_names), 10)):
            members = np.flatnonzero(held.cav_labels == c)
            if len(members) >= n_concept:
                positive[f"class {class_names[c]}"] = (np.random.default_rng(seed + c).permutation(members)[:n_concept],
                                                       c)
    scores = T.tcav_factors(model, variables, tcav_layers, F_cav[tested], cav_images=held.cav,
                            score_images=held.score, F_score=F_score[tested], n_concept=n_concept,
                            cav_labels=held.cav_labels, score_labels=held.score_labels,
                            names=[f"factor {k}" for k in tested], positive_controls=positive, seed=seed)
    return tcav_section(scores, class_names, notes=notes)
