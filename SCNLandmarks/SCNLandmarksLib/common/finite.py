"""Numbers from reports and model files, where NaN, infinity or a value of another type may stand."""

from __future__ import annotations

import math
import numbers

__all__ = ["finite_or_none"]


def finite_or_none(value: object) -> float | None:
    """``value`` as a float where it is a finite real number (NumPy's included, not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
