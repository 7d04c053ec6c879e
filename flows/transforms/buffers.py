"""Buffers a module updates in its forward pass, kept out of the memory-saving rebuild.

A block rebuilt by memory-saving backward runs its forward (and often its inverse) a
second time in the same training step. Per-step state that follows
:func:`~flows.transforms.switches.updates_frozen` (power iterations, ActNorm's
initialisation) does not advance then; a module that updates its buffers whatever the
switch says (BatchNorm's running statistics) would. So the rebuild runs on stand-ins:
:func:`standing_in` puts copies in the modules' buffer slots for the duration and the
original tensors back after, untouched (their values, and their version counters, which
an ordinary-autograd graph of the same buffers checks, never move).

Change is detected per module: a module one of whose buffers changed version in the
forward pass has all its buffers stood in for (BatchNorm bumps ``num_batches_tracked``
but updates its running mean without a version bump).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

Slot = tuple[nn.Module, str]


def slots(module: nn.Module) -> list[Slot]:
    """Every ``(submodule, name)`` that holds a buffer in ``module``."""
    return [(m, name) for m in module.modules() for name, b in m._buffers.items() if b is not None]


def versions(entries: list[Slot]) -> list[int]:
    """The version counters of the buffers in ``entries``."""
    return [m._buffers[name]._version for m, name in entries]


def changed_modules(entries: list[Slot], before: list[int]) -> list[Slot]:
    """The slots of every module with a buffer whose version moved since ``before``."""
    moved = {id(m) for (m, name), v in zip(entries, before) if m._buffers[name]._version != v}
    return [(m, name) for m, name in entries if id(m) in moved]


def values(entries: list[Slot]) -> list[Tensor]:
    """Copies of the buffers in ``entries`` as they are now."""
    return [m._buffers[name].detach().clone() for m, name in entries]


@contextmanager
def standing_in(entries: list[Slot], stand_ins: list[Tensor] | None = None) -> Iterator[list[Tensor]]:
    """Run the body with ``stand_ins`` (default: copies of the current values) in the
    buffer slots ``entries``; the original tensors go back afterwards, untouched."""
    originals = [m._buffers[name] for m, name in entries]
    stand_ins = values(entries) if stand_ins is None else stand_ins
    for (m, name), t in zip(entries, stand_ins):
        m._buffers[name] = t
    try:
        yield stand_ins
    finally:
        for (m, name), t in zip(entries, originals):
            m._buffers[name] = t
