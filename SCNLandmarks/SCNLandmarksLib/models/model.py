"""A landmark model: the network plus everything needed to use it on a new image."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..imaging.grid import GridSpec
from .heatmaps import HeatmapTargets
from ..imaging.intensity import IntensityConfig
from .network import LandmarkNetwork, NetworkConfig, NetworkEnsemble, build_network
from .quality import ErrorModel
from .refinement import RefinementEnsemble, RefinementNetwork
from .shape_model import ShapeModel

__all__ = ["LandmarkModel", "create_model", "default_target_settings"]


def default_target_settings(dimension: int) -> dict[str, float]:
    """Initial sigma (grid px), gamma and sigma-penalty weight of the SCN papers."""
    if dimension == 2:
        return {"initial_sigma": 2.5, "gamma": 100.0, "sigma_weight": 20.0}
    return {"initial_sigma": 4.0, "gamma": 1000.0, "sigma_weight": 100.0}


@dataclass
class LandmarkModel:
    """Network, target sigmas, input grid, intensity mapping and landmark definitions.

    Attributes:
        network: the global stage: the SCN or U-Net, or several read as one (``NetworkEnsemble``).
        targets: learnable sigmas, gamma (define targets and the confidence scale).
        grid: network input grid (size and spacing, or fit-to-size).
        intensity: how pixels are normalised.
        landmark_names: one per output channel.
        landmark_descriptions: one per output channel (anatomical definition).
        sigma_weight: weight of the sigma penalty in the loss.
        info: provenance: training data, iterations, measured accuracy, parent model, ...
        refiner: the local high-resolution stage, or None for a global-only model.
        shape_model: where each landmark lies given the others (training shapes), or None.
        error_model: expected error per point from the detector's signals, or None (then the
            points to check are those of low confidence).
    """

    network: LandmarkNetwork | NetworkEnsemble
    targets: HeatmapTargets
    grid: GridSpec
    intensity: IntensityConfig
    landmark_names: list[str]
    landmark_descriptions: list[str]
    sigma_weight: float
    info: dict[str, object] = field(default_factory=dict)
    refiner: RefinementNetwork | RefinementEnsemble | None = None
    shape_model: ShapeModel | None = None
    error_model: ErrorModel | None = None

    @property
    def config(self) -> NetworkConfig:
        return self.network.config

    @property
    def dimension(self) -> int:
        return self.network.config.dimension

    def to(self, device: torch.device) -> LandmarkModel:
        self.network.to(device)
        self.targets.to(device)
        if self.refiner is not None:
            self.refiner.to(device)
        return self


def create_model(
    config: NetworkConfig,
    *,
    grid: GridSpec,
    landmark_names: list[str],
    landmark_descriptions: list[str] | None = None,
    intensity: IntensityConfig | None = None,
    initial_sigma: float | None = None,
    gamma: float | None = None,
    sigma_weight: float | None = None,
) -> LandmarkModel:
    """A freshly initialised model; target settings default to the papers' values."""
    if len(landmark_names) != config.num_landmarks:
        msg = f"{len(landmark_names)} landmark names for a network with {config.num_landmarks} outputs"
        raise ValueError(msg)
    if grid.dimension != config.dimension:
        msg = f"A {grid.dimension}D input grid does not fit a {config.dimension}D network"
        raise ValueError(msg)
    if any(s % config.size_divisor for s in grid.size):
        msg = f"Input grid size {grid.size} must be a multiple of {config.size_divisor} on every axis"
        raise ValueError(msg)
    if any(s < config.minimum_size for s in grid.size):
        msg = (f"Input grid size {grid.size} is too small for this network: every axis needs at least "
               f"{config.minimum_size} voxels (its pooling and its {config.padding_mode} padding); choose a larger grid")
        raise ValueError(msg)
    defaults = default_target_settings(config.dimension)
    targets = HeatmapTargets(
        config.num_landmarks,
        config.dimension,
        initial_sigma=initial_sigma if initial_sigma is not None else defaults["initial_sigma"],
        gamma=gamma if gamma is not None else defaults["gamma"],
    )
    return LandmarkModel(
        network=build_network(config),
        targets=targets,
        grid=grid,
        intensity=intensity or IntensityConfig(),
        landmark_names=list(landmark_names),
        landmark_descriptions=list(landmark_descriptions or [""] * len(landmark_names)),
        sigma_weight=sigma_weight if sigma_weight is not None else defaults["sigma_weight"],
    )
