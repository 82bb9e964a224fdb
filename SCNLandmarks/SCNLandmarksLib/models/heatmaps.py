"""Gaussian target heatmaps with a learnable sigma per landmark, and the training loss.

Targets follow the SCN papers: ``g_i(x) = gamma / (sqrt(2 pi) sigma_i)^d * exp(-|x - mu_i|^2 / (2 sigma_i^2))``
on the network grid (pixel centres at integer grid indices, sigma in grid pixels). The
normalising factor makes the peak fall as sigma grows, and a penalty on sigma^2 keeps the
targets sharp; the gradient reaches sigma through the target, so targets are never detached.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["HeatmapTargets", "heatmap_loss"]


class HeatmapTargets(nn.Module):
    """Learnable per-landmark sigmas and the targets they define.

    Args:
        num_landmarks: number of heatmap channels.
        dimension: 2 or 3.
        initial_sigma: starting sigma in grid pixels (2.5 in 2D, 4 in 3D in the papers).
        gamma: target scale (100 in 2D, 1000 in 3D).
    """

    def __init__(self, num_landmarks: int, dimension: int, *, initial_sigma: float, gamma: float) -> None:
        super().__init__()
        self.dimension = dimension
        self.gamma = float(gamma)
        self.sigmas = nn.Parameter(torch.full((num_landmarks,), float(initial_sigma)))

    def clamped_sigmas(self) -> torch.Tensor:
        # Below ~0.5 px the Gaussian is no longer resolved by the grid.
        return self.sigmas.clamp(min=0.5)

    def peak_values(self) -> torch.Tensor:
        """Target value at the landmark for each channel, ``(N,)``."""
        return self.gamma / (math.sqrt(2 * math.pi) * self.clamped_sigmas()) ** self.dimension

    def forward(self, positions: torch.Tensor, grid_shape: tuple[int, ...]) -> torch.Tensor:
        """Targets ``(B, N, [z,] y, x)`` for grid-index positions ``(B, N, D)`` in x, y[, z] order.

        Missing landmarks (NaN rows) give all-zero maps; the loss masks them anyway.
        """
        batch, count, dim = positions.shape
        sigma = self.clamped_sigmas().view(1, count, 1)
        safe = torch.nan_to_num(positions, nan=-1e6)
        result = None
        # Separable: the product of one 1D Gaussian per axis, broadcast over the grid.
        for axis in range(dim):
            length = grid_shape[dim - 1 - axis]
            coords = torch.arange(length, dtype=positions.dtype, device=positions.device).view(1, 1, -1)
            profile = torch.exp(-((coords - safe[..., axis : axis + 1]) ** 2) / (2 * sigma**2))
            view = [batch, count] + [1] * dim
            view[2 + dim - 1 - axis] = length
            profile = profile.view(*view)
            result = profile if result is None else result * profile
        scale = self.peak_values().view(1, count, *([1] * dim))
        return result * scale


def heatmap_loss(
    predicted: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    sigma_weight: float,
) -> torch.Tensor:
    """Summed L2 heatmap loss plus the sigma penalty, per image of the batch.

    ``0.5 * sum((predicted - target)^2) + sigma_weight * 0.5 * sum(sigma_i^2)``, both summed
    over valid (present) landmarks only and averaged over the batch.

    Args:
        predicted, target: ``(B, N, [z,] y, x)``.
        valid: ``(B, N)`` bool, False for missing landmarks.
        sigmas: ``(N,)``.
        sigma_weight: weight of the sigma penalty (20 in 2D, 100 in 3D in the papers).
    """
    mask = valid.to(predicted.dtype).view(*valid.shape, *([1] * (predicted.ndim - 2)))
    data = 0.5 * (((predicted - target) ** 2) * mask).sum()
    penalty = sigma_weight * 0.5 * ((sigmas.view(1, -1) ** 2) * valid.to(sigmas.dtype)).sum()
    return (data + penalty) / predicted.shape[0]
