"""Reading and writing images with SimpleITK, keeping their physical geometry exactly.

Every reader returns an :class:`~SCNLandmarksLib.imaging.image.Image`: float32 pixels in NumPy
``(z, y, x)`` order and the grid geometry in LPS millimetres, as SimpleITK defines it.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..common.atomic import atomic_path
from ..common.system_memory import memory_available_bytes
from .geometry import ImageGeometry
from .image import Image

__all__ = ["IMAGE_SUFFIXES", "check_fits_in_memory", "find_images", "grey_pixels", "image_from_sitk", "image_to_sitk",
           "is_dicom_folder", "single_file_dicom_images",
           "is_photo_file", "output_stem", "read_image", "write_image"]

logger = logging.getLogger(__name__)

# Photographic formats: their pixel size, when present at all, is a print resolution in
# dots per inch, not the detector pixel size, so it is never trusted.
_PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Formats that store header and pixels in two files; renaming the header after an atomic
# write would break the link to the pixel file.
_TWO_FILE_SUFFIXES = (".mhd", ".nhdr", ".hdr", ".img")


# The reader or writer of each extension, named: ITK chooses by the extension's exact case and
# does not know "scan.MHA" or "SCAN.NII.GZ" (some scanners and Windows tools write upper case).
_IMAGE_IO = {".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO", ".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO",
             ".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".png": "PNGImageIO", ".jpg": "JPEGImageIO",
             ".jpeg": "JPEGImageIO", ".bmp": "BMPImageIO", ".tif": "TIFFImageIO", ".tiff": "TIFFImageIO",
             ".dcm": "GDCMImageIO"}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_photo_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PNG, JPEG, BMP or TIFF file: a format without a trustworthy pixel size."""
    path = Path(path)
    return path.is_file() and _suffix(path) in _PHOTO_SUFFIXES


def _sitk_reason(error: RuntimeError) -> str:
    """The human part of a SimpleITK exception, which otherwise starts with C++ file names."""
    text = " ".join(str(error).split())
    _, marker, reason = text.partition("ERROR:")
    return (reason if marker else text).strip() or "unknown reason"


def grey_pixels(array: np.ndarray, channels: int, source: str) -> np.ndarray:
    """One float32 grey value per pixel from ``channels`` values per pixel (the last array axis
    where there are several): RGB and RGBA become the mean of R, G and B, grey plus alpha its grey.

    Raises:
        ValueError: more than 4 values per pixel (a diffusion or multi-echo series, for example).
    """
    if channels == 1:
        return array.astype(np.float32, copy=False)
    # The channel axis is last in the array SimpleITK returns for vector pixels.
    if channels == 2:
        # Grey plus alpha: the alpha (opacity) channel carries no anatomy.
        return array[..., 0].astype(np.float32)
    if channels in (3, 4):
        return array[..., :3].astype(np.float32).mean(axis=-1)
    msg = (
        f"{source} has {channels} values per pixel; only grey, RGB and RGBA images can be used. "
        "Save one channel of it as a separate image."
    )
    raise ValueError(msg)


def image_from_sitk(sitk_image: sitk.Image, *, source: str = "The image") -> Image:
    """Convert a ``SimpleITK.Image`` to an :class:`Image`, keeping its geometry exactly.

    RGB and RGBA pixels become grey (mean of R, G and B; alpha is ignored). A 4D image whose
    fourth axis has a single sample (a 3D volume saved as a time series) is treated as 3D.

    Args:
        sitk_image: a 2D or 3D SimpleITK image (LPS physical frame).
        source: how to name the image in error messages, for example its file path.

    Raises:
        ValueError: the image is not 2D or 3D, or has more than 4 channels.
    """
    dimension = sitk_image.GetDimension()
    if dimension == 4 and sitk_image.GetSize()[3] == 1:
        size = list(sitk_image.GetSize())
        size[3] = 0  # Extract with a zero size collapses that axis.
        sitk_image = sitk.Extract(sitk_image, size, [0, 0, 0, 0])
        dimension = 3
    if dimension not in (2, 3):
        msg = (
            f"{source} is a {dimension}D image (size {tuple(sitk_image.GetSize())}); "
            "only 2D images and 3D volumes can be used"
        )
        raise ValueError(msg)
    array = grey_pixels(sitk.GetArrayFromImage(sitk_image), sitk_image.GetNumberOfComponentsPerPixel(), source)
    return Image(array, ImageGeometry.from_sitk(sitk_image))


