"""The module's ``.ui`` file and its binding to the parameter node, against Slicer's real code.

This is a faithful model of Slicer, not Slicer itself (see ``pythonqt_model.py``):

- the real ``SCNLandmarks.ui`` is built by Qt's own ``QUiLoader`` (PySide6, offscreen), with the
  Slicer/CTK widget classes generated from the C++ headers of Slicer 5.8.1 and CTK in
  ``../shared/slicer-python/headers``, so a misspelt class, property, enum value or signal
  connection is caught here rather than silently ignored in Slicer;
- the parameter node is declared with Slicer 5.8.1's real ``parameterNodeWrapper`` on a real
  MRML scene (``slicer-core``), and bound to those widgets with Slicer's real GUI connectors
  (``guiConnectors.py``), which see the widgets through a PythonQt-like view.

Skips with a clear message where ``../shared/slicer-python`` (or ``$SLICER_PYTHON_DIR``), PySide6
or slicer-core is absent.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed (pip install PySide6-Essentials)")

from PySide6 import QtCore  # noqa: E402

import pythonqt_model as pq  # noqa: E402
from real_slicer_python import REPOSITORY, SKIP_REASON, SlicerState, find_slicer_python_dir, load_on_real_wrapper  # noqa: E402

UI_FILE = REPOSITORY / "SCNLandmarks" / "Resources" / "UI" / "SCNLandmarks.ui"
DYNAMIC_PROPERTIES = {"SlicerParameterName", "SlicerPackParameterName"}


@pytest.fixture(scope="module")
def slicer_python() -> Path:
    folder = find_slicer_python_dir()
    if folder is None:
        pytest.skip(SKIP_REASON)
    return folder


@pytest.fixture(scope="module")
def application() -> QtWidgets.QApplication:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


@pytest.fixture(scope="module")
def headers(slicer_python: Path) -> dict[str, pq.HeaderClass]:
    return pq.read_headers(slicer_python / "headers")


@pytest.fixture(scope="module")
def classes(headers: dict[str, pq.HeaderClass], application: QtWidgets.QApplication) -> dict[str, type]:
    return pq.stand_in_classes(headers)


@contextlib.contextmanager
def qt_messages() -> Iterator[list[str]]:
    """Qt's warnings while the block runs (QUiLoader reports unknown signals, slots and values there)."""
    messages: list[str] = []
    previous = QtCore.qInstallMessageHandler(lambda kind, context, text: messages.append(text))
    try:
        yield messages
    finally:
        QtCore.qInstallMessageHandler(previous)


def ui_problems(path: Path, classes: dict[str, type], headers: dict[str, pq.HeaderClass]) -> list[str]:
    """Everything in a ``.ui`` file that real Slicer would not honour, one message each."""
    problems = []
    with qt_messages() as messages:
        root = pq.load_ui(path, classes)
    for message in messages:
        if "could not be read" in message and "set-type property" in message:
            continue  # flag values of stand-in classes: checked against the headers below
        problems.append("Qt: " + message.strip())
    for item in pq.read_ui_file(path):
        built = root if item.name == root.objectName() else root.findChild(QtCore.QObject, item.name)
        if built is None or built.metaObject().className() != item.class_name:
            problems.append(f"{item.name}: class {item.class_name} is not a Qt class nor one of the headers")
            continue
        meta = built.metaObject()
        for name, element in item.properties.items():
            if name in item.dynamic:
                if name not in DYNAMIC_PROPERTIES:
                    problems.append(f"{item.name}: dynamic property {name} is read by nothing")
                continue
            if meta.indexOfProperty(name) < 0:
                problems.append(f"{item.name}: {item.class_name} has no property {name}")
            for value in element.iter("set"):
                for flag in (value.text or "").split("|"):
                    owner, _, enumerator = flag.strip().rpartition("::")
                    header = headers.get(owner)
                    known = enumerator in header.enum_values if header else hasattr(QtCore.Qt, enumerator) or hasattr(
                        getattr(QtWidgets, owner, None), enumerator)
                    if not known:
                        problems.append(f"{item.name}: {flag.strip()} is not declared")
    root.deleteLater()
    return problems


def test_the_ui_file_builds_with_every_class_property_value_and_connection_real(
    classes: dict[str, type], headers: dict[str, pq.HeaderClass]
) -> None:
    assert ui_problems(UI_FILE, classes, headers) == []


