"""Installing what the module needs inside 3D Slicer: PyTorch through PyTorch Utils, the rest with pip.

Slicer-side, like :mod:`.mrml_adapter`: Slicer is imported inside the functions that need it,
so this file loads (and its pure helpers are testable) without the application. Nothing runs
at import or in a constructor; :func:`ensure_requirements` is quick when everything is there.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from importlib import metadata
from pathlib import Path

__all__ = [
    "MINIMUM_TORCH_VERSION",
    "NEVER_REINSTALL",
    "InstallError",
    "ensure_requirements",
    "in_slicer_application",
    "missing_requirements",
    "packages_already_imported",
    "requirement_name",
    "requirements_file",
]

# PyTorch below this version is refused (PyTorch Utils installs a matching build).
MINIMUM_TORCH_VERSION = "2.1"
# Packages Slicer ships (or PyTorch Utils installs with the right GPU build): pip must never
# reinstall or upgrade them, or Slicer's own modules may break.
NEVER_REINSTALL = ("SimpleITK", "numpy", "torch", "vtk")


class InstallError(RuntimeError):
    """A required package is missing and was not installed (the user declined, or it failed)."""


def in_slicer_application() -> bool:
    """True inside the Slicer application (not with slicer-core or a plain Python)."""
    slicer = sys.modules.get("slicer")
    return getattr(slicer, "app", None) is not None


def _(text: str) -> str:
    """The message in the application's language inside Slicer; as it is elsewhere."""
    if not in_slicer_application():
        return text
    from slicer.i18n import tr

    return tr(text)


def requirements_file() -> Path:
    """The module's ``Resources/requirements.txt`` (one pip specifier per line)."""
    return Path(__file__).resolve().parents[2] / "Resources" / "requirements.txt"


def requirement_name(requirement: str) -> str:
    """The distribution name of a pip specifier: ``"scipy >=1.10; python_version>'3.9'"`` -> ``"scipy"``."""
    name = requirement.replace(" ", "").split(";")[0]
    for separator in ("[", ">", "<", "=", "!", "~"):
        name = name.split(separator)[0]
    return name


def packages_already_imported(requirements: list[str]) -> list[str]:
    """The packages of ``requirements`` (pip specifiers) that this Python has already imported:
    installing another version of them only takes effect after a restart."""
    imported = []
    for requirement in requirements:
        name = requirement_name(requirement)
        if name in sys.modules or name.replace("-", "_").lower() in sys.modules:
            imported.append(name)
    return imported


def missing_requirements(path: Path | None = None) -> list[str]:
    """Lines of the requirements file whose package is not installed."""
    missing = []
    for line in (path or requirements_file()).read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        try:
            metadata.version(requirement_name(requirement))
        except metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def ensure_requirements(*, ask_confirmation: bool = True) -> None:
    """Install what is missing: PyTorch through PyTorch Utils, other packages with pip.

    SimpleITK, numpy, torch and vtk are never reinstalled by pip.

    Raises:
        InstallError: a package is missing and was not installed.
    """
    if importlib.util.find_spec("torch") is None:
        _install_torch(ask_confirmation)
    version = metadata.version("torch")
    if _version_tuple(version) < _version_tuple(MINIMUM_TORCH_VERSION):
        raise InstallError(_(
            "PyTorch {version} is installed but SCNLandmarks needs {minimum} or newer. "
            "Update it in the 'PyTorch Utils' module, then restart Slicer."
        ).format(version=version, minimum=MINIMUM_TORCH_VERSION))
    missing = missing_requirements()
    if missing:
        _pip_install(missing, ask_confirmation)


def _install_torch(ask_confirmation: bool) -> None:
    if not in_slicer_application():
        raise InstallError(_("PyTorch is not installed; install it with: pip install 'torch>={minimum}'").format(
            minimum=MINIMUM_TORCH_VERSION))
    try:
        import PyTorchUtils
    except ImportError as error:
        raise InstallError(_(
            "SCNLandmarks needs the 'PyTorch' extension. Install it from the Extensions Manager and restart Slicer."
        )) from error
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if not torch_logic.torchInstalled():
        # PyTorch Utils picks the build that matches this computer's GPU driver (or a CPU build).
        torch = torch_logic.installTorch(askConfirmation=ask_confirmation,
                                         torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
        if torch is None:
            raise InstallError(_("PyTorch is required for landmark detection; it was not installed."))


def _pip_install(requirements: list[str], ask_confirmation: bool) -> None:
    if not in_slicer_application():
        raise InstallError(_("Missing Python packages: {names}").format(names=", ".join(requirements)))
    import slicer

    try:  # Slicer 5.12 and later; slicer/__init__ does not import it, so import it by name
        import slicer.packaging as packaging
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        requested = packaging.load_requirements(str(requirements_file()))
        options = {"requester": "SCNLandmarks", "prompt_install": ask_confirmation}
        # Asked of the signature, not by retrying on TypeError: a TypeError from inside the
        # install must surface, not start a second install.
        if "skip_packages" in inspect.signature(packaging.pip_ensure).parameters:
            options["skip_packages"] = list(NEVER_REINSTALL)
        packaging.pip_ensure(requested, **options)
        return
    if ask_confirmation and not slicer.util.confirmOkCancelDisplay(
        _("SCNLandmarks needs these Python packages, which will be downloaded and installed now:"),
        detailedText="\n".join(requirements),
    ):
        raise InstallError(_("Required Python packages were not installed: {names}").format(
            names=", ".join(requirements)))
    outdated = packages_already_imported(requirements)
    for requirement in requirements:
        slicer.util.pip_install(requirement)
    if outdated and slicer.util.confirmYesNoDisplay(
        _("A new version of {names} was installed, but the old one is still in use until Slicer restarts. "
          "Restart Slicer now?").format(names=", ".join(outdated))
    ):
        slicer.util.restart()


def _version_tuple(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)