def image_to_sitk(image: Image) -> sitk.Image:
    """Convert an :class:`Image` to a float32 ``SimpleITK.Image`` with the same geometry."""
    sitk_image = sitk.GetImageFromArray(np.ascontiguousarray(image.array, dtype=np.float32))
    image.geometry.apply_to_sitk(sitk_image)
    return sitk_image


def _spacing_tuple(spacing: Sequence[float] | float, dimension: int, source: str) -> tuple[float, ...]:
    if isinstance(spacing, numbers.Real):
        values = (float(spacing),) * dimension
    else:
        values = tuple(float(s) for s in spacing)
    if len(values) != dimension:
        msg = f"{source} is {dimension}D but {len(values)} spacing values were given: {values}"
        raise ValueError(msg)
    if any(not np.isfinite(v) or v <= 0 for v in values):
        msg = f"Pixel spacing must be positive millimetres, got {values} for {source}"
        raise ValueError(msg)
    return values


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        msg = f"No DICOM series found in the folder {folder}; choose an image file or a folder of DICOM files"
        raise ValueError(msg)
    # A scanner's export often holds a scout or a dose report beside the volume: the series with
    # the most slices is the volume (the first of equals, in GDCM's order).
    files_per_series = {series: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series) for series in series_ids}
    chosen = max(series_ids, key=lambda series: len(files_per_series[series]))
    if len(series_ids) > 1:
        others = ", ".join(f"{series} ({len(files_per_series[series])} files)" for series in series_ids if series != chosen)
        logger.warning("The folder %s holds %d DICOM series; reading the largest, %s (%d files); not read: %s",
                       folder, len(series_ids), chosen, len(files_per_series[chosen]), others)
    file_names = files_per_series[chosen]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(file_names)
    return reader.Execute()


# End-of-image markers: a file cut short (an interrupted copy or download) lacks them, and the
# decoders fill the missing rows with grey instead of failing.
_END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND"}
# How each of those formats begins: a file without it is something else under that name.
_SIGNATURES = {".jpg": b"\xff\xd8", ".jpeg": b"\xff\xd8", ".png": b"\x89PNG\r\n\x1a\n"}


def _refuse_truncated(path: Path) -> None:
    marker = _END_MARKERS.get(path.suffix.lower()) if path.is_file() else None
    if marker is None:
        return
    with open(path, "rb") as stream:
        head = stream.read(8)
        stream.seek(max(path.stat().st_size - 4096, 0))
        tail = stream.read()
    if not head.startswith(_SIGNATURES[path.suffix.lower()]):
        msg = f"{path} is not a {path.suffix[1:].upper()} file: its content is not such an image (renamed, or another kind of file)"
        raise ValueError(msg)
    if marker not in tail:
        msg = f"{path} is damaged: the file ends before the image does (truncated {path.suffix[1:].upper()}); copy it again"
        raise ValueError(msg)


