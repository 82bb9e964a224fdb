"""The module's Widget driven through its main flows, on a faithful model of Slicer (not Slicer).

What is real here: the module file; Slicer 5.8.1's ``ScriptedLoadableModule.py``, ``i18n.py`` and
``parameterNodeWrapper`` (from ``../shared/slicer-python``); ``slicer.util`` and the MRML scene,
nodes and logics of the ``slicer-core`` wheel; the ``.ui`` file built by Qt's ``QUiLoader``; Qt
widgets, signals and timers (PySide6, offscreen); the engine and its background worker processes.

What is modelled (``pythonqt_model.py``): PythonQt's view of Qt objects, the Slicer/CTK widget
classes (generated from their headers), and ``slicer.app`` / ``slicer.modules`` below, which give
only what the module and ``slicer.util`` ask of them, in Slicer's testing mode (message boxes are
logged instead of shown, as in Slicer's own self-tests).

Each flow clicks the real buttons and checks what a user would see: points in the scene, labels,
enabled buttons, files written, and a cancelled fine-tuning leaving no model behind.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed (pip install PySide6-Essentials)")
pytest.importorskip("torch")

from PySide6 import QtCore  # noqa: E402

import pythonqt_model as pq  # noqa: E402
import slicer_stubs  # noqa: E402
from real_slicer_python import SKIP_REASON, SlicerState, find_slicer_python_dir, load_on_real_wrapper  # noqa: E402

class SlicerApplicationModel:
    """``slicer.app`` as far as the module, ``ScriptedLoadableModule`` and ``slicer.util`` use it."""

    applicationName = "Slicer"
    documentationBaseUrl = "https://slicer.readthedocs.io/en/latest/"

    def __init__(self) -> None:
        self._moduleManager = pq.wrap(_ModuleManager())
        self.connections: dict[str, list[Callable[[], Any]]] = {}
        self.cachePath = ""

    def connect(self, signature: str, slot: Callable[[], Any]) -> None:
        """PythonQt's ``slicer.app.connect("startupCompleted()", slot)``; :meth:`emit` runs the slots."""
        self.connections.setdefault(signature, []).append(slot)

    def emit(self, signature: str) -> None:
        for slot in self.connections.pop(signature, []):
            slot()

    def testingEnabled(self) -> bool:  # noqa: N802 - Slicer's names
        return True

    def moduleManager(self) -> Any:  # noqa: N802
        return self._moduleManager

    def startupEnvironment(self) -> QtCore.QProcessEnvironment:  # noqa: N802
        return QtCore.QProcessEnvironment.systemEnvironment()

    def topLevelWidgets(self) -> list[Any]:  # noqa: N802 - no main window: slicer.util.mainWindow() is None
        return []

    def layoutManager(self) -> None:  # noqa: N802 - no main window, so no view layout (Slicer returns None then)
        return None

    def setOverrideCursor(self, cursor: Any) -> None:  # noqa: N802
        pass

    def restoreOverrideCursor(self) -> None:  # noqa: N802
        pass

    def processEvents(self) -> None:  # noqa: N802
        QtWidgets.QApplication.processEvents()

    def translate(self, context: str, text: str) -> str:
        return text

    def moduleDocumentationUrl(self, name: str) -> str:  # noqa: N802
        return self.documentationBaseUrl


class _ModuleManager(QtCore.QObject):
    moduleAboutToBeUnloaded = QtCore.Signal(str)  # noqa: N815 - Qt's name


