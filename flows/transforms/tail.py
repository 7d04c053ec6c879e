"""Run a bijector on the part of a flat latent that has not been factored out yet."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flows.transforms.base import Bijector, check_tensor


class Tail(Bijector):
    """Apply ``bijector`` to elements ``[offset:]`` of a flat ``(B, D)`` latent.

    A multi-scale flow keeps one flat tensor throughout: the first ``offset`` elements
    are latents factored out at earlier levels and pass through unchanged; the rest, the
    "tail", is viewed as ``in_shape``, transformed, and flattened back (its shape may
    change, e.g. by a squeeze, its size may not). Factoring out half of the channels is
    then only a larger ``offset`` for the next level, and the factored-out latents are
    part of the chain's output: a memory-saving chain keeps nothing else.

    Forward ``y = [x_{:offset}, flat(f(view(x_{offset:})))]``, log-det that of ``f``;
    inverse likewise with ``f^{-1}``.

    Args:
        bijector: the transform of the tail.
        offset: number of leading elements that pass through.
        in_shape: event shape of the tail in the forward direction, e.g. ``(C, H, W)``.
        out_shape: event shape after ``bijector`` (defaults to ``in_shape``).

    Example:
        >>> import torch
        >>> from flows.transforms import Squeeze
        >>> stage = Tail(Squeeze(), offset=4, in_shape=(1, 2, 2), out_shape=(4, 1, 1))
        >>> stage(torch.randn(3, 8))[0].shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        bijector: Bijector,
        offset: int,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.bijector = bijector
        self.offset = offset
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape) if out_shape is not None else self.in_shape
        if math.prod(self.in_shape) != math.prod(self.out_shape):
            raise ValueError(f"Tail: {self.in_shape} and {self.out_shape} differ in size")
        self.size = offset + math.prod(self.in_shape)
        # Builders set this for a Chain of blocks that each keep the tail's shape.
        self.shape_preserving = False
        self._parts: list[Tail] | None = None

    @property
    def exact_inverse(self) -> bool:  # type: ignore[override]
        return self.bijector.exact_inverse

    @property
    def exact_logdet(self) -> bool:  # type: ignore[override]
        return self.bijector.exact_logdet

    def leaves(self) -> list[Bijector]:
        """Itself, or, for a chain of shape-keeping blocks, one ``Tail`` per block of it.

        A memory-saving chain then rebuilds and recomputes each block on its own, so blocks
        that fuse their inverse with the recompute (``reconstruct``) can do so inside a
        multi-scale model too (it runs consecutive tails of one offset and shape on the
        tail itself, splitting and joining the flat latent once per run). Only for
        ``shape_preserving`` tails (every block keeps the tail's shape, as in a Glow or
        i-ResNet step); others stay one leaf. The per-block tails are built once and hold
        no state of their own.
        """
        if not self.shape_preserving:
            return [self]
        if self._parts is None:
            # A plain list, not registered as submodules: state_dict and .to() go through
            # the wrapped blocks, which are registered under self.bijector already.
            self._parts = [Tail(block, self.offset, self.in_shape) for block in self.bijector.leaves()]
        for part in self._parts:
            part.memory_saving = part.bijector.memory_saving  # a block's opt-out may change
        return self._parts

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform_tail(x, self.bijector.forward, self.in_shape)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform_tail(y, self.bijector.inverse, self.out_shape)

    def split(self, x: Tensor, shape: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
        """The passed-through head ``(B, offset)`` and the tail viewed as ``shape``
        (default ``in_shape``) of a flat ``(B, D)`` latent."""
        check_tensor(x, "Tail", 2, "(B, D)")
        if x.shape[1] != self.size:
            raise ValueError(f"Tail: expected a flat latent of {self.size} elements, got {x.shape[1]}")
        return x[:, : self.offset], x[:, self.offset :].reshape(x.shape[0], *(shape or self.in_shape))

    @staticmethod
    def join(head: Tensor, tail: Tensor) -> Tensor:
        """The flat latent ``[head, flat(tail)]``: the inverse of :meth:`split`."""
        return torch.cat([head, tail.flatten(1)], dim=1)

    def _transform_tail(self, x: Tensor, fn, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        head, tail = self.split(x, shape)
        out, logdet = fn(tail)
        return self.join(head, out), logdet
