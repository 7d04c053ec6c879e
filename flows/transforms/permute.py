"""Fixed permutations of channels or features."""

from __future__ import annotations

import torch
from torch import Tensor

from flows.transforms.base import Bijector, check_size, check_tensor, zero_logdet


class Permute(Bijector):
    """A fixed permutation of dim 1 (channels of images, features of vectors), log-det 0.

    ``y[:, i] = x[:, perm[i]]``; ``x[:, perm[i]] = y[:, i]``. ``mode="reverse"`` reverses
    the order (RealNVP/Glow's reverse permutation); ``mode="shuffle"`` draws a random
    permutation once from ``seed`` (stored in the state dict).

    Args:
        channels: size of dim 1.
        mode: ``"reverse"`` or ``"shuffle"``.
        seed: seed of the shuffle (``None`` uses the global RNG).

    Example:
        >>> import torch
        >>> Permute(3)(torch.tensor([[1.0, 2.0, 3.0]]))[0]
        tensor([[3., 2., 1.]])
    """

    def __init__(self, channels: int, mode: str = "reverse", seed: int | None = None) -> None:
        super().__init__()
        if mode == "reverse":
            perm = torch.arange(channels - 1, -1, -1)
        elif mode == "shuffle":
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            perm = torch.randperm(channels, generator=gen)
        else:
            raise ValueError(f"Permute: mode must be 'reverse' or 'shuffle', got {mode!r}")
        self.channels = channels
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        return x[:, self.perm], zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y)
        return y[:, self.inverse_perm], zero_logdet(y)

    def _check(self, x: Tensor) -> None:
        check_tensor(x, "Permute", (2, 3, 4, 5), "(B, C, ...)")
        check_size(x, "Permute", 1, self.channels, "channels")
