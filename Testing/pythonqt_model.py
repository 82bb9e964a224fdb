"""A faithful model of Slicer's Qt layer for tests: PySide6 widgets seen the way PythonQt shows them.

This is not Slicer. It lets the module's real ``.ui`` file and Slicer's real GUI connectors
(``slicer.parameterNodeWrapper.guiConnectors``, from ``../shared/slicer-python``) run here:

- **Stand-in Slicer/CTK widget classes** are generated from the C++ headers in
  ``../shared/slicer-python/headers``: one PySide6 class per header, deriving from the base the
  header names, with exactly the ``Q_PROPERTY`` lines, ``Q_SIGNALS`` and flag/enum values written
  there. A ``.ui`` property or enum value that the header lacks is therefore caught, as real Slicer
  would (silently) ignore it. Behaviour beyond storing values is what the CTK/Slicer sources do
  and is kept to the minimum the connectors use: writing a property whose header declares a
  ``<name>Changed`` signal emits it when the value changes; ``qMRMLNodeComboBox`` keeps its
  current node (``currentNode()``/``setCurrentNode()`` slots, ``currentNodeChanged`` signal).
- **A PythonQt-like view** (:func:`wrap`): Qt properties read and written as attributes
  (``button.enabled = False``), signals connected by signature (``button.connect("clicked(bool)",
  slot)``) or as objects, other methods called through, ``findChildren(qt.QWidget)`` with
  PythonQt's class objects, and one wrapper per Qt object so ``type(widget) == qt.QCheckBox`` holds
  as in Slicer.
- ``qt``/``ctk`` modules (:func:`qt_module`, :func:`ctk_module`) whose class names are those
  PythonQt wrapper classes.

Qt here is Qt 6 (PySide6); Slicer 5.8 builds on Qt 5. The properties of the plain Qt widgets a
``.ui`` file uses are the same in both for the classes this module uses.
"""

from __future__ import annotations

import re
import types
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets
from PySide6.QtCore import Property, QObject, Signal, Slot

__all__ = [
    "HeaderClass",
    "PythonQtObject",
    "UiWidget",
    "ctk_module",
    "load_ui",
    "placeholder_class",
    "parse_header",
    "qt_module",
    "read_headers",
    "read_ui_file",
    "slicer_classes",
    "stand_in_classes",
    "unwrap",
    "wrap",
    "wrap_class",
]

_PYTHON_TYPES = {"bool": bool, "int": int, "double": float, "float": float, "QString": str, "QStringList": list}


@dataclass(frozen=True)
class HeaderClass:
    """What one C++ widget header declares.

    Attributes:
        name: the class name.
        base: the public base class.
        properties: ``Q_PROPERTY`` name -> C++ type.
        writers: ``Q_PROPERTY`` name -> its WRITE function (properties without one are read-only).
        signals: signal name -> C++ argument types of its first declaration.
        enum_values: every enumerator named in the header's enums.
        slots: names of the public slots.
    """

    name: str
    base: str
    properties: dict[str, str]
    writers: dict[str, str]
    signals: dict[str, tuple[str, ...]]
    enum_values: frozenset[str]
    slots: frozenset[str] = field(default_factory=frozenset)


def _section_functions(text: str, heading: str) -> list[tuple[str, tuple[str, ...]]]:
    """``(name, argument types)`` of the ``void`` functions under each ``heading:`` of a header."""
    found = []
    for match in re.finditer(rf"^\s*{heading}\s*:\s*$", text, flags=re.MULTILINE):
        body = text[match.end():]
        end = re.search(r"^\s*(public|protected|private)\b[^:\n]*:\s*$|^\s*Q_SIGNALS\s*:|^\s*signals\s*:|^};", body,
                        flags=re.MULTILINE)
        body = body[: end.start()] if end else body
        for function in re.finditer(r"\bvoid\s+(\w+)\s*\(([^)]*)\)", body):
            arguments = tuple(_argument_type(part) for part in function.group(2).split(",") if part.strip())
            found.append((function.group(1), arguments))
    return found


def _argument_type(argument: str) -> str:
    """``"const QString& id = QString()"`` -> ``"const QString&"``; a bare type stays as it is."""
    argument = argument.split("=")[0].strip()
    named = re.match(r"^(.+?)\s*\b(\w+)$", argument)
    return named.group(1).strip() if named and named.group(1).strip() not in ("const", "unsigned") else argument


