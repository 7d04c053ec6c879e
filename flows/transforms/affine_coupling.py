"""The affine coupling, with RealNVP's bounded, Glow's sigmoid or an unbounded log-scale."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flows.transforms.coupling import MaskedCoupling

# Glow's offset: a zero network output gives the scale sigmoid(2) = 0.88, close to 1.
_GLOW_OFFSET = 2.0
SCALES = ("tanh", "sigmoid", "exp")


class AffineCoupling(MaskedCoupling):
    """Affine coupling: scale and shift of one part conditioned on the other.

    With ``(a, t) = NN(x_A)`` and a log-scale ``s(a)``:

    - forward ``y_A = x_A``, ``y_B = x_B * exp(s) + t``, ``log|det J| = sum s``;
    - inverse ``x_B = (y_B - t) / exp(s)``, ``log|det J| = -sum s``.

    ``scale`` picks ``s``:

    - ``"tanh"`` (RealNVP's bounded scale, the default): ``s = tanh(a)``, each factor in
      ``(1/e, e)``, so one step cannot blow the scale up; a zero network output is the
      identity.
    - ``"sigmoid"`` (Glow's): ``s = log sigmoid(a + 2)``, a factor in ``(0, 1)`` in the
      density direction: a coupling only contracts (ActNorm and the 1x1 convolution
      expand), without a floor, so it can whiten near-constant pixels (a digit's
      background) that a bounded scale cannot; ``ds/da = 1 - sigmoid(a + 2)`` is 0.12 at a
      zero output, so the scale starts slow and never overshoots. A zero output is the
      scale ``sigmoid(2) = 0.88``, not the identity.
    - ``"exp"`` (normflows' default ``scale_map``, which its variational-inference
      examples use): ``s = a``, the factor ``exp(a)`` unbounded either way; a zero output
      is the identity. Nothing stops one step from scaling by ``e^10``: it suits flows
      trained through their own samples (reverse KL, where the target bounds the scale)
      better than density fits on data.

    With a channel mask the input may have 1, 2 or 3 spatial axes (``dims``), e.g. the
    couplings of :class:`flows.nn.IUNet`.

    Args:
        mask: see :class:`~flows.transforms.coupling.MaskedCoupling`, as every other
            argument; the conditioner outputs ``2 * k`` channels for ``k`` transformed
            ones (log-scale first, then shift).
        scale: ``"tanh"``, ``"sigmoid"`` or ``"exp"``.

    References:
        Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. arXiv:1605.08803.
        Kingma, Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
        arXiv:1807.03039.

    Example:
        >>> import torch
        >>> from flows.transforms import AffineCoupling, checkerboard_mask
        >>> coupling = AffineCoupling(checkerboard_mask(4, 4), channels=3)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> y, logdet = coupling(x)
        >>> torch.allclose(coupling.inverse(y)[0], x)
        True
        >>> glow = AffineCoupling(checkerboard_mask(4, 4), channels=3, scale="sigmoid")
        >>> round(glow(x)[1][0].item() / 24, 4)  # a fresh one scales the 24 changed elements by 0.88
        -0.1269
    """

    params_per_element = 2
    # A class default, so modules pickled before the option existed load as they were.
    scale = "tanh"

    def __init__(self, mask: Tensor, *args: Any, scale: str = "tanh", **kwargs: Any) -> None:
        if scale not in SCALES:
            raise ValueError(f"AffineCoupling: scale must be one of {SCALES}, got {scale!r}")
        super().__init__(mask, *args, **kwargs)
        self.scale = scale

    def _log_scale(self, raw: Tensor) -> Tensor:
        if self.scale == "sigmoid":
            return F.logsigmoid(raw + _GLOW_OFFSET)
        if self.scale == "exp":
            return raw
        return torch.tanh(raw)

    def coupling_parameters(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(s, exp(s), t)``: one log-scale map and one ``exp`` for both directions (a
        memory-saving rebuild solves and recouples with the same ones)."""
        raw, shift = theta.chunk(2, dim=1)
        log_scale = self._log_scale(raw)
        return log_scale, torch.exp(log_scale), shift

    def couple(self, x: Tensor, theta: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        log_scale, scale, shift = theta
        return x * scale + shift, log_scale

    def uncouple(self, y: Tensor, theta: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        log_scale, scale, shift = theta
        return (y - shift) / scale, log_scale
