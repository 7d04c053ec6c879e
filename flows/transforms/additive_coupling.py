"""NICE's additive coupling."""

from __future__ import annotations

from torch import Tensor

from flows.transforms.coupling import MaskedCoupling


class AdditiveCoupling(MaskedCoupling):
    """Additive coupling: volume-preserving shift of one part conditioned on the other.

    Forward ``y_A = x_A``, ``y_B = x_B + t(x_A)``; inverse ``x_B = y_B - t(y_A)``;
    ``log|det J| = 0`` in both directions.

    With a channel mask the input may have 1, 2 or 3 spatial axes (``dims``), e.g. the
    couplings of :class:`flows.nn.IUNet`.

    Args: see :class:`~flows.transforms.coupling.MaskedCoupling`.

    References:
        Dinh, Krueger, Bengio. NICE: Non-linear Independent Components Estimation.
        arXiv:1410.8516.

    Example:
        >>> import torch
        >>> from flows.transforms import AdditiveCoupling, channel_mask
        >>> coupling = AdditiveCoupling(channel_mask(6, 0), image=False)
        >>> y, logdet = coupling(torch.randn(3, 6))
        >>> logdet
        tensor([0., 0., 0.])
    """

    params_per_element = 1

    def couple(self, x: Tensor, theta: Tensor) -> tuple[Tensor, None]:
        return x + theta, None

    def uncouple(self, y: Tensor, theta: Tensor) -> tuple[Tensor, None]:
        return y - theta, None
