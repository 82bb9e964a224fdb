"""The module's parameter node, declared with 3D Slicer's REAL ``parameterNodeWrapper``.

This is a faithful model of Slicer, not Slicer itself. The other tests load ``SCNLandmarks.py``
with a hand-written stand-in for ``slicer.parameterNodeWrapper`` (``slicer_stubs.py``) that only
stores plain attributes. Here the module file is loaded with the unchanged Slicer 5.8.1 sources of
``slicer/parameterNodeWrapper/`` (serializers, validators, wrapper) read from
``../shared/slicer-python`` (or ``$SLICER_PYTHON_DIR``), running on the real MRML classes of the
``slicer-core`` wheel: a real ``vtkMRMLScriptedModuleNode`` in a real ``vtkMRMLScene``. So the
defaults, the storage of each parameter in the MRML node, the node-reference type checks and the
``WithinRange`` validators are Slicer's own code, not a re-implementation.

What is still stood in, and why:

- ``qt`` / ``ctk`` for the wrapper package: modules holding only the names the package evaluates
  at import time (in annotations of its GUI connectors): ``qt.QWidget, QLineEdit, QLabel,
  QTextEdit, QPushButton`` and ``ctk.ctkPathLineEdit, ctkDirectoryButton``, as empty classes. Any
  other attribute raises ``AttributeError``, so a use outside import time would fail loudly. The
  GUI connectors themselves (``connectGui``) are not exercised: they need real widgets.
- ``slicer.qMRMLNodeComboBox``: same reason (one annotation); set only while the package is
  imported, then removed again from the ``slicer`` package.
- ``slicer.i18n``, ``slicer.ScriptedLoadableModule`` and the ``qt``/``ctk`` that the module file
  itself imports: the stand-ins of ``slicer_stubs.py`` (the module file only subclasses and calls
  them; they play no part in the parameter node).

Everything registered in ``sys.modules`` (and on the ``slicer`` package) for this is undone after
loading, so the other tests keep seeing the stand-ins of ``slicer_stubs.py``.
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path
from typing import Any

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
vtk = pytest.importorskip("vtk")

import slicer_stubs  # noqa: E402
from real_slicer_python import PACKAGE, SKIP_REASON, find_slicer_python_dir, load_on_real_wrapper  # noqa: E402


# The names the real package evaluates at import time (found by importing it; see module docstring).
QT_IMPORT_TIME_NAMES = ("QWidget", "QLineEdit", "QLabel", "QTextEdit", "QPushButton")
CTK_IMPORT_TIME_NAMES = ("ctkPathLineEdit", "ctkDirectoryButton")
SLICER_IMPORT_TIME_NAMES = ("qMRMLNodeComboBox",)

FIELDS = {
    "inputVolume", "landmarksNode", "device", "confidenceThreshold", "checkAboveMm",
    "fineTuneIterations", "useTimeBudget", "timeBudgetMinutes", "batchInputFolder", "batchOutputFolder",
    "batchPixelSizeMm", "batchOverwrite",
}


def _minimal_module(name: str, class_names: tuple[str, ...]) -> types.ModuleType:
    """A module holding only empty placeholder classes of the given names (nothing else)."""
    module = types.ModuleType(name)
    module.__doc__ = "Import-time placeholders for the real parameterNodeWrapper: " + ", ".join(class_names)
    for class_name in class_names:
        setattr(module, class_name, type(class_name, (), {"__module__": name}))
    return module


def _load_real(slicer_python: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The real wrapper package and ``SCNLandmarks.py`` on it, with import-time placeholders only."""
    return load_on_real_wrapper(
        slicer_python,
        qt=_minimal_module("qt", QT_IMPORT_TIME_NAMES),
        ctk=_minimal_module("ctk", CTK_IMPORT_TIME_NAMES),
        slicer_names={name: type(name, (), {"__module__": "slicer"}) for name in SLICER_IMPORT_TIME_NAMES},
        module_name="SCNLandmarks_with_real_parameterNodeWrapper",
    )


@pytest.fixture(scope="module")
def real() -> types.SimpleNamespace:
    """The real wrapper package (``pnw``), the module loaded on it, and its parameter node class."""
    slicer_python = find_slicer_python_dir()
    if slicer_python is None:
        pytest.skip(SKIP_REASON)
    package, module = _load_real(slicer_python)
    return types.SimpleNamespace(
        pnw=package, module=module, ParameterNode=module.SCNLandmarksParameterNode, folder=slicer_python
    )


@pytest.fixture
def node(scene: Any) -> Any:
    """A fresh, empty ``vtkMRMLScriptedModuleNode`` in the scene."""
    parameter_node = scene.AddNode(slicer.vtkMRMLScriptedModuleNode())
    assert len(parameter_node.GetParameterNames()) == 0
    return parameter_node


