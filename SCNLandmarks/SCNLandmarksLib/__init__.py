"""SCNLandmarksLib: the SpatialConfiguration-Net landmark engine (no Slicer or Qt imports).

Frames and axis order are defined in :mod:`SCNLandmarksLib.geometry`.
"""

__version__ = "0.1.0"
