"""Heatmap maxima with sub-pixel refinement."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["heatmap_maxima"]


def heatmap_maxima(heatmaps: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position and value of the maximum of every channel.

    The integer argmax is refined per axis with a parabola through it and its two
    neighbours. Where all three values are positive the parabola is fitted to their
    logarithms, which is exact for the Gaussian peaks the network is trained to produce
    (a parabola on the values themselves is biased by up to a tenth of a pixel); otherwise
    the values are used. Refinement is skipped at the border or where the neighbourhood
    is not concave.

    Args:
        heatmaps: ``(N, [z,] y, x)`` one heatmap per landmark.

    Returns:
        ``(positions, values)``: ``(N, D)`` grid index in x, y[, z] order, and ``(N,)`` maxima.
    """
    array = heatmaps.detach().float().cpu().numpy() if isinstance(heatmaps, torch.Tensor) else np.asarray(heatmaps, float)
    count = array.shape[0]
    shape = array.shape[1:]
    dim = len(shape)
    positions = np.zeros((count, dim))
    values = np.zeros(count)
    for channel in range(count):
        heatmap = array[channel]
        peak = np.unravel_index(int(np.argmax(heatmap)), shape)
        values[channel] = heatmap[peak]
        refined = np.asarray(peak, dtype=float)
        for axis in range(dim):
            if peak[axis] == 0 or peak[axis] == shape[axis] - 1:
                continue
            before, after = list(peak), list(peak)
            before[axis] -= 1
            after[axis] += 1
            a, b, c = heatmap[tuple(before)], heatmap[peak], heatmap[tuple(after)]
            if min(a, b, c) > 0:
                a, b, c = np.log(a), np.log(b), np.log(c)
            curvature = a - 2 * b + c
            if curvature < 0:
                refined[axis] += float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5))
        positions[channel] = refined[::-1]
    return positions, values
