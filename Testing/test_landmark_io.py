"""Landmark files: Slicer .mrk.json and .fcsv, challenge CSV, detection summaries, atomic writes."""

from __future__ import annotations

import dataclasses

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from SCNLandmarksLib.common.atomic import atomic_path, atomic_write_text
from SCNLandmarksLib.imaging.geometry import lps_to_ras
from SCNLandmarksLib.data.landmark_io import (
    read_fcsv,
    read_landmark_csv,
    read_landmarks,
    read_mrk_json,
    write_detection_summary_csv,
    write_fcsv,
    write_landmark_csv,
    write_landmarks,
    write_mrk_json,
)
from SCNLandmarksLib.data.landmarks import Landmarks


def _landmarks_3d() -> Landmarks:
    return Landmarks(
        names=["Sella", "Nasion, soft tissue", 'Menton "M"', "Gonion"],
        positions=np.array(
            [[10.5, -20.25, 30.125], [np.nan, np.nan, np.nan], [-1.0, 2.0, -3.0], [0.1, 0.2, 0.3]]
        ),
        descriptions=["centre of the sella turcica", "", "lowest point; of the chin", ""],
        confidences=np.array([0.93, np.nan, 0.41, 0.875]),
        corrected=np.array([False, False, True, False]),
    )


def _landmarks_2d() -> Landmarks:
    return Landmarks.from_positions([[83.5, 99.6], [147.3, 102.9], [np.nan, np.nan]])


def _assert_same(read: Landmarks, written: Landmarks) -> None:
    assert read.names == written.names
    np.testing.assert_allclose(read.positions, written.positions, atol=1e-9)
    np.testing.assert_array_equal(read.missing, written.missing)
    assert read.descriptions == written.descriptions


def _no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------- .mrk.json


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_mrk_json_round_trip(tmp_path: Path, system: str) -> None:
    landmarks = _landmarks_3d()
    path = write_mrk_json(landmarks, tmp_path / "pred.mrk.json", coordinate_system=system)
    read = read_mrk_json(path)
    _assert_same(read, landmarks)
    np.testing.assert_allclose(read.confidences, [0.93, np.nan, 0.41, 0.875], atol=5e-4)
    np.testing.assert_array_equal(read.corrected, [False, False, True, False])
    assert _no_temporary_files(tmp_path)

    markup = json.loads(path.read_text())["markups"][0]
    assert markup["coordinateSystem"] == system
    assert markup["name"] == "pred"
    stored = np.array(markup["controlPoints"][0]["position"])
    expected = lps_to_ras(landmarks.positions[0]) if system == "RAS" else landmarks.positions[0]
    np.testing.assert_allclose(stored, expected)


def test_mrk_json_missing_point_is_never_zero(tmp_path: Path) -> None:
    path = write_mrk_json(_landmarks_3d(), tmp_path / "a.mrk.json")
    point = json.loads(path.read_text())["markups"][0]["controlPoints"][1]
    assert point["positionStatus"] == "missing"
    assert point["position"] == ""
    assert read_mrk_json(path).missing.tolist() == [False, True, False, False]


def test_mrk_json_confidence_and_description_in_point_description(tmp_path: Path) -> None:
    path = write_mrk_json(_landmarks_3d(), tmp_path / "a.mrk.json")
    points = json.loads(path.read_text())["markups"][0]["controlPoints"]
    assert points[0]["description"] == "centre of the sella turcica; confidence=0.930"
    assert points[1]["description"] == ""
    assert points[2]["description"] == "lowest point; of the chin; confidence=0.410; corrected=yes"


def test_mrk_json_low_confidence_points_are_flagged_and_unlocked(tmp_path: Path) -> None:
    path = write_mrk_json(_landmarks_3d(), tmp_path / "a.mrk.json", locked=True, low_confidence_threshold=0.5)
    markup = json.loads(path.read_text())["markups"][0]
    points = markup["controlPoints"]
    assert markup["locked"] is True
    assert [p["selected"] for p in points] == [True, True, False, True]
    assert [p["locked"] for p in points] == [True, True, False, True]
    assert "low confidence: please check" in points[2]["description"]
    read = read_mrk_json(path)
    assert read.descriptions[2] == "lowest point; of the chin"
    assert read.confidences[2] == pytest.approx(0.41)


