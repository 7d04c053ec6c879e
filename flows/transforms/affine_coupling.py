"""RealNVP's affine coupling with a bounded log-scale."""

from __future__ import annotations

import torch
from torch import Tensor

from flows.transforms.coupling import MaskedCoupling


class AffineCoupling(MaskedCoupling):
    """Affine coupling: scale and shift of one part conditioned on the other.

    With ``(a, t) = NN(x_A)`` and ``log_scale = tanh(a)``:

    - forward ``y_A = x_A``, ``y_B = x_B * exp(log_scale) + t``,
      ``log|det J| = sum log_scale``;
    - inverse ``x_B = (y_B - t) * exp(-log_scale)``, ``log|det J| = -sum log_scale``.

    ``tanh`` bounds each factor to ``(1/e, e)``: a single step cannot blow up the scale,
    which keeps training stable (the role Glow gives ``sigmoid(a + 2)``), and a zero
    network output is the identity, so a fresh coupling with the default zero-initialised
    conditioner is the identity.

    With a channel mask the input may have 1, 2 or 3 spatial axes (``dims``), e.g. the
    couplings of :class:`flows.nn.IUNet`.

    Args: see :class:`~flows.transforms.coupling.MaskedCoupling`; the conditioner outputs
    ``2 * k`` channels for ``k`` transformed ones (log-scale first, then shift).

    References:
        Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. arXiv:1605.08803.

    Example:
        >>> import torch
        >>> from flows.transforms import AffineCoupling, checkerboard_mask
        >>> coupling = AffineCoupling(checkerboard_mask(4, 4), channels=3)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> y, logdet = coupling(x)
        >>> torch.allclose(coupling.inverse(y)[0], x)
        True
    """

    params_per_element = 2

    def couple(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = theta.chunk(2, dim=1)
        log_scale = torch.tanh(raw)
        return x * torch.exp(log_scale) + shift, log_scale

    def uncouple(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = theta.chunk(2, dim=1)
        log_scale = torch.tanh(raw)
        return (y - shift) * torch.exp(-log_scale), log_scale
