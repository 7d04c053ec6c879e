"""An exponential moving average of a model's weights (Polyak averaging), for training.

The Glow and Residual Flows code bases evaluate and sample with such an average of the
weights rather than with the last iterate: it smooths the noise of the last steps of
stochastic optimisation and usually scores a little better on held-out data. Its decay
warms up over the first updates, so the average follows the weights from the first steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """Exponential moving average of the parameters, its decay warmed up over the first updates.

    Update ``n`` (``n = 0, 1, ...`` updates done before it) moves the average toward the
    current parameters ``theta`` with the decay

        d_n = min(d, (1 + n) / (10 + n)),    theta_ema <- d_n theta_ema + (1 - d_n) theta,

    the warm-up of TensorFlow's ``ExponentialMovingAverage(decay, num_updates)``. A fixed
    ``d`` started at the initialisation ``theta_0`` keeps ``d^n`` of it after ``n`` updates
    (37% after 1000 updates at ``d = 0.999``), so the average lags far behind a run shorter
    than a few windows ``1 / (1 - d)``. With the warm-up, while ``(1 + n) / (10 + n) <= d``
    (up to ``n = (10 d - 1) / (1 - d)``, 8990 at 0.999) the weight left on ``theta_0``
    after ``n`` updates is ``prod_{j < n} (1 + j) / (10 + j) = 1 / C(n + 9, 9)`` and the
    window, ``1 / (1 - d_n) = (10 + n) / 9``, is about a ninth of the steps so far; after
    that it is the plain average of decay ``d``.

    Only floating-point parameters are averaged. Buffers (ActNorm's ``initialized`` flag,
    spectral norm's power-iteration vectors) are state, not weights: :meth:`state_dict`
    copies the model's current ones beside the averages.

    Args:
        model: the module whose parameters to average; the average starts at their values.
        decay: ``d`` in ``(0, 1)``, the decay after the warm-up.

    Attributes:
        updates: the number of updates applied (``n``); a checkpoint keeps it beside the
            averages (:meth:`load_state_dict`).

    Raises:
        ValueError: ``decay`` outside ``(0, 1)``.

    References:
        Polyak, Juditsky. Acceleration of Stochastic Approximation by Averaging. SIAM J.
        Control Optim. 30(4), 1992. Kingma, Dhariwal. Glow. arXiv:1807.03039.

    Example:
        >>> layer = nn.Linear(1, 1, bias=False)
        >>> _ = nn.init.zeros_(layer.weight)
        >>> ema = EMA(layer, decay=0.999)
        >>> _ = nn.init.ones_(layer.weight)
        >>> ema.effective_decay  # the first update: (1 + 0) / (10 + 0)
        0.1
        >>> ema.update(layer)
        >>> ema.average["weight"]  # 0.1 * 0 + 0.9 * 1
        tensor([[0.9000]])
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0 < decay < 1):
            raise ValueError(f"EMA: decay must be a number in (0, 1), e.g. 0.999, got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.average = {name: p.detach().clone() for name, p in _averaged(model)}

    @property
    def effective_decay(self) -> float:
        """The decay of the next update, ``min(decay, (1 + updates) / (10 + updates))``."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step toward ``model``'s current parameters."""
        weight = 1.0 - self.effective_decay
        for name, p in _averaged(model):
            self.average[name].lerp_(p, weight)
        self.updates += 1

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """A state dict of ``model`` holding the averaged parameters and ``model``'s own buffers."""
        return {name: self.average.get(name, value).clone() for name, value in model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor], updates: int) -> None:
        """Restore the averages from a :meth:`state_dict` (its buffers are not needed) and the
        number of ``updates`` they had (which sets the warm-up's place)."""
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"EMA: updates must be an integer >= 0, got {updates!r}")
        missing = sorted(set(self.average) - set(state))
        if missing:
            raise KeyError(f"EMA: the state lacks the averages of {missing[0]} (and {len(missing) - 1} more)")
        for name, value in self.average.items():
            value.copy_(state[name])
        self.updates = updates

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

