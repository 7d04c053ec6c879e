"""Whether the caller uses the log-dets: a switch for layers that discard them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Per thread, as torch keeps grad mode: a classifier inside skipping_logdet() on one thread
# must not zero the log-dets of a density model evaluated on another.
_STATE = threading.local()


def _depth() -> int:
    return getattr(_STATE, "skipping", 0)


def logdet_wanted() -> bool:
    """False inside :func:`skipping_logdet`: the caller discards every log-det.

    A block whose log-det costs more than its map (``ResidualBlock``: vector-Jacobian
    products) then returns a zero log-det instead of computing it. Blocks whose log-det is
    cheap ignore the switch.
    """
    return _depth() == 0


@contextmanager
def skipping_logdet() -> Iterator[None]:
    """Run bijectors whose log-dets the caller discards (ordinary nets, classifiers).

    :class:`flows.nn.Reversible` runs its blocks inside it, and memory-saving backward
    replays the setting of the forward pass when it recomputes a block. Never use it
    around a density model: the log-dets it returns are then zeros.

    Example:
        >>> import torch
        >>> from flows.transforms import ResidualBlock
        >>> block = ResidualBlock.mlp(4, 16)
        >>> with skipping_logdet():
        ...     y, logdet = block(torch.randn(3, 4))
        >>> logdet
        tensor([0., 0., 0.])
    """
    _STATE.skipping = _depth() + 1
    try:
        yield
    finally:
        _STATE.skipping -= 1


@contextmanager
def logdet_setting(wanted: bool) -> Iterator[None]:
    """Set :func:`logdet_wanted` to ``wanted`` for the enclosed code, whatever it was.

    Memory-saving backward replays the forward pass's setting with it (the backward may
    run on another thread, e.g. CUDA's autograd thread).
    """
    saved = _depth()
    _STATE.skipping = 0 if wanted else 1
    try:
        yield
    finally:
        _STATE.skipping = saved
