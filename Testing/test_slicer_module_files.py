"""Static checks of the Slicer module files that Slicer itself would only report at run time.

* every ``self.ui.<name>`` used in SCNLandmarks.py exists in the .ui file, with a widget class
  that fits what the code does with it;
* every parameter-node field has a widget carrying its ``SlicerParameterName``, of a class
  Slicer's parameterNodeWrapper can connect to that field type (and no widget names a field
  that does not exist);
* every Python file and every resource is listed in the module's CMakeLists.txt (an unlisted
  file is silently left out of the installed extension);
* SCNLandmarks.py imports neither torch nor SimpleITK at module level, and really imports
  without them;
* extension metadata, requirements and icon are well formed.
"""

from __future__ import annotations

import ast
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
MODULE_DIR = REPOSITORY / "SCNLandmarks"
MODULE_FILE = MODULE_DIR / "SCNLandmarks.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SCNLandmarks.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"

# Widget classes by the suffix of the variable name used in the code.
CLASS_BY_SUFFIX = {
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "Button": {"QPushButton", "QToolButton"},
    "Selector": {"qMRMLNodeComboBox"},
    "ComboBox": {"QComboBox", "ctkComboBox"},
    "SpinBox": {"QSpinBox", "QDoubleSpinBox", "ctkDoubleSpinBox"},
    "CheckBox": {"QCheckBox"},
    "Label": {"QLabel"},
    "ProgressBar": {"QProgressBar"},
    "PathLineEdit": {"ctkPathLineEdit"},
    "SliderWidget": {"ctkSliderWidget"},
    "TableWidget": {"QTableWidget"},
}