def _load_real_module(path: Path, name: str) -> types.ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slicer_model() -> Iterator[types.SimpleNamespace]:
    """The module loaded on the real Slicer sources, with the model of Slicer installed while this
    file's tests run (and removed afterwards, so other tests keep their stand-ins)."""
    folder = find_slicer_python_dir()
    if folder is None:
        pytest.skip(SKIP_REASON)
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    classes = pq.stand_in_classes(pq.read_headers(folder / "headers"))
    qt, ctk = pq.qt_module(classes), pq.ctk_module(classes)
    slicer_classes = pq.slicer_classes(classes)
    slicer_stubs.install()
    saved = SlicerState(("qt", "ctk", "slicer.i18n", "slicer.ScriptedLoadableModule"),
                        ("app", "modules", "selfTests", *slicer_classes))
    try:
        sys.modules["qt"], sys.modules["ctk"] = qt, ctk
        slicer.app = SlicerApplicationModel()
        for name, cls in slicer_classes.items():
            setattr(slicer, name, cls)
        i18n = _load_real_module(folder / "slicer" / "i18n.py", "slicer.i18n")
        sys.modules["slicer.i18n"] = i18n
        scripted = _load_real_module(folder / "slicer" / "ScriptedLoadableModule.py", "slicer.ScriptedLoadableModule")
        package, module = load_on_real_wrapper(
            folder, qt=qt, ctk=ctk, slicer_names=slicer_classes, module_name="SCNLandmarks_in_slicer_model",
            module_qt=qt, module_ctk=ctk,
            module_extras={"slicer.i18n": i18n, "slicer.ScriptedLoadableModule": scripted},
        )
        slicer.modules = types.SimpleNamespace(scnlandmarks=types.SimpleNamespace(path=str(slicer_stubs.MODULE_FILE)))
        # load_on_real_wrapper restores what it touched; the model stays installed for these tests.
        sys.modules["qt"], sys.modules["ctk"] = qt, ctk
        for name, cls in slicer_classes.items():
            setattr(slicer, name, cls)
        yield types.SimpleNamespace(module=module, qt=qt, ctk=ctk, app=app, scripted=scripted)
    finally:
        saved.restore()


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Run Qt's event loop (timers deliver the worker's events) until ``condition`` or the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        QtWidgets.QApplication.processEvents(QtCore.QEventLoop.AllEvents, 50)
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def panel(slicer_model: types.SimpleNamespace, mrml_scene: dict[str, Any], scene: Any, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """The module panel as Slicer builds it: Widget(parent) then setup() and enter()."""
    monkeypatch.setenv("SCN_CASES_DIR", str(tmp_path / "cases"))
    monkeypatch.setenv("SCN_USER_MODELS_DIR", str(tmp_path / "models"))
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, str(tmp_path / "settings"))
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    errors: list[str] = []
    previous_hook = sys.excepthook
    sys.excepthook = lambda kind, value, trace: errors.append(f"{kind.__name__}: {value}")  # errors in Qt slots
    qt = slicer_model.qt
    parent = slicer.qMRMLWidget()
    parent.setLayout(qt.QVBoxLayout())
    parent.setMRMLScene(scene)
    widget = slicer_model.module.SCNLandmarksWidget(parent)
    widget.setup()
    widget.enter()
    try:
        yield types.SimpleNamespace(widget=widget, ui=widget.ui, scene=scene, tmp=tmp_path, errors=errors,
                                    module=slicer_model.module, mrml=mrml_scene)
    finally:
        widget.exit()
        widget.cleanup()
        for job in (widget._detectJob, widget._fineTuneJob, widget._batchJob):
            if job is not None and job.isRunning():
                job.cancel()
                wait_until(lambda job=job: not job.isRunning(), 60)
        pq.unwrap(parent).deleteLater()
        sys.excepthook = previous_hook


def radiograph_volume(scene: Any, name: str = "Ceph") -> Any:
    """A single-slice scalar volume (how Slicer loads a radiograph): 0.1 mm pixels, non-zero origin."""
    rng = np.random.default_rng(3)
    pixels = (rng.random((1, 240, 200)) * 60).astype(np.float32)
    pixels[0, 60:180, 50:150] += 120.0  # something to look at
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume.SetSpacing(0.5, 0.5, 1.0)
    volume.SetOrigin(-30.0, 12.0, 4.0)
    slicer.util.updateVolumeFromArray(volume, pixels)
    return volume


def test_setup_lists_the_bundled_model_and_waits_for_a_volume(panel: types.SimpleNamespace) -> None:
    ui = panel.ui
    assert ui.modelComboBox.count >= 1
    assert "ceph" in ui.modelComboBox.currentText.lower()
    assert ui.detectButton.enabled is False  # no volume yet
    assert ui.cancelFineTuneButton.enabled is False and ui.batchCancelButton.enabled is False
    assert ui.casesTableWidget.rowCount == 0
    assert str(panel.tmp / "cases") in ui.casesFolderLabel.text
    assert panel.errors == []


