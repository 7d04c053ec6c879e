"""Gaussian base distributions.

Every base distribution has ``log_prob(z, context=None)`` and ``sample(n, temperature=1.0,
context=None)``; ``temperature`` is a number or a tensor broadcastable to the event shape
(per-level temperatures) and scales the noise, not the mean. The unconditional ones
accept a context and ignore it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class StandardNormal(nn.Module):
    """Standard normal ``N(0, I)`` over events of shape ``shape``.

    ``log p(z) = -0.5 * sum(z^2) - 0.5 * D * log(2 pi)`` with ``D = prod(shape)``.
    ``sample(n, temperature=T)`` draws from ``N(0, T^2 I)`` (Glow's reduced-temperature
    sampling).

    Args:
        shape: event shape, e.g. ``(D,)``.

    Example:
        >>> dist = StandardNormal((2,))
        >>> round(dist.log_prob(torch.zeros(1, 2)).item(), 4)
        -1.8379
    """

    def __init__(self, shape: tuple[int, ...] | int) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        check_event(z, self.shape, type(self).__name__)
        d = math.prod(self.shape)
        return -0.5 * z.pow(2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)

    def sample(self, n: int, temperature: float | Tensor = 1.0, context: Tensor | None = None) -> Tensor:
        eps = torch.randn(n, *self.shape, device=self._anchor.device, dtype=self._anchor.dtype)
        return temperature * eps


class DiagonalGaussian(nn.Module):
    """Gaussian ``N(mean, diag(exp(2 log_scale)))`` with learnable mean and log-scale.

    ``log p(z) = sum[-0.5 ((z - mean) / sigma)^2 - log sigma - 0.5 log(2 pi)]``;
    ``sample(n, temperature=T)`` draws ``mean + T * sigma * eps``. Starts at ``N(0, I)``.

    Args:
        shape: event shape.

    Example:
        >>> dist = DiagonalGaussian((3,))
        >>> dist.sample(4).shape
        torch.Size([4, 3])
    """

    def __init__(self, shape: tuple[int, ...] | int) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.mean = nn.Parameter(torch.zeros(self.shape))
        self.log_scale = nn.Parameter(torch.zeros(self.shape))

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        check_event(z, self.shape, type(self).__name__)
        u = (z - self.mean) * torch.exp(-self.log_scale)
        elementwise = -0.5 * u.pow(2) - self.log_scale - 0.5 * math.log(2 * math.pi)
        return elementwise.flatten(1).sum(1)

    def sample(self, n: int, temperature: float | Tensor = 1.0, context: Tensor | None = None) -> Tensor:
        eps = torch.randn(n, *self.shape, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + temperature * torch.exp(self.log_scale) * eps


def check_event(z: Tensor, shape: tuple[int, ...], name: str) -> None:
    """Raise a clear error unless ``z`` is a batch of events of ``shape``."""
    if tuple(z.shape[1:]) != shape:
        raise ValueError(f"{name}: expected samples of shape (B, {', '.join(map(str, shape))}), got {tuple(z.shape)}")
