"""SCNLandmarksLogic against the real MRML scene of slicer-core (module imported under test stand-ins).

Only Slicer's application layer is stood in (Qt, ScriptedLoadableModule, parameterNodeWrapper,
i18n; see slicer_stubs.py); volumes, point lists, transforms and storage nodes are the real
MRML classes, the model is real, and fine-tuning runs the real worker subprocess on the CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
vtk = pytest.importorskip("vtk")

import slicer_stubs  # noqa: E402

from SCNLandmarksLib.slicer_side import mrml_adapter  # noqa: E402
from SCNLandmarksLib.inference.detection import Detector  # noqa: E402
from SCNLandmarksLib.common.errors import ModelFileError, TrainingCancelled  # noqa: E402
from SCNLandmarksLib.imaging.geometry import lps_to_ras  # noqa: E402
from SCNLandmarksLib.imaging.grid import GridSpec  # noqa: E402
from SCNLandmarksLib.imaging.image_io import write_image  # noqa: E402
from SCNLandmarksLib.models.model import create_model  # noqa: E402
from SCNLandmarksLib.models.model_file import load_model, save_model  # noqa: E402
from SCNLandmarksLib.models.network import NetworkConfig  # noqa: E402
from SCNLandmarksLib.data.synthetic import make_synthetic_case  # noqa: E402

NAMES = ["L1", "L2", "L3"]
SHIFT = np.array([12.0, -4.0, 0.0])  # translation of the parent transform, RAS mm


@pytest.fixture(scope="module")
def module():
    return slicer_stubs.load_module()


@pytest.fixture
def model_path(tmp_path):
    config = NetworkConfig(dimension=2, num_landmarks=3, filters=8, levels=2, spatial_downsample=4, spatial_kernel=3)
    model = create_model(config, grid=GridSpec(size=(32, 32)), landmark_names=list(NAMES))
    return save_model(model, tmp_path / "tiny.scn.pt")


@pytest.fixture
def logic(module, tmp_path, scene):
    return module.SCNLandmarksLogic(casesFolder=tmp_path / "cases", userModelsFolder=tmp_path / "models")


def _case(seed: int = 1):
    return make_synthetic_case(dimension=2, size=(40, 36), spacing=(0.8, 1.1), origin=(5.0, -7.0),
                               direction=0.2, num_landmarks=3, seed=seed)


def _volume(scene, image, *, shifted: bool):
    volume = mrml_adapter.volume_node_from_image(image, scene=scene, name="ceph")
    if shifted:
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
        matrix = vtk.vtkMatrix4x4()
        for axis in range(3):
            matrix.SetElement(axis, 3, float(SHIFT[axis]))
        transform.SetMatrixTransformToParent(matrix)
        volume.SetAndObserveTransformNodeID(transform.GetID())
    return volume


def _world(node) -> np.ndarray:
    points = []
    for index in range(node.GetNumberOfControlPoints()):
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, position)
        points.append(position)
    return np.array(points)


def test_detect_places_engine_predictions_in_world_ras(logic, scene, model_path):
    image, _ = _case()
    plain = logic.detect(_volume(scene, image, shifted=False), model=model_path, device="cpu",
                         lowConfidenceThreshold=0.5)
    shifted = logic.detect(_volume(scene, image, shifted=True), model=model_path, device="cpu")

    # The engine alone, on the image in its own frame, predicts these LPS positions.
    expected = Detector(load_model(model_path), device="cpu").detect(image)
    expected_ras = lps_to_ras(np.column_stack([expected.positions, np.zeros(3)]))
    np.testing.assert_allclose(_world(plain), expected_ras, atol=1e-6)
    # A volume moved by a parent transform gives points moved by exactly that transform.
    np.testing.assert_allclose(_world(shifted), expected_ras + SHIFT, atol=1e-6)

    assert plain.GetName() == "ceph - tiny"
    assert [plain.GetNthControlPointLabel(i) for i in range(3)] == NAMES
    assert plain.GetFixedNumberOfControlPoints()
    confidences = json.loads(plain.GetAttribute(mrml_adapter.ATTRIBUTE_CONFIDENCES))
    np.testing.assert_allclose([confidences[n] for n in NAMES], expected.confidences, atol=1e-6)
    low = [bool(c < 0.5) for c in expected.confidences]
    assert [not plain.GetNthControlPointSelected(i) for i in range(3)] == low
    assert logic.pointsToCheckCount(plain) == sum(low)
    assert "Used: cpu" in logic.environmentSummary()


def test_detect_never_overwrites_an_edited_list(logic, scene, model_path):
    image, _ = _case()
    volume = _volume(scene, image, shifted=True)
    first = logic.detect(volume, model=model_path, device="cpu")
    # Unedited: detecting again refreshes the same list.
    assert logic.detect(volume, model=model_path, device="cpu", outputNode=first) is first
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 1
    # Edited: a new list is made and the corrections stay.
    first.SetNthControlPointPositionWorld(0, 1.0, 2.0, 3.0)
    second = logic.detect(volume, model=model_path, device="cpu", outputNode=first)
    assert second.GetID() != first.GetID()
    np.testing.assert_allclose(_world(first)[0], [1.0, 2.0, 3.0])
    # An empty list (e.g. created in the selector) is filled.
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "empty")
    assert logic.detect(volume, model=model_path, device="cpu", outputNode=empty) is empty
    assert empty.GetNumberOfControlPoints() == 3
    with pytest.raises(ValueError, match="input volume"):
        logic.detect(None, model=model_path)


def test_a_point_list_knows_its_volume_by_a_node_reference(module, logic, scene, model_path):
    """A reference follows the volume when Slicer renames IDs (a scene imported into another);
    lists saved by earlier versions, with the ID in an attribute, are still recognised."""
    volume = _volume(scene, _case()[0], shifted=False)
    points = logic.detect(volume, model=model_path, device="cpu")
    assert points.GetNodeReference(module.SOURCE_VOLUME_REFERENCE) is volume
    assert module.sourceVolumeID(points) == volume.GetID()
    older = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "older")
    older.SetAttribute("SCNLandmarks.sourceVolumeID", volume.GetID())
    assert module.sourceVolumeID(older) == volume.GetID()
    assert module.sourceVolumeID(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "mine")) is None


def test_2d_model_on_a_multi_slice_volume_is_explained(logic, scene, model_path):
    from SCNLandmarksLib.imaging.image import Image

    image3d = Image(np.random.default_rng(0).random((4, 20, 20)).astype(np.float32),
                    _case()[0].geometry.__class__(size=(20, 20, 4), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                                                  direction=tuple(np.eye(3).reshape(-1))))
    volume = mrml_adapter.volume_node_from_image(image3d, scene=scene, name="stack")
    with pytest.raises(ValueError, match="expects a 2D image"):
        logic.detect(volume, model=model_path, device="cpu")


def test_cases_are_stored_on_disk_with_corrections_and_survive_restart(module, logic, scene, model_path, tmp_path):
    image, truth = _case()
    volume = _volume(scene, image, shifted=True)
    points = logic.detect(volume, model=model_path, device="cpu")
    true_world = lps_to_ras(np.column_stack([truth.positions, np.zeros(3)])) + SHIFT
    points.SetNthControlPointPositionWorld(1, *true_world[1])
    points.SetNthControlPointPositionMissing(2)

    info = logic.addTrainingCase(volume, points)
    assert (info.name, info.dimension, info.num_missing, info.corrected_names) == ("ceph", 2, 1, ["L2"])
    assert info.metadata["model"] == "tiny.scn.pt"
    # The same image added again (corrected further) replaces its case: it is one case, not two
    # that fine-tuning's folds could train on and hold out at once.
    points.SetNthControlPointPositionWorld(0, *true_world[0])
    second = logic.addTrainingCase(volume, points)
    assert (second.name, second.replaced, second.corrected_names) == ("ceph", ["ceph"], ["L1", "L2"])
    assert [c.name for c in logic.trainingCases()] == ["ceph"]
    # A new detection of that image (after fine-tuning, say) never wipes out a person's corrections.
    fresh = logic.detect(volume, model=model_path, device="cpu")
    with pytest.raises(FileExistsError, match="stored already as the training case 'ceph'.*corrections of L1, L2.*remove"):
        logic.addTrainingCase(volume, fresh)
    assert [(c.name, c.corrected_names) for c in logic.trainingCases()] == [("ceph", ["L1", "L2"])]
    # Another image of the same name is a case of its own.
    namesake = _volume(scene, _case(seed=3)[0], shifted=False)
    assert namesake.GetName() == "ceph"
    third = logic.addTrainingCase(namesake, logic.detect(namesake, model=model_path, device="cpu"))
    assert (third.name, third.replaced) == ("ceph-2", [])

    # A new Logic (Slicer restarted) sees the same cases; the stored case is in world LPS.
    restarted = module.SCNLandmarksLogic(casesFolder=tmp_path / "cases", userModelsFolder=tmp_path / "models")
    assert [c.name for c in restarted.trainingCases()] == ["ceph", "ceph-2"]
    from SCNLandmarksLib.data.cases import read_case

    stored_image, stored = read_case(info.folder)
    np.testing.assert_allclose(stored.positions[1], truth.positions[1] + [-SHIFT[0], -SHIFT[1]], atol=1e-6)
    assert stored.missing.tolist() == [False, False, True]
    assert stored_image.dimension == 2
    np.testing.assert_allclose(stored_image.geometry.origin, np.array(image.geometry.origin) + [-SHIFT[0], -SHIFT[1]])
    restarted.removeTrainingCase("ceph-2")
    assert [c.name for c in logic.trainingCases()] == ["ceph"]
    with pytest.raises(ValueError, match="Select the volume"):
        logic.addTrainingCase(volume, None)
    # After switching the input volume, the other volume's points are not stored with this image.
    other = _volume(scene, _case(seed=2)[0], shifted=False)
    with pytest.raises(ValueError, match="was detected on"):
        logic.addTrainingCase(other, points)
    assert [c.name for c in logic.trainingCases()] == ["ceph"]


def test_fine_tune_blocking_and_cancel(logic, scene, model_path, tmp_path):
    from SCNLandmarksLib.data import cases

    for seed in (1, 2):
        volume = _volume(scene, _case(seed)[0], shifted=False)
        points = logic.detect(volume, model=model_path, device="cpu")
        logic.addTrainingCase(volume, points, name=f"case{seed}")
    # A case of another landmark set (stored by another model, or by hand) is left out, never learned silently.
    image, foreign = _case(3)
    foreign.names = ["X1", "X2", "X3"]
    cases.write_case(logic.casesFolder, "foreign", image, foreign)
    with pytest.raises(ValueError, match=r"landmarks the model tiny.scn.pt does not have \(X1, X2, X3\).*newLandmarks=True"):
        logic.fineTune(cases=["case1", "foreign"], fromModel=model_path, iterations=3, device="cpu")
    before = model_path.read_bytes()

    events = []
    new_model = logic.fineTune(fromModel=model_path, iterations=3, device="cpu", progressCallback=events.append)
    assert new_model == tmp_path / "models" / "tiny-ft001.scn.pt"
    assert load_model(new_model).landmark_names == NAMES
    assert events[0].stage == "started" and "2 cases" in events[0].message
    assert any(e.stage == "fine-tune" and 0 < e.fraction <= 1 for e in events)
    assert model_path.read_bytes() == before
    assert any(entry.path == new_model for entry in logic.listModels())
    # Fine-tuning the new version continues the numbering.
    job = logic.fineTune(fromModel="tiny-ft001", timeBudgetSeconds=300, device="cpu", wait=False)
    assert job.outputPath == tmp_path / "models" / "tiny-ft002.scn.pt"
    while job.lastProgress is None:
        assert job.isRunning(), job.process.stderr_tail
        job.process.wait(timeout=0.1)
    job.cancel()
    with pytest.raises(TrainingCancelled):
        job.wait(timeout=60)
    assert job.status == "cancelled" and not job.outputPath.exists()
    with pytest.raises(ValueError, match="either a number of iterations or a time budget"):
        logic.fineTune(iterations=3, timeBudgetSeconds=3, fromModel=model_path)


def test_fine_tune_without_cases_says_what_to_do(logic, model_path):
    with pytest.raises(ValueError, match="no training cases"):
        logic.fineTune(fromModel=model_path)


def test_models_listing_loading_and_resolving(logic, model_path, tmp_path):
    assert [e for e in logic.listModels() if e.source == "user"] == []
    copied = logic.loadModelFile(model_path)
    assert copied == tmp_path / "models" / "tiny.scn.pt"
    assert logic.resolveModel("tiny") == copied
    assert logic.resolveModel(str(model_path)) == model_path
    assert logic.modelDescriptionLandmarks("tiny") == NAMES
    damaged = tmp_path / "damaged.scn.pt"
    damaged.write_bytes(b"nonsense")
    with pytest.raises(ModelFileError):
        logic.loadModelFile(damaged)
    with pytest.raises(FileNotFoundError, match="available models"):
        logic.resolveModel("no such model")


def test_detect_folder_writes_files_and_skips_bad_ones(logic, model_path, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in (1, 2):
        write_image(_case(seed)[0], inputs / f"img{seed}.nrrd")
    (inputs / "broken.nrrd").write_text("not an image")
    reports = []
    report = logic.detectFolder(inputs, tmp_path / "out", model=model_path, device="cpu", progressCallback=reports.append)
    assert sorted(item.image.name for item in report.succeeded) == ["img1.nrrd", "img2.nrrd"]
    assert [item.image.name for item in report.failed] == ["broken.nrrd"]
    assert (tmp_path / "out" / "img1.mrk.json").is_file() and report.summary_csv.is_file()
    assert reports[-1].done == 3
    with pytest.raises(ValueError, match="does not exist"):
        logic.detectFolder(tmp_path / "nowhere", tmp_path / "out", model=model_path)

    # The GUI's way: a background process with progress events, the same files, and a report.
    events, finished = [], []
    job = logic.detectFolder(inputs, tmp_path / "background", model=model_path, device="cpu", wait=False,
                             progressCallback=events.append, finishedCallback=finished.append)
    assert job.wait(timeout=120) == tmp_path / "background"
    assert finished == [job] and job.status == "done"
    assert job.report["succeeded"] == 2 and [item["image"] for item in job.report["failed"]] == ["broken.nrrd"]
    assert not job.report["cancelled"] and (tmp_path / "background" / "img2.mrk.json").is_file()
    assert [e.done for e in events if e.stage != "started"] == [1, 2, 3] and events[-1].fraction == 1.0
    assert sorted(row["image"] for row in job.report["review_order"]) == ["img1", "img2"]
    # Cancelled at once: it stops between images, and what it finished stays.
    job = logic.detectFolder(inputs, tmp_path / "cancelled", model=model_path, device="cpu", wait=False)
    job.cancel()
    try:
        job.wait(timeout=120)
    except TrainingCancelled as cancelled:  # stopped before it began
        assert "images finished before it are kept" in str(cancelled)
    else:  # stopped between images: a report of what it did
        assert job.report["cancelled"] and job.report["succeeded"] < 2


def test_detect_folder_takes_the_pixel_size_of_photos_and_keeps_earlier_results(logic, model_path, tmp_path):
    """JPEG/PNG carry no pixel size: the one given reaches the background worker, and files with
    their own keep it. A rerun into the same folder keeps the earlier results unless asked, and says
    so before detecting."""
    from SCNLandmarksLib.data.landmark_io import read_mrk_json

    inputs = tmp_path / "photos"
    inputs.mkdir()
    pixels = (np.random.default_rng(0).random((60, 50)) * 255).astype(np.uint8)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(inputs / "photo.png"))
    write_image(_case(1)[0], inputs / "scan.nrrd")  # 0.8 x 1.1 mm pixels in its header
    logic.detectFolder(inputs, tmp_path / "at1mm", model=model_path, device="cpu")
    job = logic.detectFolder(inputs, tmp_path / "at02mm", model=model_path, device="cpu", pixelSizeMm=0.2, wait=False)
    assert job.wait(timeout=120) == tmp_path / "at02mm" and job.report["succeeded"] == 2
    at_1mm = read_mrk_json(tmp_path / "at1mm" / "photo.mrk.json").positions
    at_02mm = read_mrk_json(tmp_path / "at02mm" / "photo.mrk.json").positions
    np.testing.assert_allclose(at_02mm, 0.2 * at_1mm, rtol=1e-4, atol=1e-4)  # the same pixels, a fifth of the mm
    np.testing.assert_allclose(read_mrk_json(tmp_path / "at02mm" / "scan.mrk.json").positions,
                               read_mrk_json(tmp_path / "at1mm" / "scan.mrk.json").positions)  # its own pixel size

    before = (tmp_path / "at02mm" / "photo.mrk.json").read_bytes()
    job = logic.detectFolder(inputs, tmp_path / "at02mm", model=model_path, device="cpu", wait=False)
    job.wait(timeout=120)
    assert job.report["succeeded"] == 0 and len(job.report["failed"]) == 2
    assert all("exists from an earlier run and is kept" in item["error"] for item in job.report["failed"])
    assert (tmp_path / "at02mm" / "photo.mrk.json").read_bytes() == before
    job = logic.detectFolder(inputs, tmp_path / "at02mm", model=model_path, device="cpu", overwrite=True, wait=False)
    job.wait(timeout=120)
    assert job.report["succeeded"] == 2
    replaced = read_mrk_json(tmp_path / "at02mm" / "photo.mrk.json").positions
    np.testing.assert_allclose(replaced, at_1mm, rtol=1e-4, atol=1e-4)  # read at 1 mm this time


def test_requirements_are_present_here_and_never_list_slicer_packages(logic):
    logic.setupPythonRequirements(askConfirmation=False)  # torch and scipy present: nothing to do
    from SCNLandmarksLib.slicer_side.slicer_requirements import missing_requirements

    assert missing_requirements() == []
    assert logic.suggestedIterations(2) < logic.suggestedIterations(20)
    presets = logic.fineTunePresets(2)
    assert presets[0][1:] == (None, None) and str(logic.suggestedIterations(2)) in presets[0][0]
    assert any(minutes for _, _, minutes in presets)


def test_module_self_test_runs_under_slicer_core(module, scene):
    """The self-test that Slicer runs (detect -> correct -> fine-tune -> detect), here on slicer-core."""
    test = module.SCNLandmarksTest()
    test.runTest()
