"""Numbers from reports and model files: real and finite, or None."""

from __future__ import annotations


def test_finite_or_none_takes_real_numbers_only():
    import numpy as np

    from SCNLandmarksLib.common.finite import finite_or_none

    assert finite_or_none(2) == 2.0 and finite_or_none(np.float32(1.5)) == 1.5
    assert [finite_or_none(v) for v in (None, True, "3", float("nan"), float("inf"))] == [None] * 5