def test_mrk_json_2d_written_with_zero_z_and_read_back_2d(tmp_path: Path) -> None:
    landmarks = _landmarks_2d()
    path = write_mrk_json(landmarks, tmp_path / "two.mrk.json", coordinate_system="RAS")
    points = json.loads(path.read_text())["markups"][0]["controlPoints"]
    assert points[0]["position"] == [-83.5, -99.6, 0.0]
    read = read_mrk_json(path, dimension=2)
    assert read.dimension == 2
    _assert_same(read, landmarks)
    assert read_mrk_json(path).dimension == 3


def _write_json(path: Path, markup: dict) -> Path:
    path.write_text(json.dumps({"@schema": "x", "markups": [markup]}))
    return path


def test_mrk_json_reads_ras_statuses_units_and_defaults(tmp_path: Path) -> None:
    path = _write_json(
        tmp_path / "slicer.mrk.json",
        {
            "type": "Fiducial",
            "coordinateSystem": "RAS",
            "controlPoints": [
                {"label": "A", "position": [1.0, 2.0, 3.0]},
                {"label": "B", "position": [4.0, 5.0, 6.0], "positionStatus": "undefined"},
                {"label": "C", "positionStatus": "missing"},
                {"label": "", "position": [7.0, 8.0, 9.0], "positionStatus": "defined"},
                {"label": "E", "position": [0.0, 0.0, 0.0], "positionStatus": "preview"},
            ],
        },
    )
    read = read_mrk_json(path)
    assert read.names == ["A", "B", "C", "L4", "E"]
    np.testing.assert_allclose(read.positions[0], [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(read.positions[3], [-7.0, -8.0, 9.0])
    assert read.missing.tolist() == [False, True, True, False, True]
    assert read.confidences is None and read.corrected is None

    micrometres = _write_json(
        tmp_path / "um.mrk.json",
        {
            "type": "Fiducial",
            "coordinateUnits": "um",
            "controlPoints": [{"label": "A", "position": [1000, 0, -500]}],
        },
    )
    np.testing.assert_allclose(read_mrk_json(micrometres).positions, [[1.0, 0.0, -0.5]])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a valid JSON file"),
        ('{"something": 1}', "no 'markups' list"),
        ('{"markups": [{"type": "Line", "controlPoints": []}]}', "only Line markups"),
        ('{"markups": [{"type": "Fiducial", "coordinateSystem": "IJK"}]}', "coordinate system 'IJK'"),
        ('{"markups": [{"controlPoints": [{"label": "A", "position": [1, 2]}]}]}', "expected 3 numbers"),
        ('{"markups": [{"controlPoints": [{"label": "A"}, {"label": "A"}]}]}', "repeated: A"),
    ],
)
def test_mrk_json_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.mrk.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.mrk.json") as error:
        read_mrk_json(path)
    assert message in str(error.value)


def test_missing_landmark_file_is_file_not_found(tmp_path: Path) -> None:
    for reader in (read_mrk_json, read_fcsv):
        with pytest.raises(FileNotFoundError, match="nothere"):
            reader(tmp_path / "nothere.mrk.json")


# --------------------------------------------------------------------------- .fcsv


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_fcsv_round_trip(tmp_path: Path, system: str) -> None:
    landmarks = _landmarks_3d()
    path = write_fcsv(landmarks, tmp_path / "a.fcsv", coordinate_system=system)
    lines = path.read_text().splitlines()
    assert lines[1] == f"# CoordinateSystem = {0 if system == 'RAS' else 1}"
    rows = list(csv.reader(lines[3:]))
    assert rows[1][1:4] == ["NaN", "NaN", "NaN"] and rows[1][14] == "3"
    expected = lps_to_ras(landmarks.positions[0]) if system == "RAS" else landmarks.positions[0]
    np.testing.assert_allclose([float(v) for v in rows[0][1:4]], expected)
    read = read_fcsv(path)
    _assert_same(read, landmarks)
    np.testing.assert_allclose(read.confidences, [0.93, np.nan, 0.41, 0.875], atol=5e-4)


def test_fcsv_reads_slicer5_layout_with_status_column(tmp_path: Path) -> None:
    path = tmp_path / "slicer5.fcsv"
    path.write_text(
        "# Markups fiducial file version = 5.6\n"
        "# CoordinateSystem = LPS\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        '1,1,2,3,0,0,0,1,1,1,0,"A, left","desc, with comma",,2,0\n'
        "2,4,5,6,0,0,0,1,1,1,0,B,,,3,0\n"
        "3,0,0,0,0,0,0,1,1,1,0,C,,,0,0\n"
    )
    read = read_fcsv(path)
    assert read.names == ["A, left", "B", "C"]
    assert read.descriptions[0] == "desc, with comma"
    np.testing.assert_allclose(read.positions[0], [1, 2, 3])
    assert read.missing.tolist() == [False, True, True]


