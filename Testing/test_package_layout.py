"""The engine's folders: every file installed, nothing left at the top, and the layer rule.

``SCNLandmarksLib`` has one sub-package per concept. A sub-package may import only itself and
the sub-packages before it in :data:`LAYERS` (lazy imports inside functions included), and only
``slicer_side`` may import 3D Slicer, VTK or Qt. Imports are read with :mod:`ast`, so nothing is
executed and no torch is needed.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
MODULE_DIR = REPOSITORY / "SCNLandmarks"
PACKAGE = "SCNLandmarksLib"
LIB = MODULE_DIR / PACKAGE

# Lowest first: each group may import the groups before it, never those after it.
LAYERS = ("common", "imaging", "data", "models", "inference", "learning", "running", "slicer_side")
SLICER_SIDE = "slicer_side"
# Top-level names of the Slicer application's modules (MRML, VTK, Qt, CTK).
SLICER_MODULES = {"slicer", "vtk", "vtkmodules", "qt", "ctk", "mrml", "MRMLCorePython", "PythonQt", "SampleData"}
TOP_LEVEL_ALLOWED = {"__init__.py", "__main__.py"}


def _library_files() -> list[Path]:
    return sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def _group(path: Path) -> str:
    return path.relative_to(LIB).parts[0]


def _cmake_scripts() -> list[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    match = re.search(r"set\(MODULE_PYTHON_SCRIPTS\s+(.*?)\)", text, re.DOTALL)
    assert match, "MODULE_PYTHON_SCRIPTS not found"
    entries = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [e for e in entries if e]


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join((PACKAGE, *path.relative_to(LIB).parent.parts))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                assert node.level <= len(parts), f"{path}:{node.lineno} imports above the package"
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from SCNLandmarksLib import data` names a group through its alias.
            if module == PACKAGE:
                found += [(node.lineno, f"{PACKAGE}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def test_every_library_file_is_listed_in_cmake_and_every_listed_file_exists():
    listed = {entry for entry in _cmake_scripts() if entry.startswith(PACKAGE + "/")}
    present = {str(p.relative_to(MODULE_DIR)).replace("\\", "/") for p in _library_files()}
    assert sorted(present - listed) == [], "files missing from MODULE_PYTHON_SCRIPTS (not installed in Slicer)"
    assert sorted(listed - present) == [], "MODULE_PYTHON_SCRIPTS lists files that do not exist"
    assert len(_cmake_scripts()) == len(set(_cmake_scripts())), "a file is listed twice"


def test_the_package_top_level_holds_only_the_package_files_and_the_groups():
    top_files = {p.name for p in LIB.glob("*.py")}
    assert top_files <= TOP_LEVEL_ALLOWED and "__init__.py" in top_files
    folders = {p.name for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS)
    for group in LAYERS:
        init = LIB / group / "__init__.py"
        assert init.is_file(), f"{group}/ is not a package"
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert docstring and "\n" not in docstring.strip(), f"{group}/__init__.py needs a one-line docstring"
        assert [p for p in (LIB / group).iterdir() if p.is_dir() and p.name != "__pycache__"] == [], \
            f"{group}/ has sub-folders; the layout is one level deep"
        assert len(list((LIB / group).glob("*.py"))) > 1, f"{group}/ holds no module"


def test_each_group_imports_only_itself_and_the_groups_below_it():
    rank = {group: index for index, group in enumerate(LAYERS)}
    violations, crossings = [], 0
    for path in _library_files():
        if path.parent == LIB:
            continue
        group = _group(path)
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] != PACKAGE:
                continue
            assert len(parts) > 1 and parts[1] in rank, f"{path}:{line} imports {module}, which is in no group"
            if parts[1] != group:
                crossings += 1
                if rank[parts[1]] > rank[group]:
                    violations.append(f"{path.relative_to(LIB)}:{line} ({group}) imports {module}")
    assert crossings > 50  # the walk does see the imports between groups
    assert violations == []


def test_common_imports_no_other_group():
    for path in (LIB / "common").glob("*.py"):
        others = [m for _, m in _imports(path) if m.startswith(PACKAGE + ".") and not m.startswith(f"{PACKAGE}.common")]
        assert others == [], f"{path.name} imports {others}"


def test_only_slicer_side_imports_slicer_vtk_or_qt():
    importers = set()
    for path in _library_files():
        slicer_imports = [m for _, m in _imports(path) if m.split(".")[0] in SLICER_MODULES]
        if slicer_imports:
            importers.add(path.relative_to(LIB).parts[0])
    assert importers == {SLICER_SIDE}  # and slicer_side does import Slicer: the walk sees it


def test_entry_points_name_modules_that_exist():
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))
    for target in project["project"]["scripts"].values():
        module, _, function = target.partition(":")
        path = MODULE_DIR / Path(*module.split(".")).with_suffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, target
    from SCNLandmarksLib.running.process import worker_command

    command = worker_command(["detect"], python="python")
    assert command[1] == "-m" and importlib.util.find_spec(command[2]) is not None
    assert Path(importlib.util.find_spec(command[2]).origin).resolve().is_relative_to(LIB.resolve())
