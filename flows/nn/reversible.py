"""A drop-in reversible layer for ordinary networks (returns ``y`` only)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from flows.transforms.base import Bijector
from flows.transforms.chain import Chain
from flows.transforms.switches import skipping_logdet


class Reversible(nn.Module):
    r"""Memory-saving stack of bijector blocks for ordinary (non-density) networks.

    Computes :math:`y = f_n \circ \dots \circ f_1(x)` like a :class:`~flows.transforms.Chain`
    but returns only ``y`` (the log-det is dropped), so it replaces an ``nn.Sequential`` of
    residual blocks. With ``memory_saving = True`` (the default) training keeps only the
    stack's output: the backward pass rebuilds each block's input with ``inverse`` and
    recomputes the block (the engine of :mod:`flows.transforms.invertible_backward`), so
    activation memory does not grow with depth. A block opts out with
    ``reversible[i].memory_saving = False``. The blocks run inside
    :func:`~flows.transforms.switches.skipping_logdet`: those with costly log-dets
    (i-ResNet's :class:`~flows.transforms.ResidualBlock`) skip computing them.

    Args:
        *blocks: bijectors (e.g. :class:`~flows.transforms.rev_coupling.RevCoupling`),
            in application order.

    References:
        The Reversible Residual Network: Backpropagation Without Storing Activations
        (Gomez et al., arXiv:1707.04585).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from flows.transforms.rev_coupling import RevCoupling
        >>> layer = Reversible(*[RevCoupling(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(3)])
        >>> x = torch.randn(2, 8)
        >>> y = layer(x)
        >>> torch.allclose(layer.inverse(y), x, atol=1e-5)
        True
    """

    def __init__(self, *blocks: Bijector) -> None:
        super().__init__()
        self.chain = Chain(*blocks)
        self.chain.memory_saving = True

    @property
    def memory_saving(self) -> bool:
        """Whether training keeps only the output (settable between steps)."""
        return self.chain.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self.chain.memory_saving = bool(value)

    def __len__(self) -> int:
        return len(self.chain)

    def __getitem__(self, index: int) -> Bijector:
        return self.chain[index]

    def __iter__(self) -> Iterator[Bijector]:
        return iter(self.chain)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the blocks; ``x`` is ``(B, ...)`` as the blocks expect."""
        with skipping_logdet():
            return self.chain(x)[0]

    def inverse(self, y: Tensor) -> Tensor:
        """Rebuild the input from the output."""
        return self.chain.inverse(y)[0]