def read_image(path: str | os.PathLike[str], *, spacing: Sequence[float] | float | None = None) -> Image:
    """Read a 2D or 3D image, or the DICOM series in a folder (the largest, where it holds several).

    Any format SimpleITK reads works (NRRD, NIfTI, MHA, DICOM, PNG, JPEG, BMP, TIFF...).
    Colour pixels become grey. A single-slice 3D volume stays 3D here. A DICOM image whose
    photometric interpretation is ``MONOCHROME1`` (lowest value displayed white) comes back
    inverted, as displayed, like ``MONOCHROME2``: SimpleITK's GDCM reader does this, and a test
    keeps it so. Detection copes with negatives anyway (see :mod:`SCNLandmarksLib.inference.detection`).

    Args:
        path: image file, or a folder of DICOM files.
        spacing: pixel size in mm, x, y[, z] order (a single number for all axes). PNG,
            JPEG, BMP and TIFF files carry no trustworthy pixel size: without ``spacing``
            they get 1.0 mm per pixel, origin 0 and identity direction, with a logged
            warning. For other formats it replaces the spacing in the file header.

    Returns:
        The image, geometry in LPS mm.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        ValueError: unreadable file, folder without DICOM, image that is not 2D or 3D.
    """
    path = Path(path).expanduser()
    source = str(path)
    if not path.exists():
        msg = f"Image not found: {path}"
        raise FileNotFoundError(msg)
    _refuse_truncated(path)
    try:
        if path.is_dir():
            sitk_image = _read_dicom_folder(path)
        else:
            sitk_image = sitk.ReadImage(str(path), imageIO=_IMAGE_IO.get(_suffix(path), ""))
    except RuntimeError as error:
        reason = _sitk_reason(error)
        dimension = re.search(r"unsupported image dimension of (\d+)", reason)
        if dimension:
            msg = f"{path} is a {dimension.group(1)}D image; only 2D images and 3D volumes can be used"
        elif "Unknown PixelType" in reason and _suffix(path) == ".png":
            # ITK's PNG reader has no pixel type for grey + transparency (PNG colour type 4).
            msg = (f"{path} is a grey PNG with a transparency channel, which the image reader cannot read; "
                   "save it without transparency (plain grey or RGB) and try again")
        else:
            msg = f"Could not read the image {path}: {reason}"
        raise ValueError(msg) from error

    image = image_from_sitk(sitk_image, source=source)
    is_photo = is_photo_file(path)
    if spacing is None and not is_photo:
        return image

    geometry = image.geometry
    if spacing is None:
        logger.warning(
            "%s carries no reliable pixel size; assuming 1.0 mm per pixel. "
            "Give the spacing explicitly if distances in mm matter.",
            path,
        )
        new_spacing = (1.0,) * geometry.dimension
    else:
        new_spacing = _spacing_tuple(spacing, geometry.dimension, source)
        if not is_photo and not np.allclose(new_spacing, geometry.spacing):
            logger.warning("%s: the pixel size given, %s mm, replaces the file's own, %s mm",
                           path, " x ".join(f"{v:g}" for v in new_spacing), " x ".join(f"{v:g}" for v in geometry.spacing))
    if is_photo:
        origin = (0.0,) * geometry.dimension
        direction = tuple(np.eye(geometry.dimension).reshape(-1))
    else:
        origin, direction = geometry.origin, geometry.direction
    new_geometry = ImageGeometry(size=geometry.size, spacing=new_spacing, origin=origin, direction=direction)
    return Image(image.array, new_geometry)


def _cast_for_integer_format(sitk_image: sitk.Image, array: np.ndarray, path: Path) -> sitk.Image:
    rounded = np.round(array)
    integral = np.allclose(array, rounded, atol=1e-3)
    low, high = float(array.min()), float(array.max())
    suffix = _suffix(path)
    if integral and low >= 0 and high <= 255:
        return sitk.Cast(sitk.Round(sitk_image), sitk.sitkUInt8)
    if integral and low >= 0 and high <= 65535 and suffix == ".png":
        return sitk.Cast(sitk.Round(sitk_image), sitk.sitkUInt16)
    msg = (
        f"Cannot write {path.name}: {suffix} files hold whole numbers from 0 to "
        f"{65535 if suffix == '.png' else 255}, but this image has values from {low:g} to {high:g}. "
        "Use .nrrd, .mha or .nii.gz, which keep the pixel values exactly."
    )
    raise ValueError(msg)


