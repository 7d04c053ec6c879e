"""The ambient switches bijectors read, all thread-local like torch's grad mode.

Three switches, one thread model (each thread has its own setting, as
``torch.is_grad_enabled`` does: a recompute on CUDA's autograd thread, or a sampler on a
second thread, never changes what a training loop on the first thread sees):

* :func:`updates_frozen` -- per-step state must not advance now: power-iteration vectors
  of spectral norm, ActNorm's data-dependent initialisation. Entered by
  :func:`frozen_updates` (an iterative inverse iterating with fixed weights, the
  memory-saving engine's reconstruction-drift check and fallback) and by
  :func:`recomputing`.
* :func:`is_recomputing` -- a memory-saving backward is rebuilding and recomputing blocks
  (implies :func:`updates_frozen`). A nested memory-saving chain then runs plainly: the
  enclosing segment already recomputes it locally.
* :func:`logdet_wanted` -- False inside :func:`skipping_logdet`: the caller discards every
  log-det, so a block whose log-det costs more than its map may return zeros.

Bijectors import this module, never the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_STATE = threading.local()


def _depth(name: str) -> int:
    return getattr(_STATE, name, 0)


@contextmanager
def _entered(name: str) -> Iterator[None]:
    setattr(_STATE, name, _depth(name) + 1)
    try:
        yield
    finally:
        setattr(_STATE, name, _depth(name) - 1)


def updates_frozen() -> bool:
    """True where per-step state (power iterations, data-dependent init) must not advance."""
    return _depth("frozen") > 0 or _depth("recomputing") > 0


@contextmanager
def frozen_updates() -> Iterator[None]:
    """Run the enclosed code without advancing per-step state, on this thread only.

    Example:
        >>> import torch
        >>> from flows.transforms.spectral_norm import spectral_norm
        >>> layer = spectral_norm(torch.nn.Linear(3, 3)).train()
        >>> u = layer.weight_u.clone()
        >>> with frozen_updates():
        ...     _ = layer(torch.randn(2, 3))
        >>> torch.equal(u, layer.weight_u)
        True
    """
    with _entered("frozen"):
        yield


def is_recomputing() -> bool:
    """True while a memory-saving backward rebuilds or recomputes a block."""
    return _depth("recomputing") > 0


@contextmanager
def recomputing() -> Iterator[None]:
    """Mark the enclosed code as a memory-saving recompute (per-step state frozen too)."""
    with _entered("recomputing"):
        yield


def logdet_wanted() -> bool:
    """False inside :func:`skipping_logdet`: the caller discards every log-det.

    A block whose log-det costs more than its map (``ResidualBlock``: vector-Jacobian
    products) then returns a zero log-det instead of computing it. Blocks whose log-det is
    cheap ignore the switch.
    """
    return _depth("skipping") == 0


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
    with _entered("skipping"):
        yield


@contextmanager
def logdet_setting(wanted: bool) -> Iterator[None]:
    """Set :func:`logdet_wanted` to ``wanted`` for the enclosed code, whatever it was.

    Memory-saving backward replays the forward pass's setting with it (the backward may
    run on another thread, e.g. CUDA's autograd thread).
    """
    saved = _depth("skipping")
    _STATE.skipping = 0 if wanted else 1
    try:
        yield
    finally:
        _STATE.skipping = saved
