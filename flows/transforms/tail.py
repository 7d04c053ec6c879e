"""Run a bijector on the part of a flat latent that has not been factored out yet."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flows.transforms.base import Bijector, Region, check_tensor


@dataclass(frozen=True)
class TailRegion:
    """Elements ``[offset:]`` of a flat ``(B, size)`` latent, viewed as ``shape``."""

    offset: int
    shape: tuple[int, ...]
    size: int

    def split(self, x: Tensor, shape: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
        """The passed-through head ``(B, offset)`` and the tail viewed as ``shape``
        (default: the region's shape)."""
        check_tensor(x, "Tail", 2, "(B, D)")
        if x.shape[1] != self.size:
            raise ValueError(f"Tail: expected a flat latent of {self.size} elements, got {x.shape[1]}")
        # One split (its backward is one cat, where two slices would each scatter into a
        # zero tensor of the whole latent). A contiguous part: a view would let a block's
        # saved input keep the whole flat latent alive under ordinary backward (a no-op
        # where the reshape copies anyway).
        head, part = x.split([self.offset, self.size - self.offset], dim=1)
        return head, part.reshape(x.shape[0], *(shape or self.shape)).contiguous()

    @staticmethod
    def join(head: Tensor, tail: Tensor) -> Tensor:
        """The flat latent ``[head, flat(tail)]``: the inverse of :meth:`split`."""
        return torch.cat([head, tail.flatten(1)], dim=1)


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
        self._region = TailRegion(offset, self.in_shape, self.size)
        self._parts: list[Tail] | None = None

    @property
    def exact_inverse(self) -> bool:  # type: ignore[override]
        return self.bijector.exact_inverse

    @property
    def exact_logdet(self) -> bool:  # type: ignore[override]
        return self.bijector.exact_logdet

    @Bijector.memory_saving.getter
    def memory_saving(self) -> bool:
        """Whether this tail takes part in memory-saving backward: unless opted out itself,
        when every block it wraps does (so a per-block tail of :meth:`leaves` follows
        its block's own setting)."""
        return self._memory_saving and all(b.memory_saving for b in self.bijector.leaves())

    def leaves(self) -> list[Bijector]:
        """Itself, or, when it wraps several blocks that each keep the tail's shape (a
        Glow or i-ResNet step of flow), one ``Tail`` per block.

        A memory-saving chain then rebuilds and recomputes each block on its own, so blocks
        that fuse their inverse with the recompute (``reconstruct``) can do so inside a
        multi-scale model too (consecutive tails of one region run on the region itself,
        splitting and joining the flat latent once per run). The per-block tails are built
        once and hold no state of their own.
        """
        blocks = self.bijector.leaves()
        one_leaf = not self._memory_saving or len(blocks) == 1  # opted out as a whole: one leaf
        if one_leaf or self.in_shape != self.out_shape or not all(b.keeps_shape for b in blocks):
            return [self]
        if self._parts is None:
            # A plain list, not registered as submodules: state_dict and .to() go through
            # the wrapped blocks, which are registered under self.bijector already.
            self._parts = [Tail(block, self.offset, self.in_shape) for block in blocks]
        return self._parts

    def __setstate__(self, state: dict) -> None:
        """Load a Tail pickled by an older version (before regions and derived splits)."""
        state.pop("shape_preserving", None)
        state["_parts"] = None
        super().__setstate__(state)
        if "_region" not in state:
            self._region = TailRegion(self.offset, self.in_shape, self.size)

    def region(self) -> tuple[Region, Bijector] | None:
        if self.in_shape != self.out_shape:
            return None
        return self._region, self.bijector

    def initialize_chunks(self, chunks: list[Tensor], contexts: list[Tensor | None]) -> list[Tensor]:
        """The wrapped bijector initialises on the tails of the chunks; the heads pass through.

        Consumes ``chunks`` (see :meth:`Bijector.initialize_chunks`): the heads are copied
        out of each chunk, so a chunk is freed once split, and each part once joined.
        """
        heads, parts = [], []
        for k in range(len(chunks)):
            head, part = self._region.split(chunks[k], self.in_shape)
            heads.append(head.clone())  # a view would keep the whole chunk alive
            parts.append(part)
            chunks[k] = None
        outputs = self.bijector.initialize_chunks(parts, contexts)
        joined = []
        for k in range(len(heads)):
            joined.append(self._region.join(heads[k], outputs[k]))
            heads[k] = outputs[k] = None
        return joined

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._transform_tail(x, context, self.bijector.forward, self.in_shape)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._transform_tail(y, context, self.bijector.inverse, self.out_shape)

    def _transform_tail(self, x: Tensor, context: Tensor | None, fn, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        head, tail = self._region.split(x, shape)
        out, logdet = fn(tail, context)
        return self._region.join(head, out), logdet