def parse_header(text: str) -> HeaderClass:
    """The class, its base, properties, signals, slots and enum values declared in a header's text."""
    code = re.sub(r"//[^\n]*", "", text)
    declaration = re.search(r"^class\s+(?:\w+_EXPORT\s+)?(\w+)\s*:\s*public\s+(\w+)\s*\{", code, flags=re.MULTILINE)
    if declaration is None:
        msg = "no exported class with a public base found"
        raise ValueError(msg)
    properties, writers = {}, {}
    for match in re.finditer(r"Q_PROPERTY\(\s*([\w:]+\s*\**)\s+(\w+)\s+READ\s+\w+([^)]*)\)", code):
        properties[match.group(2)] = match.group(1).strip()
        writer = re.search(r"WRITE\s+(\w+)", match.group(3))
        if writer:
            writers[match.group(2)] = writer.group(1)
    signals: dict[str, tuple[str, ...]] = {}
    for heading in ("Q_SIGNALS", "signals"):
        for name, arguments in _section_functions(code, heading):
            signals.setdefault(name, arguments)
    slots = {name for heading in (r"public\s+Q_SLOTS", r"public\s+slots") for name, _ in _section_functions(code, heading)}
    enum_values = set()
    for enum in re.finditer(r"\benum\s+\w+\s*\{([^}]*)\}", code):
        enum_values.update(re.findall(r"^\s*(\w+)", item)[0] for item in enum.group(1).split(",") if item.strip())
    return HeaderClass(
        name=declaration.group(1), base=declaration.group(2), properties=properties, writers=writers,
        signals=signals, enum_values=frozenset(enum_values), slots=frozenset(slots),
    )


def read_headers(folder: Path) -> dict[str, HeaderClass]:
    """Every widget header of ``folder`` that declares a class with a base, by class name."""
    classes = {}
    for path in sorted(folder.glob("*.h")):
        try:
            header = parse_header(path.read_text(encoding="utf-8", errors="replace"))
        except ValueError:
            continue
        classes[header.name] = header
    return classes


def _plain(cpp_type: str) -> str:
    return cpp_type.replace("const ", "").replace("&", "").strip()


def _make_signal(arguments: tuple[str, ...]) -> Signal:
    """A signal emitted with Python values whose C++ signature (``mrmlSceneChanged(vtkMRMLScene*)``)
    is also registered, so a ``.ui`` connection by signature finds it or fails as in Slicer."""
    python = tuple(_PYTHON_TYPES.get(_plain(a), object) for a in arguments)
    cpp = tuple(_plain(a) for a in arguments)
    if all(c in _PYTHON_TYPES for c in cpp):
        return Signal(*python)
    return Signal(python, cpp)


def _default(cpp_type: str) -> Any:
    python_type = _PYTHON_TYPES.get(cpp_type)
    return python_type() if python_type is not None else 0


def _make_property(name: str, cpp_type: str, signal_name: str | None) -> Property:
    python_type = _PYTHON_TYPES.get(cpp_type)
    qt_type = {list: "QStringList"}.get(python_type, python_type) if python_type else int

    def read(self: QObject) -> Any:
        return self._values.get(name, _default(cpp_type))

    def write(self: QObject, value: Any) -> None:
        if python_type is float:
            value = float(value)
        changed = self._values.get(name, _default(cpp_type)) != value
        self._values[name] = value
        if changed and signal_name is not None:
            getattr(self, signal_name).emit(value)

    return Property(qt_type, read, write)


def stand_in_classes(headers: dict[str, HeaderClass]) -> dict[str, type]:
    """One PySide6 widget class per header, with its properties, signals and setters.

    A class whose base is neither a Qt widget nor another header here is left out.
    """
    made: dict[str, type] = {}

    def build(name: str) -> type | None:
        if name in made:
            return made[name]
        header = headers[name]
        base = build(header.base) if header.base in headers else getattr(QtWidgets, header.base, None)
        if base is None:
            return None  # derives from a class without a header here (qSlicerWidget)
        attributes: dict[str, Any] = {}
        for signal_name, arguments in header.signals.items():
            attributes[signal_name] = _make_signal(arguments)
        for property_name, cpp_type in header.properties.items():
            notify = property_name + "Changed"
            attributes[property_name] = _make_property(property_name, cpp_type, notify if notify in header.signals else None)
            writer = header.writers.get(property_name)
            if writer and writer not in header.properties:
                attributes[writer] = lambda self, value, _name=property_name: self.setProperty(_name, value)

        def __init__(self: QObject, parent: QObject | None = None) -> None:  # noqa: N807
            base.__init__(self, parent)
            if not hasattr(self, "_values"):
                self._values = {}

        attributes["__init__"] = __init__
        if issubclass(base, QtWidgets.QAbstractButton):
            attributes["paintEvent"] = lambda self, event: None  # pure virtual in QAbstractButton
        if name == "qMRMLNodeComboBox":
            attributes.update(_NODE_COMBO_BOX_SLOTS)
        if name == "qMRMLWidget":
            attributes.update({"setMRMLScene": _set_widget_scene, "mrmlScene": lambda self: getattr(self, "_scene", None)})
        made[name] = type(name, (base,), attributes)
        return made[name]

    for class_name in headers:
        build(class_name)
    return made


