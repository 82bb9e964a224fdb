"""Teach a trained model how far off its points are: the shape model and the error model.

Run after training: the shape model comes from the training cases' landmarks, the error model
from detections on validation cases the model did not train on (see :mod:`SCNLandmarksLib.models.quality`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..models.quality import ErrorModel
from ..models.shape_model import MIN_SHAPES, ShapeModel

if TYPE_CHECKING:
    from ..models.model import LandmarkModel
    from ..data.training_case import TrainingCase

__all__ = ["DEFAULT_FLAG_FRACTION", "QUALITY_SIGNALS", "fit_point_quality"]

log = logging.getLogger(__name__)

# The signals the error model uses when the detector has them. Chosen on the validation images,
# each held out of the fit in turn (scripts/experiments/extra_signals.py, the bundled model): how far
# the local stage's distribution spreads (its width), the global confidence and the shape deviation
# give an AUROC of 0.853 for points > 2 mm off; with the local peak instead of the width 0.820, with
# both 0.845; adding the local networks' disagreement, the local stage's shift from the global
# estimate or the global heatmap's runner-up peak to the peak's set 0.814-0.822. On 135 training
# images detected out of fold (scripts/experiments/oof_error_model.py) the sets are alike: 0.822
# with these three, 0.825 with the local peak added (the bundled model's set), 0.821 with the peak
# instead of the width; a model fitted on a few validation cases keeps the smaller set.
QUALITY_SIGNALS = ("local_width_mm", "global_confidence", "shape_deviation")
DEFAULT_FLAG_FRACTION = 0.15
# Fewer validation cases than this give an error model and threshold worth a warning.
FEW_VALIDATION_CASES = 3


def fit_point_quality(
    model: LandmarkModel,
    training_cases: Sequence[TrainingCase],
    validation_cases: Sequence[TrainingCase] | None,
    *,
    device: str = "auto",
    flag_fraction: float = DEFAULT_FLAG_FRACTION,
    description: str = "",
) -> str:
    """Give ``model`` a shape model and an error model where the cases allow; one line on what was done.

    Args:
        model: a trained model (changed in place: ``shape_model`` and ``error_model``).
        training_cases: their landmarks make the shape model (at least five cases).
        validation_cases: detected to fit the error model (none: the model flags low confidence instead).
        device: where detection runs.
        flag_fraction: the default check threshold flags this share of the validation points.
        description: a few words on the validation data, kept in the model file.
    """
    from ..inference.detection import Detector
    from ..inference.evaluation import point_errors

    names = list(model.landmark_names)
    shapes = [case.landmarks.reordered(names).positions for case in training_cases
              if case.landmarks.dimension == model.dimension and any(n in case.landmarks.names for n in names)]
    model.error_model = None
    try:
        model.shape_model = ShapeModel.fit(np.stack(shapes)) if len(shapes) >= MIN_SHAPES else None
    except ValueError as error:
        model.shape_model = None
        log.info("No shape model: %s", error)
    if not validation_cases:
        return "Expected errors: none (no validation cases); points of low confidence will be flagged instead."
    detector = Detector(model, device=device)
    signals: dict[str, list[np.ndarray]] = {}
    errors = []
    for case in validation_cases:
        found = detector.detect(case.image.as_dimension(model.dimension))
        for name, values in detector.last_signals.items():
            signals.setdefault(name, []).append(values)
        errors.append(point_errors(found, case.landmarks.reordered(names)))
    use = [name for name in QUALITY_SIGNALS if name in signals]
    try:
        model.error_model = ErrorModel.fit(
            {name: np.stack(signals[name]) for name in use}, np.stack(errors), use=use, flag_fraction=flag_fraction,
            fitted_on=description or f"{len(validation_cases)} validation cases",
        )
    except ValueError as error:
        return f"Expected errors: none ({error}); points of low confidence will be flagged instead."
    held_out = ", ".join(case.name for case in validation_cases[:5]) + (", ..." if len(validation_cases) > 5 else "")
    cases = f"{len(validation_cases)} validation case{'s' if len(validation_cases) != 1 else ''}"
    few = (f" With only {cases} the expected errors and this threshold are rough: hold out more cases "
           "(--validation-ids) where you can." if len(validation_cases) < FEW_VALIDATION_CASES else "")
    return (f"Expected errors learned on {cases} ({held_out}); points expected more "
            f"than {model.error_model.check_above_mm:.2f} mm off will be flagged for checking.{few}")
