"""Evaluation: known errors give known MRE and SDR; missing points; report files."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from SCNLandmarksLib.inference.evaluation import evaluate, format_summary, named_like_model, point_errors, write_evaluation
from SCNLandmarksLib.data.landmarks import Landmarks

NAMES = ["A", "B", "C"]


def _truth() -> Landmarks:
    return Landmarks(NAMES, np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]))


def _shifted(offsets: list[list[float]]) -> Landmarks:
    return Landmarks(NAMES, _truth().positions + np.array(offsets))


def test_point_errors_are_euclidean_mm_matched_by_name() -> None:
    truth = _truth()
    predicted = Landmarks(["C", "A", "X"], np.array([[0.0, 13.0, 4.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]]))
    errors = point_errors(predicted, truth)
    np.testing.assert_allclose(errors, [1.0, np.nan, 5.0])
    with pytest.raises(ValueError, match="2D predictions with 3D"):
        point_errors(Landmarks.from_positions([[0.0, 0.0]]), truth)


def _cases() -> list[tuple[str, Landmarks, Landmarks]]:
    # Errors: case1 = 1, 2, 3 mm; case2 = 4, 12 mm and one missing prediction;
    # case3 = 0.5 mm and a missing reference point for B and C.
    truth3 = _truth()
    truth3.positions[1:] = np.nan
    prediction2 = _shifted([[4.0, 0, 0], [0, 12.0, 0], [0, 0, 0]])
    prediction2.positions[2] = np.nan
    return [
        ("case1", _shifted([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]]), _truth()),
        ("case2", prediction2, _truth()),
        ("case3", _shifted([[0, 0.5, 0], [1, 1, 1], [1, 1, 1]]), truth3),
    ]


def test_known_errors_give_known_statistics() -> None:
    report = evaluate(_cases(), radii=(2.0, 4.0), outlier_mm=10.0)
    errors = np.array([1.0, 2.0, 3.0, 4.0, 12.0, 0.5])
    overall = report["overall"]
    assert overall["mre_mm"] == pytest.approx(errors.mean())
    assert overall["std_mm"] == pytest.approx(errors.std())
    assert overall["median_mm"] == pytest.approx(np.median(errors))
    assert overall["max_mm"] == pytest.approx(12.0)
    # 7 reference points with a chance of detection (6 detected + 1 missed):
    # within 2 mm: 1, 2, 0.5 -> 3/7; within 4 mm: 5/7 (errors equal to r count as success).
    assert overall["sdr"] == {"2": pytest.approx(3 / 7), "4": pytest.approx(5 / 7)}
    assert overall["num_evaluated"] == 6 and overall["num_missing_prediction"] == 1
    assert report["missing"] == {"reference": 2, "prediction": 1}

    a = report["per_landmark"]["A"]
    assert a["mre_mm"] == pytest.approx((1.0 + 4.0 + 0.5) / 3)
    assert a["sdr"]["2"] == pytest.approx(2 / 3)
    c = report["per_landmark"]["C"]
    assert c["num_evaluated"] == 1 and c["num_missing_prediction"] == 1 and c["num_missing_reference"] == 1
    assert c["sdr"]["4"] == pytest.approx(1 / 2)

    assert report["per_case"]["case2"]["errors_mm"] == {"A": 4.0, "B": 12.0, "C": None}
    assert report["per_case"]["case1"]["mre_mm"] == pytest.approx(2.0)
    assert report["outliers"] == [{"case": "case2", "landmark": "B", "error_mm": 12.0}]
    assert report["missing_predictions"] == [{"case": "case2", "landmark": "C"}]
    assert report["landmark_names"] == NAMES
    json.dumps(report, allow_nan=False)  # strictly serialisable: no NaN anywhere


def test_evaluate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="No cases"):
        evaluate([])
    case = ("same", _truth(), _truth())
    with pytest.raises(ValueError, match="appears twice"):
        evaluate([case, case])


def test_all_predictions_missing_gives_zero_sdr_and_no_mre() -> None:
    nothing = Landmarks(NAMES, np.full((3, 3), np.nan))
    report = evaluate([("c", nothing, _truth())])
    assert report["overall"]["mre_mm"] is None
    assert report["overall"]["sdr"]["2"] == 0.0
    assert "n/a" in format_summary(report)


def test_format_summary() -> None:
    text = format_summary(evaluate(_cases(), radii=(2.0, 4.0)))
    assert "MRE 3.75 ± " in text
    assert "2 mm: 42.9 %" in text and "4 mm: 71.4 %" in text
    assert "1 outliers above 10 mm" in text


def test_write_evaluation_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = evaluate(_cases())
    written = write_evaluation(report, tmp_path / "eval")
    names = sorted(p.name for p in written)
    assert names == ["cumulative_error.png", "errors_per_landmark.png", "evaluation.json"]
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text()) == json.loads(json.dumps(report))
    for name in ("cumulative_error.png", "errors_per_landmark.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        write_evaluation(report, tmp_path / "eval")
    assert len(write_evaluation(report, tmp_path / "eval", overwrite=True)) == 3
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.startswith(".tmp-")]


def test_write_evaluation_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" fail
    with caplog.at_level(logging.INFO):
        written = write_evaluation(evaluate(_cases()), tmp_path)
    assert [p.name for p in written] == ["evaluation.json"]
    assert "matplotlib is not installed" in caplog.text


def test_a_reference_without_names_takes_the_models_names_in_column_order() -> None:
    unnamed = Landmarks.from_positions(_truth().positions)  # a CSV without header: L1, L2, L3
    named = named_like_model(unnamed, NAMES)
    assert named.names == NAMES
    np.testing.assert_array_equal(named.positions, _truth().positions)
    truth = _truth()
    assert named_like_model(truth, ["B", "Z"]) is truth  # a shared name: matched by name as before
    with pytest.raises(ValueError, match="share no name"):
        named_like_model(unnamed, ["A", "B"])  # two names for three columns: cannot be matched
    with pytest.raises(ValueError, match="--names"):
        named_like_model(_truth(), ["X", "Y", "Z"])
