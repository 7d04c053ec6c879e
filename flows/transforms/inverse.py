"""The inverse of a bijector as a bijector, and its part in memory-saving backward."""

from __future__ import annotations

from torch import Tensor

from flows.transforms.base import Bijector, Reconstruction, Region


class Inverse(Bijector):
    """Swaps the directions of a bijector: ``forward = b.inverse``, ``inverse = b.forward``.

    For ``b: x -> y`` with ``log|det J_b(x)|``, ``Inverse(b)`` maps ``y -> x`` with log-det
    ``log|det J_{b^{-1}}(y)| = -log|det J_b(x)|``, and back.

    Memory-saving backward (:mod:`flows.transforms.invertible_backward`) rebuilds an
    ``Inverse(b)``'s input from its output with ``b``'s forward and recomputes ``b``'s
    inverse under grad (the wrapped block's
    :meth:`~flows.transforms.Bijector.reconstruct_inverse`: fused, one conditioner pass, for
    couplings, ActNorm and the 1x1 convolution). This
    is how :meth:`flows.transforms.Chain.inverse` saves memory in the sampling direction:
    it hands the engine ``Inverse(b)`` for its leaves in reverse order, which is what
    :meth:`leaves` of an inverted chain returns. So:

    - :meth:`leaves` inverts the wrapped block's leaves, in reverse order;
    - :meth:`region` maps a restricted block (a :class:`~flows.transforms.Tail`) to the
      same region with the inner block inverted;
    - :attr:`memory_saving` is this wrapper's own switch, and off where ``b``'s inverse
      is not exact (i-ResNet's fixed-point inverse runs without a graph, so there is
      nothing to recompute under grad, and a recompute would repeat the iteration). It
      does not read ``b.memory_saving``: that setting is about rebuilding ``b``'s input
      with ``b``'s inverse, which this wrapper never runs. A MAF block opts out because
      that inverse costs ``D`` passes, while ``Inverse(MAF block)``, an IAF block, rebuilds
      with the one-pass forward and takes part.

    Args:
        bijector: the bijector to invert.

    Example:
        >>> import torch
        >>> from flows.transforms import Inverse, Squeeze
        >>> unsqueeze = Inverse(Squeeze())
        >>> unsqueeze(torch.randn(1, 4, 2, 2))[0].shape
        torch.Size([1, 1, 4, 4])
    """

    # Wrappers built on demand (plain attributes, not submodules: state_dict and .to() go
    # through the wrapped blocks, which are registered under self.bijector already).
    _parts: list[Inverse] | None = None
    _restricted: tuple[Region, Inverse] | None = None

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

    @Bijector.memory_saving.getter
    def memory_saving(self) -> bool:
        """Whether this block takes part in memory-saving backward: unless opted out
        itself, when the wrapped block's inverse (recomputed under grad) is exact."""
        return self._memory_saving and self.bijector.exact_inverse

    def leaves(self) -> list[Bijector]:
        """Itself, or, when the wrapped block has several leaves (a chain), their
        inverses in reverse order: ``(f_n o ... o f_1)^{-1} = f_1^{-1} o ... o f_n^{-1}``.

        A memory-saving chain then rebuilds and recomputes each inverted block on its own.
        The wrappers are built once per set of leaves and hold no state of their own.
        """
        inner = self.bijector.leaves()
        if not self._memory_saving or inner == [self.bijector]:  # opted out as a whole: one leaf
            return [self]
        inner = inner[::-1]  # a copy: a Tail hands out its own cached list
        if self._parts is None or len(self._parts) != len(inner) or any(
            part.bijector is not b for part, b in zip(self._parts, inner)
        ):
            self._parts = [Inverse(b) for b in inner]
        return list(self._parts)

    def region(self) -> tuple[Region, Bijector] | None:
        """The wrapped block's region with its inner block inverted: a block that keeps
        the rest of its input and the part's shape does so in both directions."""
        restricted = self.bijector.region()
        if restricted is None:
            return None
        region, inner = restricted
        if self._restricted is None or self._restricted[1].bijector is not inner:
            self._restricted = (region, Inverse(inner))
        return region, self._restricted[1]

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        """The wrapped block's :meth:`~flows.transforms.Bijector.reconstruct_inverse`
        (a coupling's runs its conditioner once for the rebuild and the recompute)."""
        return self.bijector.reconstruct_inverse(y, context)

    def reconstruct_inverse(self, x: Tensor, context: Tensor | None = None) -> Reconstruction:
        return self.bijector.reconstruct(x, context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.bijector.inverse(x, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.bijector(y, context)
