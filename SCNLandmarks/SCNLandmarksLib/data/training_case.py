"""One annotated image: what training, fine-tuning and evaluation learn from (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass

from ..imaging.image import Image
from .landmarks import Landmarks

__all__ = ["TrainingCase"]


@dataclass
class TrainingCase:
    """One annotated image. Missing landmarks (NaN) are left out of the loss.

    Attributes:
        image: the image, geometry in LPS mm.
        landmarks: its landmarks, LPS mm, matched to a model's by name.
        name: an identifier for messages and reports (usually the file name without extension).
    """

    image: Image
    landmarks: Landmarks
    name: str = ""
