"""Logit preprocessing of dequantized pixels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flows.transforms.base import Bijector, checks_values


class Logit(Bijector):
    """Map dequantized pixels in ``[0, 1]`` to the real line (RealNVP's preprocessing).

    Forward ``p = alpha + (1 - 2 alpha) x``, ``y = log p - log(1 - p)``, with
    ``log|det J| = sum [log(1 - 2 alpha) - log p - log(1 - p)]``.
    Inverse ``x = (sigmoid(y) - alpha) / (1 - 2 alpha)`` with minus that log-det.
    ``alpha`` keeps the logit away from the infinite boundary values.

    Args:
        alpha: boundary margin in ``[0, 0.5)``; RealNVP uses 0.05.

    References:
        Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. arXiv:1605.08803,
        section 4.1.

    Example:
        >>> import torch
        >>> y, logdet = Logit(0.05)(torch.full((1, 1, 2, 2), 0.5))
        >>> y.abs().max().item()
        0.0
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"Logit: alpha must be in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError("Logit: expected a floating-point tensor of pixels in [0, 1]")
        p = self.alpha + (1 - 2 * self.alpha) * x
        # The domain is where p lies in (0, 1): pixels in [0, 1] with the alpha margin
        # around them, so decoded samples (and memory-saving reconstructions) map back.
        if checks_values(x) and (not torch.isfinite(x).all() or p.min() <= 0 or p.max() >= 1):
            raise ValueError(
                "Logit: inputs must be finite dequantized pixels in [0, 1] (the margin alpha "
                f"admits [{-self.alpha / (1 - 2 * self.alpha):.3g}, {(1 - self.alpha) / (1 - 2 * self.alpha):.3g}]), "
                f"got range [{x.min().item():.4g}, {x.max().item():.4g}]"
            )
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        logdet = (math.log(1 - 2 * self.alpha) - log_p - log_1mp).flatten(1).sum(1)
        return log_p - log_1mp, logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(y)
        # log p and log(1 - p) from logsigmoid stay finite for large |y|.
        logdet = (F.logsigmoid(y) + F.logsigmoid(-y) - math.log(1 - 2 * self.alpha)).flatten(1).sum(1)
        return (p - self.alpha) / (1 - 2 * self.alpha), logdet
