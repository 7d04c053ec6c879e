"""Reshape of the event (non-batch) dimensions."""

from __future__ import annotations

import math

from torch import Tensor

from flows.transforms.base import Bijector, zero_logdet


class Reshape(Bijector):
    """Reshape of each sample from ``in_shape`` to ``out_shape`` (same size), log-det 0.

    Args:
        in_shape: event shape of the input, e.g. ``(C, H, W)``.
        out_shape: event shape of the output, e.g. ``(C * H * W,)``.

    Example:
        >>> import torch
        >>> Reshape((1, 4, 4), (16,))(torch.randn(3, 1, 4, 4))[0].shape
        torch.Size([3, 16])
    """

    keeps_shape = False

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        if math.prod(self.in_shape) != math.prod(self.out_shape):
            raise ValueError(f"Reshape: sizes differ: {self.in_shape} vs {self.out_shape}")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._reshape(x, self.in_shape, self.out_shape), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._reshape(y, self.out_shape, self.in_shape), zero_logdet(y)

    @staticmethod
    def _reshape(x: Tensor, src: tuple[int, ...], dst: tuple[int, ...]) -> Tensor:
        if tuple(x.shape[1:]) != src:
            raise ValueError(f"Reshape: expected input of shape (B, {', '.join(map(str, src))}), got {tuple(x.shape)}")
        return x.reshape(x.shape[0], *dst)