def write_image(image: Image, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write an image atomically, in the format given by the file extension.

    Pixels are written as float32 with the full geometry (NRRD, NIfTI, MHA, TIFF). PNG, JPEG
    and BMP hold only whole-number grey values; the image must already be in that range.

    Returns:
        The written path.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: two-file formats (.mhd, .nhdr, .hdr), or values a format cannot hold.
    """
    path = Path(path).expanduser()
    suffix = _suffix(path)
    if suffix in _TWO_FILE_SUFFIXES:
        msg = (
            f"Cannot write {path.name}: {suffix} stores the pixels in a second file. "
            "Use a single-file format such as .nrrd, .mha or .nii.gz."
        )
        raise ValueError(msg)
    sitk_image = image_to_sitk(image)
    if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        if image.dimension != 2:
            msg = f"Cannot write {path.name}: {suffix} files hold 2D images, this image is {image.dimension}D"
            raise ValueError(msg)
        sitk_image = _cast_for_integer_format(sitk_image, image.array, path)
    with atomic_path(path, overwrite=overwrite) as temporary:
        # Written under the lower-case extension: ITK's writers read the layout from it
        # (an upper-case ".MHA" would become a header and a second pixel file).
        written = temporary.with_name(temporary.name[: len(temporary.name) - len(suffix)] + suffix)
        try:
            sitk.WriteImage(sitk_image, str(written), useCompression=suffix in (".nrrd", ".mha", ".nii.gz"),
                            imageIO=_IMAGE_IO.get(suffix, ""))
            os.replace(written, temporary)
        except RuntimeError as error:
            written.unlink(missing_ok=True)
            reason = _sitk_reason(error)
            msg = f"Could not write the image {path}: {reason}"
            raise ValueError(msg) from error
    return path


# --------------------------------------------------------------------------- finding images

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


def output_stem(path: Path) -> str:
    """File name without its (possibly double) image extension: ``ct.nii.gz`` -> ``ct``; a DICOM
    folder keeps its whole name (``1.2.840.1.5`` is a series UID, not a name and an extension)."""
    name = path.name
    if path.is_dir():
        return name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_dicom_folder(path: Path) -> bool:
    """True for a folder holding DICOM files (read as one DICOM series).

    A file counts by its ``.dcm`` name or, as scanners export them (``IM0001``, ``1.2.840...``),
    by the ``DICM`` marker that follows the 128-byte preamble of a DICOM file (read from the
    first 20 files by name, not all).
    """
    if not path.is_dir():
        return False
    files = sorted(entry for entry in path.iterdir() if entry.is_file() and not entry.name.startswith("."))
    return any(entry.suffix.lower() == ".dcm" for entry in files) or any(map(_has_dicom_marker, files[:20]))


def _has_dicom_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def find_images(folder: str | Path) -> list[Path]:
    """Image files in ``folder`` (not recursive) and its sub-folders that hold a DICOM series, sorted.

    Hidden files (``._scan.jpg`` of macOS, unfinished writes) are not images. Loose DICOM files
    count where each is an image of its own (radiographs exported one file each,
    :func:`single_file_dicom_images`); a sub-folder of DICOM files is one series.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        msg = f"Input folder not found: {folder}"
        raise FileNotFoundError(msg)
    images = list(single_file_dicom_images(folder))
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES) and not entry.name.lower().endswith(".dcm"):
            images.append(entry)
        elif entry.is_dir() and is_dicom_folder(entry):
            images.append(entry)
    return sorted(images)


def single_file_dicom_images(folder: Path) -> list[Path]:
    """The DICOM files of ``folder`` when every one is a series of its own (two or more
    radiographs, not the slices of a volume), sorted; otherwise none.

    Each file's series UID is read from its header once, stopping at the first repeat (the
    slices of a volume share one): asking GDCM for each series' files would read every
    header once per series.
    """
    files = sorted(entry for entry in folder.iterdir() if entry.is_file() and not entry.name.startswith(".")
                   and (entry.suffix.lower() == ".dcm" or _has_dicom_marker(entry)))
    if len(files) < 2:
        return []
    seen: set[str] = set()
    for file in files:
        series = _series_uid(file)
        if series is None or series in seen:
            return []
        seen.add(series)
    return files


def _series_uid(path: Path) -> str | None:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # not readable as DICOM: the folder is left to the series reader
    return reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else None


# --------------------------------------------------------------------------- memory

# Reading, converting to float and resampling hold a few copies of an image at once.
_WORKING_COPIES = 4


def memory_needed_bytes(path: str | os.PathLike[str]) -> int | None:
    """About how much memory reading and preparing this image takes, from its header alone (None: unknown)."""
    path = Path(path)
    if not path.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # read_image will say what is wrong with it
    voxels = int(np.prod(reader.GetSize(), dtype=np.int64)) * max(1, reader.GetNumberOfComponents())
    return voxels * 4 * _WORKING_COPIES


def check_fits_in_memory(path: str | os.PathLike[str]) -> None:
    """Refuse, before reading it, an image too large for the memory available now.

    Raises:
        MemoryError: with the sizes in GB, so that a batch reports it and goes on.
    """
    needed, available = memory_needed_bytes(path), memory_available_bytes()
    if needed is not None and available is not None and needed > available:
        msg = (f"{Path(path).name} is too large for the memory available: about {needed / 2**30:.1f} GB needed, "
               f"{available / 2**30:.1f} GB free")
        raise MemoryError(msg)