@Slot("vtkMRMLScene*", name="setMRMLScene")
def _set_widget_scene(self: QObject, scene: Any) -> None:
    """qMRMLWidget emits mrmlSceneChanged(scene), which a .ui connects to its node selectors; a
    Python object cannot travel through that C++ signature here, so the scene is handed to every
    descendant that takes one (the connections themselves are checked when the .ui is loaded)."""
    self._scene = scene
    for child in self.findChildren(QtWidgets.QWidget):
        if callable(getattr(type(child), "setMRMLScene", None)):
            child.setMRMLScene(scene)


@Slot("vtkMRMLScene*", name="setMRMLScene")
def _set_combo_scene(self: QObject, scene: Any) -> None:
    self._scene = scene


def _set_current_node(self: QObject, node: Any) -> None:
    if getattr(self, "_current", None) is not node:
        self._current = node
        self.currentNodeChanged.emit(node)


_NODE_COMBO_BOX_SLOTS = {
    # qMRMLNodeComboBox's public slots (see its header); the node list itself is not modelled.
    "currentNode": lambda self: getattr(self, "_current", None),
    "setCurrentNode": _set_current_node,
    "setMRMLScene": _set_combo_scene,
    "mrmlScene": lambda self: getattr(self, "_scene", None),
}


# --- The PythonQt-like view -------------------------------------------------------------------

_wrap_classes: dict[type, type] = {}
_wrappers: dict[int, Any] = {}


class _PythonQtClass(type):
    """PythonQt's class objects: calling one builds the Qt object; enums and static methods
    (``qt.QHeaderView.Stretch``, ``qt.QFile.ReadOnly``) are read from the Qt class."""

    def __call__(cls, *args: Any) -> Any:
        return wrap(cls._qt_class(*[unwrap(a) for a in args]))

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls._qt_class, name)


class PythonQtObject(metaclass=_PythonQtClass):
    """A Qt object as PythonQt shows it to Python (see the module docstring)."""

    _qt_class: type = QObject

    def __getattr__(self, name: str) -> Any:
        qobject = object.__getattribute__(self, "_qobject")
        meta = qobject.metaObject()
        index = meta.indexOfProperty("objectName" if name == "name" else name)  # PythonQt's alias
        if index >= 0:
            return _to_python(meta.property(index).read(qobject))
        attribute = getattr(qobject, name)
        if isinstance(attribute, QtCore.SignalInstance) or not callable(attribute):
            return attribute
        return lambda *args, **kwargs: _to_python(attribute(*[unwrap(a) for a in args], **kwargs))

    def __setattr__(self, name: str, value: Any) -> None:
        qobject = object.__getattribute__(self, "_qobject")
        meta = qobject.metaObject()
        index = meta.indexOfProperty(name)
        if index < 0:
            object.__setattr__(self, name, value)  # PythonQt lets Python code add attributes to wrappers
            return
        if not meta.property(index).write(qobject, unwrap(value)):
            msg = f"{meta.className()}.{name} could not be set to {value!r}"
            raise AttributeError(msg)

    def __bool__(self) -> bool:
        return True

    def connect(self, signature: str, slot: Any) -> None:
        """PythonQt's ``widget.connect("clicked(bool)", slot)``."""
        getattr(object.__getattribute__(self, "_qobject"), signature.split("(")[0]).connect(slot)

    def disconnect(self, signature: str, slot: Any) -> None:
        getattr(object.__getattribute__(self, "_qobject"), signature.split("(")[0]).disconnect(slot)

    def findChildren(self, wanted: type) -> list[Any]:  # noqa: N802 (Qt's name)
        qt_class = wanted._qt_class if isinstance(wanted, _PythonQtClass) else wanted
        return [wrap(child) for child in object.__getattribute__(self, "_qobject").findChildren(qt_class)]

    def __repr__(self) -> str:
        qobject = object.__getattribute__(self, "_qobject")
        return f"<PythonQt {qobject.metaObject().className()} '{qobject.objectName()}'>"


def wrap_class(qt_class: type) -> type:
    """The PythonQt class for a Qt class, with PythonQt's inheritance chain."""
    if qt_class not in _wrap_classes:
        qt_bases = [b for b in qt_class.__bases__ if issubclass(b, QObject)]
        bases = tuple(wrap_class(b) for b in qt_bases) or (PythonQtObject,)
        _wrap_classes[qt_class] = _PythonQtClass(qt_class.__name__, bases, {"_qt_class": qt_class})
    return _wrap_classes[qt_class]


def placeholder_class(name: str) -> type:
    """A PythonQt class for a Slicer/CTK class that has no header here: nothing is ever one."""
    return _PythonQtClass(name, (PythonQtObject,), {"_qt_class": type(name, (), {})})


