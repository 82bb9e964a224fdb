"""Load ``SCNLandmarks.py`` on Slicer's REAL ``parameterNodeWrapper`` (from ``../shared/slicer-python``).

Shared by the tests that run the module against Slicer 5.8.1's own Python sources. Everything
registered in ``sys.modules`` (and on the ``slicer`` package) while loading is undone afterwards,
so the other tests keep seeing the stand-ins of ``slicer_stubs.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import slicer_stubs

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = "slicer.parameterNodeWrapper"
SKIP_REASON = (
    "Slicer's Python sources not available: set SLICER_PYTHON_DIR to a folder holding "
    "slicer/parameterNodeWrapper/ (Slicer 5.8.1), or provide ../shared/slicer-python"
)

__all__ = ["PACKAGE", "SKIP_REASON", "SlicerState", "find_slicer_python_dir", "load_on_real_wrapper"]


class SlicerState:
    """Entries of ``sys.modules`` and attributes of the ``slicer`` package, saved to be put back
    exactly (absent ones removed again), so stand-ins never leak from one test file to another."""

    def __init__(self, module_names: Sequence[str] = (), attribute_names: Sequence[str] = ()) -> None:
        import slicer

        self._slicer = slicer
        self.modules = {name: sys.modules.get(name) for name in module_names}
        self.attributes = {name: getattr(slicer, name, None) for name in attribute_names}

    def restore(self) -> None:
        for name, saved in self.modules.items():
            if saved is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved
        for name, saved in self.attributes.items():
            if saved is None:
                if hasattr(self._slicer, name):
                    delattr(self._slicer, name)
            else:
                setattr(self._slicer, name, saved)


def find_slicer_python_dir() -> Path | None:
    """``$SLICER_PYTHON_DIR``, else ``<repo>/../shared/slicer-python``; None where it has no wrapper."""
    configured = os.environ.get("SLICER_PYTHON_DIR")
    folder = Path(configured).expanduser() if configured else REPOSITORY.parent / "shared" / "slicer-python"
    return folder if (folder / "slicer" / "parameterNodeWrapper" / "__init__.py").is_file() else None


def load_on_real_wrapper(
    slicer_python: Path,
    *,
    qt: types.ModuleType,
    ctk: types.ModuleType,
    slicer_names: dict[str, object],
    module_name: str,
    module_qt: types.ModuleType | None = None,
    module_ctk: types.ModuleType | None = None,
    module_extras: dict[str, types.ModuleType] | None = None,
) -> tuple[types.ModuleType, types.ModuleType]:
    """Import the real wrapper package, then ``SCNLandmarks.py`` on top of it; undo all registrations.

    Args:
        slicer_python: the folder holding ``slicer/parameterNodeWrapper``.
        qt, ctk: the modules the wrapper package imports as ``qt`` and ``ctk`` (its GUI
            connectors look widget classes up there).
        slicer_names: attributes set on the ``slicer`` package while the wrapper is imported
            (and kept by its modules, e.g. ``qMRMLNodeComboBox``).
        module_name: the name the module file is loaded under.
        module_qt, module_ctk: what the module file itself imports as ``qt``/``ctk``
            (default: the stand-ins of ``slicer_stubs.py``).
        module_extras: further modules the module file imports instead of the stand-ins (for
            example the real ``slicer.ScriptedLoadableModule``), by name.

    Returns:
        ``(real parameterNodeWrapper package, SCNLandmarks module object)``.
    """
    import slicer

    slicer_stubs.install()  # i18n, ScriptedLoadableModule, qt, ctk stand-ins for the module file itself
    extras = dict(module_extras or {})
    extra_attributes = [name.split(".", 1)[1] for name in extras if name.startswith("slicer.")]
    saved = SlicerState(("qt", "ctk", PACKAGE, module_name, *extras),
                        ("parameterNodeWrapper", *slicer_names, *extra_attributes))
    saved_submodules = {name for name in sys.modules if name.startswith(PACKAGE + ".")}
    package_dir = slicer_python / "slicer" / "parameterNodeWrapper"
    try:
        # 1. The real package, with the given qt/ctk/slicer names.
        sys.modules["qt"], sys.modules["ctk"] = qt, ctk
        for name, value in slicer_names.items():
            setattr(slicer, name, value)
        sys.modules.pop(PACKAGE, None)
        spec = importlib.util.spec_from_file_location(
            PACKAGE, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        slicer.parameterNodeWrapper = package
        spec.loader.exec_module(package)

        # 2. The module file, whose `from slicer.parameterNodeWrapper import ...` now gets the real package.
        sys.modules["qt"] = module_qt or saved.modules["qt"]
        sys.modules["ctk"] = module_ctk or saved.modules["ctk"]
        for name, extra in extras.items():
            sys.modules[name] = extra
            if name.startswith("slicer."):
                setattr(slicer, name.split(".", 1)[1], extra)
        spec = importlib.util.spec_from_file_location(module_name, slicer_stubs.MODULE_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # typing.get_type_hints resolves names through it
        spec.loader.exec_module(module)
    finally:
        saved.restore()
        for name in [name for name in sys.modules if name.startswith(PACKAGE + ".")]:
            if name not in saved_submodules:
                del sys.modules[name]
    return package, module
