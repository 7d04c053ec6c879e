"""Switch memory-saving backward on for a module temporarily."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from flows.transforms.chain import Chain


@contextmanager
def memory_saving(module: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Context manager that sets ``memory_saving`` on every :class:`Chain` in ``module``.

    The previous settings are restored on exit, also when the body raises.

    Example:
        >>> import torch
        >>> from flows.transforms import ActNorm, Chain
        >>> chain = Chain(ActNorm(2))
        >>> with memory_saving(chain):
        ...     chain.memory_saving
        True
        >>> chain.memory_saving
        False
    """
    chains = [m for m in module.modules() if isinstance(m, Chain)]
    if not chains:
        raise ValueError(f"memory_saving: {type(module).__name__} contains no Chain to switch")
    previous = [c.memory_saving for c in chains]
    for c in chains:
        c.memory_saving = enabled
    try:
        yield module
    finally:
        for c, state in zip(chains, previous):
            c.memory_saving = state