def wrap(qobject: Any) -> Any:
    """The one PythonQt view of ``qobject`` (other values are returned as they are)."""
    if not isinstance(qobject, QObject):
        return qobject
    key = id(qobject)
    known = _wrappers.get(key)
    if known is None or object.__getattribute__(known, "_qobject") is not qobject:
        known = object.__new__(wrap_class(type(qobject)))
        object.__setattr__(known, "_qobject", qobject)
        _wrappers[key] = known
    return known


def unwrap(value: Any) -> Any:
    """The Qt value PythonQt passes for a Python one: the wrapped object, or a tuple as a list
    (PythonQt converts any sequence to a ``QStringList``/``QList``)."""
    if isinstance(value, PythonQtObject):
        return object.__getattribute__(value, "_qobject")
    return list(value) if isinstance(value, tuple) else value


def _to_python(value: Any) -> Any:
    if isinstance(value, QObject):
        return wrap(value)
    if isinstance(value, list):
        return [_to_python(v) for v in value]
    return value


class _ClassNamespace(types.ModuleType):
    """A ``qt``/``ctk`` module: each Qt class name gives its PythonQt class; others raise."""

    def __init__(self, name: str, classes: dict[str, type], fallback: Any | None) -> None:
        super().__init__(name)
        self._classes = classes
        self._fallback = fallback

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._classes:
            return wrap_class(self._classes[name])
        if self._fallback is None:
            for source in (QtWidgets, QtCore, QtGui):
                value = getattr(source, name, None)
                if value is not None:
                    return wrap_class(value) if isinstance(value, type) and issubclass(value, QObject) else value
            msg = f"module {self.__name__!r} has no attribute {name!r}"
            raise AttributeError(msg)
        return self._fallback(name)


def qt_module(classes: dict[str, type] | None = None) -> types.ModuleType:
    """PythonQt's ``qt`` module: Qt classes by name (widgets, core, gui) as PythonQt classes;
    its ``QUiLoader`` knows the stand-in classes (as Slicer's knows the real ones)."""
    stand_ins = dict(classes or {})

    class QUiLoader(QtUiTools.QUiLoader):
        def __init__(self, parent: QObject | None = None) -> None:
            super().__init__(parent)
            for cls in stand_ins.values():
                self.registerCustomWidget(cls)

    return _ClassNamespace("qt", {"QUiLoader": QUiLoader}, None)


# Slicer classes that the real GUI connectors look up on the ``slicer`` package and that have no
# header here: placeholders, so that no widget is ever one of them.
SLICER_CLASSES_WITHOUT_HEADER = ("qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox", "qSlicerWidget")


def slicer_classes(classes: dict[str, type]) -> dict[str, type]:
    """The PythonQt classes PythonQt puts on the ``slicer`` package (``slicer.qMRMLNodeComboBox``...)."""
    found: dict[str, type] = {name: wrap_class(cls) for name, cls in classes.items() if name.startswith("qMRML")}
    found.update({name: placeholder_class(name) for name in SLICER_CLASSES_WITHOUT_HEADER})
    return found


def ctk_module(classes: dict[str, type]) -> types.ModuleType:
    """PythonQt's ``ctk`` module: the stand-in CTK classes; CTK classes without a header here get
    a placeholder class (so ``type(widget) == ctk.ctkCheckBox`` is simply False)."""
    absent: dict[str, type] = {}

    def unknown(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return absent.setdefault(name, placeholder_class(name))

    return _ClassNamespace("ctk", {k: v for k, v in classes.items() if k.startswith("ctk")}, unknown)


# --- The .ui file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UiWidget:
    """One ``<widget>`` of a ``.ui`` file: its class, name and the properties it sets."""

    class_name: str
    name: str
    properties: dict[str, ElementTree.Element]
    dynamic: frozenset[str]


def read_ui_file(path: Path) -> list[UiWidget]:
    """Every widget of a Qt Designer file, with its ``<property>`` elements (``stdset="0"`` = dynamic)."""
    widgets = []
    for element in ElementTree.parse(path).getroot().iter("widget"):
        properties = {p.get("name"): p for p in element.findall("property")}
        dynamic = frozenset(p.get("name") for p in element.findall("property") if p.get("stdset") == "0")
        widgets.append(UiWidget(element.get("class"), element.get("name"), properties, dynamic))
    return widgets


def load_ui(path: Path, classes: dict[str, type]) -> QtWidgets.QWidget:
    """The ``.ui`` file built by ``QUiLoader`` with the stand-in classes registered."""
    loader = QtUiTools.QUiLoader()
    for cls in classes.values():
        loader.registerCustomWidget(cls)
    widget = loader.load(str(path))
    if widget is None:
        msg = f"QUiLoader could not build {path}: {loader.errorString()}"
        raise ValueError(msg)
    return widget
