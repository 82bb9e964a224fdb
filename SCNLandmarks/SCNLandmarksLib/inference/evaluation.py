"""Accuracy of detected landmarks against reference landmarks, as the literature reports it.

Definitions used throughout (distances in mm, Euclidean in LPS space):

* **point error**: distance between the predicted and the reference position of one landmark.
* **MRE**: mean radial error, the mean of the point errors; with its (population) standard
  deviation and the median.
* **SDR at r mm**: successful detection rate, the share of reference points whose prediction
  lies within r mm (error <= r). A reference point without a prediction counts as a failure.
  (The SCN paper counts errors >= r as outliers, the complement up to points exactly at r.)
* Reference points that are missing are not evaluated; they are counted separately.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..common.atomic import atomic_path, atomic_write_text, check_writable, make_output_folder
from ..data.landmarks import Landmarks, default_names

__all__ = ["evaluate", "format_summary", "named_like_model", "point_errors", "write_evaluation"]

logger = logging.getLogger(__name__)

_OUTPUT_NAMES = ("evaluation.json", "errors_per_landmark.png", "cumulative_error.png")


def point_errors(predicted: Landmarks, truth: Landmarks) -> np.ndarray:
    """Distance in mm from each reference landmark to its prediction, matched by name.

    Returns:
        ``(N,)`` errors in the order of ``truth.names``; NaN where either point is missing or
        the prediction has no landmark of that name.

    Raises:
        ValueError: the two sets differ in dimension (2D against 3D).
    """
    if predicted.dimension != truth.dimension:
        msg = (
            f"Cannot compare {predicted.dimension}D predictions with {truth.dimension}D reference "
            "landmarks"
        )
        raise ValueError(msg)
    lookup = {name: row for row, name in enumerate(predicted.names)}
    matched = np.full(truth.positions.shape, np.nan)
    for row, name in enumerate(truth.names):
        source = lookup.get(name)
        if source is not None:
            matched[row] = predicted.positions[source]
    return np.sqrt(((matched - truth.positions) ** 2).sum(axis=1))


def named_like_model(reference: Landmarks, model_names: Sequence[str]) -> Landmarks:
    """The reference landmarks under the model's names, when the file gave them none.

    A CSV without a header or a ``--names`` file gives the default names ``L1..LN``; when it
    has exactly as many landmarks as the model, its columns are read in the model's order
    (the order the model's own CSVs are written in).

    Raises:
        ValueError: the reference and the model share no landmark name and the columns cannot
            be matched by position: every point would count as "not detected".
    """
    model_names = list(model_names)
    if set(reference.names) & set(model_names):
        return reference
    if reference.names == default_names(len(reference)) and len(reference) == len(model_names):
        return Landmarks(names=model_names, positions=reference.positions.copy(),
                         descriptions=list(reference.descriptions))
    msg = (
        f"The reference landmarks ({', '.join(reference.names[:4])}{', ...' if len(reference) > 4 else ''}; "
        f"{len(reference)} of them) share no name with the model's ({', '.join(model_names[:4])}"
        f"{', ...' if len(model_names) > 4 else ''}; {len(model_names)} of them). Give the landmark "
        "names in the reference's column order with --names, or evaluate with the model made for them."
    )
    raise ValueError(msg)


def _number(value: float) -> float | None:
    """JSON has no NaN: unknown values become null."""
    return float(value) if math.isfinite(value) else None


def _statistics(errors: np.ndarray, missing_predictions: int, radii: Sequence[float]) -> dict[str, Any]:
    """Statistics of the finite errors; SDR counts missing predictions as failures."""
    evaluated = errors[np.isfinite(errors)]
    attempts = evaluated.size + missing_predictions
    if evaluated.size:
        mre, std = float(evaluated.mean()), float(evaluated.std())
        median, worst = float(np.median(evaluated)), float(evaluated.max())
    else:
        mre = std = median = worst = math.nan
    return {
        "mre_mm": _number(mre),
        "std_mm": _number(std),
        "median_mm": _number(median),
        "max_mm": _number(worst),
        "sdr": {
            f"{r:g}": (float((evaluated <= r).sum() / attempts) if attempts else None) for r in radii
        },
        "num_evaluated": int(evaluated.size),
        "num_missing_prediction": int(missing_predictions),
    }


def evaluate(
    cases: Sequence[tuple[str, Landmarks, Landmarks]],
    *,
    radii: Sequence[float] = (2.0, 2.5, 3.0, 4.0),
    outlier_mm: float = 10.0,
) -> dict[str, Any]:
    """Compare predictions with reference landmarks over many cases.

    Args:
        cases: ``(case id, predicted, reference)`` per image; landmarks are matched by name
            and the reference names define what is evaluated.
        radii: SDR radii in mm.
        outlier_mm: errors above this are listed as outliers.

    Returns:
        A JSON-serialisable report (unknown values are ``None``) with keys ``num_cases``,
        ``landmark_names``, ``radii_mm``, ``outlier_mm``, ``definitions``, ``overall``
        (MRE, std, median, max, SDR per radius, counts), ``per_landmark`` (the same per
        name), ``per_case`` (MRE and each landmark's error), ``outliers`` (case, landmark,
        error, largest first), ``missing_predictions`` (case, landmark) and ``missing``
        (counts of missing reference points and missing predictions).

    Raises:
        ValueError: no cases, a repeated case id, or mixed dimensions in a case.
    """
    if not cases:
        msg = "No cases to evaluate"
        raise ValueError(msg)
    radii = [float(r) for r in radii]
    names: list[str] = []
    per_case: dict[str, Any] = {}
    errors_by_name: dict[str, list[float]] = {}
    missing_prediction_by_name: dict[str, int] = {}
    missing_truth_by_name: dict[str, int] = {}
    outliers: list[dict[str, Any]] = []
    missing_predictions: list[dict[str, str]] = []

    for case_id, predicted, truth in cases:
        case_id = str(case_id)
        if case_id in per_case:
            msg = f"The case {case_id!r} appears twice in the evaluation"
            raise ValueError(msg)
        errors = point_errors(predicted, truth)
        case_missing_predictions = 0
        case_errors: dict[str, float | None] = {}
        for row, name in enumerate(truth.names):
            if name not in errors_by_name:
                names.append(name)
                errors_by_name[name] = []
                missing_prediction_by_name[name] = 0
                missing_truth_by_name[name] = 0
            case_errors[name] = _number(errors[row])
            if truth.missing[row]:
                missing_truth_by_name[name] += 1
            elif not math.isfinite(errors[row]):
                # The reference exists but nothing was predicted: a failed detection.
                missing_prediction_by_name[name] += 1
                case_missing_predictions += 1
                missing_predictions.append({"case": case_id, "landmark": name})
            else:
                errors_by_name[name].append(float(errors[row]))
                if errors[row] > outlier_mm:
                    outliers.append({"case": case_id, "landmark": name, "error_mm": float(errors[row])})
        finite = errors[np.isfinite(errors)]
        per_case[case_id] = {
            "mre_mm": _number(float(finite.mean())) if finite.size else None,
            "errors_mm": case_errors,
            "num_missing_prediction": case_missing_predictions,
            "num_missing_reference": int(truth.missing.sum()),
        }

    all_errors = np.array([e for name in names for e in errors_by_name[name]], dtype=float)
    total_missing_prediction = sum(missing_prediction_by_name.values())
    outliers.sort(key=lambda item: item["error_mm"], reverse=True)
    return {
        "num_cases": len(per_case),
        "landmark_names": names,
        "radii_mm": radii,
        "outlier_mm": float(outlier_mm),
        "definitions": {
            "error": "Euclidean distance in mm between predicted and reference position (LPS)",
            "sdr": "share of reference points with a prediction within r mm (error <= r); "
            "a missing prediction counts as a failure",
            "std": "population standard deviation of the errors (ddof = 0)",
        },
        "overall": _statistics(all_errors, total_missing_prediction, radii),
        "per_landmark": {
            name: {
                **_statistics(
                    np.array(errors_by_name[name], dtype=float), missing_prediction_by_name[name], radii
                ),
                "num_missing_reference": missing_truth_by_name[name],
            }
            for name in names
        },
        "per_case": per_case,
        "outliers": outliers,
        "missing_predictions": missing_predictions,
        "missing": {
            "reference": int(sum(missing_truth_by_name.values())),
            "prediction": int(total_missing_prediction),
        },
    }


def format_summary(report: dict[str, Any]) -> str:
    """A few lines of text for the console: MRE ± std, median, SDR per radius, outliers."""
    overall = report["overall"]

    def mm(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [
        f"{report['num_cases']} cases, {overall['num_evaluated']} points evaluated, "
        f"{overall['num_missing_prediction']} not detected, "
        f"{report['missing']['reference']} without reference",
        f"MRE {mm(overall['mre_mm'])} ± {mm(overall['std_mm'])} mm (median {mm(overall['median_mm'])} mm, "
        f"max {mm(overall['max_mm'])} mm)",
        "SDR "
        + ", ".join(
            f"{radius} mm: {'n/a' if value is None else f'{100.0 * value:.1f} %'}"
            for radius, value in overall["sdr"].items()
        ),
        f"{len(report['outliers'])} outliers above {report['outlier_mm']:g} mm",
    ]
    return "\n".join(lines)


def _plot_errors_per_landmark(report: dict[str, Any], path: Path, *, overwrite: bool) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = report["landmark_names"]
    data = [
        [e for case in report["per_case"].values() if (e := case["errors_mm"].get(name)) is not None]
        for name in names
    ]
    figure = Figure(figsize=(max(6.0, 0.35 * len(names) + 2.0), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = [i + 1 for i, values in enumerate(data) if values]
    if positions:
        axes.boxplot([values for values in data if values], positions=positions, widths=0.6, showfliers=True)
    axes.set_xticks(range(1, len(names) + 1))
    axes.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    axes.set_xlim(0.4, len(names) + 0.6)
    axes.set_ylabel("error (mm)")
    axes.set_title(f"Error per landmark ({report['num_cases']} cases)")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path, overwrite=overwrite) as temporary:
        figure.savefig(temporary, dpi=120, format="png")


def _plot_cumulative_error(report: dict[str, Any], path: Path, *, overwrite: bool) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    errors = np.sort(
        [e for case in report["per_case"].values() for e in case["errors_mm"].values() if e is not None]
    )
    attempts = errors.size + report["overall"]["num_missing_prediction"]
    figure = Figure(figsize=(6.0, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if errors.size:
        # The curve ends below 100 % when some reference points were not detected at all.
        axes.step(errors, 100.0 * np.arange(1, errors.size + 1) / attempts, where="post")
    for radius in report["radii_mm"]:
        axes.axvline(radius, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("error (mm)")
    axes.set_ylabel("points within error (%)")
    axes.set_ylim(0, 100)
    axes.set_xlim(left=0)
    axes.set_title("Cumulative error distribution")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path, overwrite=overwrite) as temporary:
        figure.savefig(temporary, dpi=120, format="png")


def check_evaluation_folder(folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Make the report folder and check, before any work, that its files may be written.

    Raises:
        FileExistsError: a report file exists and ``overwrite`` is False.
        PermissionError: the folder is read-only.
    """
    folder = make_output_folder(folder)
    # Checked up front so that a refused overwrite leaves no half-updated set of files.
    for name in _OUTPUT_NAMES:
        check_writable(folder / name, overwrite=overwrite)
    return folder


def write_evaluation(
    report: dict[str, Any], folder: str | os.PathLike[str], *, overwrite: bool = False
) -> list[Path]:
    """Write ``evaluation.json`` and, when matplotlib is installed, two plots into ``folder``.

    The plots are ``errors_per_landmark.png`` (box plot of the error of each landmark) and
    ``cumulative_error.png`` (share of points within each error). matplotlib is optional:
    without it the plots are skipped with a logged note. The folder is created if needed.

    Returns:
        The paths written.

    Raises:
        FileExistsError: one of the files exists and ``overwrite`` is False.
    """
    folder = Path(folder).expanduser()
    check_evaluation_folder(folder, overwrite=overwrite)
    text = json.dumps(report, indent=2) + "\n"
    written = [atomic_write_text(folder / "evaluation.json", text, overwrite=overwrite)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("matplotlib is not installed: evaluation plots are skipped (pip install matplotlib)")
        return written
    for name, plot in (
        ("errors_per_landmark.png", _plot_errors_per_landmark),
        ("cumulative_error.png", _plot_cumulative_error),
    ):
        plot(report, folder / name, overwrite=overwrite)
        written.append(folder / name)
    return written
