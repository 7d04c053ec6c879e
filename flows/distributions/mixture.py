"""A learnable Gaussian-mixture base distribution."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flows.distributions.normal import check_event


class GaussianMixture(nn.Module):
    """``p(z) = sum_k pi_k N(z; mu_k, diag(sigma_k^2))`` over ``(D,)`` events, all learnable.

    ``log p(z) = logsumexp_k [log pi_k - sum_d (0.5 u_kd^2 + log sigma_kd) - 0.5 D log(2 pi)]``
    with ``u_k = (z - mu_k) / sigma_k`` and ``pi = softmax(logits)``. The means start spread
    (a fixed normal draw scaled by ``spread``) so the components can separate, the scales at
    1. ``sample(n, temperature=T)`` picks a component by ``pi`` and draws
    ``mu_k + T sigma_k eps`` (the temperature scales the noise, not the means). A context
    is accepted and ignored.

    Args:
        shape: event shape ``(D,)`` (or ``D``).
        components: ``K``.
        spread: scale of the initial means.
        seed: seed of the initial means.

    Example:
        >>> import torch
        >>> base = GaussianMixture(2, components=3)
        >>> base.log_prob(base.sample(5)).shape
        torch.Size([5])
    """

    def __init__(self, shape: tuple[int, ...] | int, components: int = 8, spread: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(self.shape) != 1:
            raise ValueError(f"GaussianMixture: events must be vectors (D,), got shape {self.shape}")
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"GaussianMixture: components must be an integer >= 1, got {components!r}")
        d = self.shape[0]
        generator = torch.Generator().manual_seed(seed)
        self.means = nn.Parameter(spread * torch.randn(components, d, generator=generator))
        self.log_scales = nn.Parameter(torch.zeros(components, d))
        self.logits = nn.Parameter(torch.zeros(components))

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        check_event(z, self.shape, type(self).__name__)
        u = (z[:, None, :] - self.means) * torch.exp(-self.log_scales)
        per_component = -(0.5 * u.pow(2) + self.log_scales).sum(-1) - 0.5 * self.shape[0] * math.log(2 * math.pi)
        return torch.logsumexp(torch.log_softmax(self.logits, 0) + per_component, dim=1)

    def sample(self, n: int, temperature: float | Tensor = 1.0, context: Tensor | None = None) -> Tensor:
        k = torch.multinomial(torch.softmax(self.logits.detach(), 0), n, replacement=True)
        eps = torch.randn(n, self.shape[0], device=self.means.device, dtype=self.means.dtype)
        return self.means[k] + temperature * torch.exp(self.log_scales[k]) * eps
