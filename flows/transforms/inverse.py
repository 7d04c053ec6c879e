"""The inverse of a bijector as a bijector."""

from __future__ import annotations

from torch import Tensor

from flows.transforms.base import Bijector


class Inverse(Bijector):
    """Swaps the directions of a bijector: ``forward = b.inverse``, ``inverse = b.forward``.

    Args:
        bijector: the bijector to invert.

    Example:
        >>> import torch
        >>> from flows.transforms import Inverse, Squeeze
        >>> unsqueeze = Inverse(Squeeze())
        >>> unsqueeze(torch.randn(1, 4, 2, 2))[0].shape
        torch.Size([1, 1, 4, 4])
    """

    def __init__(self, bijector: Bijector) -> None:
        super().__init__()
        self.bijector = bijector

    @property
    def exact_inverse(self) -> bool:  # type: ignore[override]
        return self.bijector.exact_inverse

    @property
    def exact_logdet(self) -> bool:  # type: ignore[override]
        return self.bijector.exact_logdet

    @property
    def keeps_shape(self) -> bool:  # type: ignore[override]
        return self.bijector.keeps_shape

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.bijector.inverse(x, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.bijector(y, context)