def test_a_misspelt_ui_is_caught(tmp_path: Path, classes: dict[str, type], headers: dict[str, pq.HeaderClass]) -> None:
    """The checks above can fail: each kind of mistake in a copy of the file is reported."""
    text = UI_FILE.read_text(encoding="utf-8")
    broken = tmp_path / "broken.ui"
    mistakes = {
        '<property name="noneEnabled">': '<property name="noneEnable">',  # property
        "ctkPathLineEdit::NoDotDot": "ctkPathLineEdit::NoDotDots",  # flag value
        "<slot>setMRMLScene(vtkMRMLScene*)</slot>": "<slot>setMrmlScene(vtkMRMLScene*)</slot>",  # connection
        'class="ctkCollapsibleButton" name="batchCollapsibleButton"': 'class="ctkCollapsibleButon" name="batchCollapsibleButton"',
    }
    for right, wrong in mistakes.items():
        assert right in text, right
        broken.write_text(text.replace(right, wrong, 1), encoding="utf-8")
        problems = ui_problems(broken, classes, headers)
        assert problems, f"not caught: {wrong}"


def test_headers_are_read_as_declared(headers: dict[str, pq.HeaderClass]) -> None:
    slider = headers["ctkSliderWidget"]
    assert slider.base == "QWidget"
    assert slider.properties["value"] == "double"
    assert slider.signals["valueChanged"] == ("double",)
    combo = headers["qMRMLNodeComboBox"]
    assert combo.properties["nodeTypes"] == "QStringList"
    assert combo.signals["currentNodeChanged"] == ("vtkMRMLNode*",)
    assert {"setCurrentNode", "setMRMLScene"} <= combo.slots
    assert {"Dirs", "NoDot", "NoDotDot"} <= headers["ctkPathLineEdit"].enum_values


# --- The parameter node bound to the widgets by Slicer's real GUI connectors -------------------


@pytest.fixture(scope="module")
def bound_module(slicer_python: Path, classes: dict[str, type]) -> Iterator[types.SimpleNamespace]:
    """The real wrapper whose GUI connectors see the PythonQt-like ``qt``/``ctk``/``slicer`` classes,
    and the module on it. The ``slicer`` class names stay set while this file's tests run."""
    qt, ctk = pq.qt_module(), pq.ctk_module(classes)
    on_slicer = pq.slicer_classes(classes)
    package, module = load_on_real_wrapper(
        slicer_python, qt=qt, ctk=ctk, slicer_names=on_slicer, module_name="SCNLandmarks_bound_to_ui",
    )
    saved = SlicerState(attribute_names=list(on_slicer))
    for name, cls in on_slicer.items():
        setattr(slicer, name, cls)
    yield types.SimpleNamespace(pnw=package, module=module, qt=qt, ctk=ctk)
    saved.restore()


@pytest.fixture
def bound(bound_module: types.SimpleNamespace, classes: dict[str, type], scene: Any) -> Iterator[types.SimpleNamespace]:
    """The built .ui (PythonQt view), a parameter node on the real scene, and the binding's tag."""
    root = pq.wrap(pq.load_ui(UI_FILE, classes))
    root.setMRMLScene(scene)
    # What slicer.util.childWidgetVariables gives the Widget: every named child as an attribute.
    ui = types.SimpleNamespace(**{w.objectName: w for w in root.findChildren(bound_module.qt.QWidget) if w.objectName})
    parameters = bound_module.module.SCNLandmarksParameterNode(scene.AddNode(slicer.vtkMRMLScriptedModuleNode()))
    tag = bound_module.module.connectParameterNodeToGui(parameters, ui)
    widgets = {w.property("SlicerParameterName"): w for w in vars(ui).values() if w.property("SlicerParameterName")}
    yield types.SimpleNamespace(root=root, ui=ui, parameters=parameters, tag=tag, widgets=widgets, scene=scene,
                                **vars(bound_module))
    parameters.disconnectGui(tag)
    pq.unwrap(root).deleteLater()


def test_every_parameter_has_exactly_one_widget(bound: types.SimpleNamespace) -> None:
    assert set(bound.widgets) == set(bound.module.SCNLandmarksParameterNode.allParameters)
    connectors = bound.parameters._parameterGUIs[bound.tag]
    assert {name: type(c).__name__ for name, c in connectors.items()} == {
        "inputVolume": "qMRMLNodeComboBoxToNodeConnector",
        "landmarksNode": "qMRMLNodeComboBoxToNodeConnector",
        "device": "QComboBoxToEnumConnector",
        "confidenceThreshold": "QDoubleSpinBoxCtkSliderWidgetToFloatConnector",
        "checkAboveMm": "QDoubleSpinBoxCtkSliderWidgetToFloatConnector",
        "fineTuneIterations": "QSliderOrSpinBoxToIntConnector",
        "useTimeBudget": "QCheckBoxToBoolConnector",
        "timeBudgetMinutes": "QDoubleSpinBoxCtkSliderWidgetToFloatConnector",
        "batchInputFolder": "ctkPathLineEditToPathConnector",
        "batchOutputFolder": "ctkPathLineEditToPathConnector",
        "batchPixelSizeMm": "QDoubleSpinBoxCtkSliderWidgetToFloatConnector",
        "batchOverwrite": "QCheckBoxToBoolConnector",
    }


