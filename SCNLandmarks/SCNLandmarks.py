"""SCNLandmarks: detect anatomical landmarks with a SpatialConfiguration-Net, correct them,
fine-tune the model on the corrected cases, and detect on whole folders.

The Widget only wires the user interface to the Logic. The Logic is a typed API that the
Python console, scripts and tests use in the same way as the GUI::

    logic = slicer.util.getModuleLogic("SCNLandmarks")
    points = logic.detect(slicer.util.getNode("CT"), model="Cephalometric 2D", device="auto")
    # ... move the points that are wrong ...
    logic.addTrainingCase(slicer.util.getNode("CT"), points)
    newModel = logic.fineTune()                          # blocks; wait=False returns a job
    logic.detectFolder("/data/in", "/data/out", model=newModel)

The engine (``SCNLandmarksLib``) has no Slicer dependency; everything that touches MRML is in
``SCNLandmarksLib.slicer_side.mrml_adapter``. torch and SimpleITK are imported inside functions only, so
this module loads before PyTorch is installed; it is installed when first needed.
"""

import enum
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SCNLandmarksLib.models.quality import LOW_CONFIDENCE as DEFAULT_LOW_CONFIDENCE_THRESHOLD  # noqa: E402 - torch-free
from SCNLandmarksLib.slicer_side.slicer_requirements import in_slicer_application  # noqa: E402 - torch-free

SETTINGS_MODEL_KEY = "SCNLandmarks/model"

#
# SCNLandmarks
#


