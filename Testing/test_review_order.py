"""review_order.csv: every image of a folder ranked for review, across runs and shards, with warnings."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from SCNLandmarksLib.data.landmark_io import merge_detection_summary_csv
from SCNLandmarksLib.data.landmarks import Landmarks
from SCNLandmarksLib.inference.batch import update_review_order_csv
from SCNLandmarksLib.models.quality import review_order


def _detected(expected: list[float], check: list[bool]) -> Landmarks:
    positions = np.arange(2 * len(expected), dtype=float).reshape(-1, 2)
    positions[np.isnan(expected)] = np.nan
    plain = Landmarks.from_positions(positions)
    return Landmarks(plain.names, positions, expected_errors=np.array(expected), check=np.array(check))


def _run(folder: Path, results: list[tuple[str, Landmarks]], warnings: dict[str, str | None]):
    summary = merge_detection_summary_csv(results, folder / "landmarks.csv")
    return update_review_order_csv(summary, folder / "review_order.csv", warnings=warnings)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_runs_one_after_another_end_with_one_ranking_of_all_images_and_their_warnings(tmp_path: Path) -> None:
    first = [("a", _detected([1.0, 1.5, np.nan], [False, False, False])), ("b", _detected([3.0, 2.0, 4.0], [True, False, True]))]
    order, path = _run(tmp_path, first, {"a": "pixel size doubtful", "b": None})
    assert [row[0] for row in order] == ["b", "a"] and path == tmp_path / "review_order.csv"

    # A second run (another shard, or new images) adds one image: the ranking covers all three.
    order, _ = _run(tmp_path, [("c", _detected([2.0, 2.0, 2.0], [False, True, False]))], {"c": None})
    rows = _rows(path)
    assert [row["image"] for row in rows] == ["b", "c", "a"] == [row[0] for row in order]
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    assert [row["points_to_check"] for row in rows] == ["2", "1", "0"]
    assert rows[0]["mean_expected_error_mm"] == "3.00"
    assert rows[2]["mean_expected_error_mm"] == "1.25"  # the missing point does not count
    assert rows[2]["warning"] == "pixel size doubtful"  # kept from the first run

    # a detected again without a warning: its old warning goes, and its new figures rank it.
    _run(tmp_path, [("a", _detected([5.0, 5.0, 5.0], [True, True, True]))], {"a": None})
    rows = _rows(path)
    assert [row["image"] for row in rows] == ["a", "b", "c"] and all(row["warning"] == "" for row in rows)


def test_the_folder_ranking_agrees_with_the_ranking_of_the_same_detections(tmp_path: Path) -> None:
    generator = np.random.default_rng(3)
    results = [(f"image{n}", _detected(list(generator.uniform(0.5, 6.0, 4)), list(generator.random(4) > 0.7)))
               for n in range(8)]
    order, _ = _run(tmp_path, results, {})
    in_memory = review_order(results)
    assert [row[0] for row in order] == [row[0] for row in in_memory]
    assert [row[2] for row in order] == [row[2] for row in in_memory]
    np.testing.assert_allclose([row[1] for row in order], [row[1] for row in in_memory], atol=0.005)


def test_one_image_or_no_expected_errors_writes_no_ranking(tmp_path: Path) -> None:
    order, path = _run(tmp_path, [("only", _detected([1.0, 2.0], [False, True]))], {})
    assert path is None and not (tmp_path / "review_order.csv").exists()
    assert order == [("only", pytest.approx(1.5), 1)]

    plain = Landmarks.from_positions([[1.0, 2.0], [3.0, 4.0]])  # a model without an error model
    _, path = _run(tmp_path, [("plain", plain)], {})
    assert path is not None  # "only" has expected errors: two images, one of them ranked by them
    assert [row["image"] for row in _rows(path)] == ["only", "plain"]


def test_a_ranking_of_an_earlier_version_without_warnings_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "review_order.csv").write_text("image,rank,mean_expected_error_mm,points_to_check\nold,1,9.00,3\n")
    _, path = _run(tmp_path, [("a", _detected([1.0], [False])), ("b", _detected([2.0], [True]))], {"b": "w"})
    assert [(row["image"], row["warning"]) for row in _rows(path)] == [("b", "w"), ("a", "")]


def test_a_warning_is_kept_even_when_there_is_nothing_to_rank_yet(tmp_path: Path) -> None:
    """A shard of one image that finishes first: its pixel-size warning must reach the final ranking."""
    order, path = _run(tmp_path, [("first", _detected([1.0, 2.0], [False, True]))], {"first": "pixel size doubtful"})
    assert path is not None and [(r["image"], r["warning"]) for r in _rows(path)] == [("first", "pixel size doubtful")]
    _run(tmp_path, [("second", _detected([3.0, 3.0], [True, True]))], {"second": None})
    assert [(r["image"], r["warning"]) for r in _rows(path)] == [("second", ""), ("first", "pixel size doubtful")]
