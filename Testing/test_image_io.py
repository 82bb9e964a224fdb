"""Image reading and writing: geometry kept exactly, colour to grey, DICOM folders, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SCNLandmarksLib.imaging.geometry import ImageGeometry
from SCNLandmarksLib.imaging.image import Image
from SCNLandmarksLib.imaging.image_io import find_images, image_from_sitk, image_to_sitk, read_image, write_image
from SCNLandmarksLib.data.synthetic import make_bright_point_image, rotation_matrix

OBLIQUE = tuple(float(v) for v in rotation_matrix((0.2, -0.1, 0.3), 3).reshape(-1))


def _oblique_volume() -> Image:
    # Anisotropic, oblique, offset: every part of the geometry must survive the round trip.
    return make_bright_point_image(
        (15, 10, 5), size=(40, 30, 20), spacing=(0.5, 0.8, 1.2), origin=(10.0, -20.0, 30.0), direction=OBLIQUE
    )


def _assert_same_geometry(a: ImageGeometry, b: ImageGeometry) -> None:
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-6)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-5)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


@pytest.mark.parametrize("name", ["v.nrrd", "v.nii.gz", "v.nii", "v.mha"])
def test_round_trip_keeps_oblique_geometry(tmp_path: Path, name: str) -> None:
    image = _oblique_volume()
    path = write_image(image, tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    read = read_image(path)
    _assert_same_geometry(read.geometry, image.geometry)
    np.testing.assert_array_equal(read.array, image.array)
    assert read.array.dtype == np.float32
    # The bright voxel is where SimpleITK itself puts it in physical space.
    reference = sitk.ReadImage(str(path))
    expected = reference.TransformIndexToPhysicalPoint((15, 10, 5))
    bright = np.argwhere(read.array == read.array.max())[0][::-1]
    np.testing.assert_allclose(read.geometry.index_to_physical(bright), expected, atol=1e-4)


def test_sitk_conversion_is_exact_and_axis_order_is_zyx() -> None:
    image = _oblique_volume()
    sitk_image = image_to_sitk(image)
    assert sitk_image.GetSize() == (40, 30, 20)
    assert sitk_image[15, 10, 5] == 1000.0
    back = image_from_sitk(sitk_image)
    assert back.geometry == image.geometry
    np.testing.assert_array_equal(back.array, image.array)


def test_single_slice_volume_stays_3d(tmp_path: Path) -> None:
    image = make_bright_point_image((3, 4, 0), size=(8, 9, 1), spacing=(0.2, 0.2, 1.0))
    read = read_image(write_image(image, tmp_path / "slice.mha"))
    assert read.dimension == 3 and read.geometry.size == (8, 9, 1)


def test_png_without_spacing_gets_1mm_and_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pixels = np.zeros((12, 20), dtype=np.uint8)
    pixels[5, 7] = 200
    path = tmp_path / "xray.png"
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(path))
    with caplog.at_level(logging.WARNING):
        image = read_image(path)
    assert "no reliable pixel size" in caplog.text
    assert image.geometry.spacing == (1.0, 1.0) and image.geometry.origin == (0.0, 0.0)
    assert image.array.shape == (12, 20) and image.array[5, 7] == 200.0

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        image = read_image(path, spacing=(0.1, 0.1))
    assert caplog.text == ""
    assert image.geometry.spacing == (0.1, 0.1)
    np.testing.assert_allclose(image.geometry.index_to_physical([7, 5]), [0.7, 0.5])


def test_rgb_and_rgba_become_grey(tmp_path: Path) -> None:
    rgb = np.zeros((6, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 30, 60, 90
    path = tmp_path / "colour.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    image = read_image(path, spacing=0.5)
    assert image.array.shape == (6, 5)
    np.testing.assert_allclose(image.array, 60.0)

    rgba = np.concatenate([rgb, np.full((6, 5, 1), 7, dtype=np.uint8)], axis=-1)
    grey = image_from_sitk(sitk.GetImageFromArray(rgba, isVector=True))
    np.testing.assert_allclose(grey.array, 60.0)


def test_write_png_needs_whole_numbers(tmp_path: Path) -> None:
    image = make_bright_point_image((2, 3), size=(6, 5), value=255.0)
    read = read_image(write_image(image, tmp_path / "a.png"), spacing=(1.0, 1.0))
    np.testing.assert_array_equal(read.array, image.array)
    with pytest.raises(ValueError, match="Use .nrrd"):
        write_image(make_bright_point_image((2, 3), size=(6, 5), value=0.5), tmp_path / "b.png")
    with pytest.raises(ValueError, match="second file"):
        write_image(image, tmp_path / "c.mhd")


def _write_dicom_series(folder: Path, volume, *, series_uid: str, name: str = "slice{k:03d}.dcm") -> None:
    """Write ``volume`` as one DICOM file per slice, all of series ``series_uid``."""
    sitk_volume = sitk.Cast(image_to_sitk(volume), sitk.sitkInt16)
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")  # also where the file name has no .dcm to tell
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.geometry.size[2]):
        slice_image = sitk_volume[:, :, k]
        origin = volume.geometry.index_to_physical([0, 0, k])
        for tag, value in (
            ("0020|000e", series_uid),  # same series for every slice
            ("0008|0018", f"{series_uid}.{k + 1}"),
            ("0020|0032", "\\".join(f"{v:.4f}" for v in origin)),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0020|0013", str(k + 1)),
            ("0028|0030", "0.7\\0.7"),
            ("0018|0050", "2.5"),
        ):
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / name.format(k=k)))
        writer.Execute(slice_image)


def _dicom_volume(slices: int = 4):
    return make_bright_point_image((4, 5, min(2, slices - 1)), size=(10, 12, slices), spacing=(0.7, 0.7, 2.5),
                                   origin=(-5.0, 3.0, 40.0))


def test_dicom_series_folder(tmp_path: Path) -> None:
    volume = _dicom_volume()
    folder = tmp_path / "series"
    _write_dicom_series(folder, volume, series_uid="1.2.826.0.1.3680043.2.1125.1")
    image = read_image(folder)
    assert image.geometry.size == (10, 12, 4)
    np.testing.assert_allclose(image.geometry.spacing, (0.7, 0.7, 2.5), rtol=1e-4)
    np.testing.assert_allclose(image.geometry.origin, (-5.0, 3.0, 40.0), atol=1e-3)
    np.testing.assert_array_equal(np.argwhere(image.array == image.array.max())[0], [2, 5, 4])


def test_a_scanner_export_without_file_extensions_is_found_as_a_dicom_series(tmp_path: Path) -> None:
    _write_dicom_series(tmp_path / "patient1", _dicom_volume(), series_uid="1.2.826.0.1.3680043.2.1125.2",
                        name="IM{k:04d}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("not an image, though it has no extension either")
    assert find_images(tmp_path) == [tmp_path / "patient1"]
    assert read_image(tmp_path / "patient1").geometry.size == (10, 12, 4)


def test_a_folder_with_a_scout_beside_the_volume_reads_the_volume_and_says_so(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "export"
    # GDCM lists series by their UID as text, so this scout ("...10") comes before the volume ("...2").
    _write_dicom_series(folder, _dicom_volume(2), series_uid="1.2.840.9.9.10", name="scout{k}.dcm")
    _write_dicom_series(folder, _dicom_volume(5), series_uid="1.2.840.9.9.2")
    with caplog.at_level("WARNING"):
        image = read_image(folder)
    assert image.geometry.size == (10, 12, 5)
    assert "2 DICOM series" in caplog.text and "1.2.840.9.9.10 (2 files)" in caplog.text


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.nrrd"):
        read_image(tmp_path / "missing.nrrd")
    empty = tmp_path / "not_dicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="No DICOM series found in the folder .*not_dicom"):
        read_image(empty)
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_text("this is not an image")
    with pytest.raises(ValueError, match="Could not read the image .*garbage.nrrd"):
        read_image(garbage)


def test_4d_and_1d_images_are_rejected(tmp_path: Path) -> None:
    four = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), dtype=np.float32), isVector=False)
    path = tmp_path / "four.nii.gz"
    sitk.WriteImage(four, str(path))
    with pytest.raises(ValueError, match="4D image"):
        read_image(path)
    one = tmp_path / "one.nrrd"
    one.write_text("NRRD0004\ntype: float\ndimension: 1\nsizes: 3\nencoding: ascii\n\n1 2 3\n")
    with pytest.raises(ValueError, match="1D image"):
        read_image(one)


def test_4d_with_one_time_point_is_a_volume(tmp_path: Path) -> None:
    four = sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5), isVector=False)
    image = image_from_sitk(four)
    assert image.geometry.size == (5, 4, 3)
    np.testing.assert_array_equal(image.array, np.arange(60).reshape(3, 4, 5))


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    image = _oblique_volume()
    path = write_image(image, tmp_path / "v.nrrd")
    with pytest.raises(FileExistsError):
        write_image(image, path)
    write_image(image, path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["v.nrrd"]


def test_real_jpeg_cephalogram_is_grey(data_dir: Path) -> None:
    path = data_dir / "isbi2015" / "images" / "001.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    image = read_image(path, spacing=(0.1, 0.1))
    assert image.array.shape == (2400, 1935)
    assert image.geometry.spacing == (0.1, 0.1)


def _radiograph_dicom(path: Path, raw: np.ndarray, photometric: str) -> Path:
    """A one-frame DICOM radiograph whose header declares ``photometric`` (MONOCHROME1 or 2)."""
    image = sitk.GetImageFromArray(raw[None])
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.Execute(image)  # GDCM always writes MONOCHROME2 for grey pixels ...
    data = path.read_bytes()
    assert data.count(b"MONOCHROME2 ") == 1
    path.write_bytes(data.replace(b"MONOCHROME2 ", photometric.encode() + b" "))  # ... so set the tag afterwards
    return path


@pytest.mark.parametrize("as_folder", [False, True])
def test_monochrome1_dicom_reads_bright_where_dense_as_the_standard_says(tmp_path, as_folder):
    """MONOCHROME1 means the lowest stored value is displayed white: reading gives display values."""
    raw = np.zeros((24, 32), dtype=np.uint16)
    raw[8:16, 10:20] = 1000  # stored high: displayed dark under MONOCHROME1
    folder = tmp_path / "series"
    folder.mkdir()
    inverted = _radiograph_dicom(folder / "m1.dcm", raw, "MONOCHROME1")
    usual = _radiograph_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2")
    read_inverted = read_image(folder if as_folder else inverted).array.reshape(raw.shape)
    read_usual = read_image(usual).array.reshape(raw.shape)
    np.testing.assert_array_equal(read_usual, raw)
    assert read_inverted[12, 15] < read_inverted[0, 0]  # the stored-high block is dark
    np.testing.assert_allclose(np.corrcoef(read_inverted.ravel(), raw.ravel())[0, 1], -1.0, atol=1e-6)


def test_a_given_pixel_size_replaces_a_header_s_own_and_says_so(tmp_path: Path, caplog) -> None:
    volume = _dicom_volume()
    path = write_image(volume, tmp_path / "scan.nii.gz")
    with caplog.at_level("WARNING"):
        same = read_image(path, spacing=(0.7, 0.7, 2.5))
    assert caplog.text == "" and same.geometry.spacing == pytest.approx((0.7, 0.7, 2.5))
    with caplog.at_level("WARNING"):
        replaced = read_image(path, spacing=2.0)
    assert replaced.geometry.spacing == (2.0, 2.0, 2.0)
    assert "the pixel size given, 2 x 2 x 2 mm, replaces the file's own, 0.7 x 0.7 x 2.5 mm" in caplog.text


def test_names_as_exports_and_other_tools_write_them(tmp_path: Path) -> None:
    """Series folders named by UID keep their whole name; upper-case extensions read and write; hidden files are not images."""
    from SCNLandmarksLib.imaging.image_io import output_stem

    series = tmp_path / "1.2.840.1.5"
    _write_dicom_series(series, _dicom_volume(), series_uid="1.2.840.1.5")
    assert output_stem(series) == "1.2.840.1.5" and output_stem(tmp_path / "ct.v2.nii.gz") == "ct.v2"
    volume = _dicom_volume()
    for name in ("T1.MHA", "T2.NII.GZ", "T3.NRRD"):
        back = read_image(write_image(volume, tmp_path / name))
        np.testing.assert_allclose(back.array, volume.array)
    (tmp_path / "._T1.MHA").write_bytes(b"\x00\x05\x16\x07 resource fork")  # what macOS leaves on other disks
    assert [p.name for p in find_images(tmp_path)] == ["1.2.840.1.5", "T1.MHA", "T2.NII.GZ", "T3.NRRD"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_folder_of_single_file_dicom_radiographs_is_a_folder_of_images(tmp_path: Path) -> None:
    from SCNLandmarksLib.imaging.image_io import single_file_dicom_images

    folder = tmp_path / "radiographs"
    for number in (1, 2, 3):
        _write_dicom_series(folder, _dicom_volume(1), series_uid=f"1.2.826.0.1.{number}", name=f"patient{number}.dcm")
    found = find_images(folder)
    assert [p.name for p in found] == ["patient1.dcm", "patient2.dcm", "patient3.dcm"]
    assert single_file_dicom_images(folder) == found
    assert read_image(found[1]).geometry.size == (10, 12, 1)
    volume = tmp_path / "volume"
    _write_dicom_series(volume, _dicom_volume(4), series_uid="1.2.826.0.1.9")
    assert single_file_dicom_images(volume) == []
    assert find_images(tmp_path) == [folder, volume]  # sub-folders: a series each
