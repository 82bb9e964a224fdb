"""The overlay picture: every legend line shown, 3D points off the shown slice marked, square pixels."""

from __future__ import annotations

import numpy as np

from SCNLandmarksLib.data.landmarks import Landmarks
from SCNLandmarksLib.imaging.geometry import ImageGeometry
from SCNLandmarksLib.imaging.image import Image
from SCNLandmarksLib.inference.overlay import _COLOURS, legend_lines, render_overlay

BACKGROUND = 32


def _volume(size: tuple[int, int, int], spacing: tuple[float, float, float]) -> Image:
    array = np.random.default_rng(0).uniform(0, 100, size=size[::-1]).astype(np.float32)
    return Image(array, ImageGeometry(size=size, spacing=spacing, origin=(5.0, -3.0, 20.0),
                                      direction=tuple(np.eye(3).reshape(-1))))


def test_a_legend_taller_than_the_image_is_shown_whole():
    """32 AFIDs-like landmarks on a slice 40 pixels high: the picture grows below, no line is cut."""
    volume = _volume((50, 40, 9), (1.0, 1.0, 1.0))
    index = np.column_stack([np.arange(32) % 45 + 2, np.arange(32) % 35 + 2, np.full(32, 4.0)])
    found = Landmarks.from_positions(volume.geometry.index_to_physical(index))
    picture = render_overlay(volume, found)
    assert picture.shape[0] >= (32 + 2) * 7
    panel = picture[:, 50:]
    last_line = panel[33 * 7 : 34 * 7]  # the 32nd landmark's line, at scale 1
    assert (last_line != BACKGROUND).any()
    assert (picture[40:, :50] == BACKGROUND).all()  # below the image: dark, not stretched


def test_3d_points_off_the_shown_slice_are_marked_and_their_slice_named():
    volume = _volume((60, 50, 20), (1.0, 1.0, 2.0))
    index = np.array([[10.0, 10.0, 5.0], [30.0, 20.0, 5.0], [40.0, 30.0, 12.0]])
    found = Landmarks.from_positions(volume.geometry.index_to_physical(index))
    picture = render_overlay(volume, found)
    text = legend_lines(found, np.zeros(3, bool), shown_slice=5, on_slices=[None, None, 12])
    assert "slice 5" in text[0] and text[3].endswith("(slice 12)") and "slice" not in text[1]
    third = tuple(int(c) for c in _COLOURS[2])
    # The point on slice 12 is an open square around (40, 30), not a cross through it.
    assert tuple(picture[30, 40]) != third and tuple(picture[30 - 1, 40]) != third
    ring = [tuple(picture[y, x]) for y, x in ((28, 40), (32, 40), (30, 38), (30, 42))]  # half side 2 at this size
    assert any(colour == third for colour in ring)
    first = tuple(int(c) for c in _COLOURS[0])
    assert tuple(picture[10, 10]) == first  # a point on the shown slice: a cross through it


def test_pixels_of_unequal_size_are_drawn_square_with_the_points_on_them():
    image = Image(np.zeros((30, 50), np.float32) + np.arange(50, dtype=np.float32),
                  ImageGeometry(size=(50, 30), spacing=(1.0, 2.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0)))
    found = Landmarks.from_positions(image.geometry.index_to_physical(np.array([[10.0, 10.0]])))
    picture = render_overlay(image, found)
    assert picture.shape[0] == 60  # 30 rows of 2 mm became 60 of 1 mm
    colour = tuple(int(c) for c in _COLOURS[0])
    assert tuple(picture[20, 10]) == colour or tuple(picture[21, 10]) == colour  # row 10 of 2 mm is at 20.5


def test_the_3d_slice_shown_is_the_one_most_points_lie_on():
    from SCNLandmarksLib.inference.overlay import _slice_of_most_points

    assert _slice_of_most_points(np.array([2.0, 2.0, 9.0, 9.0, 9.0]), 20) == 9
    assert _slice_of_most_points(np.array([2.0, 2.0, 9.0, 9.0, 4.0]), 20) == 2  # a tie: nearer the median (4)
    assert _slice_of_most_points(np.array([np.nan, 40.0]), 20) == 10  # none inside: the middle
    volume = _volume((60, 50, 20), (1.0, 1.0, 2.0))
    index = np.array([[10.0, 10.0, 2.0], [30.0, 20.0, 2.0], [40.0, 30.0, 9.0], [20.0, 40.0, 9.0], [45.0, 12.0, 9.0]])
    picture = render_overlay(volume, Landmarks.from_positions(volume.geometry.index_to_physical(index)))
    assert tuple(picture[30, 40]) == tuple(int(c) for c in _COLOURS[2])  # slice 9 shown: a cross on its point
