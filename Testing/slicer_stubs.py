"""Minimal stand-ins for the parts of 3D Slicer that slicer-core lacks, for tests only.

slicer-core provides the real MRML scene, nodes, logics and ``slicer.util`` array helpers,
but no Qt, no ``slicer.app``, no ``ScriptedLoadableModule``, no ``parameterNodeWrapper`` and
no ``slicer.i18n``. With the stand-ins below ``SCNLandmarks.py`` imports unchanged, so its
Logic (and its self-test) run against the real MRML classes. The Widget is not exercised:
it needs a real Qt application.

The stand-ins do as little as possible; what they cannot check (Qt widgets, GUI
connectors, parameter-node serialisation) is checked in real Slicer by the module's self-test
and the generic tests.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
import typing
import unittest
from pathlib import Path

MODULE_FILE = Path(__file__).resolve().parents[1] / "SCNLandmarks" / "SCNLandmarks.py"


class _Anything:
    """Accepts any attribute access or call (the Qt/CTK names the module only mentions)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> _Anything:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __call__(self, *args: object, **kwargs: object) -> _Anything:
        return _Anything()


def _qt_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def __getattr__(attribute: str) -> type:  # noqa: N807 - module-level attribute hook
        if attribute.startswith("__"):
            # Tools that scan sys.modules look for __file__, __path__...: this module has none.
            raise AttributeError(attribute)
        return _Anything

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return module


def _i18n_module() -> types.ModuleType:
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text  # type: ignore[attr-defined]
    module.translate = lambda context, text: text  # type: ignore[attr-defined]
    return module


def _parameter_node_wrapper_module() -> types.ModuleType:
    module = types.ModuleType("slicer.parameterNodeWrapper")

    class WithinRange:
        def __init__(self, minimum: float, maximum: float) -> None:
            self.minimum, self.maximum = minimum, maximum

    class Choice:
        def __init__(self, choices: typing.Sequence[object]) -> None:
            self.choices = list(choices)

    def parameterNodeWrapper(cls: type) -> type:  # noqa: N802 - Slicer's name
        """Plain attributes with the declared defaults; the real wrapper stores them in the node."""
        hints = typing.get_type_hints(cls, include_extras=True)
        defaults = {name: cls.__dict__.get(name) for name in hints}

        def __init__(self, parameterNode=None) -> None:  # noqa: N803, ANN001
            self.parameterNode = parameterNode
            for name, value in defaults.items():
                setattr(self, name, value)

        namespace = {
            "__init__": __init__,
            "__doc__": cls.__doc__,
            "fieldTypes": hints,
            "connectGui": lambda self, gui: None,
            "disconnectGui": lambda self, tag: None,
        }
        return type(cls.__name__, (), namespace)

    module.WithinRange = WithinRange  # type: ignore[attr-defined]
    module.Choice = Choice  # type: ignore[attr-defined]
    module.parameterNodeWrapper = parameterNodeWrapper  # type: ignore[attr-defined]
    return module


def _scripted_loadable_module(slicer: types.ModuleType) -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent: object) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent: object = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: object = None) -> None:
            self.moduleName = type(self).__name__.removesuffix("Logic")

        def getParameterNode(self):  # noqa: ANN201, N802
            # Like Slicer: one scripted-module node per module, a singleton in the scene.
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetName(self.moduleName)
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message: str, msec: int = 1000) -> None:  # noqa: N802
            logging.info("%s", message)

    for item in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                 ScriptedLoadableModuleTest):
        setattr(module, item.__name__, item)
    module.__all__ = [item.__name__ for item in (ScriptedLoadableModule, ScriptedLoadableModuleWidget,  # type: ignore[attr-defined]
                                                 ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest)]
    return module


def install() -> types.ModuleType:
    """Register the stand-ins (idempotent) and return the real ``slicer`` package of slicer-core."""
    import slicer

    additions = {
        "qt": _qt_module("qt"),
        "ctk": _qt_module("ctk"),
        "slicer.i18n": _i18n_module(),
        "slicer.parameterNodeWrapper": _parameter_node_wrapper_module(),
        "slicer.ScriptedLoadableModule": _scripted_loadable_module(slicer),
    }
    for name, module in additions.items():
        if name not in sys.modules:
            sys.modules[name] = module
            if name.startswith("slicer."):
                setattr(slicer, name.split(".", 1)[1], module)
    return slicer


def load_module(name: str = "SCNLandmarks") -> types.ModuleType:
    """Import ``SCNLandmarks/SCNLandmarks.py`` under the stand-ins (a fresh module object)."""
    install()
    spec = importlib.util.spec_from_file_location(name, MODULE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
