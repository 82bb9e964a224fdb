"""Errors that the engine raises on purpose, each with a message meant for the user."""

from __future__ import annotations

__all__ = ["ModelFileError", "TrainingCancelled"]


class ModelFileError(ValueError):
    """A model file is missing, damaged, not ours, or does not fit the request."""


class TrainingCancelled(Exception):
    """Training stopped because the user asked; the previous model file is untouched.

    ``checkpoint``: the checkpoint written on the way out, to resume from (None: none kept).
    """

    def __init__(self, message: str = "", *, checkpoint: object = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