def test_fcsv_2d_and_header_without_coordinate_system_is_ras(tmp_path: Path) -> None:
    path = write_fcsv(_landmarks_2d(), tmp_path / "two.fcsv")
    _assert_same(read_fcsv(path, dimension=2), _landmarks_2d())
    old = tmp_path / "old.fcsv"
    old.write_text("# Markups fiducial file version = 4.6\n1,1,2,3,0,0,0,1,1,1,0,A,,\n")
    np.testing.assert_allclose(read_fcsv(old).positions, [[-1.0, -2.0, 3.0]])


def test_fcsv_real_afids_file_is_ras(data_dir: Path) -> None:
    path = data_dir / "afids_mni" / "groundtruth.fcsv"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    landmarks = read_landmarks(path)
    assert len(landmarks) == 32 and landmarks.names[:2] == ["1", "2"]
    assert landmarks.descriptions[:2] == ["AC", "PC"]
    assert not landmarks.missing.any()
    first = next(line for line in path.read_text().splitlines() if not line.startswith("#")).split(",")
    ras = np.array([float(v) for v in first[1:4]])
    np.testing.assert_allclose(landmarks.positions[0], [-ras[0], -ras[1], ras[2]])
    # AC and PC are on the midline, about 25-30 mm apart along y.
    assert 20 < np.linalg.norm(landmarks.positions[0] - landmarks.positions[1]) < 35


# --------------------------------------------------------------------------- challenge CSV


def test_landmark_csv_round_trip_2d_with_missing(tmp_path: Path) -> None:
    rows = {"001": _landmarks_2d(), "002": Landmarks.from_positions([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
    path = write_landmark_csv(rows, tmp_path / "rows.csv")
    assert path.read_text().splitlines()[0] == "001,83.5,99.6,147.3,102.9,,"
    read = read_landmark_csv(path, dimension=2)
    assert list(read) == ["001", "002"]
    for key, landmarks in rows.items():
        _assert_same(read[key], landmarks)


def test_landmark_csv_header_nan_names_and_3d(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,x1,y1,z1,x2,y2,z2\ncase1,1,2,3,NaN,nan,nan\ncase2,4,5,6,7,8,9,\n")
    read = read_landmark_csv(path, dimension=3, names=["AC", "PC"])
    assert read["case1"].names == ["AC", "PC"]
    assert read["case1"].missing.tolist() == [False, True]
    np.testing.assert_allclose(read["case2"].positions, [[4, 5, 6], [7, 8, 9]])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a,1,2,3\n", "not a multiple of 2"),
        ("a,1,2,3,4\nb,1,2\n", "earlier rows have 2"),
        ("a,1,2\na,3,4\n", "appears twice"),
        ("a,1,2\nb,1,x\n", "not a number"),
    ],
)
def test_landmark_csv_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_landmark_csv(path, dimension=2)


def test_landmark_csv_rejects_different_landmark_sets(tmp_path: Path) -> None:
    rows = {
        "a": Landmarks.from_positions([[1.0, 2.0]]),
        "b": Landmarks.from_positions([[1.0, 2.0]], names=["X"]),
    }
    with pytest.raises(ValueError, match="same columns"):
        write_landmark_csv(rows, tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_detection_summary_csv(tmp_path: Path) -> None:
    three = _landmarks_3d()
    two = _landmarks_2d()
    path = write_detection_summary_csv([("ct1", three), ("xray", two)], tmp_path / "summary.csv")
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == [
        "image", "landmark", "x_lps", "y_lps", "z_lps", "x_ras", "y_ras", "z_ras", "confidence",
        "expected_error_mm", "check", "missing",
    ]  # fmt: skip
    assert len(rows) == 7
    assert rows[0]["landmark"] == "Sella"
    assert [float(rows[0][key]) for key in ("x_ras", "y_ras", "z_ras")] == [-10.5, 20.25, 30.125]
    assert [float(rows[0][key]) for key in ("x_lps", "y_lps", "z_lps")] == [10.5, -20.25, 30.125]
    assert rows[0]["confidence"] == "0.93" and rows[0]["missing"] == "false"
    assert rows[1]["landmark"] == "Nasion, soft tissue"
    assert rows[1]["x_lps"] == "" and rows[1]["missing"] == "true"
    assert rows[4]["image"] == "xray" and rows[4]["z_lps"] == "" and rows[4]["confidence"] == ""
    assert float(rows[4]["x_ras"]) == -83.5
    assert rows[0]["expected_error_mm"] == "" and rows[0]["check"] == "false"


def _checked(landmarks: Landmarks) -> Landmarks:
    """The landmarks as a detector with an error model returns them: the last placed point to check."""
    count = len(landmarks)
    expected = np.linspace(0.5, 4.5, count)
    expected[landmarks.missing] = np.nan
    check = np.zeros(count, dtype=bool)
    check[np.flatnonzero(~landmarks.missing)[-1]] = True
    return dataclasses.replace(landmarks, expected_errors=expected, check=check)


def test_summary_csv_carries_expected_error_and_check(tmp_path: Path) -> None:
    path = write_detection_summary_csv([("ct1", _checked(_landmarks_3d()))], tmp_path / "summary.csv")
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["expected_error_mm"] for r in rows] == ["0.5", "", "3.17", "4.5"]
    assert [r["check"] for r in rows] == ["false", "false", "false", "true"]


def test_mrk_json_describes_points_to_check_with_their_expected_error(tmp_path: Path) -> None:
    # A confident point (0.875) is flagged because the detector expects it far off: the check
    # decision, not the confidence, drives the note and the colour.
    path = write_mrk_json(_checked(_landmarks_3d()), tmp_path / "x.mrk.json", low_confidence_threshold=0.5)
    points = json.loads(path.read_text())["markups"][0]["controlPoints"]
    assert points[3]["description"].endswith("expected_error_mm=4.5; please check")
    assert points[3]["selected"] is False
    assert "please check" not in points[2]["description"] and points[2]["selected"] is True
    back = read_mrk_json(path)
    assert back.descriptions == _landmarks_3d().descriptions
    assert back.confidences[3] == pytest.approx(0.875)


def test_merging_into_a_summary_of_the_earlier_columns_keeps_its_rows(tmp_path: Path) -> None:
    from SCNLandmarksLib.data.landmark_io import merge_detection_summary_csv

    path = tmp_path / "landmarks.csv"
    path.write_text(
        "image,landmark,x_lps,y_lps,z_lps,x_ras,y_ras,z_ras,confidence,missing\n"
        "old,L1,1.0,2.0,,-1.0,-2.0,,0.9,false\n"
    )
    merge_detection_summary_csv([("new", _checked(_landmarks_2d()))], path)
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert rows[0]["image"] == "old" and rows[0]["confidence"] == "0.9" and rows[0]["missing"] == "false"
    assert rows[0]["expected_error_mm"] == "" and rows[0]["check"] == ""
    assert [r["check"] for r in rows[1:]] == ["false", "true", "false"]


# --------------------------------------------------------------------------- dispatch, overwrite, atomic


@pytest.mark.parametrize("name", ["x.mrk.json", "x.json", "x.fcsv"])
def test_read_write_landmarks_dispatch(tmp_path: Path, name: str) -> None:
    path = write_landmarks(_landmarks_3d(), tmp_path / name, coordinate_system="RAS")
    _assert_same(read_landmarks(path), _landmarks_3d())


def test_read_landmarks_rejects_tables_and_unknown_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read_landmark_csv"):
        read_landmarks(tmp_path / "a.csv")
    with pytest.raises(ValueError, match="Unknown landmark file type"):
        write_landmarks(_landmarks_3d(), tmp_path / "a.txt")


@pytest.mark.parametrize(
    "write",
    [
        lambda lm, p, **kw: write_mrk_json(lm, p / "a.mrk.json", **kw),
        lambda lm, p, **kw: write_fcsv(lm, p / "a.fcsv", **kw),
        lambda lm, p, **kw: write_landmark_csv({"a": lm}, p / "a.csv", **kw),
        lambda lm, p, **kw: write_detection_summary_csv([("a", lm)], p / "s.csv", **kw),
    ],
)
def test_writers_refuse_to_overwrite(tmp_path: Path, write) -> None:  # noqa: ANN001
    first = write(_landmarks_3d(), tmp_path)
    before = first.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        write(_landmarks_2d(), tmp_path)
    assert first.read_bytes() == before
    write(_landmarks_2d(), tmp_path, overwrite=True)
    assert first.read_bytes() != before
    assert _no_temporary_files(tmp_path)


def test_atomic_path_failure_leaves_original_and_no_temporary(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "model.txt", "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target, overwrite=True) as temporary:
            assert temporary.parent == tmp_path and temporary.name.endswith("model.txt")
            temporary.write_text("half written")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.txt"]


def test_a_name_near_the_file_system_limit_is_written(tmp_path: Path) -> None:
    """The temporary name must not be what is too long: 240 characters and an extension fit, so must the write."""
    target = atomic_write_text(tmp_path / ("a" * 240 + ".mrk.json"), "{}")
    assert target.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_atomic_write_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_text(tmp_path / "no" / "folder.txt", "x")
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path, "x", overwrite=True)
    with pytest.raises(FileNotFoundError, match="Nothing was written"):
        with atomic_path(tmp_path / "never.txt"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writers_racing_for_a_new_name_never_replace_each_other(tmp_path: Path) -> None:
    """Eight writers all find the name free, then publish at once: exactly one file wins, whole."""
    import threading

    target = tmp_path / "model.scn.pt"
    barrier = threading.Barrier(8, timeout=60)
    written, refused = [], []

    def write(number: int) -> None:
        try:
            with atomic_path(target) as temporary:
                temporary.write_text(f"writer {number}")
                barrier.wait()
            written.append(number)
        except FileExistsError as error:
            assert "created by someone else" in str(error)
            refused.append(number)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(written) == 1 and len(refused) == 7
    assert target.read_text() == f"writer {written[0]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.scn.pt"]


def test_a_file_created_while_ours_was_written_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "model.scn.pt"
    with pytest.raises(FileExistsError, match="created by someone else"):
        with atomic_path(target) as temporary:
            temporary.write_text("ours")
            target.write_text("another program's")  # meanwhile
    assert target.read_text() == "another program's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.scn.pt"]


# --------------------------------------------------------------------------- real Slicer (slicer-core)


def _load_in_slicer(mrml: dict, path: Path):  # noqa: ANN202 - slicer types are dynamic
    import slicer

    node = mrml["scene"].AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "loaded")
    storage = slicer.vtkMRMLMarkupsJsonStorageNode() if path.name.endswith("json") else (
        slicer.vtkMRMLMarkupsFiducialStorageNode()
    )  # fmt: skip
    mrml["scene"].AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return node


def _slicer_points(node) -> tuple[list[str], np.ndarray, list[int], list[str]]:  # noqa: ANN001
    labels, positions, statuses, descriptions = [], [], [], []
    for i in range(node.GetNumberOfControlPoints()):
        labels.append(node.GetNthControlPointLabel(i))
        positions.append(node.GetNthControlPointPosition(i))
        statuses.append(node.GetNthControlPointPositionStatus(i))
        descriptions.append(node.GetNthControlPointDescription(i))
    return labels, np.array(positions), statuses, descriptions


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_slicer_loads_our_mrk_json(tmp_path: Path, mrml_scene: dict, system: str) -> None:
    import slicer

    landmarks = _landmarks_3d()
    path = write_mrk_json(
        landmarks,
        tmp_path / "pred.mrk.json",
        coordinate_system=system,
        locked=True,
        node_name="SCN predictions",
    )
    node = _load_in_slicer(mrml_scene, path)
    labels, positions_ras, statuses, descriptions = _slicer_points(node)
    assert labels == landmarks.names
    assert node.GetName() == "SCN predictions"
    assert node.GetFixedNumberOfControlPoints() and node.GetLocked()
    defined = ~landmarks.missing
    np.testing.assert_allclose(positions_ras[defined], lps_to_ras(landmarks.positions[defined]), atol=1e-9)
    missing = slicer.vtkMRMLMarkupsNode.PositionMissing
    defined_status = slicer.vtkMRMLMarkupsNode.PositionDefined
    assert statuses == [defined_status, missing, defined_status, defined_status]
    assert descriptions[0] == "centre of the sella turcica; confidence=0.930"

    # The markups logic (what Slicer's "Add data" uses) loads it too.
    node_id = mrml_scene["Markups"].LoadMarkups(str(path), "via logic")
    assert mrml_scene["scene"].GetNodeByID(node_id).GetNumberOfControlPoints() == 4


