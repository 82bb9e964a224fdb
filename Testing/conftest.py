"""Shared pytest fixtures for the SCNLandmarks tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def find_data_dir() -> Path | None:
    """The shared real-data folder: ``$SCN_DATA_DIR``, else ``<repo>/../shared/data``."""
    configured = os.environ.get("SCN_DATA_DIR")
    candidate = Path(configured).expanduser() if configured else REPOSITORY.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the real data sets (isbi2015/, hand9/, afids_mni/); skips the test if absent."""
    folder = find_data_dir()
    if folder is None:
        pytest.skip("real data not available: set SCN_DATA_DIR to the shared data folder")
    return folder


@pytest.fixture
def mrml_scene() -> Iterator[dict[str, Any]]:
    """A headless MRML scene with the Slicer logics that markups and volumes need.

    Uses ``slicer-core`` (the Qt-free core of 3D Slicer); skips the test where it is not
    installed. The application logic and the Colors logic are registered because the
    Markups and Volumes logics look them up, and complain without them.

    Yields:
        ``{"scene": vtkMRMLScene, "application": vtkSlicerApplicationLogic,
        "Markups": vtkSlicerMarkupsLogic, "Volumes": vtkSlicerVolumesLogic}``
    """
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    colors = application.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    application.SetModuleLogic("Colors", colors)
    logics: dict[str, Any] = {"scene": scene, "application": application}
    module_logics = (("Volumes", slicer.vtkSlicerVolumesLogic), ("Markups", slicer.vtkSlicerMarkupsLogic))
    for name, logic_class in module_logics:
        logic = logic_class()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(application)
        application.SetModuleLogic(name, logic)
        logics[name] = logic
    yield logics
    scene.Clear(1)


@pytest.fixture
def scene(mrml_scene: dict[str, Any]) -> Iterator[Any]:
    """The scene of :func:`mrml_scene`, also as ``slicer.mrmlScene`` (what module code reads)."""
    import slicer

    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = mrml_scene["scene"]
    yield mrml_scene["scene"]
    slicer.mrmlScene = previous
