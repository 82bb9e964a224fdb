"""Where each landmark should be, given the others: a statistical shape model of the training set.

Training shapes are aligned by similarity (translation, rotation, uniform scale; Procrustes)
and modelled as one Gaussian over all coordinates. For a detected shape, every landmark in
turn is left out: the others are aligned to the mean shape, the left-out point is predicted
as the Gaussian's conditional mean given them, and the prediction is mapped back to the
image. A point far from where the others place it is implausible (a global miss, a jump to a
neighbouring structure). Positions are physical mm (LPS), rows in model channel order,
columns x, y[, z].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ShapeModel", "similarity_transform"]

MIN_SHAPES = 5
MIN_OTHERS = 3
# Shrinks the covariance toward its diagonal: with few shapes it is singular.
SHRINKAGE = 0.1


def similarity_transform(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale, rotation and translation mapping ``source`` onto ``target`` in least squares.

    Args:
        source, target: ``(K, D)`` corresponding points.

    Returns:
        ``(scale, rotation, translation)`` with ``target ~= scale * source @ rotation.T + translation``;
        ``rotation`` is a proper rotation (no reflection).
    """
    source_mean, target_mean = source.mean(0), target.mean(0)
    a, b = source - source_mean, target - target_mean
    u, singular, vt = np.linalg.svd(b.T @ a)
    sign = np.ones(len(singular))
    sign[-1] = np.sign(np.linalg.det(u @ vt)) or 1.0
    rotation = (u * sign) @ vt
    variance = float((a**2).sum())
    scale = float((singular * sign).sum() / variance) if variance > 0 else 1.0
    return scale, rotation, target_mean - scale * source_mean @ rotation.T