def test_loading_left_the_stand_ins_in_place(real: types.SimpleNamespace) -> None:
    """Loading the real package must not leak into the other tests (they use slicer_stubs)."""
    assert sys.modules.get(PACKAGE) is not real.pnw
    assert getattr(slicer, "parameterNodeWrapper", None) is not real.pnw
    leaked = [
        name for name, module in list(sys.modules.items())
        if str(real.folder) in str(getattr(module, "__file__", None) or "")
    ]
    assert leaked == []
    for name in SLICER_IMPORT_TIME_NAMES:
        assert not hasattr(slicer, name)


def test_declared_with_the_real_wrapper(real: types.SimpleNamespace) -> None:
    pnw = real.pnw
    # The package really is Slicer's file, not the stand-in.
    wrapper_file = (real.folder / "slicer" / "parameterNodeWrapper" / "wrapper.py").resolve()
    assert Path(inspect.getfile(pnw.wrapper)).resolve() == wrapper_file
    assert real.module.parameterNodeWrapper is pnw.parameterNodeWrapper
    assert real.module.WithinRange is pnw.validators.WithinRange
    assert pnw.isParameterNodeWrapper(real.ParameterNode)
    assert set(real.ParameterNode.allParameters) == FIELDS
    # The real serializers chosen for each declared type.
    assert real.ParameterNode.dataType("fineTuneIterations").__origin__ is int
    assert real.ParameterNode.dataType("device") is real.module.ComputeDevice


def test_defaults_as_declared_and_written_to_the_node(real: types.SimpleNamespace, node: Any) -> None:
    parameters = real.ParameterNode(node)
    ComputeDevice = real.module.ComputeDevice  # noqa: N806
    assert parameters.parameterNode is node
    assert parameters.inputVolume is None
    assert parameters.landmarksNode is None
    assert parameters.device is ComputeDevice.AUTO
    assert parameters.confidenceThreshold == pytest.approx(0.3)
    assert parameters.confidenceThreshold == real.module.DEFAULT_LOW_CONFIDENCE_THRESHOLD
    assert parameters.checkAboveMm == 0.0
    assert parameters.fineTuneIterations == 0 and type(parameters.fineTuneIterations) is int
    assert parameters.useTimeBudget is False
    assert parameters.timeBudgetMinutes == 10.0
    assert parameters.batchInputFolder == Path() and parameters.batchOutputFolder == Path()
    assert parameters.batchPixelSizeMm == 0.0 and parameters.batchOverwrite is False
    # Wrapping writes every default into the MRML node, with Slicer's own serialisation.
    assert set(node.GetParameterNames()) == FIELDS
    assert node.GetParameter("device") == "AUTO"
    assert node.GetParameter("fineTuneIterations") == "0"
    assert node.GetParameter("useTimeBudget") == "False"
    assert float(node.GetParameter("confidenceThreshold")) == pytest.approx(0.3)
    assert node.GetNodeReferenceID("inputVolume") is None


def test_values_are_stored_in_the_mrml_node(real: types.SimpleNamespace, node: Any, tmp_path: Path) -> None:
    ComputeDevice = real.module.ComputeDevice  # noqa: N806
    parameters = real.ParameterNode(node)
    parameters.device = ComputeDevice.CPU
    parameters.confidenceThreshold = 0.55
    parameters.checkAboveMm = 2.5
    parameters.fineTuneIterations = 1234
    parameters.useTimeBudget = True
    parameters.timeBudgetMinutes = 42.5
    parameters.batchInputFolder = tmp_path / "in"
    parameters.batchOutputFolder = tmp_path / "out"
    parameters.batchPixelSizeMm = 0.1
    parameters.batchOverwrite = True

    assert node.GetParameter("device") == "CPU"
    assert node.GetParameter("fineTuneIterations") == "1234"
    assert node.GetParameter("useTimeBudget") == "True"
    assert Path(node.GetParameter("batchInputFolder")) == tmp_path / "in"

    again = real.ParameterNode(node)  # a fresh wrapper reads only what the node holds
    assert again is not parameters
    assert again.device is ComputeDevice.CPU
    assert again.confidenceThreshold == pytest.approx(0.55)
    assert again.checkAboveMm == pytest.approx(2.5)
    assert again.fineTuneIterations == 1234
    assert again.useTimeBudget is True
    assert again.timeBudgetMinutes == pytest.approx(42.5)
    assert again.batchInputFolder == tmp_path / "in"
    assert again.batchOutputFolder == tmp_path / "out"
    assert again.batchPixelSizeMm == pytest.approx(0.1) and again.batchOverwrite is True

    # A change made on the node itself (e.g. by scene loading or undo) reaches the cached wrapper.
    node.SetParameter("fineTuneIterations", "77")
    assert parameters.fineTuneIterations == 77


def test_a_second_node_keeps_its_own_values(real: types.SimpleNamespace, scene: Any, node: Any) -> None:
    first = real.ParameterNode(node)
    second = real.ParameterNode(scene.AddNode(slicer.vtkMRMLScriptedModuleNode()))
    first.fineTuneIterations = 5
    assert second.fineTuneIterations == 0