def test_widgets_show_the_defaults_and_the_declared_ranges(bound: types.SimpleNamespace) -> None:
    w, module = bound.widgets, bound.module
    assert w["confidenceThreshold"].value == pytest.approx(module.DEFAULT_LOW_CONFIDENCE_THRESHOLD)
    assert (w["checkAboveMm"].minimum, w["checkAboveMm"].maximum) == (0.0, 10.0)
    assert (w["fineTuneIterations"].minimum, w["fineTuneIterations"].maximum, w["fineTuneIterations"].value) == (0, 100000, 0)
    assert w["timeBudgetMinutes"].minimum == pytest.approx(0.5)
    assert w["useTimeBudget"].checked is False
    assert (w["batchPixelSizeMm"].minimum, w["batchPixelSizeMm"].maximum, w["batchPixelSizeMm"].value) == (0.0, 10.0, 0.0)
    assert w["batchPixelSizeMm"].specialValueText == "not given (1 mm)"  # 0: photos are read at 1 mm
    assert w["batchOverwrite"].checked is False  # earlier results are kept unless asked
    labels = [w["device"].itemText(i) for i in range(w["device"].count)]
    assert len(labels) == len(module.ComputeDevice) and w["device"].currentIndex == list(module.ComputeDevice).index(
        module.ComputeDevice.AUTO)
    assert w["inputVolume"].nodeTypes == ["vtkMRMLScalarVolumeNode"]
    assert w["landmarksNode"].nodeTypes == ["vtkMRMLMarkupsFiducialNode"]


def test_parameter_changes_reach_the_widgets(bound: types.SimpleNamespace, tmp_path: Path) -> None:
    p, w, module = bound.parameters, bound.widgets, bound.module
    volume = bound.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    p.inputVolume = volume
    p.checkAboveMm = 2.5
    p.fineTuneIterations = 1234
    p.useTimeBudget = True
    p.device = module.ComputeDevice.CPU
    p.batchInputFolder = tmp_path
    assert w["inputVolume"].currentNode() is volume
    assert w["checkAboveMm"].value == pytest.approx(2.5)
    assert w["fineTuneIterations"].value == 1234
    assert w["useTimeBudget"].checked is True
    assert w["device"].currentIndex == list(module.ComputeDevice).index(module.ComputeDevice.CPU)
    assert Path(w["batchInputFolder"].currentPath) == tmp_path


def test_widget_edits_reach_the_mrml_node(bound: types.SimpleNamespace, tmp_path: Path) -> None:
    p, w, module = bound.parameters, bound.widgets, bound.module
    points = bound.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    w["landmarksNode"].setCurrentNode(points)
    w["confidenceThreshold"].value = 0.45
    w["timeBudgetMinutes"].value = 7.5
    w["useTimeBudget"].checked = True
    w["fineTuneIterations"].value = 42
    w["device"].currentIndex = list(module.ComputeDevice).index(module.ComputeDevice.CPU)
    w["batchOutputFolder"].currentPath = str(tmp_path)
    assert p.landmarksNode is points
    assert p.confidenceThreshold == pytest.approx(0.45)
    assert p.timeBudgetMinutes == pytest.approx(7.5)
    assert p.useTimeBudget is True
    assert p.fineTuneIterations == 42
    assert p.device is module.ComputeDevice.CPU
    assert p.batchOutputFolder == tmp_path
    # Stored in the MRML node itself (what a saved scene keeps), by the real serializers.
    node = p.parameterNode
    assert float(node.GetParameter("confidenceThreshold")) == pytest.approx(0.45)
    assert node.GetNodeReference("landmarksNode") is points


def test_leaving_the_module_unbinds_the_widgets(bound: types.SimpleNamespace) -> None:
    """The module's tag really disconnects (Slicer 5.8.1's own connectGui returns None, issue #7547)."""
    assert bound.tag is not None
    bound.parameters.disconnectGui(bound.tag)
    bound.widgets["checkAboveMm"].value = 6.0
    assert bound.parameters.checkAboveMm == pytest.approx(0.0)
    bound.parameters.checkAboveMm = 1.5
    assert bound.widgets["checkAboveMm"].value == pytest.approx(6.0)
    bound.tag = bound.module.connectParameterNodeToGui(bound.parameters, bound.ui)  # the fixture disconnects it
    assert bound.widgets["checkAboveMm"].value == pytest.approx(1.5)

