"""Replace an implausible point by another candidate of its global heatmap that the shape model prefers.

The global stage sometimes puts a landmark on a structure that looks like it (the other side of
a contour, a neighbouring tooth) while its heatmap also has a peak in the right place. Where a
point lies more than ``DEVIATION_LIMIT`` spreads from where the shape model places it from the
other points, the other local maxima of its global heatmap (each at least ``CANDIDATE_RATIO`` of
the highest, refined by the local stage) are tried, and the one the shape model finds most
plausible replaces the point if it is more plausible than the point itself; up to
``MAX_REPLACEMENTS`` times per image, the most implausible point first.

Chosen on 135 ISBI 2015 training images, each decoded by a fold model that never saw it
(``scripts/experiments/decode_variants.py --out-of-fold``): MRE 1.143 -> 1.120 mm, points more
than 4 mm off 96 -> 91, 13 of 2 565 points changed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..models.shape_model import ShapeModel

__all__ = ["CANDIDATE_RATIO", "DEVIATION_LIMIT", "MAX_REPLACEMENTS", "heatmap_candidates", "replace_implausible_points"]

DEVIATION_LIMIT = 2.0  # in units of the landmark's spread on the training shapes
CANDIDATE_RATIO = 0.2  # a candidate's heatmap value / the heatmap's highest
MAX_REPLACEMENTS = 3
OTHER_CANDIDATES = 3
PEAK_WINDOW = 9  # grid voxels: a local maximum is the highest value of this window around it


def heatmap_candidates(heatmap: np.ndarray, *, ratio: float = CANDIDATE_RATIO,
                       count: int = OTHER_CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """The local maxima of one heatmap other than its highest, highest first.

    Args:
        heatmap: ``([z,] y, x)`` one landmark's global heatmap.
        ratio: only maxima at least this share of the highest value.
        count: at most this many.

    Returns:
        ``(K, D)`` grid indices in x, y[, z] order and their ``(K,)`` values.
    """
    from scipy import ndimage

    heatmap = np.asarray(heatmap, dtype=float)
    top = float(heatmap.max())
    if not top > 0:
        return np.zeros((0, heatmap.ndim)), np.zeros(0)
    peaks = (heatmap == ndimage.maximum_filter(heatmap, size=PEAK_WINDOW)) & (heatmap >= ratio * top)
    index = np.stack(np.nonzero(peaks), axis=1)  # numpy order: [z,] y, x
    values = heatmap[tuple(index.T)]
    order = np.argsort(-values, kind="stable")[1: count + 1]  # the highest is the detector's own point
    return index[order, ::-1].astype(float), values[order]


def replace_implausible_points(
    positions: np.ndarray,
    shape_model: ShapeModel,
    propose: Callable[[int], np.ndarray],
    *,
    limit: float = DEVIATION_LIMIT,
    max_replacements: int = MAX_REPLACEMENTS,
) -> tuple[np.ndarray, dict[int, int]]:
    """Points after the most implausible ones were replaced by more plausible candidates.

    Args:
        positions: ``(N, D)`` LPS mm, model channel order (NaN rows: landmarks not found).
        shape_model: places each point from the others.
        propose: ``channel -> (K, D)`` candidate positions in LPS mm for that landmark (NaN rows
            are skipped); called for the most implausible point of each round (the same landmark
            may come up again: cache there if proposing is costly).
        limit: a point is implausible beyond this many spreads from where the others place it.
        max_replacements: at most this many points change.

    Returns:
        The new ``(N, D)`` positions and, for each replaced landmark, the index of the candidate
        that replaced it.
    """
    positions = np.array(positions, dtype=float, copy=True)
    chosen: dict[int, int] = {}
    for _ in range(max_replacements):
        deviation = shape_model.deviations(positions) / shape_model.spread_mm
        if not np.isfinite(deviation).any():
            break
        worst = int(np.nanargmax(deviation))
        if deviation[worst] <= limit:
            break
        best, choice = float(deviation[worst]), None
        candidates = np.asarray(propose(worst), dtype=float)
        for k, candidate in enumerate(candidates):
            if not np.isfinite(candidate).all():
                continue
            trial = positions.copy()
            trial[worst] = candidate
            plausibility = float(np.linalg.norm(candidate - shape_model.prediction(trial, worst)) / shape_model.spread_mm[worst])
            if plausibility < best:
                best, choice = plausibility, k
        if choice is None:
            break
        positions[worst] = candidates[choice]
        chosen[worst] = choice
    return positions, chosen