# Widget classes that slicer.parameterNodeWrapper's GUI connectors accept per field type
# (its connectors compare the exact widget class).
CONNECTABLE = {
    "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
    "vtkMRMLMarkupsFiducialNode": {"qMRMLNodeComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "int": {"QSpinBox", "QSlider"},
    "bool": {"QCheckBox", "QPushButton"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "ComputeDevice": {"QComboBox"},
}


def _ui_widgets() -> dict[str, tuple[str, str | None]]:
    """name -> (class, SlicerParameterName or None) for every widget in the .ui file."""
    root = ElementTree.parse(UI_FILE).getroot()
    widgets = {}
    for element in root.iter("widget"):
        parameter = None
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.findtext("string")
        widgets[element.get("name")] = (element.get("class"), parameter)
    return widgets


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _ui_names_used() -> set[str]:
    names = set()
    for node in ast.walk(_module_tree()):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def _parameter_fields() -> dict[str, str]:
    """field -> base type name, from the @parameterNodeWrapper class of the module."""
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            fields = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    annotation = item.annotation
                    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
                        annotation = annotation.slice.elts[0]  # type: ignore[attr-defined]
                    fields[item.target.id] = ast.unparse(annotation)
            return fields
    pytest.fail("SCNLandmarks.py has no @parameterNodeWrapper class")
    return {}


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.DOTALL)
    assert match, f"{variable} not found in {MODULE_CMAKE}"
    entries = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [e.replace("${MODULE_NAME}", "SCNLandmarks") for e in entries if e]


# --------------------------------------------------------------------------- .ui


def test_every_ui_widget_the_code_uses_exists_with_a_fitting_class():
    widgets = _ui_widgets()
    used = _ui_names_used()
    assert len(used) >= 15  # the check is not vacuous
    for name in sorted(used):
        assert name in widgets, f"self.ui.{name} is used in SCNLandmarks.py but is not in SCNLandmarks.ui"
        widget_class = widgets[name][0]
        suffix = next((s for s in CLASS_BY_SUFFIX if name.endswith(s)), None)
        assert suffix is not None, f"self.ui.{name}: unknown naming; add its suffix to CLASS_BY_SUFFIX"
        assert widget_class in CLASS_BY_SUFFIX[suffix], f"{name} is a {widget_class}, expected {CLASS_BY_SUFFIX[suffix]}"


def test_every_parameter_field_has_a_connectable_widget():
    widgets = _ui_widgets()
    fields = _parameter_fields()
    assert {"inputVolume", "landmarksNode", "device", "confidenceThreshold"} <= set(fields)
    bound = {parameter: (name, cls) for name, (cls, parameter) in widgets.items() if parameter}
    for field, type_name in fields.items():
        assert field in bound, f"parameter '{field}' has no widget with SlicerParameterName={field}"
        widget_name, widget_class = bound[field]
        assert widget_class in CONNECTABLE[type_name], (
            f"parameter '{field}' ({type_name}) is bound to {widget_name}, a {widget_class}; "
            f"parameterNodeWrapper connects it only to {CONNECTABLE[type_name]}"
        )
    unknown = set(bound) - set(fields)
    assert not unknown, f"widgets name parameters that do not exist: {unknown}"
    # A str field on a QComboBox needs a Choice annotation; we use an Enum instead.
    assert fields["device"] == "ComputeDevice"


def test_ui_file_declares_its_custom_widgets_and_scene_connections():
    root = ElementTree.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {cls for cls, _ in _ui_widgets().values() if cls.startswith(("ctk", "qMRML"))}
    assert used <= declared
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    node_selectors = {name for name, (cls, _) in _ui_widgets().items() if cls == "qMRMLNodeComboBox"}
    assert node_selectors and node_selectors <= receivers


# --------------------------------------------------------------------------- CMake


def test_every_python_file_and_resource_is_listed_in_cmake():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    python_files = sorted(
        str(p.relative_to(MODULE_DIR)).replace("\\", "/")
        for p in [*MODULE_DIR.glob("*.py"), *(MODULE_DIR / "SCNLandmarksLib").rglob("*.py")]
        if "__pycache__" not in p.parts
    )
    resource_files = sorted(
        str(p.relative_to(MODULE_DIR)).replace("\\", "/")
        for p in (MODULE_DIR / "Resources").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    )
    assert sorted(set(python_files) - set(scripts)) == [], "Python files missing from MODULE_PYTHON_SCRIPTS"
    assert sorted(set(resource_files) - set(resources)) == [], "resources missing from MODULE_PYTHON_RESOURCES"
    for listed in scripts + resources:
        assert (MODULE_DIR / listed).is_file(), f"CMakeLists.txt lists {listed}, which does not exist"
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\).*"
                     r"add_subdirectory\(Testing\)", text, re.DOTALL)
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text()
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_extension_cmake_reads_metadata_and_depends_on_pytorch():
    top = (REPOSITORY / "CMakeLists.txt").read_text(encoding="utf-8")
    metadata = (REPOSITORY / "SCNLandmarks.cmake").read_text(encoding="utf-8")
    for pattern in (r"cmake_minimum_required\(", r"project\(SCNLandmarks\)", r"include\(.*SCNLandmarks\.cmake\)",
                    r"find_package\(Slicer REQUIRED\)", r"include\(\$\{Slicer_USE_FILE\}\)",
                    r"add_subdirectory\(SCNLandmarks\)", r"Slicer_EXTENSION_GENERATE_CONFIG", r"Slicer_EXTENSION_CPACK"):
        assert re.search(pattern, top), pattern
    assert top.index("SCNLandmarks.cmake") < top.index("find_package(Slicer")
    setting = r'set\((EXTENSION_\w+)\s+"?([^")]*)"?\)'
    in_top, in_metadata = dict(re.findall(setting, top)), dict(re.findall(setting, metadata))
    # The Extensions Index and the Extension Wizard read these four from the top-level file's text.
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert in_top.get(key), f"{key} is not set in the top-level CMakeLists.txt"
    for key in ("EXTENSION_NAME", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_STATUS"):
        assert in_metadata.get(key), f"{key} is not set in SCNLandmarks.cmake"
    assert not set(in_top) & set(in_metadata), "each value has one home"
    assert in_top["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    # The URLs point at files of this repository that exist.
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        relative = in_top[key].split("/main/", 1)[1]
        assert (REPOSITORY / relative).is_file(), f"{key} points to {relative}, which does not exist"
    assert (REPOSITORY / "LICENSE").read_text(encoding="utf-8").lstrip().startswith("Apache License")


# --------------------------------------------------------------------------- imports and dependencies


def _top_level_imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, ast.Import):
                names.update(alias.name.split(".")[0] for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom) and statement.module:
                names.add(statement.module.split(".")[0])
            elif isinstance(statement, (ast.If, ast.Try)):
                visit(statement.body)
                visit(getattr(statement, "orelse", []))
                for handler in getattr(statement, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names


def test_module_imports_no_heavy_package_at_module_level():
    imports = _top_level_imports(_module_tree())
    assert "slicer" in imports  # the walk does see the imports
    assert not imports & {"torch", "SimpleITK", "scipy", "numpy"}
    adapter = ast.parse((MODULE_DIR / "SCNLandmarksLib" / "slicer_side" / "mrml_adapter.py").read_text(encoding="utf-8"))
    assert not _top_level_imports(adapter) & {"torch", "SimpleITK"}
    # Slicer stays out of the engine package itself.
    init = ast.parse((MODULE_DIR / "SCNLandmarksLib" / "__init__.py").read_text(encoding="utf-8"))
    assert not _top_level_imports(init) & {"slicer", "vtk", "qt", "torch"}


def test_module_and_logic_load_without_torch_or_simpleitk():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "sys.modules['SimpleITK'] = None\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import slicer_stubs, slicer\n"
        "module = slicer_stubs.load_module()\n"
        "slicer.mrmlScene = slicer.vtkMRMLScene()\n"
        "logic = module.SCNLandmarksLogic(casesFolder='unused-cases', userModelsFolder='unused-models')\n"
        "logic.getParameterNode()\n"
        "print(logic.environmentSummary())\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_requirements_never_list_packages_slicer_or_pytorch_utils_provide():
    lines = [
        line.split("#")[0].strip()
        for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    names = {re.split(r"[<>=!~\[; ]", line)[0].lower() for line in lines}
    assert "scipy" in names
    assert not names & {"simpleitk", "numpy", "torch", "vtk"}
    assert all(">=" in line and "==" not in line for line in lines), "use minimum versions, never exact pins"


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "SCNLandmarks.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_user_visible_strings_in_logic_errors_are_translatable():
    """Raised messages and label texts go through _() so Slicer can translate them."""
    untranslated = []
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            first = node.exc.args[0]
            if isinstance(first, (ast.Constant, ast.JoinedStr)):
                untranslated.append(ast.unparse(node))
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            literal = isinstance(node.value, ast.JoinedStr) or (
                isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) and node.value.value
            )
            if node.targets[0].attr in ("text", "toolTip") and literal:
                untranslated.append(ast.unparse(node))
    assert untranslated == []
