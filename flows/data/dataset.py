"""The dataset record shared by every loader, and uniform dequantization."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def dequantize(x: Tensor, n_levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of integer levels to floats in ``[0, 1)``.

    ``y = (x + u) / n_levels`` with ``u ~ U[0, 1)`` drawn independently per element. A
    continuous density ``p`` on ``[0, 1)^D`` then bounds the discrete log-likelihood from
    below: ``log P(x) >= E_u[log p(y)] - D log(n_levels)`` (Theis et al., 2016).

    Args:
        x: integer levels in ``{0, ..., n_levels - 1}``, any shape (e.g. ``(B, C, H, W)``).
        n_levels: the number of discrete levels (17 for digits, 256 for 8-bit images).
        generator: optional random generator for the noise (reproducible batches).

    Returns:
        A float32 tensor of ``x``'s shape with values in ``[0, 1)``.

    Example:
        >>> import torch
        >>> y = dequantize(torch.tensor([0, 16]), 17)
        >>> bool(((y >= 0) & (y < 1)).all())
        True
    """
    if n_levels < 2:
        raise ValueError(f"dequantize: n_levels must be at least 2, got {n_levels}")
    x = x.to(torch.float32)
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + noise) / n_levels


@dataclass
class Dataset:
    """A train/test pair of tensors and what they hold.

    Attributes:
        name: the dataset's name, as accepted by :func:`flows.data.load`.
        train: training examples, ``(N, *shape)``; ``uint8`` levels for discrete data,
            ``float32`` values for continuous data.
        test: held-out examples, ``(M, *shape)``, same dtype as ``train``.
        n_levels: the number of discrete levels per element (17 for digits, 256 for 8-bit
            images), or ``None`` for continuous data such as the 2D toys.
        shape: the shape of one example, ``(C, H, W)`` for images or ``(D,)`` for vectors.
    """

    name: str
    train: Tensor
    test: Tensor
    n_levels: int | None
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        for split, tensor in (("train", self.train), ("test", self.test)):
            if tuple(tensor.shape[1:]) != tuple(self.shape):
                raise ValueError(
                    f"Dataset {self.name!r}: {split} examples have shape "
                    f"{tuple(tensor.shape[1:])}, expected {tuple(self.shape)}"
                )

    @property
    def discrete(self) -> bool:
        """Whether the data are integer levels that need dequantization."""
        return self.n_levels is not None

    @property
    def dim(self) -> int:
        """The number of elements of one example (``C * H * W`` or ``D``)."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def prepare(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Turn stored examples into model inputs.

        Discrete data are dequantized to ``[0, 1)`` with :func:`dequantize`; continuous
        data are returned as float32.

        Args:
            x: examples ``(B, *shape)`` taken from ``train`` or ``test``.
            generator: optional random generator for the dequantization noise.

        Returns:
            A float32 tensor ``(B, *shape)``.
        """
        if self.n_levels is None:
            return x.to(torch.float32)
        return dequantize(x, self.n_levels, generator=generator)

    def __repr__(self) -> str:
        levels = "continuous" if self.n_levels is None else f"n_levels={self.n_levels}"
        return (
            f"Dataset({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"shape={tuple(self.shape)}, {levels})"
        )
