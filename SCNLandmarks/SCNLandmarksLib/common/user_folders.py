"""Where SCNLandmarks keeps a user's own data (models, training cases)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["user_data_folder"]

# One root for everything a user makes, so it is found, backed up or moved in one place.
USER_ROOT_NAME = ".SCNLandmarks"


def user_data_folder(name: str, *, environment_variable: str, create: bool = False) -> Path:
    """``$environment_variable`` when set, else ``~/.SCNLandmarks/<name>``.

    Args:
        name: sub-folder of the user root, e.g. ``"models"`` or ``"cases"``.
        environment_variable: variable that overrides the whole path (shared or offline sites).
        create: create the folder (and its parents) when it does not exist.
    """
    override = os.environ.get(environment_variable)
    folder = Path(override).expanduser() if override else Path.home() / USER_ROOT_NAME / name
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder
