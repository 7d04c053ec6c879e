"""Whole-module helpers: switch memory-saving backward temporarily, find a model's device.

:func:`memory_saving` is the one place that saves and restores the memory-saving switch
(:func:`flows.parity.gradient_parity` and the benchmarks use it); :func:`module_device` is
the one answer to "which device does this model run on".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from flows.transforms.chain import Chain


@contextmanager
def memory_saving(module: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Context manager that sets ``memory_saving`` on every :class:`Chain` in ``module``.

    Every memory-saving switch of the package (``Flow.memory_saving``,
    :class:`flows.nn.Reversible`, :class:`flows.nn.IUNet`, MEFT's ``ReversibleStack``)
    is a :class:`Chain`'s underneath, so this works on all of them and on any network that
    holds them. The previous setting of each chain is restored on exit, also when the body
    raises (a model whose chains were set differently gets each one back).

    Args:
        module: the module whose chains to switch.
        enabled: the setting inside the block (``False`` forces ordinary backward).

    Yields:
        ``module`` itself.

    Raises:
        ValueError: ``module`` contains no :class:`Chain`.

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


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``: that of its first parameter, else of its first buffer, else CPU.

    A model is assumed to live on one device (the package moves models whole with ``.to``).

    Example:
        >>> import torch
        >>> module_device(torch.nn.Linear(2, 2))
        device(type='cpu')
        >>> module_device(torch.nn.ReLU())
        device(type='cpu')
    """
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
