"""Errors that the engine raises on purpose, each with a message meant for the user."""

from __future__ import annotations

__all__ = ["ModelFileError", "TrainingCancelled", "unexpected_error_message"]


class ModelFileError(ValueError):
    """A model file is missing, damaged, not ours, or does not fit the request."""


class TrainingCancelled(Exception):
    """Training stopped because the user asked; the previous model file is untouched.

    ``checkpoint``: the checkpoint written on the way out, to resume from (None: none kept).
    """

    def __init__(self, message: str = "", *, checkpoint: object = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def unexpected_error_message(error: BaseException, command: str) -> str:
    """One sentence for the user about an error nobody raised for them (torch, memory, a bug).

    ``command``: what was running, as the user named it (``"train"``, ``"detect"``...).
    """
    text = str(error)
    if isinstance(error, MemoryError):
        return text or "Not enough memory; use fewer or smaller cases or images, or the CPU"
    if "out of memory" in text.lower():
        return "The GPU ran out of memory; choose the CPU device, or use fewer cases or smaller images"
    return f"The {command} run failed unexpectedly: {type(error).__name__}: {text}"