def test_detect_add_case_and_fine_tune_then_cancel(panel: types.SimpleNamespace) -> None:
    ui, widget = panel.ui, panel.widget
    volume = radiograph_volume(panel.scene)
    ui.inputVolumeSelector.setCurrentNode(volume)  # as a user picking it in the selector
    assert widget._parameterNode.inputVolume is volume
    assert ui.detectButton.enabled is True

    ui.detectButton.click()
    # The network runs on a worker thread: the panel stays live and Detect cannot be clicked twice.
    assert widget._detectJob.isRunning() and ui.detectButton.enabled is False
    assert "Detecting" in ui.detectStatusLabel.text
    assert wait_until(lambda: not widget._detectJob.isRunning(), 120), "detection did not finish"
    assert widget._detectJob.status == "done", widget._detectJob.errorMessage
    assert ui.detectButton.enabled is True
    points = widget._parameterNode.landmarksNode
    assert points is not None and ui.landmarksSelector.currentNode() is points
    assert points.GetNumberOfControlPoints() == 19
    assert panel.module.sourceVolumeID(points) == volume.GetID()
    assert "19" in ui.detectStatusLabel.text
    assert ui.addCaseButton.enabled is True

    ui.addCaseButton.click()
    assert ui.casesTableWidget.rowCount == 1
    assert ui.casesTableWidget.item(0, 0).text() == "Ceph"
    assert (panel.tmp / "cases").is_dir() and any((panel.tmp / "cases").iterdir())
    assert ui.fineTuneButton.enabled is True

    widget._parameterNode.batchInputFolder = panel.tmp / "cases"
    widget._parameterNode.batchOutputFolder = panel.tmp / "out"
    assert ui.batchRunButton.enabled is True
    ui.fineTuneButton.click()
    assert widget._fineTuneJob is not None and widget._fineTuneJob.isRunning()
    assert ui.cancelFineTuneButton.enabled is True and ui.fineTuneButton.enabled is False
    assert ui.batchRunButton.enabled is False  # never both at once: each would get half the computer
    ui.cancelFineTuneButton.click()
    assert wait_until(lambda: not widget._fineTuneJob.isRunning(), 120), "the worker did not stop"
    assert widget._fineTuneJob.status == "cancelled"
    assert "Cancelled" in ui.fineTuneStatusLabel.text
    assert ui.cancelFineTuneButton.enabled is False and ui.fineTuneButton.enabled is True
    assert ui.batchRunButton.enabled is True
    models = panel.tmp / "models"
    assert not models.exists() or not list(models.glob("*.scn.pt")), "a cancelled fine-tuning wrote a model"
    assert panel.errors == []


def test_batch_detection_runs_in_the_background(panel: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two noise images and the bundled cephalogram, a JPEG: no pixel size in the files."""
    import shutil

    import SimpleITK as sitk
    from SCNLandmarksLib.data.landmark_io import read_mrk_json
    from SCNLandmarksLib.data.sample import SAMPLE_IMAGE, SAMPLE_SPACING_MM

    warnings: list[tuple[str, str]] = []
    monkeypatch.setattr(slicer.util, "warningDisplay",
                        lambda text, detailedText="", **kwargs: warnings.append((text, detailedText)))
    ui, widget = panel.ui, panel.widget
    images, results = panel.tmp / "images", panel.tmp / "results"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        pixels = (rng.random((200, 160)) * 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(pixels), str(images / f"image{index}.png"))
    shutil.copy(SAMPLE_IMAGE, images / "ceph.jpg")
    widget._parameterNode.batchInputFolder = images
    widget._parameterNode.batchOutputFolder = results
    assert ui.batchInputPathLineEdit.currentPath == str(images)
    assert ui.batchRunButton.enabled is True
    ui.batchPixelSizeSpinBox.value = SAMPLE_SPACING_MM  # as a user who knows the detector's pixel size

    ui.batchRunButton.click()
    assert ui.batchCancelButton.enabled is True and ui.batchRunButton.enabled is False
    assert wait_until(lambda: not widget._batchRunning, 180), "batch detection did not finish"
    assert sorted(p.name for p in results.glob("*.mrk.json")) == ["ceph.mrk.json", "image0.mrk.json", "image1.mrk.json"]
    assert (results / "landmarks.csv").is_file()
    assert ui.batchProgressBar.value == 100
    assert ui.batchCancelButton.enabled is False and ui.batchRunButton.enabled is True
    assert warnings == []  # the cephalogram at its true pixel size spans a plausible size

    # Run again into the same folder: the results are kept and the user is told why nothing was done.
    before = (results / "image0.mrk.json").read_bytes()
    at_01mm = read_mrk_json(results / "image0.mrk.json").positions
    ui.batchPixelSizeSpinBox.value = 0.0  # "not given": read at 1 mm
    ui.batchRunButton.click()
    assert wait_until(lambda: not widget._batchRunning, 180), "batch detection did not finish"
    assert "0 images done, 3 skipped" in ui.batchStatusLabel.text
    assert len(warnings) == 1 and "exists from an earlier run and is kept" in warnings[0][1]
    assert (results / "image0.mrk.json").read_bytes() == before
    # Asked to replace them, it does, at 1 mm per pixel now: ten times the distances, and the
    # cephalogram, which the model knows, is ten times the size of its training shapes.
    ui.batchOverwriteCheckBox.checked = True
    ui.batchRunButton.click()
    assert wait_until(lambda: not widget._batchRunning, 180), "batch detection did not finish"
    assert "3 images done, 0 skipped" in ui.batchStatusLabel.text
    # The global stage sees the same pixels; the local stage reads 0.3 mm crops, so not exactly ten times.
    ratio = np.linalg.norm(read_mrk_json(results / "image0.mrk.json").positions, axis=1) / np.linalg.norm(at_01mm, axis=1)
    assert np.median(ratio) == pytest.approx(10.0, rel=0.1)
    assert len(warnings) == 2 and warnings[1][1].startswith("ceph.jpg: ")
    assert "pixel size (1 x 1 mm) is probably wrong" in warnings[1][1]
    assert panel.errors == []


def test_the_sample_is_offered_in_sample_data_with_its_true_pixel_size(
    slicer_model: types.SimpleNamespace, mrml_scene: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registered once Slicer has started, as a NRRD whose pixels are 0.1 mm (the JPEG has none)."""
    registered: list[dict[str, Any]] = []

    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,  # noqa: N802, ANN001, ANN202
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileType="VolumeFile", loadFiles=None, loadFileProperties=None,
                                       checksums=None):
        """Slicer 5.8's SampleDataLogic.registerCustomSampleDataSource signature (recording only)."""
        registered.append(dict(locals()))

    sample_data = types.SimpleNamespace(SampleDataLogic=types.SimpleNamespace(
        registerCustomSampleDataSource=registerCustomSampleDataSource))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    monkeypatch.setattr(slicer.app, "cachePath", str(tmp_path))
    description = types.SimpleNamespace(path=str(slicer_stubs.MODULE_FILE))
    slicer_model.module.SCNLandmarks(description)
    assert description.title == "SCN Landmarks" and "Quantification" in description.categories
    assert registered == []  # nothing happens before Slicer has started
    slicer.app.emit("startupCompleted()")

    assert len(registered) == 1
    source = registered[0]
    assert source["category"] == "SCNLandmarks" and source["loadFileType"] == "VolumeFile"
    assert Path(source["thumbnailFileName"]).is_file()
    volume_file = Path(source["uris"].removeprefix("file://"))
    assert volume_file.is_file() and volume_file.is_relative_to(tmp_path)
    assert source["fileNames"].endswith(".nrrd")
    # Loaded by Slicer's own volume reader (what Sample Data does), the pixels are 0.1 mm.
    storage = mrml_scene["scene"].AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(volume_file))
    volume = mrml_scene["scene"].AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert storage.ReadData(volume)
    assert volume.GetSpacing()[:2] == pytest.approx((0.1, 0.1))
    assert volume.GetImageData().GetDimensions()[:2] == (1935, 2400)


def test_a_package_already_in_use_asks_for_a_restart(slicer_model: types.SimpleNamespace, monkeypatch) -> None:
    import slicer
    from SCNLandmarksLib.slicer_side import slicer_requirements
    from SCNLandmarksLib.slicer_side.slicer_requirements import packages_already_imported, requirement_name

    assert requirement_name("scipy >=1.10; python_version>'3.9'") == "scipy"
    assert requirement_name("SimpleITK[extra]==2.3") == "SimpleITK"
    assert packages_already_imported(["numpy>=1.0", "not-a-package-here>=1"]) == ["numpy"]
    assert slicer_requirements.in_slicer_application()
    calls = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: calls.append("ok?") or True, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirement: calls.append(f"pip {requirement}"), raising=False)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda *a, **k: calls.append("restart?") or True, raising=False)
    monkeypatch.setattr(slicer.util, "restart", lambda: calls.append("restart"), raising=False)
    slicer_requirements._pip_install(["numpy>=1.0", "not-a-package-here>=1"], ask_confirmation=True)
    assert calls == ["ok?", "pip numpy>=1.0", "pip not-a-package-here>=1", "restart?", "restart"]
    calls.clear()
    slicer_requirements._pip_install(["not-a-package-here>=1"], ask_confirmation=False)
    assert calls == ["pip not-a-package-here>=1"]  # nothing in use: no restart asked