class SCNLandmarks(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SCN Landmarks")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["Markups"]
        self.parent.contributors = ["SCNLandmarks contributors"]
        self.parent.helpText = _(
            "Detect anatomical landmarks on 2D images and 3D volumes with a SpatialConfiguration-Net, "
            "correct them, and fine-tune the model on your corrected cases.<br>"
            "1. Choose a volume and a model, then <b>Detect landmarks</b>. Points drawn in orange are the ones the "
            "model expects furthest off (their description gives the expected error in mm): check them first.<br>"
            "2. Move wrong points; mark a landmark you cannot see as missing (right-click the point).<br>"
            "3. <b>Add case</b> stores the volume and the corrected points; cases are kept on disk.<br>"
            "4. <b>Fine-tune</b> trains a new model version on your cases in the background; "
            "the model you started from is never changed.<br>"
            "5. <b>Batch</b> detects landmarks on every image of a folder and ranks the images to review first.<br>"
            'Documentation: <a href="https://github.com/SCNLandmarks/SlicerSCNLandmarks#readme">README</a>.'
        )
        self.parent.acknowledgementText = _(
            "Based on the SpatialConfiguration-Net of Payer et al. (Medical Image Analysis, 2019)."
        )
        if in_slicer_application():
            # The Sample Data module is only complete once Slicer has started.
            slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Offer the bundled cephalogram (ISBI 2015 image 151, 0.1 mm pixels) in the Sample Data module.

    The JPEG carries no pixel size, so the sample is written once as NRRD with its true spacing
    into Slicer's cache folder; Sample Data then loads that file like any other sample.
    """
    import SampleData

    from SCNLandmarksLib.data.sample import SAMPLE_NAME, sample_volume_file

    volumeFile = sample_volume_file(Path(slicer.app.cachePath) / "SCNLandmarks")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SCNLandmarks",
        sampleName=SAMPLE_NAME,
        uris=volumeFile.as_uri(),
        fileNames="SCNLandmarks-" + volumeFile.name,
        nodeNames="Cephalogram151",
        thumbnailFileName=str(Path(__file__).resolve().parent / "Resources" / "Icons" / "SCNLandmarks.png"),
        loadFileType="VolumeFile",
    )


#
# Parameter node
#


class ComputeDevice(enum.Enum):
    """Where the network runs; AUTO uses the GPU when a usable one is present."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        return {"auto": _("Auto"), "cpu": _("CPU"), "cuda": _("GPU")}[self.value]


@parameterNodeWrapper
class SCNLandmarksParameterNode:
    """
    The parameters needed by the module.

    inputVolume - The volume (2D single slice or 3D) to detect landmarks on.
    landmarksNode - The point list shown and corrected; set by detection.
    device - Where the network runs.
    confidenceThreshold - For models without expected errors: points with a lower confidence are flagged.
    checkAboveMm - Points expected further off than this (mm) are flagged; 0: the model's validated threshold.
    fineTuneIterations - Training iterations of a fine-tuning run; 0: the recipe's, within the default time limit.
    useTimeBudget - Train for a fixed time instead of a number of iterations.
    timeBudgetMinutes - That time, in minutes.
    batchInputFolder - Folder of images for batch detection.
    batchOutputFolder - Folder that receives one .mrk.json per image and a CSV summary.
    batchPixelSizeMm - Pixel size (mm) of batch images whose files carry none (JPEG, PNG, BMP, TIFF); 0: 1 mm. Others keep theirs.
    batchOverwrite - Replace the results of an earlier run in the output folder (by default they are kept).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    landmarksNode: vtkMRMLMarkupsFiducialNode
    device: ComputeDevice = ComputeDevice.AUTO
    confidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULT_LOW_CONFIDENCE_THRESHOLD
    checkAboveMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    fineTuneIterations: Annotated[int, WithinRange(0, 100000)] = 0
    useTimeBudget: bool = False
    timeBudgetMinutes: Annotated[float, WithinRange(0.5, 1440.0)] = 10.0
    batchInputFolder: Path
    batchOutputFolder: Path
    batchPixelSizeMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    batchOverwrite: bool = False


#
# SCNLandmarksWidget
#


def connectParameterNodeToGui(parameterNode, ui) -> int:
    """Bind each widget of ``ui`` (``slicer.util.childWidgetVariables``) that names a parameter in
    its ``SlicerParameterName`` property; returns the tag that ``disconnectGui`` takes.

    ``parameterNode.connectGui(ui)`` would do the same, but up to Slicer 5.8 it returns no tag
    (Slicer issue #7547), so ``disconnectGui`` cannot undo it: a module left and re-entered would
    stay bound to every parameter node it ever showed. ``connectParametersToGui`` returns the tag.
    """
    widgets = {}
    for widget in vars(ui).values():
        name = widget.property("SlicerParameterName")
        if name:
            widgets[name] = widget
    return parameterNode.connectParametersToGui(widgets)


class SCNLandmarksWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """User interface: wires widgets to :class:`SCNLandmarksLogic`, no computation here."""

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._fineTuneJob = None
        self._batchJob = None
        self._batchRunning = False
        self._detectJob = None
        self._followedPoints = None  # the point list whose drags are watched

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SCNLandmarks.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SCNLandmarksLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCaseButton)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCaseButton)
        self.ui.fineTunePresetComboBox.connect("activated(int)", self.onFineTunePreset)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTuneButton)
        self.ui.cancelFineTuneButton.connect("clicked(bool)", self.onCancelFineTuneButton)
        self.ui.batchRunButton.connect("clicked(bool)", self.onBatchRunButton)
        self.ui.batchCancelButton.connect("clicked(bool)", self.onBatchCancelButton)

        self.ui.casesTableWidget.setColumnCount(4)
        self.ui.casesTableWidget.setHorizontalHeaderLabels([_("Case"), _("Points"), _("Corrected"), _("Missing")])
        self.ui.casesTableWidget.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self.ui.casesFolderLabel.text = _("Stored in {folder}").format(folder=self.logic.casesFolder)
        self.ui.cancelFineTuneButton.enabled = False
        self.ui.batchCancelButton.enabled = False
        self.ui.fineTuneProgressBar.setValue(0)
        self.ui.batchProgressBar.setValue(0)

        self.updateModelList()
        self.updateCasesTable()
        self.updateDeviceInfo()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()
        # Running background processes would otherwise outlive Slicer. A stopped fine-tuning writes
        # nothing; a stopped batch keeps the images it finished.
        for job in (self._fineTuneJob, self._batchJob):
            if job is not None and job.isRunning():
                job.cancel()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self._followPoints(None)
        if self._detecting():
            self._detectJob.cancel()  # its volume and point list are going away
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SCNLandmarksParameterNode]) -> None:
        """Set and observe the parameter node; the GUI follows it through connectGui."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = connectParameterNodeToGui(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        self._followPoints(parameters.landmarksNode if parameters else None)
        self._updateButtonStates()

    def _updateButtonStates(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        haveVolume = bool(parameters and parameters.inputVolume)
        haveModel = bool(self.selectedModelPath())
        running = self._fineTuneJob is not None and self._fineTuneJob.isRunning()
        detecting = self._detecting()
        self.ui.detectButton.enabled = haveVolume and haveModel and not detecting
        self.ui.detectButton.toolTip = (
            _("Detect the model's landmarks on the input volume")
            if haveVolume and haveModel
            else _("Select an input volume and a model first")
        )
        self.ui.addCaseButton.enabled = haveVolume and bool(parameters and parameters.landmarksNode) and not detecting
        # Fine-tuning and a batch are never run together: each would get half the computer (or
        # GPU memory), and a fine-tuning's time budget would buy half the steps.
        self.ui.fineTuneButton.enabled = (haveModel and not running and not self._batchRunning
                                          and self.ui.casesTableWidget.rowCount > 0)
        self.ui.cancelFineTuneButton.enabled = running
        self.ui.iterationsSpinBox.enabled = bool(parameters) and not parameters.useTimeBudget
        self.ui.timeBudgetMinutesSpinBox.enabled = bool(parameters) and parameters.useTimeBudget
        haveFolders = bool(parameters) and _isSet(parameters.batchInputFolder) and _isSet(parameters.batchOutputFolder)
        self.ui.batchRunButton.enabled = haveModel and haveFolders and not self._batchRunning and not running

    # ------------------------------------------------------------------ models

    def selectedModelPath(self) -> str:
        """The model file chosen in the model list, or "" when none."""
        data = self.ui.modelComboBox.currentData
        return str(data) if data else ""

    def updateModelList(self, select: Optional[str] = None) -> None:
        """Fill the model list (bundled and user models) and select ``select`` or the last used one."""
        wanted = select or qt.QSettings().value(SETTINGS_MODEL_KEY, "") or ""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        try:
            entries = self.logic.listModels()
        except Exception as error:  # noqa: BLE001 - a broken catalog must not block the module
            logging.error("Listing models failed: %s", error)
            entries = []
        for entry in entries:
            if entry.usable:
                combo.addItem(entry.label, str(entry.path))
            else:
                logging.warning("Model %s is not usable: %s", entry.path, entry.error)
        if combo.count == 0:
            combo.addItem(_("No model yet: use 'Load model file...'"), "")
        index = combo.findData(str(wanted)) if wanted else -1
        if index < 0:
            index = next((i for i, e in enumerate(x for x in entries if x.usable) if e.default), 0)
        combo.setCurrentIndex(index)
        combo.blockSignals(wasBlocked)
        self.onModelChanged()

    def onModelChanged(self, index: int = -1) -> None:
        path = self.selectedModelPath()
        if path:
            qt.QSettings().setValue(SETTINGS_MODEL_KEY, path)
            self.ui.modelComboBox.toolTip = path
        if self._parameterNode:
            self._updateButtonStates()

    def onLoadModelButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load model file"), "", _("SCNLandmarks model (*.scn.pt);;All files (*)")
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("This file cannot be used as a landmark model."), waitCursor=True):
            self.logic.setupPythonRequirements()
            copied = self.logic.loadModelFile(path)
            self.updateModelList(select=str(copied))

    def updateDeviceInfo(self) -> None:
        """Show the device used, the PyTorch version and the GPU (without importing torch before it is needed)."""
        self.ui.deviceInfoLabel.text = self.logic.environmentSummary()

    # ------------------------------------------------------------------ detection

    def onDetectButton(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Landmark detection failed."), waitCursor=True):
            # Installs what is missing first (with Slicer's own prompts), then runs in the background.
            self.logic.setupPythonRequirements()
            outputNode = parameters.landmarksNode
            volume = parameters.inputVolume
            # The selected list is offered for reuse only when it is not another volume's result;
            # the Logic still refuses to overwrite it if the user edited it.
            if outputNode is not None and sourceVolumeID(outputNode) not in (None, volume.GetID()):
                outputNode = None
            self._detectJob = self.logic.detect(
                volume,
                model=self.selectedModelPath(),
                device=parameters.device.value,
                outputNode=outputNode,
                lowConfidenceThreshold=parameters.confidenceThreshold,
                checkAboveMm=parameters.checkAboveMm or None,
                wait=False,
                finishedCallback=self._onDetectionFinished,
            )
            self.ui.detectStatusLabel.text = _("Detecting landmarks on '{name}'...").format(name=volume.GetName())
            self._updateButtonStates()

    def _onDetectionFinished(self, job: "SCNLandmarksDetection") -> None:
        parameters = self._parameterNode
        if job.status == "done" and parameters is not None:
            node = job.node
            # The points are corrected on the image they were found on, never over another one: a
            # list refilled in place is shown again, a new one followed (and shown once, not again
            # when the parameter node then names it).
            hidden = self._showOnly(node) if node is self._followedPoints else self._followPoints(node)
            parameters.landmarksNode = node
            self.ui.detectStatusLabel.text = _(
                "{count} landmarks in '{name}' ({seconds:.1f} s); {flagged} to check (orange)."
            ).format(count=node.GetNumberOfControlPoints(), name=node.GetName(), seconds=job.seconds,
                     flagged=self.logic.pointsToCheckCount(node))
            if hidden:
                self.ui.detectStatusLabel.text += " " + _("Hidden, not deleted: {lists}.").format(lists=", ".join(hidden))
            if self.logic.lastWarning:
                self.ui.detectStatusLabel.text += " " + self.logic.lastWarning
                slicer.util.warningDisplay(self.logic.lastWarning)
        elif job.status == "failed":
            self.ui.detectStatusLabel.text = _("Detection failed: {reason}").format(reason=job.errorMessage)
            slicer.util.errorDisplay(_("Landmark detection failed.") + "\n\n" + job.errorMessage)
        else:
            self.ui.detectStatusLabel.text = _("Detection cancelled.")
        self.updateDeviceInfo()
        self._updateButtonStates()

    def _followPoints(self, node) -> list:
        """Show the chosen point list over its volume, and watch it: a point the user drags is
        shown as corrected at once. Returns the names of the lists it hid (see :meth:`_showOnly`)."""
        if node is self._followedPoints:
            return []
        event = slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent
        if self._followedPoints is not None:
            self.removeObserver(self._followedPoints, event, self._onPointDragged)
        self._followedPoints = node
        if node is None:
            return []
        self.addObserver(node, event, self._onPointDragged)
        return self._showOnly(node) if sourceVolumeID(node) is not None else []

    def _onPointDragged(self, caller, event) -> None:
        corrected = self.logic.markCorrectedPoints(caller)
        if corrected:
            slicer.util.showStatusMessage(_("Corrected: {points}.").format(points=", ".join(corrected)), 3000)

    @staticmethod
    def _showOnly(node) -> list:
        """Show ``node`` over the volume it was detected on and hide the module's other point lists
        (those of other volumes, or an edited one a new detection did not replace), so that no
        point is dragged over the wrong image; their names."""
        volume = node.GetNodeReference(SOURCE_VOLUME_REFERENCE)
        if volume is not None:
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
        hidden = []
        others = node.GetScene().GetNodesByClass("vtkMRMLMarkupsFiducialNode")
        for index in range(others.GetNumberOfItems()):
            other = others.GetItemAsObject(index)
            display = other.GetDisplayNode()
            if other is node or sourceVolumeID(other) is None or display is None:
                continue
            if display.GetVisibility():
                display.SetVisibility(False)
                hidden.append(other.GetName())
        if node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetVisibility(True)
        return hidden

    def _detecting(self) -> bool:
        return self._detectJob is not None and self._detectJob.isRunning()

    # ------------------------------------------------------------------ cases

    def updateCasesTable(self) -> None:
        table = self.ui.casesTableWidget
        infos = self.logic.trainingCases()
        table.setRowCount(len(infos))
        for row, info in enumerate(infos):
            values = [
                info.name,
                "?" if info.error else f"{info.num_defined}/{info.num_defined + info.num_missing}",
                "" if info.error else str(info.num_corrected),
                "" if info.error else str(info.num_missing),
            ]
            for column, value in enumerate(values):
                item = qt.QTableWidgetItem(value)
                item.setToolTip(info.error or _("Stored {created} from '{volume}'").format(
                    created=info.created, volume=info.metadata.get("volume", "?")))
                table.setItem(row, column, item)
        # Refilled for the new number of cases without choosing a preset: the combo shows the one
        # the settings are (blank where they were set by hand), and the settings stay as they are.
        combo = self.ui.fineTunePresetComboBox
        presets = self.logic.fineTunePresets(len(infos))
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for label, _iterations, _minutes in presets:
            combo.addItem(label)
        combo.setCurrentIndex(self._currentPreset(presets))
        combo.blockSignals(wasBlocked)
        if self._parameterNode:
            self._updateButtonStates()

    def _currentPreset(self, presets: list) -> int:
        """The index of the preset the fine-tune settings are, or -1."""
        parameters = self._parameterNode
        if parameters is None:
            return 0
        for index, (_label, iterations, minutes) in enumerate(presets):
            if minutes is None and not parameters.useTimeBudget and (iterations or 0) == parameters.fineTuneIterations:
                return index
            if minutes is not None and parameters.useTimeBudget and abs(minutes - parameters.timeBudgetMinutes) < 1e-6:
                return index
        return -1

    def onAddCaseButton(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The case could not be stored."), waitCursor=True):
            info = self.logic.addTrainingCase(parameters.inputVolume, parameters.landmarksNode)
            self.updateCasesTable()
            message = _("Stored case '{name}' with {corrected} corrected points.") if not info.replaced else _(
                "Updated case '{name}' with {corrected} corrected points (this image's earlier case is replaced).")
            slicer.util.showStatusMessage(message.format(name=info.name, corrected=info.num_corrected), 5000)

    def onRemoveCaseButton(self) -> None:
        # selectedIndexes() is protected in C++ (QTableWidget); the selection model's rows are public.
        rows = sorted({index.row() for index in self.ui.casesTableWidget.selectionModel().selectedRows()})
        if not rows:
            return
        names = [self.ui.casesTableWidget.item(row, 0).text() for row in rows]
        if not slicer.util.confirmOkCancelDisplay(
            _("Delete {count} training case(s) from disk?").format(count=len(names)), detailedText="\n".join(names)
        ):
            return
        with slicer.util.tryWithErrorDisplay(_("The case could not be removed.")):
            for name in names:
                self.logic.removeTrainingCase(name)
        self.updateCasesTable()

    # ------------------------------------------------------------------ fine-tuning

    def onFineTunePreset(self, index: int) -> None:
        presets = self.logic.fineTunePresets(self.ui.casesTableWidget.rowCount)
        if not 0 <= index < len(presets) or self._parameterNode is None:
            return
        _label, iterations, minutes = presets[index]
        self._parameterNode.useTimeBudget = minutes is not None
        if minutes is None:
            self._parameterNode.fineTuneIterations = iterations or 0  # 0 shows as "Recommended"
        else:
            self._parameterNode.timeBudgetMinutes = minutes

    def onFineTuneButton(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not be started."), waitCursor=True):
            self.logic.setupPythonRequirements()
            self.ui.fineTuneProgressBar.setValue(0)
            self.ui.fineTuneStatusLabel.text = _("Starting...")
            self._fineTuneJob = self.logic.fineTune(
                fromModel=self.selectedModelPath(),
                iterations=None if parameters.useTimeBudget or not parameters.fineTuneIterations
                else parameters.fineTuneIterations,
                timeBudgetSeconds=parameters.timeBudgetMinutes * 60.0 if parameters.useTimeBudget else None,
                device=parameters.device.value,
                progressCallback=self.onFineTuneProgress,
                finishedCallback=self.onFineTuneFinished,
                wait=False,
            )
        self._updateButtonStates()

    def onFineTuneProgress(self, progress) -> None:
        """Show a ``SCNLandmarksLib.common.progress.Progress`` of the fine-tuning."""
        if progress.stage == "started":
            self.ui.fineTuneStatusLabel.text = _("Training ({what})...").format(what=progress.message)
            return
        self.ui.fineTuneProgressBar.setValue(int(round(100 * progress.fraction)))
        parts = []
        if progress.total:
            parts.append(_("iteration {done}/{total}").format(done=progress.done, total=progress.total))
        else:
            parts.append(_("iteration {done}").format(done=progress.done))
        if progress.eta_s is not None:
            parts.append(_("{time} left").format(time=_formatDuration(progress.eta_s)))
        if progress.loss is not None:
            parts.append(_("loss {loss:.4g}").format(loss=progress.loss))
        if progress.validation_mre_mm is not None:
            parts.append(_("validation error {mre:.2f} mm").format(mre=progress.validation_mre_mm))
        self.ui.fineTuneStatusLabel.text = ", ".join(parts)

    def onFineTuneFinished(self, job) -> None:
        self._updateButtonStates()
        outcome = job.outcome
        if outcome.status == "done":
            self.ui.fineTuneProgressBar.setValue(100)
            # The worker's sentence states both cross-validated errors; a model that is not
            # better is not written, and the starting model stays selected.
            self.ui.fineTuneStatusLabel.text = outcome.message
            if job.outputPath is not None:
                self.updateModelList(select=str(job.outputPath))
        elif outcome.status == "cancelled":
            self.ui.fineTuneStatusLabel.text = _("Cancelled. No new model was saved; the previous model is unchanged.")
        else:
            self.ui.fineTuneStatusLabel.text = _("Fine-tuning failed; the previous model is unchanged.")
            slicer.util.errorDisplay(
                _("Fine-tuning failed. The previous model is unchanged.") + "\n\n" + outcome.message,
                detailedText=outcome.details,
            )

    def onCancelFineTuneButton(self) -> None:
        if self._fineTuneJob is not None:
            self._fineTuneJob.cancel()
            self.ui.fineTuneStatusLabel.text = _("Cancelling...")

    # ------------------------------------------------------------------ batch

    def onBatchRunButton(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Batch detection could not be started."), waitCursor=True):
            self.logic.setupPythonRequirements()
            self.ui.batchProgressBar.setValue(0)
            self.ui.batchStatusLabel.text = _("Starting...")
            # A background process: Slicer stays responsive, and what must not run meanwhile is disabled.
            self._batchJob = self.logic.detectFolder(
                parameters.batchInputFolder,
                parameters.batchOutputFolder,
                model=self.selectedModelPath(),
                device=parameters.device.value,
                lowConfidenceThreshold=parameters.confidenceThreshold,
                checkAboveMm=parameters.checkAboveMm or None,
                pixelSizeMm=parameters.batchPixelSizeMm or None,
                overwrite=parameters.batchOverwrite,
                progressCallback=self.onBatchProgress,
                finishedCallback=self.onBatchFinished,
                wait=False,
            )
            self._batchRunning = True
            self.ui.batchCancelButton.enabled = True
        self._updateButtonStates()

    def onBatchProgress(self, progress) -> None:
        """Show a ``SCNLandmarksLib.common.progress.Progress`` of the batch detection."""
        if progress.stage == "started":
            return
        self.ui.batchProgressBar.setValue(int(round(100 * progress.fraction)))
        self.ui.batchStatusLabel.text = _("{done}/{total}: {message}").format(
            done=progress.done, total=progress.total, message=progress.message)

    def onBatchFinished(self, job) -> None:
        self._batchRunning = False
        self.ui.batchCancelButton.enabled = False
        self._updateButtonStates()
        outcome = job.outcome
        if outcome.status != "done":
            self.ui.batchStatusLabel.text = outcome.message
            if outcome.status == "failed":
                slicer.util.errorDisplay(_("Batch detection failed.") + "\n\n" + outcome.message,
                                         detailedText=outcome.details)
            return
        report = outcome.report
        failed = report.get("failed", [])
        text = _("{ok} images done, {failed} skipped.").format(ok=report.get("succeeded", 0), failed=len(failed))
        if report.get("cancelled"):
            text = _("Cancelled; the finished images are kept.") + " " + text
        ranked = [row for row in report.get("review_order", []) if row.get("expected_error_mm") is not None][:3]
        if ranked:
            text += " " + _("Review first: {images} (all in review_order.csv).").format(
                images=", ".join(_("{image} ({error:.1f} mm, {count} to check)").format(
                    image=row["image"], error=row["expected_error_mm"], count=row["points_to_check"]) for row in ranked))
        self.ui.batchStatusLabel.text = text
        if failed:
            slicer.util.warningDisplay(
                _("{ok} images done, {failed} skipped.").format(ok=report.get("succeeded", 0), failed=len(failed))
                + " " + _("The details say why each was skipped."),
                detailedText="\n".join(f"{item['image']}: {item['error']}" for item in failed),
            )
        warned = report.get("warnings", [])
        if warned:
            slicer.util.warningDisplay(
                _("{count} images have a doubtful result as a whole: {first}").format(
                    count=len(warned), first=warned[0]["warning"]),
                detailedText="\n".join(f"{item['image']}: {item['warning']}" for item in warned),
            )

    def onBatchCancelButton(self) -> None:
        if self._batchJob is not None:
            self._batchJob.cancel()
            self.ui.batchStatusLabel.text = _("Stopping after the current image...")


# The volume a point list was detected on. A node reference first: references follow the nodes
# when a scene is imported into one whose IDs clash (Slicer renames the IDs). The attribute as
# well: a reference disappears with its volume, and the list must still not count as user-made.
SOURCE_VOLUME_REFERENCE = "SCNLandmarksSourceVolume"
SOURCE_VOLUME_ATTRIBUTE = "SCNLandmarks.sourceVolumeID"


def sourceVolumeID(markupsNode) -> Optional[str]:
    """The ID of the volume ``markupsNode`` was detected on, or None (a list the user made)."""
    return markupsNode.GetNodeReferenceID(SOURCE_VOLUME_REFERENCE) or markupsNode.GetAttribute(
        SOURCE_VOLUME_ATTRIBUTE) or None


def _isSet(path: Optional[Path]) -> bool:
    return path is not None and str(path) not in ("", ".")


def _formatDuration(seconds: float) -> str:
    minutes, secs = divmod(int(round(float(seconds))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _pollingTimer(poll: Callable[[], None], intervalMs: int):
    """Inside Slicer, a started ``qt.QTimer`` that calls ``poll`` on the GUI thread; elsewhere None
    (the caller's ``wait`` polls instead)."""
    if not in_slicer_application():
        return None
    timer = qt.QTimer()
    timer.setInterval(intervalMs)
    timer.connect("timeout()", poll)
    timer.start()
    return timer


#
# Fine-tuning job
#


class SCNLandmarksDetection:
    """One detection running on a worker thread, so Slicer stays responsive (see
    :meth:`SCNLandmarksLogic.detect` with ``wait=False``).

    The network runs on the thread (torch releases Python's lock while it computes); the point
    list is made on the caller's thread once the thread is done, because MRML is not thread-safe.
    Inside Slicer a ``qt.QTimer`` notices the end; elsewhere :meth:`wait` does.

    Attributes:
        status: "running", "done", "failed" or "cancelled".
        node: the point list once done.
        errorMessage: why it failed, for the user.
        seconds: wall time from start to the point list.
    """

    def __init__(self, compute: Callable[[], Any], finish: Callable[[Any], Any],
                 finishedCallback: Optional[Callable[["SCNLandmarksDetection"], None]] = None) -> None:
        import threading

        self._compute, self._finish = compute, finish
        self.finishedCallback = finishedCallback
        self.status = "running"
        self.node = None
        self.errorMessage = ""
        self.seconds = 0.0
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._cancelled = False
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="SCNLandmarks detection", daemon=True)
        self._timer = None

    def _run(self) -> None:
        try:
            self._result = self._compute()
        except Exception as error:  # reported on the caller's thread by poll()
            self._error = error

    def start(self) -> "SCNLandmarksDetection":
        self._thread.start()
        self._timer = _pollingTimer(self.poll, 50)
        return self

    def poll(self) -> None:
        """Finish on this thread once the worker thread is done (called by the timer in Slicer)."""
        if self.status != "running" or self._thread.is_alive():
            return
        if self._timer is not None:
            self._timer.stop()
        if self._cancelled:
            self.status = "cancelled"
        elif self._error is not None:
            self.status, self.errorMessage = "failed", str(self._error)
        else:
            try:
                self.node = self._finish(self._result)
                self.status = "done"
            except Exception as error:
                self._error = error
                self.status, self.errorMessage = "failed", str(error)
        self.seconds = time.monotonic() - self._started
        if self.finishedCallback is not None:
            self.finishedCallback(self)

    def wait(self):
        """Block until done; returns the point list (re-raises a failure as it was raised)."""
        self._thread.join()
        self.poll()
        if self.status == "failed" and self._error is not None:
            raise self._error
        return self.node

    def isRunning(self) -> bool:
        return self.status == "running"

    def cancel(self) -> None:
        """Drop the result: the network finishes its pass, but no point list is made or changed."""
        self._cancelled = True


class SCNLandmarksJob:
    """A fine-tuning or a batch detection running in a background process (see
    :meth:`SCNLandmarksLogic.fineTune` and :meth:`SCNLandmarksLogic.detectFolder`).

    Inside Slicer a ``qt.QTimer`` delivers the worker's events on the GUI thread, so the
    callbacks may update widgets and Slicer stays responsive. Elsewhere call :meth:`poll`
    regularly, or :meth:`wait`. Progress arrives as ``SCNLandmarksLib.common.progress.Progress`` (stage
    ``"started"`` first), the end as one ``SCNLandmarksLib.running.process.WorkerOutcome``.

    Attributes:
        outputPath: the model file a fine-tuning writes when it finishes (None once it finished
            without writing one: the fine-tuned model was not better, the starting model is kept),
            or a batch detection's output folder.
        outcome: how the run ended (None while it runs): ``status``, ``message`` (the worker's
            summary, or why it was cancelled or failed), ``report`` (fine-tuning: ``verdict``
            "better", "not better" or "unchecked", ``start_error_mm`` and ``new_error_mm``
            cross-validated on the cases; batch: see :meth:`SCNLandmarksLogic.detectFolder`) and
            ``details`` (the end of the worker's error output).
        lastProgress: the last ``Progress``, or None.
    """

    def __init__(
        self,
        process,
        outputPath: Path,
        progressCallback=None,
        finishedCallback: Optional[Callable[["SCNLandmarksJob"], None]] = None,
    ) -> None:
        self.process = process
        self.outputPath = Path(outputPath)
        self.progressCallback = progressCallback
        self.finishedCallback = finishedCallback
        self.outcome = None
        self.lastProgress = None
        self._timer = None
        process.on_event = self._onEvent
        process.on_finished = self._onFinished

    @property
    def status(self) -> str:
        """``"running"``, ``"done"``, ``"cancelled"`` or ``"failed"``."""
        return "running" if self.outcome is None else self.outcome.status

    @property
    def errorMessage(self) -> str:
        """Why the run was cancelled or failed, for the user ("" otherwise)."""
        return "" if self.outcome is None or self.outcome.status == "done" else self.outcome.message

    @property
    def report(self) -> dict:
        """The worker's ``done`` event ({} until done)."""
        return {} if self.outcome is None else dict(self.outcome.report)

    def start(self) -> "SCNLandmarksJob":
        self.process.start()
        self._timer = _pollingTimer(self.poll, 200)
        return self

    def _onEvent(self, event: dict) -> None:
        from SCNLandmarksLib.running.process import progress_from_event

        if event.get("event") == "log":
            logging.info("SCNLandmarks worker: %s", event.get("message"))
        progress = progress_from_event(event)
        if progress is None:
            return
        if progress.stage != "started":
            self.lastProgress = progress
        if self.progressCallback is not None:
            self.progressCallback(progress)

    def _onFinished(self, process) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.outcome = process.outcome()
        if self.outcome.status == "done":
            self.outputPath = self.outcome.output
            logging.info("Background job finished: %s", self.outcome.message)
        elif self.outcome.status == "cancelled":
            logging.info("%s", self.outcome.message)
        else:
            logging.error("Background job failed: %s\n%s", self.outcome.message, self.outcome.details)
        if self.finishedCallback is not None:
            self.finishedCallback(self)

    def poll(self) -> None:
        """Deliver the worker's new events (called by the timer in Slicer)."""
        self.process.poll()

    def isRunning(self) -> bool:
        return self.status == "running"

    def cancel(self) -> None:
        """Stop the job: a fine-tuning writes no model (the starting model stays as it was); a batch
        detection stops after the current image and keeps the finished ones."""
        self.process.cancel()

    def wait(self, timeout: Optional[float] = None) -> Optional[Path]:
        """Block until the run ends; returns the new model file, or None when the starting model was kept
        (a batch detection: its output folder; ``report`` has the rest).

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
            SCNLandmarksLib.common.errors.TrainingCancelled: the run was cancelled.
            RuntimeError: the run failed (the message says why).
        """
        from SCNLandmarksLib.common.errors import TrainingCancelled

        if self.process.wait(timeout) is None:
            raise TimeoutError(_("The background job is still running after {seconds} s").format(seconds=timeout))
        self.poll()
        if self.status == "cancelled":
            raise TrainingCancelled(self.errorMessage)
        if self.status != "done":
            raise RuntimeError(self.errorMessage)
        return self.outputPath


#
# SCNLandmarksLogic
#


class SCNLandmarksLogic(ScriptedLoadableModuleLogic):
    """Landmark detection, training cases, fine-tuning and batch detection, usable without the GUI.

    Args:
        casesFolder: where training cases are stored (default ``~/.SCNLandmarks/cases``,
            or ``SCN_CASES_DIR``).
        userModelsFolder: where fine-tuned and loaded models go (default
            ``~/.SCNLandmarks/models``, or ``SCN_USER_MODELS_DIR``).
    """

    def __init__(self, casesFolder: Union[str, Path, None] = None, userModelsFolder: Union[str, Path, None] = None) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        from SCNLandmarksLib.data import cases
        from SCNLandmarksLib.models import catalog

        ScriptedLoadableModuleLogic.__init__(self)
        self.casesFolder = Path(casesFolder) if casesFolder is not None else cases.default_cases_folder()
        self.userModelsFolder = (
            Path(userModelsFolder) if userModelsFolder is not None else catalog.user_models_folder()
        )
        self.lastDeviceDescription = ""
        # What the last detection found doubtful as a whole (a pixel size that cannot be right), or None.
        self.lastWarning: Optional[str] = None
        self._detector = None
        self._detectorKey = None

    def getParameterNode(self):
        return SCNLandmarksParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies

    def setupPythonRequirements(self, askConfirmation: bool = True) -> None:
        """Install what is missing: PyTorch through PyTorch Utils, other packages with pip
        (``SCNLandmarksLib.slicer_side.slicer_requirements``). Never called at import or in a constructor;
        quick when everything is present.

        Raises:
            SCNLandmarksLib.slicer_side.slicer_requirements.InstallError: a package is missing and was not installed.
        """
        from SCNLandmarksLib.slicer_side.slicer_requirements import ensure_requirements

        ensure_requirements(ask_confirmation=askConfirmation)

    def environmentSummary(self) -> str:
        """One line for the user: device used (after a detection), PyTorch version, GPU name.

        torch is only inspected when it is already imported, so showing the module stays fast.
        """
        from importlib import metadata

        try:
            torchVersion = metadata.version("torch")
        except metadata.PackageNotFoundError:
            return _("PyTorch not installed yet; it is installed on first use.")
        parts = [_("PyTorch {version}").format(version=torchVersion)]
        torch = sys.modules.get("torch")
        if torch is not None:
            if torch.cuda.is_available():
                parts.append(_("GPU: {name}").format(name=torch.cuda.get_device_name(0)))
            else:
                parts.append(_("no usable GPU"))
        if self.lastDeviceDescription:
            parts.insert(0, _("Used: {device}").format(device=self.lastDeviceDescription))
        return " | ".join(parts)

    # ------------------------------------------------------------------ models

    def listModels(self) -> list:
        """Bundled and user models (``SCNLandmarksLib.models.catalog.ModelEntry``); damaged files carry ``error``."""
        from SCNLandmarksLib.models import catalog

        return catalog.list_models(user_folder=self.userModelsFolder)

    def resolveModel(self, model: Union[str, Path, None] = None) -> Path:
        """The model file for a path, a model name, or None (the default model). A catalog model
        that is not downloaded yet is fetched into the user's models folder (checksum-checked).

        Raises:
            FileNotFoundError: no such model (the message lists the available ones).
        """
        from SCNLandmarksLib.models import catalog

        return catalog.find_model(model, user_folder=self.userModelsFolder)

    def loadModelFile(self, path: Union[str, Path]) -> Path:
        """Check a model file and copy it into the user's models folder; returns the copy.

        Raises:
            SCNLandmarksLib.common.errors.ModelFileError: not a usable model (says why).
        """
        from SCNLandmarksLib.models import catalog

        return catalog.import_model_file(path, self.userModelsFolder)

    def modelDescription(self, model: Union[str, Path, None] = None):
        """The description of a model (``SCNLandmarksLib.models.model_header.ModelDescription``: landmarks,
        grid, training provenance; also readable as the file's JSON, ``description["info"]``)."""
        from SCNLandmarksLib.models.model_file import read_model_description

        return read_model_description(self.resolveModel(model))

    def _getDetector(self, modelPath: Path, device: str, checkAboveMm: Optional[float], lowConfidence: float):
        from SCNLandmarksLib.inference.detection import Detector

        # Loading a model and moving it to the GPU takes a while; reuse it while file and device are the same.
        key = (str(modelPath.resolve()), modelPath.stat().st_mtime_ns, str(device))
        if self._detector is None or self._detectorKey != key:
            self._detector = Detector(modelPath, device=device)
            self._detectorKey = key
        self._detector.check_above_mm = checkAboveMm
        self._detector.low_confidence = lowConfidence
        return self._detector

    # ------------------------------------------------------------------ detection

    def detect(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        model: Union[str, Path, None] = None,
        device: str = "auto",
        outputNode: Optional[vtkMRMLMarkupsFiducialNode] = None,
        lowConfidenceThreshold: float = DEFAULT_LOW_CONFIDENCE_THRESHOLD,
        checkAboveMm: Optional[float] = None,
        wait: bool = True,
        finishedCallback: Optional[Callable[[SCNLandmarksDetection], None]] = None,
    ) -> Union[vtkMRMLMarkupsFiducialNode, SCNLandmarksDetection]:
        """Detect the model's landmarks on a volume and show them as an editable point list.

        :param volumeNode: 3D volume, or a single-slice volume for a 2D model. A linear parent
            transform is taken into account (points appear where the volume is shown).
        :param model: model file path, model name (see :meth:`listModels`), or None for the default.
        :param device: "auto" (GPU when usable), "cpu" or "cuda".
        :param outputNode: point list to fill. It is reused only when it is empty or an unedited
            detection result; a list the user edited is never overwritten (a new one is made).
        :param lowConfidenceThreshold: for a model without an error model, points with a lower
            confidence (0..1) are to be checked.
        :param checkAboveMm: points whose expected error exceeds this (mm) are to be checked;
            None: the threshold the model was validated with. Points to check are drawn in orange.
        :param wait: False runs the network on a worker thread and returns the running
            :class:`SCNLandmarksDetection` at once (the GUI stays responsive); its ``node`` is set,
            and ``finishedCallback(job)`` called, on this thread when it is done.
        :return: the point list, named "<volume> - <model>", one point per landmark (label = name,
            description = definition, confidence, expected error and "please check" where it
            applies); missing landmarks are missing points. With ``wait=False``, the job.
            Where the detected shape's size says the volume's pixel size cannot be right (a JPEG
            loaded at 1 mm per pixel), ``self.lastWarning`` holds a sentence saying so (else None).
        """
        from SCNLandmarksLib.slicer_side import mrml_adapter

        self.lastWarning = None  # never the previous image's
        if volumeNode is None:
            raise ValueError(_("Select an input volume first."))
        self.setupPythonRequirements()
        modelPath = self.resolveModel(model)
        # Read on this thread: the pixels are copied out of the MRML node before the worker starts.
        image = mrml_adapter.image_from_volume_node(volumeNode)
        volumeName, scene = volumeNode.GetName(), volumeNode.GetScene()

        def compute():
            detector = self._getDetector(modelPath, str(getattr(device, "value", device)), checkAboveMm,
                                         lowConfidenceThreshold)
            self.lastDeviceDescription = detector.device_description
            startTime = time.time()
            landmarks = detector.detect(image.as_dimension(detector.model.dimension))
            self.lastWarning = detector.last_warning
            logging.info("Detected %d landmarks on %s in %.2f s (%s)", len(landmarks), volumeName,
                         time.time() - startTime, self.lastDeviceDescription)
            return landmarks

        def finish(landmarks):
            existing = outputNode
            if existing is not None and existing.GetScene() is None:  # deleted while the network ran
                existing = None
            if existing is not None and existing.GetNumberOfControlPoints() > 0 and self.isEdited(existing):
                logging.info("'%s' was edited; the new detection goes into a new point list", existing.GetName())
                existing = None
            node = mrml_adapter.markups_from_landmarks(
                landmarks,
                scene=scene,
                name=f"{volumeName} - {modelPath.name.removesuffix('.scn.pt')}",
                low_confidence_threshold=lowConfidenceThreshold,
                existing_node=existing,
                reference_geometry=image.geometry,
                model_name=modelPath.name,
            )
            node.SetNodeReferenceID(SOURCE_VOLUME_REFERENCE, volumeNode.GetID())
            node.SetAttribute(SOURCE_VOLUME_ATTRIBUTE, volumeNode.GetID())  # outlives a deleted volume
            return node

        job = SCNLandmarksDetection(compute, finish, finishedCallback).start()
        return job.wait() if wait else job

    def isEdited(self, markupsNode: vtkMRMLMarkupsFiducialNode) -> bool:
        """True when the user changed the point list after detection (or placed it by hand)."""
        from SCNLandmarksLib.slicer_side import mrml_adapter

        return mrml_adapter.markups_edited(markupsNode)

    def markCorrectedPoints(self, markupsNode: vtkMRMLMarkupsFiducialNode) -> list[str]:
        """Show the points moved since detection as corrected: no longer "please check" nor orange,
        described "corrected=yes" (the GUI calls this after each drag). Returns their labels."""
        from SCNLandmarksLib.slicer_side import mrml_adapter

        return mrml_adapter.mark_corrected_points(markupsNode)

    def pointsToCheckCount(self, markupsNode: vtkMRMLMarkupsFiducialNode) -> int:
        """How many points of a detection result the detector asked to check (described "please check")."""
        from SCNLandmarksLib.data.landmark_io import CHECK_NOTE

        count = markupsNode.GetNumberOfControlPoints()
        return sum(1 for i in range(count) if markupsNode.GetNthControlPointDescription(i).endswith(CHECK_NOTE))

    # ------------------------------------------------------------------ training cases

    def addTrainingCase(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        markupsNode: vtkMRMLMarkupsFiducialNode,
        name: Optional[str] = None,
    ):
        """Store the volume and its (corrected) point list as a training case on disk.

        Points are read in world coordinates; points marked missing are stored as missing and
        left out of training; which points the user moved is recorded. A case stored earlier
        from the same image is replaced where this list keeps all its corrections and landmarks
        (one image twice would be trained on and held out at once by fine-tuning's check);
        otherwise nothing is stored and ``FileExistsError`` names that case.

        :param name: case name (default: the volume name; made unique).
        :return: ``SCNLandmarksLib.data.cases.CaseInfo`` of the stored case (``replaced``: the
            earlier cases of this image it replaced).
        """
        from SCNLandmarksLib.data import cases
        from SCNLandmarksLib.slicer_side import mrml_adapter

        if volumeNode is None or markupsNode is None:
            raise ValueError(_("Select the volume and its point list first."))
        source = sourceVolumeID(markupsNode)
        if source and source != volumeNode.GetID():
            other = volumeNode.GetScene().GetNodeByID(source) if volumeNode.GetScene() is not None else None
            raise ValueError(_("The point list '{points}' was detected on '{other}', not on '{volume}': select the "
                               "volume it belongs to, or detect on this one first.").format(
                points=markupsNode.GetName(), other=other.GetName() if other is not None else source,
                volume=volumeNode.GetName()))
        image, landmarks = mrml_adapter.case_from_nodes(volumeNode, markupsNode)
        metadata = {
            "volume": volumeNode.GetName(),
            "pointList": markupsNode.GetName(),
            "model": markupsNode.GetAttribute(mrml_adapter.ATTRIBUTE_MODEL) or "",
        }
        info = cases.write_case(self.casesFolder, name or volumeNode.GetName(), image, landmarks, metadata=metadata,
                                replace_same_image=True)
        logging.info("Stored training case %s (%d corrected points) in %s", info.name, info.num_corrected, info.folder)
        return info

    def trainingCases(self) -> list:
        """The stored training cases (``SCNLandmarksLib.data.cases.CaseInfo``), sorted by name."""
        from SCNLandmarksLib.data import cases

        return cases.list_cases(self.casesFolder)

    def removeTrainingCase(self, name: str) -> None:
        """Delete a stored training case from disk."""
        from SCNLandmarksLib.data import cases

        cases.remove_case(self.casesFolder, name)

    # ------------------------------------------------------------------ fine-tuning

    @staticmethod
    def suggestedIterations(numberOfCases: int) -> int:
        """Steps per training run that suit fine-tuning on this many cases (the engine's rule)."""
        from SCNLandmarksLib.learning.finetuning import suggested_iterations

        return suggested_iterations(numberOfCases)

    def fineTunePresets(self, numberOfCases: int) -> list:
        """(label, iterations or None, minutes or None) choices for the fine-tune section (neither: the recipe's)."""
        from SCNLandmarksLib.learning.finetuning import DEFAULT_TIME_LIMIT_S

        suggested = self.suggestedIterations(numberOfCases)
        return [
            (_("Recommended for {count} cases ({iterations} iterations, fewer to end within {minutes:g} minutes)").format(
                count=numberOfCases, iterations=suggested, minutes=DEFAULT_TIME_LIMIT_S / 60), None, None),
            (_("Quick check (50 iterations)"), 50, None),
            (_("Thorough (1000 iterations)"), 1000, None),
            (_("Time budget: 5 minutes"), None, 5.0),
            (_("Time budget: 30 minutes"), None, 30.0),
        ]

    def pythonExecutable(self) -> str:
        """The Python that runs the worker: Slicer's PythonSlicer inside Slicer, else this one."""
        if in_slicer_application():
            launcher = shutil.which("PythonSlicer")
            if launcher:
                return launcher
            if sys.executable:
                candidate = Path(sys.executable).with_name("PythonSlicer" + (".exe" if os.name == "nt" else ""))
                if candidate.exists():
                    return str(candidate)
        if not sys.executable:
            raise RuntimeError(_("Cannot start the background worker: no Python program was found (PythonSlicer is "
                                 "not on the PATH and this Python does not know its own executable). Restart Slicer "
                                 "from its launcher, or reinstall it."))
        return sys.executable

    def fineTune(
        self,
        cases: Optional[list] = None,
        fromModel: Union[str, Path, None] = None,
        iterations: Optional[int] = None,
        timeBudgetSeconds: Optional[float] = None,
        device: str = "auto",
        progressCallback: Optional[Callable[[Any], None]] = None,
        wait: bool = True,
        finishedCallback: Optional[Callable[["SCNLandmarksJob"], None]] = None,
        outputPath: Union[str, Path, None] = None,
        keepWorse: bool = False,
        newLandmarks: bool = False,
    ):
        """Fine-tune a model on stored training cases, in a background process.

        The recipe is the engine's (:func:`SCNLandmarksLib.learning.finetuning.fine_tune`, the same as
        ``scn-landmarks finetune``): it is checked by cross-validation on the cases, and the
        result is a new model version in the user's models folder (``<model>-ft001.scn.pt``,
        ``-ft002``...) only when it is better than the starting model (or ``keepWorse``); the
        model it starts from is never changed. A failure or cancel writes no model.

        :param cases: case names (see :meth:`trainingCases`) or None for all usable cases: those of
            the model's dimension whose landmarks the model has (others are left out, with a log line).
        :param fromModel: model to start from (path, name, or None for the default model).
        :param iterations: steps of each training run (default: :meth:`suggestedIterations`, fewer
            where they would not end within the engine's ``DEFAULT_TIME_LIMIT_S`` on this computer).
        :param timeBudgetSeconds: train for this long instead of a number of iterations.
        :param device: "auto", "cpu" or "cuda".
        :param progressCallback: called with a ``SCNLandmarksLib.common.progress.Progress`` at each step
            (``stage, done, total`` (None with a time budget), ``fraction`` (0..1), ``elapsed_s,
            eta_s, loss, validation_mre_mm, message``), and first with stage ``"started"``.
        :param wait: True blocks until the end and returns the new model path (scripts, tests);
            False returns an :class:`SCNLandmarksJob` at once (GUI; it has ``cancel()``).
        :param finishedCallback: called with the job when it ends (any outcome).
        :param outputPath: where to write the new model (default: next version name).
        :param keepWorse: write the new model even when it is not better.
        :param newLandmarks: learn the cases' landmark set where it differs from the model's (new
            output heads; the result cannot be checked against the starting model). Without it,
            cases with landmarks the model lacks are refused (named), never learned silently.
        :return: the new model's path, or None when the starting model was kept (``wait=True``;
            ``job.report`` has both errors), or the running job (``wait=False``).
        :raises SCNLandmarksLib.common.errors.TrainingCancelled: cancelled while waiting.
        :raises RuntimeError: the run failed; the message explains why.
        """
        from SCNLandmarksLib.models import catalog
        from SCNLandmarksLib.running.process import BackgroundProcess, worker_command, worker_environment

        self.setupPythonRequirements()
        if iterations is not None and timeBudgetSeconds is not None:
            raise ValueError(_("Give either a number of iterations or a time budget, not both."))
        sourcePath = self.resolveModel(fromModel)
        description = self.modelDescription(sourcePath)
        modelNames, modelDimension = set(description.landmark_names), description.network.get("dimension")
        infos = {info.name: info for info in self.trainingCases()}

        def unusable(info) -> Optional[str]:
            if info.error is not None:
                return info.error
            if info.dimension != modelDimension:
                return _("it is {case}D, the model {model}D").format(case=info.dimension, model=modelDimension)
            return None

        if cases is None:
            names, reasons = [], []
            for name, info in infos.items():
                reason = unusable(info) or (None if newLandmarks or not set(info.landmark_names) - modelNames
                                            else _("it has landmarks the model lacks"))
                if reason is None:
                    names.append(name)
                else:
                    logging.warning("Training case %s is left out: %s", name, reason)
                    reasons.append(f"{name}: {reason}")
            if not names and infos:
                raise ValueError(_("None of the training cases can be used with the model {model} ({reasons}).").format(
                    model=sourcePath.name, reasons="; ".join(reasons[:3])))
        else:
            names = [getattr(case, "name", case) for case in cases]
            for name in names:
                if name not in infos:
                    raise ValueError(_("There is no training case named '{name}'.").format(name=name))
                reason = unusable(infos[name])
                if reason is not None:
                    raise ValueError(_("The training case '{name}' cannot be used: {reason}.").format(
                        name=name, reason=reason))
        if not names:
            raise ValueError(_("There are no training cases yet. Detect, correct and 'Add case' first."))
        caseNames = {label for name in names if name in infos for label in infos[name].landmark_names}
        if caseNames - modelNames and not newLandmarks:
            unknown = ", ".join(sorted(caseNames - modelNames)[:5])
            raise ValueError(_("The cases name landmarks the model {model} does not have ({unknown}); to teach it "
                               "the cases' landmark set, ask for it (newLandmarks=True).").format(
                model=sourcePath.name, unknown=unknown))
        if outputPath is None:
            self.userModelsFolder.mkdir(parents=True, exist_ok=True)
            outputPath = catalog.next_model_version_path(sourcePath, self.userModelsFolder)
        outputPath = Path(outputPath)

        arguments = ["finetune", "--cases", str(self.casesFolder), "--from-model", str(sourcePath),
                     "--output", str(outputPath), "--device", str(getattr(device, "value", device))]
        if iterations is not None:
            arguments += ["--iterations", str(int(iterations))]
        if timeBudgetSeconds is not None:
            arguments += ["--time-budget", str(float(timeBudgetSeconds))]
        for name in names:
            arguments += ["--case", name]
        if keepWorse:
            arguments.append("--keep-worse")
        if newLandmarks and caseNames - modelNames:
            arguments.append("--landmarks-from-cases")

        environment = slicer.util.startupEnvironment() if in_slicer_application() else None
        process = BackgroundProcess(
            worker_command(arguments, python=self.pythonExecutable()),
            env=worker_environment(environment),
        )
        job = SCNLandmarksJob(process, outputPath, progressCallback, finishedCallback).start()
        logging.info("Fine-tuning %s on %d cases -> %s", sourcePath.name, len(names), outputPath)
        return job.wait() if wait else job

    def modelDescriptionLandmarks(self, model: Union[str, Path, None] = None) -> list[str]:
        """The landmark names of a model, in channel order."""
        return list(self.modelDescription(model).landmark_names)

    # ------------------------------------------------------------------ batch

    def detectFolder(
        self,
        inputFolder: Union[str, Path],
        outputFolder: Union[str, Path],
        model: Union[str, Path, None] = None,
        device: str = "auto",
        lowConfidenceThreshold: float = DEFAULT_LOW_CONFIDENCE_THRESHOLD,
        checkAboveMm: Optional[float] = None,
        pixelSizeMm: Optional[float] = None,
        progressCallback: Optional[Callable[[Any], None]] = None,
        shouldCancel: Optional[Callable[[], bool]] = None,
        overwrite: bool = False,
        wait: bool = True,
        finishedCallback: Optional[Callable[["SCNLandmarksJob"], None]] = None,
    ):
        """Detect landmarks on every image in a folder: one ``.mrk.json`` per image plus ``landmarks.csv``
        and ``review_order.csv`` (the images ranked by expected error, the first to review first).

        A file that cannot be read or processed is reported in the result and skipped.

        :param lowConfidenceThreshold, checkAboveMm: which points are to be checked, as in :meth:`detect`.
        :param pixelSizeMm: pixel size in mm of images whose files carry none (JPEG, PNG, BMP, TIFF;
            read at 1 mm otherwise, and an image whose landmarks then span an implausible size gets a
            warning); other files keep their own.
        :param overwrite: replace the results of an earlier run in ``outputFolder``; by default an
            image whose ``.mrk.json`` is there already is skipped, saying so, before it is detected.
        :param progressCallback: called with a ``SCNLandmarksLib.common.progress.Progress`` after each image
            (with ``wait=False`` first with stage ``"started"``).
        :param shouldCancel: polled between images; True stops (finished images are kept). With
            ``wait=False`` use ``job.cancel()`` instead.
        :param wait: True runs here and returns ``SCNLandmarksLib.inference.batch.BatchReport`` (scripts);
            False runs in a background process and returns an :class:`SCNLandmarksJob` at once
            (the GUI stays responsive; ``job.cancel()`` stops after the current image; when it ends,
            ``job.report`` has ``succeeded``, ``failed``, ``warnings`` (a doubtful pixel size),
            ``cancelled``, ``summary_csv``, ``review_csv`` and ``review_order``).
        :param finishedCallback: with ``wait=False``, called with the job when it ends.
        """
        from SCNLandmarksLib.inference.batch import detect_folder

        if not _isSet(Path(inputFolder)) or not Path(inputFolder).is_dir():
            raise ValueError(_("The input folder '{folder}' does not exist.").format(folder=inputFolder))
        if not _isSet(Path(outputFolder)):
            raise ValueError(_("Choose an output folder."))
        self.setupPythonRequirements()
        modelPath = self.resolveModel(model)
        if not wait:
            from SCNLandmarksLib.running.process import BackgroundProcess, worker_command, worker_environment

            arguments = ["detect", "--input-folder", str(inputFolder), "--output", str(outputFolder),
                         "--model", str(modelPath), "--device", str(getattr(device, "value", device)),
                         "--threshold", str(float(lowConfidenceThreshold))]
            if checkAboveMm is not None:
                arguments += ["--check-above", str(float(checkAboveMm))]
            if pixelSizeMm is not None:
                arguments += ["--photo-spacing", str(float(pixelSizeMm))]
            if overwrite:
                arguments.append("--overwrite")
            environment = slicer.util.startupEnvironment() if in_slicer_application() else None
            process = BackgroundProcess(worker_command(arguments, python=self.pythonExecutable()),
                                        env=worker_environment(environment))
            logging.info("Batch detection of %s with %s in the background", inputFolder, modelPath.name)
            return SCNLandmarksJob(process, Path(outputFolder), progressCallback, finishedCallback).start()
        report = detect_folder(
            inputFolder,
            outputFolder,
            modelPath,
            device=str(getattr(device, "value", device)),
            low_confidence_threshold=lowConfidenceThreshold,
            check_above_mm=checkAboveMm,
            photo_spacing=pixelSizeMm,
            progress=progressCallback,
            should_cancel=shouldCancel,
            overwrite=overwrite,
        )
        self.lastDeviceDescription = report.device
        logging.info("Batch detection: %d done, %d skipped, summary %s", len(report.succeeded),
                     len(report.failed), report.summary_csv)
        return report


#
# SCNLandmarksTest
#


class SCNLandmarksTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: detect -> correct -> add case -> fine-tune -> detect, on a small
    synthetic volume with a tiny model, on the CPU (about half a minute)."""

    def setUp(self):
        """Reset the scene and use throw-away folders, so the user's cases and models are not touched."""
        slicer.mrmlScene.Clear()
        self.workFolder = Path(tempfile.mkdtemp(prefix="SCNLandmarksTest-"))

    def tearDown(self):
        shutil.rmtree(self.workFolder, ignore_errors=True)

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        try:
            self.test_DetectCorrectFineTuneDetect()
        finally:
            self.tearDown()

    def _tinyModel(self) -> Path:
        from SCNLandmarksLib.imaging.grid import GridSpec
        from SCNLandmarksLib.models.model import create_model
        from SCNLandmarksLib.models.model_file import save_model
        from SCNLandmarksLib.models.network import NetworkConfig

        config = NetworkConfig(dimension=2, num_landmarks=3, filters=8, levels=2, spatial_downsample=4, spatial_kernel=3)
        model = create_model(config, grid=GridSpec(size=(32, 32)), landmark_names=["L1", "L2", "L3"])
        return save_model(model, self.workFolder / "tiny.scn.pt")

    def test_DetectCorrectFineTuneDetect(self):
        from SCNLandmarksLib.slicer_side import mrml_adapter
        from SCNLandmarksLib.data.synthetic import make_synthetic_case

        self.delayDisplay("Starting the test")
        if importlib.util.find_spec("torch") is None:
            # Installing PyTorch (gigabytes) is never done by a test; install it with PyTorch Utils first.
            self.skipTest("PyTorch is not installed: install it with the PyTorch Utils module to run this test")
        logic = SCNLandmarksLogic(casesFolder=self.workFolder / "cases", userModelsFolder=self.workFolder / "models")
        logic.setupPythonRequirements(askConfirmation=False)
        modelPath = self._tinyModel()

        # An oblique, anisotropic single-slice volume under a linear transform.
        image, truth = make_synthetic_case(dimension=2, size=(40, 36), spacing=(0.8, 1.1), origin=(5.0, -7.0),
                                           direction=0.2, num_landmarks=3, seed=1)
        volume = mrml_adapter.volume_node_from_image(image, scene=slicer.mrmlScene, name="synthetic")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        matrix = vtk.vtkMatrix4x4()
        matrix.SetElement(0, 3, 12.0)
        transform.SetMatrixTransformToParent(matrix)
        volume.SetAndObserveTransformNodeID(transform.GetID())

        points = logic.detect(volume, model=modelPath, device="cpu")
        self.assertEqual(points.GetNumberOfControlPoints(), 3)
        self.assertTrue(points.GetFixedNumberOfControlPoints())
        self.assertFalse(logic.isEdited(points))
        self.delayDisplay("Detected")

        # Correct: move two points to their true world positions (RAS of the 2D truth, z = 0,
        # shifted like the volume), and mark the third as missing.
        for index in range(2):
            x, y = truth.positions[index]
            points.SetNthControlPointPositionWorld(index, -x + 12.0, -y, 0.0)
        points.SetNthControlPointPositionMissing(2)
        self.assertTrue(logic.isEdited(points))
        info = logic.addTrainingCase(volume, points)
        self.assertEqual(info.num_missing, 1)
        self.assertEqual(len(logic.trainingCases()), 1)
        # Detecting again must not overwrite the corrected list.
        again = logic.detect(volume, model=modelPath, device="cpu", outputNode=points)
        self.assertNotEqual(again.GetID(), points.GetID())
        self.delayDisplay("Case stored")

        progress = []
        newModel = logic.fineTune(fromModel=modelPath, iterations=5, device="cpu", progressCallback=progress.append)
        self.assertTrue(newModel.exists())
        self.assertEqual(newModel.parent, self.workFolder / "models")
        self.assertTrue(any(report.stage == "fine-tune" for report in progress))
        self.delayDisplay("Fine-tuned")

        tuned = logic.detect(volume, model=newModel, device="cpu")
        self.assertEqual(tuned.GetNumberOfControlPoints(), 3)
        self.delayDisplay("Test passed")


