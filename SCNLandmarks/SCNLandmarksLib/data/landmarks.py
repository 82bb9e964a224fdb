"""The landmark set of one image: names, LPS positions, missing points, confidences, points to check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["Landmarks", "default_names"]


def default_names(count: int) -> list[str]:
    """The names landmarks get when their file gives none: ``L1..L<count>``, in column order."""
    return [f"L{i + 1}" for i in range(count)]


@dataclass
class Landmarks:
    """Named landmarks of one image in physical LPS millimetres.

    Attributes:
        names: one label per landmark, in model channel order.
        positions: ``(N, D)`` float array, x, y[, z] order, LPS mm. A missing landmark
            (not placed, not visible) is a row of NaN; it is never written as (0, 0, 0).
        descriptions: optional free text per landmark (for example the anatomical definition).
        confidences: optional ``(N,)`` detection confidence in [0, 1]; NaN where unknown.
        corrected: optional ``(N,)`` bool, True where a person moved the point after detection.
        expected_errors: optional ``(N,)`` the detector's expected distance, in mm, between each
            point and where an expert would place it; NaN where unknown.
        check: optional ``(N,)`` bool, True where the detector asks a person to check the point.
    """

    names: list[str]
    positions: np.ndarray
    descriptions: list[str] = field(default_factory=list)
    confidences: np.ndarray | None = None
    corrected: np.ndarray | None = None
    expected_errors: np.ndarray | None = None
    check: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        self.positions = np.asarray(self.positions, dtype=float)
        if self.positions.ndim != 2 or self.positions.shape[1] not in (2, 3):
            msg = f"Landmark positions must have shape (N, 2) or (N, 3), got {self.positions.shape}"
            raise ValueError(msg)
        count = len(self.names)
        if self.positions.shape[0] != count:
            msg = f"{count} landmark names but {self.positions.shape[0]} positions"
            raise ValueError(msg)
        if len(set(self.names)) != count:
            duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
            msg = f"Landmark names must be unique; repeated: {', '.join(duplicates)}"
            raise ValueError(msg)
        if not self.descriptions:
            self.descriptions = [""] * count
        if len(self.descriptions) != count:
            msg = f"{count} landmark names but {len(self.descriptions)} descriptions"
            raise ValueError(msg)
        # A partly missing row would be a corrupt point; treat it as missing entirely.
        self.positions[~np.isfinite(self.positions).all(axis=1)] = np.nan
        if self.confidences is not None:
            self.confidences = np.asarray(self.confidences, dtype=float).reshape(-1)
            if self.confidences.shape[0] != count:
                msg = f"{count} landmarks but {self.confidences.shape[0]} confidences"
                raise ValueError(msg)
        if self.corrected is not None:
            self.corrected = np.asarray(self.corrected, dtype=bool).reshape(-1)
            if self.corrected.shape[0] != count:
                msg = f"{count} landmarks but {self.corrected.shape[0]} corrected flags"
                raise ValueError(msg)
        if self.expected_errors is not None:
            self.expected_errors = np.asarray(self.expected_errors, dtype=float).reshape(-1)
            if self.expected_errors.shape[0] != count:
                msg = f"{count} landmarks but {self.expected_errors.shape[0]} expected errors"
                raise ValueError(msg)
        if self.check is not None:
            self.check = np.asarray(self.check, dtype=bool).reshape(-1)
            if self.check.shape[0] != count:
                msg = f"{count} landmarks but {self.check.shape[0]} check flags"
                raise ValueError(msg)

    @property
    def dimension(self) -> int:
        return int(self.positions.shape[1])

    @property
    def missing(self) -> np.ndarray:
        """``(N,)`` bool, True where the landmark has no position."""
        return ~np.isfinite(self.positions).all(axis=1)

    def __len__(self) -> int:
        return len(self.names)

    def to_check(self, low_confidence_threshold: float | None) -> np.ndarray:
        """``(N,)`` bool: the points a person should check.

        The detector's decision (``check``) where there is one; for landmarks without it (an
        older model, a file written before), the points whose confidence is below
        ``low_confidence_threshold`` (None: none).
        """
        if self.check is not None:
            return self.check.copy()
        if self.confidences is None or low_confidence_threshold is None:
            return np.zeros(len(self), dtype=bool)
        return np.isfinite(self.confidences) & (self.confidences < low_confidence_threshold)

    @classmethod
    def from_positions(
        cls,
        positions: npt.ArrayLike,
        *,
        names: Sequence[str] | None = None,
        descriptions: Sequence[str] | None = None,
    ) -> Landmarks:
        """Landmarks with default names ``L1..LN`` unless ``names`` is given."""
        positions = np.asarray(positions, dtype=float)
        if names is None:
            names = default_names(positions.shape[0])
        return cls(names=list(names), positions=positions, descriptions=list(descriptions or []))

    def reordered(self, names: Sequence[str]) -> Landmarks:
        """The same landmarks in the order of ``names``; names not present become missing.

        Raises:
            ValueError: when none of ``names`` is present (almost surely the wrong landmark set).
        """
        lookup = {n: i for i, n in enumerate(self.names)}
        if not any(n in lookup for n in names):
            msg = (
                "None of the expected landmark names is in this landmark set "
                f"(expected e.g. {list(names)[:3]}, found e.g. {self.names[:3]})"
            )
            raise ValueError(msg)
        positions = np.full((len(names), self.dimension), np.nan)
        descriptions = []
        confidences = np.full(len(names), np.nan) if self.confidences is not None else None
        corrected = np.zeros(len(names), dtype=bool) if self.corrected is not None else None
        expected = np.full(len(names), np.nan) if self.expected_errors is not None else None
        check = np.zeros(len(names), dtype=bool) if self.check is not None else None
        for row, name in enumerate(names):
            source = lookup.get(name)
            descriptions.append(self.descriptions[source] if source is not None else "")
            if source is None:
                continue
            positions[row] = self.positions[source]
            if confidences is not None:
                confidences[row] = self.confidences[source]
            if corrected is not None:
                corrected[row] = self.corrected[source]
            if expected is not None:
                expected[row] = self.expected_errors[source]
            if check is not None:
                check[row] = self.check[source]
        return Landmarks(list(names), positions, descriptions, confidences, corrected, expected, check)