def test_a_detection_that_fails_says_why_and_frees_the_panel(panel: types.SimpleNamespace) -> None:
    ui, widget = panel.ui, panel.widget
    volume = panel.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Stack")
    slicer.util.updateVolumeFromArray(volume, np.zeros((5, 64, 64), dtype=np.float32))  # 3D; the model is 2D
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.detectButton.click()
    assert wait_until(lambda: not widget._detectJob.isRunning(), 120)
    assert widget._detectJob.status == "failed"
    assert "failed" in ui.detectStatusLabel.text and "expects a 2D image" in ui.detectStatusLabel.text
    assert widget._parameterNode.landmarksNode is None
    assert ui.detectButton.enabled is True
    assert panel.errors == []


def test_a_cancelled_detection_makes_no_point_list(panel: types.SimpleNamespace) -> None:
    volume = radiograph_volume(panel.scene)
    before = panel.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")
    job = panel.widget.logic.detect(volume, wait=False)
    job.cancel()
    assert job.wait() is None and job.status == "cancelled"
    assert panel.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == before


def test_a_volume_whose_pixel_size_cannot_be_right_is_named(panel: types.SimpleNamespace,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A radiograph loaded from a JPEG gets 1 mm pixels in Slicer: the shape found is then many times
    the training shapes' size, and the panel says what to fix instead of showing distances that are wrong."""
    from SCNLandmarksLib.data.sample import SAMPLE_IMAGE, SAMPLE_SPACING_MM
    from SCNLandmarksLib.imaging.image_io import read_image
    from SCNLandmarksLib.slicer_side import mrml_adapter

    warnings: list[str] = []
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, **kwargs: warnings.append(text))
    ui, widget = panel.ui, panel.widget
    # As Slicer's ITK reader gives a dropped JPEG: 1 mm pixels, LPS axes (slicer-core reads no JPEG).
    volume = mrml_adapter.volume_node_from_image(read_image(SAMPLE_IMAGE), scene=panel.scene, name="Ceph151")
    assert volume.GetSpacing()[:2] == pytest.approx((1.0, 1.0))
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.detectButton.click()
    assert wait_until(lambda: not widget._detectJob.isRunning(), 120) and widget._detectJob.status == "done"
    assert widget.logic.lastWarning is not None and "pixel size (1 x 1 mm) is probably wrong" in widget.logic.lastWarning
    assert warnings == [widget.logic.lastWarning] and widget.logic.lastWarning in ui.detectStatusLabel.text
    volume.SetSpacing(SAMPLE_SPACING_MM, SAMPLE_SPACING_MM, 1.0)  # the user sets the true pixel size
    ui.detectButton.click()
    assert wait_until(lambda: not widget._detectJob.isRunning(), 120) and widget._detectJob.status == "done"
    assert widget.logic.lastWarning is None and len(warnings) == 1
    assert widget.logic._detector.last_size_ratio == pytest.approx(1.0, abs=0.15)
    assert panel.errors == []


@pytest.mark.filterwarnings("ignore:does not have observer")  # the fixture closes the module again
def test_closing_slicer_stops_a_running_batch(panel: types.SimpleNamespace) -> None:
    """The batch worker runs in a process of its own; closing Slicer (``cleanup``) must not leave it running."""
    import SimpleITK as sitk

    ui, widget = panel.ui, panel.widget
    images = panel.tmp / "many"
    images.mkdir()
    rng = np.random.default_rng(1)
    for index in range(30):
        sitk.WriteImage(sitk.GetImageFromArray((rng.random((300, 240)) * 255).astype(np.uint8)),
                        str(images / f"image{index:02d}.png"))
    widget._parameterNode.batchInputFolder = images
    widget._parameterNode.batchOutputFolder = panel.tmp / "many-results"
    ui.batchRunButton.click()
    job = widget._batchJob
    assert job.isRunning()
    widget.cleanup()
    assert wait_until(lambda: not job.isRunning(), 60), "the batch went on after Slicer closed"
    assert job.status == "cancelled" or (job.status == "done" and job.report["cancelled"])
    assert len(list((panel.tmp / "many-results").glob("*.mrk.json"))) < 30


