"""Small models and synthetic cases shared by the engine tests (fast on a 2-core CPU)."""

from __future__ import annotations

from pathlib import Path

from SCNLandmarksLib.imaging.geometry import ImageGeometry
from SCNLandmarksLib.imaging.grid import GridSpec
from SCNLandmarksLib.imaging.image import Image
from SCNLandmarksLib.models.model import LandmarkModel, create_model
from SCNLandmarksLib.models.network import NetworkConfig
from SCNLandmarksLib.data.synthetic import make_synthetic_dataset
from SCNLandmarksLib.data.training_case import TrainingCase

# `scn-landmarks train` options for a network small enough to train in seconds.
TINY_TRAIN_ARGS = ["--grid-size", "64", "64", "--filters", "8", "--levels", "3", "--spatial-downsample", "8",
                   "--spatial-kernel", "5", "--device", "cpu", "--validate-every", "0"]

# An oblique, anisotropic 2D grid with a non-zero origin.
GEOMETRY_2D = {"dimension": 2, "size": (80, 72), "spacing": (0.9, 1.2), "origin": (12.0, -30.0), "direction": 0.3}


def as_single_slice(image: Image, *, thickness_mm: float = 1.0, z_mm: float = 0.0) -> Image:
    """A 2D image as a 3D volume of one slice (how Slicer and .mha files hold a radiograph)."""
    g = image.geometry
    return Image(image.array[None], ImageGeometry(size=(*g.size, 1), spacing=(*g.spacing, thickness_mm),
                                                 origin=(*g.origin, z_mm),
                                                 direction=(*g.direction[:2], 0.0, *g.direction[2:], 0.0, 0.0, 0.0, 1.0)))


def tiny_config(num_landmarks: int, dimension: int = 2, **overrides: object) -> NetworkConfig:
    values: dict[str, object] = {"filters": 16, "levels": 3, "spatial_downsample": 8, "spatial_kernel": 5, "dropout": 0.0}
    values.update(overrides)
    return NetworkConfig(dimension=dimension, num_landmarks=num_landmarks, **values)  # type: ignore[arg-type]


def tiny_model(names: list[str], *, dimension: int = 2, grid: GridSpec | None = None, **overrides: object) -> LandmarkModel:
    grid = grid or GridSpec(size=(64,) * dimension)
    return create_model(tiny_config(len(names), dimension, **overrides), grid=grid, landmark_names=names)


def synthetic_cases(count: int, *, seed: int = 1, num_landmarks: int = 4, **geometry: object) -> list[TrainingCase]:
    options = {**GEOMETRY_2D, **geometry}
    data = make_synthetic_dataset(count, seed=seed, num_landmarks=num_landmarks, **options)
    return [TrainingCase(image, landmarks, f"case{n:02d}") for n, (image, landmarks) in enumerate(data)]


def write_annotated_folder(folder: Path, count: int, *, seed: int) -> Path:
    """``count`` synthetic cases as ``<name>.nrrd`` images with ``<name>.mrk.json`` beside them."""
    from SCNLandmarksLib.imaging.image_io import write_image
    from SCNLandmarksLib.data.landmark_io import write_mrk_json

    for case in synthetic_cases(count, seed=seed):
        write_image(case.image, folder / f"{case.name}.nrrd")
        write_mrk_json(case.landmarks, folder / f"{case.name}.mrk.json")
    return folder
