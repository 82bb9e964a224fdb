"""The bundled sample cephalogram, written once with its true pixel size.

The sample is kept as a JPEG (a tenth of the size of any format that carries geometry), and a
JPEG has no pixel size: loaded as it is, it would be read at 1 mm per pixel and every distance
would be ten times too large. :func:`sample_volume_file` writes it once as NRRD with its 0.1 mm
pixels, for Slicer's Sample Data module and anyone who wants a ready-to-use volume.
"""

from __future__ import annotations

from pathlib import Path

from ..imaging.image_io import read_image, write_image

__all__ = ["SAMPLE_IMAGE", "SAMPLE_NAME", "SAMPLE_SPACING_MM", "sample_volume_file"]

SAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "Resources" / "Sample" / "isbi2015_151.jpg"
SAMPLE_NAME = "SCNLandmarksCephalogram"
SAMPLE_SPACING_MM = 0.1


def sample_volume_file(folder: str | Path) -> Path:
    """The sample as ``<folder>/isbi2015_151_0.1mm.nrrd``, written on the first call (atomically).

    Raises:
        FileNotFoundError: the bundled JPEG is missing (a damaged installation).
    """
    target = Path(folder) / "isbi2015_151_0.1mm.nrrd"
    if not target.is_file():
        if not SAMPLE_IMAGE.is_file():
            msg = f"The bundled sample image {SAMPLE_IMAGE} is missing; reinstall the extension"
            raise FileNotFoundError(msg)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(read_image(SAMPLE_IMAGE, spacing=SAMPLE_SPACING_MM), target)
    return target
