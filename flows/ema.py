"""An exponential moving average of a model's weights (Polyak averaging), for training.

The Glow and Residual Flows code bases evaluate and sample with such an average of the
weights rather than with the last iterate: it smooths the noise of the last steps of
stochastic optimisation and usually scores a little better on held-out data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """Exponential moving average ``theta_ema <- d * theta_ema + (1 - d) * theta`` of the parameters.

    After ``n`` updates from a start ``theta_0`` the average is
    ``d^n theta_0 + (1 - d) sum_k d^(n - k) theta_k``: a window of about ``1 / (1 - d)``
    steps (1000 for ``d = 0.999``). Only floating-point parameters are averaged. Buffers
    (ActNorm's ``initialized`` flag, spectral norm's power-iteration vectors) are state,
    not weights: :meth:`state_dict` copies the model's current ones beside the averages.

    Args:
        model: the module whose parameters to average; the average starts at their values.
        decay: ``d`` in ``(0, 1)``.

    Raises:
        ValueError: ``decay`` outside ``(0, 1)``.

    References:
        Polyak, Juditsky. Acceleration of Stochastic Approximation by Averaging. SIAM J.
        Control Optim. 30(4), 1992. Kingma, Dhariwal. Glow. arXiv:1807.03039.

    Example:
        >>> layer = nn.Linear(1, 1, bias=False)
        >>> _ = nn.init.zeros_(layer.weight)
        >>> ema = EMA(layer, decay=0.75)
        >>> _ = nn.init.ones_(layer.weight)
        >>> ema.update(layer)
        >>> ema.average["weight"]  # 0.75 * 0 + 0.25 * 1
        tensor([[0.2500]])
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0 < decay < 1):
            raise ValueError(f"EMA: decay must be a number in (0, 1), e.g. 0.999, got {decay!r}")
        self.decay = float(decay)
        self.average = {name: p.detach().clone() for name, p in _averaged(model)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step toward ``model``'s current parameters."""
        for name, p in _averaged(model):
            self.average[name].lerp_(p, 1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """A state dict of ``model`` holding the averaged parameters and ``model``'s own buffers."""
        return {name: self.average.get(name, value).clone() for name, value in model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the averages from a :meth:`state_dict` (its buffers are not needed)."""
        missing = sorted(set(self.average) - set(state))
        if missing:
            raise KeyError(f"EMA: the state lacks the averages of {missing[0]} (and {len(missing) - 1} more)")
        for name, value in self.average.items():
            value.copy_(state[name])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the enclosed code with the averaged parameters in ``model``; restore the raw ones after.

        The raw values are copied back bit for bit, so evaluating with the average never
        changes a training run.
        """
        raw = {name: p.detach().clone() for name, p in _averaged(model)}
        try:
            with torch.no_grad():
                for name, p in _averaged(model):
                    p.copy_(self.average[name])
            yield model
        finally:
            with torch.no_grad():
                for name, p in _averaged(model):
                    p.copy_(raw[name])


def _averaged(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The parameters an average is kept of (state-dict names, floating point only)."""
    for name, p in model.named_parameters():
        if p.is_floating_point():
            yield name, p

