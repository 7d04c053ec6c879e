"""A Gaussian base distribution whose parameters come from a context."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flows.distributions.normal import check_event
from flows.transforms.base import check_context


class ConditionalDiagonalGaussian(nn.Module):
    """``p(z | c) = N(z; mu(c), diag(exp(2 s(c))))``: mean and log-scale from the context.

    ``(mu(c), s(c)) = MLP(c)``, one hidden layer of ``hidden_features`` ReLU units, its last
    layer zero-initialised so a fresh model is ``N(0, I)`` for every context. This is
    Glow's class-conditional top prior (the class predicts the prior's mean and scale) and
    the base of conditional vector flows.

    ``log p(z | c) = sum[-0.5 ((z - mu) / sigma)^2 - log sigma - 0.5 log(2 pi)]``;
    ``sample(n, temperature=T, context=c)`` draws ``mu(c) + T sigma(c) eps``, one sample per
    row of ``c``.

    Args:
        shape: event shape of ``z``.
        context_features: ``C``, the size of one context vector ``(B, C)``.
        hidden_features: width of the MLP.

    Example:
        >>> import torch
        >>> dist = ConditionalDiagonalGaussian((3,), context_features=2)
        >>> dist.sample(4, context=torch.randn(4, 2)).shape
        torch.Size([4, 3])
    """

    def __init__(self, shape: tuple[int, ...] | int, context_features: int, hidden_features: int = 64) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.context_features = context_features
        d = math.prod(self.shape)
        self.net = nn.Sequential(
            nn.Linear(context_features, hidden_features), nn.ReLU(), nn.Linear(hidden_features, 2 * d)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def parameters_of(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu(c), s(c))``, each ``(B, *shape)``."""
        mean, log_scale = self.net(context).chunk(2, dim=1)
        return mean.view(-1, *self.shape), log_scale.view(-1, *self.shape)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        name = type(self).__name__
        check_event(z, self.shape, name)
        check_context(context, z, name, self.context_features)
        mean, log_scale = self.parameters_of(context.to(z.dtype))
        u = (z - mean) * torch.exp(-log_scale)
        elementwise = -0.5 * u.pow(2) - log_scale - 0.5 * math.log(2 * math.pi)
        return elementwise.flatten(1).sum(1)

    def sample(self, n: int, temperature: float | Tensor = 1.0, context: Tensor | None = None) -> Tensor:
        name = type(self).__name__
        reference = self.net[0].weight
        template = reference.new_empty(n, 1)
        check_context(context, template, f"{name}.sample", self.context_features)
        mean, log_scale = self.parameters_of(context.to(reference.dtype))
        eps = torch.randn(n, *self.shape, device=reference.device, dtype=reference.dtype)
        return mean + temperature * torch.exp(log_scale) * eps