def test_we_read_what_slicer_writes(tmp_path: Path, mrml_scene: dict) -> None:
    import slicer
    import vtk

    node = mrml_scene["scene"].AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "edited")
    node.AddControlPoint(vtk.vtkVector3d(1.5, -2.0, 30.0), "Sella")
    node.AddControlPoint(vtk.vtkVector3d(4.0, 5.0, 6.0), "Nasion")
    node.AddControlPoint(vtk.vtkVector3d(-7.0, 8.0, 9.0), "Menton")
    node.SetNthControlPointPositionMissing(1)
    node.SetNthControlPointDescription(2, "chin; confidence=0.250; corrected=yes")
    results = {}
    for suffix, storage_class in (("mrk.json", slicer.vtkMRMLMarkupsJsonStorageNode), ("fcsv", None)):
        storage = storage_class() if storage_class else slicer.vtkMRMLMarkupsFiducialStorageNode()
        mrml_scene["scene"].AddNode(storage)
        storage.SetFileName(str(tmp_path / f"slicer.{suffix}"))
        assert storage.WriteData(node) == 1
        results[suffix] = read_landmarks(tmp_path / f"slicer.{suffix}")
    for read in results.values():
        assert read.names == ["Sella", "Nasion", "Menton"]
        assert read.missing.tolist() == [False, True, False]
        np.testing.assert_allclose(read.positions[[0, 2]], [[-1.5, 2.0, 30.0], [7.0, -8.0, 9.0]])
        assert read.descriptions[2] == "chin"
        assert read.confidences[2] == pytest.approx(0.25)
        assert read.corrected.tolist() == [False, False, True]


def test_slicer_loads_our_fcsv(tmp_path: Path, mrml_scene: dict) -> None:
    import slicer

    landmarks = _landmarks_3d()
    path = write_fcsv(landmarks, tmp_path / "pred.fcsv", coordinate_system="LPS")
    labels, positions_ras, statuses, _ = _slicer_points(_load_in_slicer(mrml_scene, path))
    assert labels == landmarks.names
    defined = ~landmarks.missing
    np.testing.assert_allclose(positions_ras[defined], lps_to_ras(landmarks.positions[defined]), atol=1e-9)
    assert statuses[1] == slicer.vtkMRMLMarkupsNode.PositionMissing


def _summary_images(path) -> list[str]:
    import csv as csv_module

    rows = list(csv_module.reader(path.read_text().splitlines()))
    return [row[0] for row in rows[1:]]


def _merge_many(path: str, prefix: str, count: int) -> None:
    from SCNLandmarksLib.data.landmark_io import merge_detection_summary_csv

    for number in range(count):
        points = Landmarks(["A", "B"], np.array([[1.0, 2.0], [3.0, 4.0]]), confidences=np.array([0.9, 0.2]))
        merge_detection_summary_csv([(f"{prefix}{number}", points)], path)


def test_detection_summary_keeps_earlier_rows_and_survives_concurrent_runs(tmp_path):
    import multiprocessing

    from SCNLandmarksLib.data.landmark_io import merge_detection_summary_csv

    path = tmp_path / "landmarks.csv"
    first = Landmarks(["A", "B"], np.array([[1.0, 2.0], [3.0, 4.0]]))
    merge_detection_summary_csv([("img1", first)], path)
    merge_detection_summary_csv([("img2", first)], path)
    assert _summary_images(path) == ["img1", "img1", "img2", "img2"]
    moved = Landmarks(["A", "B"], np.array([[5.0, 6.0], [7.0, 8.0]]))
    merge_detection_summary_csv([("img1", moved)], path)  # detected again: its rows are replaced
    assert _summary_images(path) == ["img2", "img2", "img1", "img1"]
    assert "5.0,6.0" in path.read_text()
    workers = [multiprocessing.get_context("fork").Process(target=_merge_many, args=(str(path), p, 15)) for p in "xy"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    images = set(_summary_images(path))
    assert {f"{p}{n}" for p in "xy" for n in range(15)} <= images and {"img1", "img2"} <= images
    foreign = tmp_path / "other.csv"
    foreign.write_text("id,x,y\n1,2,3\n")
    with pytest.raises(ValueError, match="not a landmarks summary"):
        merge_detection_summary_csv([("img1", first)], foreign)
    assert foreign.read_text() == "id,x,y\n1,2,3\n"
