"""Random spatial and intensity augmentation, drawn in physical units.

One random :class:`~SCNLandmarksLib.imaging.grid.SamplingTransform` moves the image and its
landmarks together, so targets always sit where the anatomy is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .grid import ElasticField, SamplingTransform

__all__ = ["AugmentationConfig", "random_linear", "random_transform", "random_intensity"]


@dataclass(frozen=True)
class AugmentationConfig:
    """Ranges of the random augmentation (uniform draws in +-range).

    Attributes:
        translation_mm: translation per axis, mm.
        rotation_rad: rotation, radians (about each axis in 3D).
        scale: isotropic relative scale (0.2 = 80 % to 120 %).
        axis_scale: additional relative scale per axis.
        elastic_mm: displacement of each elastic control node, mm; capped at 15 % of the
            node spacing so that a small field of view is bent but never folded.
        elastic_nodes: control nodes per axis of the elastic grid.
        intensity_shift: shift of the normalised intensity.
        intensity_scale: relative scale of the normalised intensity.
        random_crop: when the image is larger than the grid, place the grid anywhere in it.
    """

    translation_mm: float = 10.0
    rotation_rad: float = 0.25
    scale: float = 0.2
    axis_scale: float = 0.2
    elastic_mm: float = 10.0
    elastic_nodes: int = 5
    intensity_shift: float = 0.25
    intensity_scale: float = 0.25
    random_crop: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> AugmentationConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]

    @classmethod
    def none(cls) -> AugmentationConfig:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 5, 0.0, 0.0, False)


def _rotation(dim: int, rng: np.random.Generator, limit: float) -> np.ndarray:
    if dim == 2:
        a = rng.uniform(-limit, limit)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    rotation = np.eye(3)
    for axis in range(3):
        a = rng.uniform(-limit, limit)
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        step = np.eye(3)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rotation = step @ rotation
    return rotation


def random_linear(dim: int, rng: np.random.Generator, *, rotation_rad: float, scale: float, axis_scale: float) -> np.ndarray:
    """A random rotation times a random isotropic and per-axis scale, ``(D, D)``."""
    isotropic = 1.0 + rng.uniform(-scale, scale)
    per_axis = 1.0 + rng.uniform(-axis_scale, axis_scale, size=dim)
    return _rotation(dim, rng, rotation_rad) @ np.diag(isotropic * per_axis)


def random_transform(
    base: SamplingTransform,
    config: AugmentationConfig,
    rng: np.random.Generator,
    *,
    image_extent_mm: np.ndarray | None = None,
) -> SamplingTransform:
    """A randomly deformed copy of ``base`` (the un-augmented grid over an image).

    Args:
        base: grid over the image, from :meth:`SamplingTransform.for_image`.
        config: augmentation ranges.
        rng: random generator (seeded by the caller for reproducible runs).
        image_extent_mm: image extent along the grid axes, for ``random_crop``.
    """
    dim = len(base.size)
    linear = random_linear(dim, rng, rotation_rad=config.rotation_rad, scale=config.scale, axis_scale=config.axis_scale)
    translation = rng.uniform(-config.translation_mm, config.translation_mm, size=dim)
    if config.random_crop and image_extent_mm is not None:
        grid_extent = np.asarray(base.size) * base.spacing
        slack = np.maximum(np.asarray(image_extent_mm) - grid_extent, 0.0) / 2.0
        translation = translation + rng.uniform(-slack, slack)
    elastic = None
    if config.elastic_mm > 0:
        nodes = (config.elastic_nodes,) * dim
        half_extent = (np.asarray(base.size, dtype=float) - 1.0) / 2.0 * base.spacing
        node_spacing = 2.0 * float(half_extent.min()) / (config.elastic_nodes - 1)
        amplitude = min(config.elastic_mm, 0.15 * node_spacing)
        displacements = rng.uniform(-amplitude, amplitude, size=(dim, *nodes))
        elastic = ElasticField(displacements, np.maximum(half_extent, 1e-6))
    return SamplingTransform(
        size=base.size,
        spacing=base.spacing,
        centre=base.centre,
        rotation=base.rotation,
        linear=linear,
        translation=translation,
        elastic=elastic,
    )


def random_intensity(config: AugmentationConfig, rng: np.random.Generator) -> tuple[float, float]:
    """(shift, scale) for :func:`SCNLandmarksLib.imaging.intensity.finish`."""
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift)
    scale = 1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale)
    return float(shift), float(scale)
