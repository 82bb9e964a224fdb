"""How far off is each detected point? An expected error in mm, and which points to check.

The detector already knows a lot about its own doubt: how sharply the local stage peaks and how
far its distribution spreads, how sure the global SCN was, how much the local result moves when
the crop moves, and whether the point sits where the other points place it (:mod:`.shape_model`). :class:`ErrorModel` turns
these signals into an expected error in millimetres with a log-linear model,

    log(error + 0.1 mm) = intercept + landmark offset + sum_k weight_k * log(signal_k)
                          [+ sum_k squared_weight_k * log(signal_k)^2],

fitted on validation detections (images the model did not train on) by ridge regression, the
landmark offsets shrunk toward zero. The squared terms (optional) let a signal's effect bend, for
example a width that stops mattering once it is small. The expected error is the mean of that
log-normal model.
A point is to be checked where its expected error exceeds a threshold in mm (the model's
default is chosen on the same validation images; the CLI, the API and Slicer can change it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data.landmarks import Landmarks

__all__ = ["LOW_CONFIDENCE", "SIGNALS", "ErrorModel", "rank_for_review", "review_order"]

# Points below this confidence are to be checked when the model has no error model (the one
# default of the CLI, the API, the overlay and Slicer).
LOW_CONFIDENCE = 0.3
ERROR_FLOOR_MM = 0.1
# How each signal enters the model: its logarithm after adding (or clipping at) a floor, so that
# a perfect signal (a zero spread, a peak of 1) stays finite.
SIGNALS = {
    "local_peak": ("clip", 1e-3),  # largest crop probability / the trained target's peak
    "local_width_mm": ("add", 0.05),  # root-mean-square distance of the crop's distribution from its maximum
    "global_confidence": ("clip", 1e-3),  # global heatmap maximum / its target's peak
    "view_spread_mm": ("add", 0.05),  # mean distance of the shifted-crop results from the point
    "member_spread_mm": ("add", 0.05),  # mean distance of the local networks' points from their mean
    "shape_deviation": ("add", 0.05),  # distance from where the other points place it / its usual spread
}
LANDMARK_SHRINKAGE = 5.0


def _features(signals: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    columns = []
    for name in names:
        how, floor = SIGNALS[name]
        values = np.asarray(signals[name], dtype=float)
        columns.append(np.log(np.clip(values, floor, None) if how == "clip" else values + floor))
    return np.stack(columns, axis=-1) if columns else np.zeros((*np.shape(next(iter(signals.values()))), 0))


@dataclass
class ErrorModel:
    """Expected error per point from the detector's own signals.

    Attributes:
        signals: the signal names used, in the order of ``weights`` (keys of :data:`SIGNALS`).
        weights: one per signal.
        intercept: the log-error of a point with all log-signals 0 and no landmark offset.
        landmark_offsets: ``(N,)`` per landmark (model channel order): how much harder it is.
        residual_variance: of the log-error around the model (makes the expectation a mean).
        check_above_mm: default threshold of the check decision, in mm.
        fitted_on: a few words on the validation data.
        squared_weights: one per signal, for the squared log-signals (None: a linear model).
    """

    signals: list[str]
    weights: np.ndarray
    intercept: float
    landmark_offsets: np.ndarray
    residual_variance: float
    check_above_mm: float
    fitted_on: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    squared_weights: np.ndarray | None = None

    @classmethod
    def fit(
        cls,
        signals: Mapping[str, np.ndarray],
        errors_mm: np.ndarray,
        *,
        use: Sequence[str],
        flag_fraction: float = 0.12,
        fitted_on: str = "",
        squared: bool = False,
    ) -> ErrorModel:
        """Fit on ``(M, N)`` arrays: M validation images, N landmarks; NaN errors are skipped.

        Args:
            signals: name -> ``(M, N)`` values (see :data:`SIGNALS`).
            errors_mm: ``(M, N)`` distance of each detected point from the reference.
            use: the signals to use.
            flag_fraction: the default threshold flags about this share of the validation points.
            squared: add each log-signal's square as a term (for fits on a few thousand points;
                chosen for the bundled model by ``scripts/experiments/error_model_terms.py``).
        """
        unknown = [name for name in use if name not in SIGNALS]
        if unknown:
            msg = f"Unknown quality signals {unknown}; known: {sorted(SIGNALS)}"
            raise ValueError(msg)
        errors_mm = np.asarray(errors_mm, dtype=float)
        if errors_mm.ndim != 2:
            msg = f"Errors must be an (images, landmarks) array, got shape {errors_mm.shape}"
            raise ValueError(msg)
        images, count = errors_mm.shape
        features = _features(signals, use).reshape(images * count, len(use))
        terms = np.concatenate([features, features**2], axis=1) if squared else features
        width = terms.shape[1]
        landmark = np.tile(np.eye(count), (images, 1))
        design = np.concatenate([terms, np.ones((images * count, 1)), landmark], axis=1)
        target = np.log(errors_mm.reshape(-1) + ERROR_FLOOR_MM)
        valid = np.isfinite(target) & np.isfinite(design).all(axis=1)
        if valid.sum() < 2 * design.shape[1] // 3 + 5:
            msg = f"Too few validation points ({int(valid.sum())}) to fit an error model"
            raise ValueError(msg)
        penalty = np.diag([0.0] * (width + 1) + [LANDMARK_SHRINKAGE] * count)
        a, y = design[valid], target[valid]
        solution = np.linalg.solve(a.T @ a + penalty, a.T @ y)
        residual = float(np.var(y - a @ solution))
        # The signals' range on validation: beyond it (an image unlike anything the model saw)
        # the log-linear model would extrapolate to absurd distances; it says "as bad as the
        # worst validation points" instead, which is above the check threshold.
        observed = features[valid]
        model = cls(
            signals=list(use),
            weights=solution[: len(use)],
            squared_weights=solution[len(use) : width] if squared else None,
            intercept=float(solution[width]),
            landmark_offsets=solution[width + 1 :],
            residual_variance=residual,
            check_above_mm=float("inf"),
            fitted_on=fitted_on,
            extra={"feature_min": observed.min(axis=0).tolist(), "feature_max": observed.max(axis=0).tolist()},
        )
        model.set_reference(signals, errors_mm, flag_fraction=flag_fraction)
        return model

    def set_reference(self, signals: Mapping[str, np.ndarray], errors_mm: np.ndarray, *, flag_fraction: float) -> None:
        """Set the default threshold and the validation mean from these ``(M, N)`` points.

        The threshold flags ``flag_fraction`` of the points that have an error (NaN errors are
        skipped); the mean expected error over them is the reference of an image like the
        training ones. :meth:`fit` sets both from the points it is fitted on; an error model
        fitted on other models' detections as well takes them from the model's own validation images.
        """
        expected = self.expected_errors(signals)
        scored = np.isfinite(np.asarray(errors_mm, dtype=float)) & np.isfinite(expected)
        if not scored.any():
            msg = "No validation point with an error and all signals to set the check threshold from"
            raise ValueError(msg)
        self.check_above_mm = float(np.quantile(expected[scored], 1.0 - flag_fraction))
        self.extra["validation_mean_mm"] = float(np.mean(expected[scored]))

    @property
    def validation_mean_mm(self) -> float | None:
        """Mean expected error on the validation images (how an image like the training ones looks)."""
        value = self.extra.get("validation_mean_mm")
        return None if value is None else float(value)  # type: ignore[arg-type]

    def expected_errors(self, signals: Mapping[str, np.ndarray]) -> np.ndarray:
        """Expected error in mm for each point: ``(..., N)`` signals give ``(..., N)``; NaN where a signal is."""
        missing = [name for name in self.signals if name not in signals]
        if missing:
            msg = f"The error model needs the signals {missing}"
            raise ValueError(msg)
        features = _features(signals, self.signals)
        if "feature_min" in self.extra and "feature_max" in self.extra:
            features = np.clip(features, np.asarray(self.extra["feature_min"]), np.asarray(self.extra["feature_max"]))
        log_error = features @ self.weights + self.intercept + self.landmark_offsets
        if self.squared_weights is not None:
            log_error = log_error + features**2 @ self.squared_weights
        return np.exp(log_error + 0.5 * self.residual_variance) - ERROR_FLOOR_MM

    def to_dict(self) -> dict[str, object]:
        return {
            "signals": list(self.signals), "weights": self.weights.tolist(), "intercept": self.intercept,
            "landmark_offsets": self.landmark_offsets.tolist(), "residual_variance": self.residual_variance,
            "check_above_mm": self.check_above_mm, "fitted_on": self.fitted_on, "extra": dict(self.extra),
            **({} if self.squared_weights is None else {"squared_weights": self.squared_weights.tolist()}),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> ErrorModel:
        signals = [str(s) for s in values["signals"]]  # type: ignore[union-attr]
        unknown = [s for s in signals if s not in SIGNALS]
        weights = np.asarray(values["weights"], dtype=float)
        squared = values.get("squared_weights")
        squared_weights = None if squared is None else np.asarray(squared, dtype=float)
        if unknown or weights.shape != (len(signals),) or (squared_weights is not None and squared_weights.shape != weights.shape):
            squares = "" if squared_weights is None else f" and {squared_weights.size} squared weights"
            msg = f"Invalid error model (signals {signals}, {weights.size} weights{squares})"
            raise ValueError(msg)
        return cls(
            signals=signals, weights=weights, intercept=float(values["intercept"]),  # type: ignore[arg-type]
            landmark_offsets=np.asarray(values["landmark_offsets"], dtype=float),
            residual_variance=float(values["residual_variance"]),  # type: ignore[arg-type]
            check_above_mm=float(values["check_above_mm"]),  # type: ignore[arg-type]
            fitted_on=str(values.get("fitted_on", "")), extra=dict(values.get("extra", {})),  # type: ignore[arg-type]
            squared_weights=squared_weights,
        )


def review_order(results: Sequence[tuple[str, Landmarks]]) -> list[tuple[str, float, int]]:
    """Images ranked for a person's review: ``(image, mean expected error in mm, points to check)``.

    The image whose points are expected furthest off comes first (the most to correct, and
    the most for a fine-tuning to learn from); see :func:`rank_for_review`.
    """
    rows = []
    for image, landmarks in results:
        values = landmarks.expected_errors if landmarks.expected_errors is not None else np.array([np.nan])
        finite = values[np.isfinite(values)]
        checks = int(landmarks.check.sum()) if landmarks.check is not None else 0
        rows.append((image, float(finite.mean()) if finite.size else float("nan"), checks))
    return rank_for_review(rows)


def rank_for_review(rows: Iterable[tuple[str, float, int]]) -> list[tuple[str, float, int]]:
    """Sort ``(image, mean expected error in mm or NaN, points to check)`` rows for review.

    Highest expected error first; images without expected errors come last, those with more
    points to check first; ties by image name.
    """
    return sorted(rows, key=lambda row: (0 if np.isfinite(row[1]) else 1, -row[1] if np.isfinite(row[1]) else 0.0,
                                         -row[2], row[0]))
