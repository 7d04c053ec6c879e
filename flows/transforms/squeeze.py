"""Space-to-depth squeeze."""

from __future__ import annotations

from torch import Tensor

from flows.transforms.base import Bijector, check_tensor, zero_logdet


class Squeeze(Bijector):
    """Space-to-depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, a permutation (log-det 0).

    Output channel ``4c + 2i + j`` holds input channel ``c`` at the pixels with row
    offset ``i`` and column offset ``j`` inside each 2x2 block. The inverse is
    depth-to-space. Both log-dets are 0.

    References:
        Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. arXiv:1605.08803.

    Example:
        >>> import torch
        >>> Squeeze()(torch.randn(2, 3, 8, 8))[0].shape
        torch.Size([2, 12, 4, 4])
    """

    keeps_shape = False

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_tensor(x, "Squeeze", 4, "(B, C, H, W)")
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze: H and W must be even, got H={h}, W={w}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, 4 * c, h // 2, w // 2), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_tensor(y, "Squeeze.inverse", 4, "(B, C, H, W)")
        b, c, h, w = y.shape
        if c % 4:
            raise ValueError(f"Squeeze.inverse: channels must be a multiple of 4, got {c}")
        x = y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, 2 * h, 2 * w), zero_logdet(y)