def test_changes_fire_modified_events_on_the_wrapper(real: types.SimpleNamespace, node: Any) -> None:
    """The Widget observes the wrapper (``addObserver(parameterNode, ModifiedEvent, ...)``)."""
    parameters = real.ParameterNode(node)
    events: list[int] = []
    tag = parameters.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: events.append(1))
    try:
        parameters.useTimeBudget = True
    finally:
        parameters.RemoveObserver(tag)
    assert events, "setting a parameter did not modify the MRML node"


def test_node_references_accept_the_declared_classes(
    real: types.SimpleNamespace, scene: Any, node: Any
) -> None:
    parameters = real.ParameterNode(node)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Landmarks")

    parameters.inputVolume = volume
    parameters.landmarksNode = points
    assert node.GetNodeReferenceID("inputVolume") == volume.GetID()
    assert node.GetNodeReferenceID("landmarksNode") == points.GetID()

    again = real.ParameterNode(node)
    assert again.inputVolume.GetID() == volume.GetID()
    assert isinstance(again.inputVolume, slicer.vtkMRMLScalarVolumeNode)
    assert again.landmarksNode.GetID() == points.GetID()

    parameters.inputVolume = None  # None is allowed (no volume selected)
    assert real.ParameterNode(node).inputVolume is None
    assert node.GetNodeReferenceID("inputVolume") is None


def test_node_references_refuse_other_classes(real: types.SimpleNamespace, scene: Any, node: Any) -> None:
    parameters = real.ParameterNode(node)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Landmarks")
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "Surface")
    parameters.inputVolume = volume

    with pytest.raises(TypeError, match="Value must be of type"):
        parameters.inputVolume = points
    with pytest.raises(TypeError, match="Value must be of type"):
        parameters.inputVolume = model
    with pytest.raises(TypeError, match="Value must be of type"):
        parameters.landmarksNode = volume
    # The refused writes left the node unchanged.
    assert node.GetNodeReferenceID("inputVolume") == volume.GetID()
    assert node.GetNodeReferenceID("landmarksNode") is None


@pytest.mark.parametrize(
    ("field", "bad", "minimum", "maximum"),
    [
        ("confidenceThreshold", 1.5, 0.0, 1.0),
        ("confidenceThreshold", -0.01, 0.0, 1.0),
        ("checkAboveMm", 10.5, 0.0, 10.0),
        ("checkAboveMm", -1.0, 0.0, 10.0),
        ("fineTuneIterations", -1, 0, 100000),
        ("fineTuneIterations", 100001, 0, 100000),
        ("timeBudgetMinutes", 0.25, 0.5, 1440.0),
        ("timeBudgetMinutes", 1441.0, 0.5, 1440.0),
    ],
)
def test_validators_refuse_out_of_range_values(
    real: types.SimpleNamespace, node: Any, field: str, bad: float, minimum: float, maximum: float
) -> None:
    parameters = real.ParameterNode(node)
    before = getattr(parameters, field)
    stored = node.GetParameter(field)
    message = rf"Value must be within range \[{minimum}, {maximum}\], is {bad}"
    with pytest.raises(ValueError, match=message):
        setattr(parameters, field, bad)
    assert getattr(parameters, field) == before
    assert node.GetParameter(field) == stored
    assert getattr(real.ParameterNode(node), field) == before
    # The bounds themselves are accepted (the real WithinRange is inclusive).
    setattr(parameters, field, minimum)
    setattr(parameters, field, maximum)
    assert getattr(real.ParameterNode(node), field) == maximum


def test_type_checks_refuse_wrong_types(real: types.SimpleNamespace, node: Any) -> None:
    parameters = real.ParameterNode(node)
    with pytest.raises(TypeError):
        parameters.fineTuneIterations = 2.5  # int parameter: a float is refused
    with pytest.raises(TypeError):
        parameters.device = "cpu"  # enum parameter: only ComputeDevice members
    with pytest.raises(ValueError, match="must not be None"):
        parameters.confidenceThreshold = None
    assert parameters.fineTuneIterations == 0
    assert parameters.device is real.module.ComputeDevice.AUTO


def test_logic_parameter_node_is_the_scene_singleton(
    real: types.SimpleNamespace, scene: Any, tmp_path: Path
) -> None:
    """``SCNLandmarksLogic.getParameterNode()`` wraps one scripted-module node per scene.

    The node lookup is the ``ScriptedLoadableModuleLogic`` stand-in of ``slicer_stubs.py`` (a
    singleton ``vtkMRMLScriptedModuleNode``, as in Slicer); the wrapping is the real one.
    """
    logic = real.module.SCNLandmarksLogic(
        casesFolder=tmp_path / "cases", userModelsFolder=tmp_path / "models"
    )
    first = logic.getParameterNode()
    first.checkAboveMm = 3.0
    second = logic.getParameterNode()
    assert second.parameterNode is first.parameterNode
    assert isinstance(second.parameterNode, slicer.vtkMRMLScriptedModuleNode)
    assert second.checkAboveMm == pytest.approx(3.0)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