def test_points_are_shown_only_over_the_image_they_were_found_on(panel: types.SimpleNamespace) -> None:
    """Radiographs share one plane: a list left on screen over another image would be corrected
    against the wrong anatomy. Detection shows its volume and hides the module's other lists."""
    ui, widget, scene = panel.ui, panel.widget, panel.scene
    views = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # what a slice view shows
    first, second = radiograph_volume(scene, "First"), radiograph_volume(scene, "Second")

    def detect_on(volume: Any) -> Any:
        ui.inputVolumeSelector.setCurrentNode(volume)
        ui.detectButton.click()
        assert wait_until(lambda: not widget._detectJob.isRunning(), 120) and widget._detectJob.status == "done"
        assert views.GetBackgroundVolumeID() == volume.GetID()
        return widget._parameterNode.landmarksNode

    on_first = detect_on(first)
    position = [0.0, 0.0, 0.0]
    on_first.GetNthControlPointPositionWorld(0, position)
    on_first.SetNthControlPointPositionWorld(0, position[0] + 5.0, position[1], position[2])  # a correction
    on_second = detect_on(second)
    assert not on_first.GetDisplayNode().GetVisibility() and on_second.GetDisplayNode().GetVisibility()
    assert f"Hidden, not deleted: {on_first.GetName()}" in ui.detectStatusLabel.text
    again = detect_on(first)  # the edited list is kept, hidden, beside the new one
    assert again is not on_first and again.GetDisplayNode().GetVisibility()
    assert not on_first.GetDisplayNode().GetVisibility() and not on_second.GetDisplayNode().GetVisibility()
    # Choosing a hidden list again shows it, over its own image.
    ui.landmarksSelector.setCurrentNode(on_second)
    assert on_second.GetDisplayNode().GetVisibility() and not again.GetDisplayNode().GetVisibility()
    assert views.GetBackgroundVolumeID() == second.GetID()
    assert panel.errors == []


def test_a_dragged_point_stops_asking_to_be_checked(panel: types.SimpleNamespace) -> None:
    ui, widget = panel.ui, panel.widget
    volume = radiograph_volume(panel.scene)
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.detectButton.click()
    assert wait_until(lambda: not widget._detectJob.isRunning(), 120) and widget._detectJob.status == "done"
    points = widget._parameterNode.landmarksNode
    flagged = [i for i in range(points.GetNumberOfControlPoints()) if not points.GetNthControlPointSelected(i)]
    before = widget.logic.pointsToCheckCount(points)
    assert flagged and before == len(flagged)
    position = [0.0, 0.0, 0.0]
    points.GetNthControlPointPositionWorld(flagged[0], position)
    points.SetNthControlPointPositionWorld(flagged[0], position[0] + 4.0, position[1], position[2])
    points.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)  # the end of a drag in a view
    assert points.GetNthControlPointSelected(flagged[0])
    assert points.GetNthControlPointDescription(flagged[0]).endswith("corrected=yes")
    assert widget.logic.pointsToCheckCount(points) == before - 1
    assert panel.errors == []


def test_adding_a_case_keeps_the_chosen_fine_tune_preset(panel: types.SimpleNamespace) -> None:
    """The preset list is rebuilt for the new number of cases; the user's choice must survive it."""
    ui, widget = panel.ui, panel.widget
    combo, parameters = ui.fineTunePresetComboBox, widget._parameterNode
    combo.setCurrentIndex(3)  # "Time budget: 5 minutes", as a user picks it (Qt then emits activated(3))
    widget.onFineTunePreset(3)
    assert parameters.useTimeBudget is True and parameters.timeBudgetMinutes == pytest.approx(5.0)
    widget.updateCasesTable()  # what Add case and Remove case do
    assert combo.currentIndex == 3 and parameters.useTimeBudget is True
    parameters.useTimeBudget, parameters.fineTuneIterations = False, 777  # set by hand
    widget.updateCasesTable()
    assert combo.currentIndex == -1 and parameters.fineTuneIterations == 777  # no preset claims it
    parameters.fineTuneIterations = 0
    widget.updateCasesTable()
    assert combo.currentIndex == 0  # "Recommended"
    assert panel.errors == []