@dataclass
class ShapeModel:
    """A Gaussian over similarity-aligned shapes.

    Attributes:
        mean: ``(N, D)`` mean aligned shape (centred, in the units of the first training shape).
        covariance: ``(N*D, N*D)`` covariance of the aligned shapes, rows in (landmark, axis) order.
        spread_mm: ``(N,)`` root-mean-square distance, on the training shapes, between each point
            and where the others place it (leave-one-landmark-out): the scale of a normal deviation.
    """

    mean: np.ndarray
    covariance: np.ndarray
    spread_mm: np.ndarray

    @property
    def num_landmarks(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dimension(self) -> int:
        return int(self.mean.shape[1])

    @classmethod
    def fit(cls, shapes: Sequence[np.ndarray] | np.ndarray, *, iterations: int = 10) -> ShapeModel:
        """Fit to ``(M, N, D)`` training shapes in mm; missing points are NaN rows.

        Raises:
            ValueError: fewer than five shapes, or a landmark placed in fewer than five of them.
        """
        stack = np.asarray(shapes, dtype=float)
        if stack.ndim != 3 or stack.shape[0] < MIN_SHAPES:
            msg = f"A shape model needs at least {MIN_SHAPES} shapes of (N, D) points, got {stack.shape}"
            raise ValueError(msg)
        present = np.isfinite(stack).all(axis=2)
        if (present.sum(0) < MIN_SHAPES).any():
            msg = f"A shape model needs every landmark in at least {MIN_SHAPES} shapes"
            raise ValueError(msg)
        mean = np.nanmean(stack, axis=0)
        mean = mean - mean.mean(0)
        aligned = stack.copy()
        for _ in range(iterations):
            for m in range(len(stack)):
                rows = present[m]
                scale, rotation, shift = similarity_transform(stack[m, rows], mean[rows])
                aligned[m] = scale * stack[m] @ rotation.T + shift
            new_mean = np.nanmean(aligned, axis=0)
            new_mean -= new_mean.mean(0)
            # Keep the first shape's size so that the model's units stay millimetres.
            new_mean *= np.sqrt((mean**2).sum() / (new_mean**2).sum())
            converged = np.abs(new_mean - mean).max() < 1e-6
            mean = new_mean
            if converged:
                break
        flat = aligned.reshape(len(stack), -1)
        centred = np.where(np.isfinite(flat), flat - mean.reshape(-1), 0.0)
        counts = np.isfinite(flat).astype(float)
        covariance = (centred.T @ centred) / np.maximum(counts.T @ counts - 1.0, 1.0)
        covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.diag(np.diag(covariance))
        model = cls(mean=mean, covariance=covariance, spread_mm=np.ones(mean.shape[0]))
        distances = np.stack([model.deviations(shape) for shape in stack])
        model.spread_mm = np.sqrt(np.nanmean(distances**2, axis=0))
        return model

    def predictions(self, positions: np.ndarray) -> np.ndarray:
        """Each landmark's position predicted from the others, ``(N, D)`` mm; NaN where unknown."""
        positions = self._checked(positions)
        return np.stack([self._predict(positions, landmark) for landmark in range(self.num_landmarks)])

    def prediction(self, positions: np.ndarray, landmark: int) -> np.ndarray:
        """``landmark``'s position predicted from the other points of ``(N, D)`` ``positions``, ``(D,)`` mm; NaN where unknown."""
        return self._predict(self._checked(positions), landmark)

    def _checked(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=float)
        if positions.shape != self.mean.shape:
            count, dim = self.mean.shape
            msg = f"The shape model has {count} landmarks in {dim}D; got positions of shape {positions.shape}"
            raise ValueError(msg)
        return positions

    def _predict(self, positions: np.ndarray, landmark: int) -> np.ndarray:
        count, dim = self.mean.shape
        others = np.isfinite(positions).all(axis=1)
        others[landmark] = False
        if others.sum() < MIN_OTHERS:
            return np.full(dim, np.nan)
        scale, rotation, shift = similarity_transform(positions[others], self.mean[others])
        aligned = scale * positions[others] @ rotation.T + shift
        known = np.repeat(others, dim)
        wanted = np.repeat(np.arange(count) == landmark, dim)
        gain = np.linalg.solve(self.covariance[np.ix_(known, known)], self.covariance[np.ix_(known, wanted)]).T
        estimate = self.mean[landmark] + gain @ (aligned - self.mean[others]).reshape(-1)
        return ((estimate - shift) @ rotation) / scale

    def size_ratio(self, positions: np.ndarray) -> float:
        """How many times larger ``(N, D)`` positions (mm) are than the mean shape.

        The scale of the similarity transform that maps the mean shape onto the landmarks present
        in ``positions`` (NaN rows are left out; NaN with fewer than :data:`MIN_OTHERS` of them),
        fitted again without the quarter of the points that fit worst, so that a few points far off
        (misses) move it little. A detection on an image whose pixel size is wrong (a JPEG read at
        1 mm per pixel) is off by that factor.
        """
        positions = self._checked(positions)
        present = np.flatnonzero(np.isfinite(positions).all(axis=1))
        if len(present) < MIN_OTHERS:
            return float("nan")
        scale, rotation, shift = similarity_transform(self.mean[present], positions[present])
        residuals = np.linalg.norm(scale * self.mean[present] @ rotation.T + shift - positions[present], axis=1)
        kept = present[np.argsort(residuals)[: max(MIN_OTHERS, int(np.ceil(0.75 * len(present))))]]
        scale, _, _ = similarity_transform(self.mean[kept], positions[kept])
        return float(scale)

    def deviations(self, positions: np.ndarray) -> np.ndarray:
        """``(N,)`` mm between each landmark and where the others place it; NaN where unknown."""
        return np.linalg.norm(np.asarray(positions, dtype=float) - self.predictions(positions), axis=1)

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean.tolist(), "covariance": self.covariance.tolist(), "spread_mm": self.spread_mm.tolist()}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> ShapeModel:
        mean = np.asarray(values["mean"], dtype=float)
        covariance = np.asarray(values["covariance"], dtype=float)
        spread = np.asarray(values["spread_mm"], dtype=float)
        if mean.ndim != 2 or covariance.shape != (mean.size, mean.size) or spread.shape != (mean.shape[0],):
            msg = "The shape model's arrays do not fit together"
            raise ValueError(msg)
        return cls(mean=mean, covariance=covariance, spread_mm=spread)
