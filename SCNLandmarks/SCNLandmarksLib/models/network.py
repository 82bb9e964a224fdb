"""SpatialConfiguration-Net (Payer et al., MedIA 2019) and a plain heatmap U-Net, 2D and 3D.

Tensors are ``(batch, channels, [z,] y, x)``. The network predicts one heatmap channel per
landmark on the same grid as its input.

The layout follows the authors' MIA-2019 code rather than later re-implementations:
a U-Net-like local-appearance part with the same number of filters at every level,
average pooling down, fixed linear upsampling and *added* skips (each passing through its
own "parallel" conv), a linear heatmap layer initialised with a tiny std; and a
spatial-configuration part that average-pools the local heatmaps by a large factor, applies
large-kernel convs, a tanh, and upsamples with a fixed cubic kernel. Only the element-wise
product of the two is trained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LandmarkNetwork", "NetworkConfig", "NetworkEnsemble", "build_network", "count_parameters", "ensemble_of", "settings_from_dict",
]

_Settings = TypeVar("_Settings")

ARCHITECTURES = ("scn", "unet")


@dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild a network; stored inside every model file.

    Attributes:
        dimension: 2 or 3.
        num_landmarks: number of output heatmap channels.
        architecture: ``"scn"`` (local x spatial configuration) or ``"unet"`` (local part only).
        filters: feature channels at every level of the local part and in the spatial part.
        levels: levels of the local U-Net (``levels - 1`` average poolings by 2).
        local_kernel: kernel size of the local convs.
        spatial_downsample: average-pooling factor before the spatial-configuration convs.
        spatial_kernel: kernel size of the spatial-configuration convs.
        spatial_layers: hidden spatial-configuration convs before the output conv.
        dropout: element-wise dropout rate between the two convs of every level.
        heatmap_init_std: std of the normal init of both heatmap output layers.
        padding_mode: ``"zeros"`` (2D in the paper) or ``"reflect"`` (3D in the paper).
        members: networks of this configuration trained apart and read as one, their heatmaps
            averaged (:class:`NetworkEnsemble`); 1 for a single network.
    """

    dimension: int
    num_landmarks: int
    architecture: str = "scn"
    filters: int = 128
    levels: int = 4
    local_kernel: int = 3
    spatial_downsample: int = 16
    spatial_kernel: int = 11
    spatial_layers: int = 3
    dropout: float = 0.5
    heatmap_init_std: float = 1e-4
    padding_mode: str = "zeros"
    members: int = 1

    def __post_init__(self) -> None:
        if self.dimension not in (2, 3):
            msg = f"Network dimension must be 2 or 3, got {self.dimension}"
            raise ValueError(msg)
        if self.architecture not in ARCHITECTURES:
            msg = f"Unknown architecture {self.architecture!r}; choose one of {ARCHITECTURES}"
            raise ValueError(msg)
        if self.num_landmarks < 1:
            msg = f"A model needs at least one landmark, got {self.num_landmarks}"
            raise ValueError(msg)
        if self.local_kernel % 2 == 0 or self.spatial_kernel % 2 == 0:
            msg = "Kernel sizes must be odd so that the output grid matches the input grid"
            raise ValueError(msg)
        if self.padding_mode not in ("zeros", "reflect", "replicate"):
            msg = f"Unsupported padding mode {self.padding_mode!r}"
            raise ValueError(msg)
        if self.members < 1:
            msg = f"A global stage needs at least one network, got {self.members}"
            raise ValueError(msg)

    @classmethod
    def paper_2d(cls, num_landmarks: int, **overrides: object) -> NetworkConfig:
        """The cephalogram configuration of the MIA-2019 code (128 filters, pool 16, 11x11)."""
        return cls(dimension=2, num_landmarks=num_landmarks, **overrides)  # type: ignore[arg-type]

    @classmethod
    def paper_3d(cls, num_landmarks: int, **overrides: object) -> NetworkConfig:
        """The 3D configuration of the MIA-2019 code (64 filters, pool 8, 7x7x7, std 1e-3, reflect)."""
        values: dict[str, object] = {
            "filters": 64,
            "spatial_downsample": 8,
            "spatial_kernel": 7,
            "heatmap_init_std": 1e-3,
            "padding_mode": "reflect",
        }
        values.update(overrides)
        return cls(dimension=3, num_landmarks=num_landmarks, **values)  # type: ignore[arg-type]

    @property
    def size_divisor(self) -> int:
        """Input sizes must be multiples of this along every axis."""
        local = 2 ** (self.levels - 1)
        if self.architecture == "unet":
            return local
        return math.lcm(local, self.spatial_downsample)

    @property
    def minimum_size(self) -> int:
        """The smallest input size, in voxels along any axis, that the network runs on.

        A multiple of :attr:`size_divisor`; with reflect padding also large enough that the
        coarsest local level and the spatial part's pooled grid are wider than their convolutions'
        padding (zero and replicate padding have no such limit).
        """
        size = self.size_divisor
        if self.padding_mode != "reflect":
            return size

        def fits(length: int) -> bool:
            coarsest = length // 2 ** (self.levels - 1) > self.local_kernel // 2
            if self.architecture == "unet":
                return coarsest
            return coarsest and length // self.spatial_downsample > self.spatial_kernel // 2

        while not fits(size):
            size += self.size_divisor
        return size

    def to_dict(self) -> dict[str, object]:
        values = asdict(self)
        if self.members == 1:
            # A single network is described as before ensembles existed, so its file still
            # loads in versions that do not know them.
            del values["members"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> NetworkConfig:
        return settings_from_dict(cls, values, kind="network")


def settings_from_dict(cls: type[_Settings], values: dict[str, object], *, kind: str) -> _Settings:
    """A settings dataclass from a model file's description; an unknown key is an error (a newer or foreign file)."""
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        msg = f"Unknown {kind} settings in model file: {sorted(unknown)}"
        raise ValueError(msg)
    return cls(**values)


def _conv(dimension: int) -> type[nn.Module]:
    return nn.Conv2d if dimension == 2 else nn.Conv3d


def _pool(dimension: int, factor: int) -> nn.Module:
    return nn.AvgPool2d(factor) if dimension == 2 else nn.AvgPool3d(factor)


def _he_init(conv: nn.Module) -> None:
    # He (fan-in, gain 2) truncated normal, as the original code's variance-scaling initialiser.
    fan_in = conv.weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978  # correct for truncation at 2 std
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(conv.bias)


def _small_init(conv: nn.Module, std: float) -> None:
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(conv.bias)


class _ConvAct(nn.Module):
    def __init__(self, config: NetworkConfig, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = _conv(config.dimension)(
            in_channels, out_channels, kernel, padding=kernel // 2, padding_mode=config.padding_mode
        )
        _he_init(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.1)


def _keys_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


class FixedUpsample(nn.Module):
    """Upsampling by an integer factor with a fixed separable kernel (no parameters).

    Input sample ``i`` lands at output position ``i * factor + (factor - 1) / 2`` (the
    half-pixel convention of ``align_corners=False``). Borders are zero-padded, so values
    fade towards the image edge, as in the authors' transposed-convolution implementation.

    Args:
        factor: integer upsampling factor.
        kernel: ``"cubic"`` (Keys, a = -0.5) or ``"linear"``.
        dimension: 2 or 3.
    """

    def __init__(self, factor: int, *, kernel: str = "cubic", dimension: int) -> None:
        super().__init__()
        support = 2 if kernel == "cubic" else 1
        length = 2 * support * factor - factor % 2
        # Computed on the CPU whatever the default device: a model file's shapes are checked by
        # building its networks on the meta device, where this would pull in torch's compiler (1.5 s).
        positions = (torch.arange(length, dtype=torch.float64, device="cpu") - (length - 1) / 2) / factor
        weights = _keys_cubic(positions) if kernel == "cubic" else (1 - positions.abs()).clamp(min=0)
        self.factor = factor
        self.crop = (length - factor) // 2
        self.dimension = dimension
        self.register_buffer("weights", weights.float().view(1, 1, -1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for axis in range(2, 2 + self.dimension):
            x = self._upsample_axis(x, axis)
        return x

    def axis_matrix(self, length: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """``(length, length * factor)``: row ``i`` is what input sample ``i`` adds along one axis."""
        impulses = torch.eye(length, dtype=dtype, device=device).unsqueeze(1)
        spread = F.conv_transpose1d(impulses, self.weights.to(dtype=dtype, device=impulses.device), stride=self.factor)
        return spread[:, 0, self.crop : self.crop + length * self.factor]

    def _upsample_axis(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        # A product with the axis' small upsampling matrix: the transposed convolution it equals,
        # run over every row with one input channel, took a tenth of an SCN training step on the CPU.
        moved = x.movedim(axis, -1)
        return (moved @ self.axis_matrix(moved.shape[-1], dtype=moved.dtype, device=moved.device)).movedim(-1, axis)


class LocalAppearance(nn.Module):
    """U-Net-like local-appearance part: precise but ambiguous heatmaps."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        k, f = config.local_kernel, config.filters
        self.stem = _ConvAct(config, 1, f, k)
        self.contracting = nn.ModuleList(
            nn.ModuleList([_ConvAct(config, f, f, k), _ConvAct(config, f, f, k)]) for _ in range(config.levels)
        )
        self.parallel = nn.ModuleList(_ConvAct(config, f, f, k) for _ in range(config.levels))
        self.dropout = nn.Dropout(config.dropout)
        self.pool = _pool(config.dimension, 2)
        self.heatmap = _conv(config.dimension)(f, config.num_landmarks, k, padding=k // 2)
        _small_init(self.heatmap, config.heatmap_init_std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        node = self.stem(image)
        skips = []
        for level, (first, second) in enumerate(self.contracting):
            if level > 0:
                node = self.pool(node)
            node = second(self.dropout(first(node)))
            skips.append(self.parallel[level](node))
        node = skips[-1]
        mode = "bilinear" if self.config.dimension == 2 else "trilinear"
        for skip in reversed(skips[:-1]):
            node = F.interpolate(node, scale_factor=2, mode=mode, align_corners=False) + skip
        return self.heatmap(node)


class SpatialConfiguration(nn.Module):
    """Coarse, unambiguous heatmaps computed from the local heatmaps alone."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        k, f, n = config.spatial_kernel, config.filters, config.num_landmarks
        self.pool = _pool(config.dimension, config.spatial_downsample)
        channels = [n] + [f] * config.spatial_layers
        self.hidden = nn.Sequential(
            *(_ConvAct(config, channels[i], channels[i + 1], k) for i in range(config.spatial_layers))
        )
        self.output = _conv(config.dimension)(
            channels[-1], n, k, padding=k // 2, padding_mode=config.padding_mode
        )
        _small_init(self.output, config.heatmap_init_std)
        self.upsample = FixedUpsample(config.spatial_downsample, kernel="cubic", dimension=config.dimension)

    def forward(self, local_heatmaps: torch.Tensor) -> torch.Tensor:
        coarse = torch.tanh(self.output(self.hidden(self.pool(local_heatmaps))))
        return self.upsample(coarse)


class LandmarkNetwork(nn.Module):
    """SCN (``local * spatial``) or the plain U-Net baseline (``local``), per ``config.architecture``."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.local = LocalAppearance(config)
        self.spatial = SpatialConfiguration(config) if config.architecture == "scn" else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Heatmaps ``(B, N, [z,] y, x)`` for images ``(B, 1, [z,] y, x)``; sizes must divide by ``config.size_divisor``."""
        expected = 2 + self.config.dimension
        if image.ndim != expected or image.shape[1] != 1:
            msg = (
                f"Expected a batch of one-channel {self.config.dimension}D images of shape "
                f"(B, 1, {'Z, ' if self.config.dimension == 3 else ''}Y, X), got {tuple(image.shape)}"
            )
            raise ValueError(msg)
        divisor = self.config.size_divisor
        if any(s % divisor for s in image.shape[2:]):
            msg = f"Network input size {tuple(image.shape[2:])} must be a multiple of {divisor} on every axis"
            raise ValueError(msg)
        if any(s < self.config.minimum_size for s in image.shape[2:]):
            msg = (f"Network input size {tuple(image.shape[2:])} is too small: every axis needs at least "
                   f"{self.config.minimum_size} voxels")
            raise ValueError(msg)
        local = self.local(image)
        if self.spatial is None:
            return local
        return local * self.spatial(local)

    def head_parameter_names(self) -> set[str]:
        """Parameters whose shape depends on the number of landmarks (replaced when the landmark set changes)."""
        names = {"local.heatmap.weight", "local.heatmap.bias"}
        if self.spatial is not None:
            names |= {"spatial.hidden.0.conv.weight", "spatial.output.weight", "spatial.output.bias"}
        return names


class NetworkEnsemble(nn.Module):
    """Several global networks of one configuration read as one (usually trained apart, then joined by :func:`ensemble_of`).

    The heatmaps are the mean of the members' heatmaps, so everything downstream (decoding,
    confidence, the local stage) reads them as one network's. When trained or fine-tuned, the
    mean is what learns: the members are updated together.
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        single = replace(config, members=1)
        self.members = nn.ModuleList(LandmarkNetwork(single) for _ in range(config.members))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The members' mean heatmaps ``(B, N, [z,] y, x)`` for images ``(B, 1, [z,] y, x)``."""
        total = self.members[0](image)
        for member in self.members[1:]:
            total = total + member(image)  # a running sum: one heatmap stack in memory, not one per member
        return total / len(self.members)

    def head_parameter_names(self) -> set[str]:
        return {f"members.{i}.{name}" for i, m in enumerate(self.members) for name in m.head_parameter_names()}


def build_network(config: NetworkConfig) -> LandmarkNetwork | NetworkEnsemble:
    """The global stage a configuration describes: one network, or an ensemble of ``members``."""
    return LandmarkNetwork(config) if config.members == 1 else NetworkEnsemble(config)


def ensemble_of(networks: Sequence[LandmarkNetwork]) -> LandmarkNetwork | NetworkEnsemble:
    """One global stage reading ``networks`` (single networks of one configuration) as one.

    Raises:
        ValueError: no networks, an ensemble among them, or networks set up differently.
    """
    networks = list(networks)
    if not networks:
        msg = "An ensemble needs at least one global network"
        raise ValueError(msg)
    if any(not isinstance(n, LandmarkNetwork) for n in networks):
        msg = "Give single global networks; an ensemble cannot be a member of another"
        raise ValueError(msg)
    config = networks[0].config
    if any(n.config != config for n in networks):
        msg = "The global networks of an ensemble must share one configuration (landmarks, grid, filters)"
        raise ValueError(msg)
    device = next(networks[0].parameters()).device
    combined = build_network(replace(config, members=len(networks)))
    members = combined.members if isinstance(combined, NetworkEnsemble) else [combined]
    for member, network in zip(members, networks):
        member.load_state_dict(network.state_dict())
    return combined.to(device).train(networks[0].training)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
