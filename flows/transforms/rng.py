"""The one random-number scheme of memory-saving backward.

The engine snapshots the global RNG state (CPU, and CUDA for CUDA inputs) before the
forward pass of each block that says it may draw random numbers
(:attr:`~flows.transforms.Bijector.draws_random`; :func:`module_draws_random` is the rule
for plain modules such as dropout) and, if it did draw, replays the state for the
block's rebuild (:meth:`~flows.transforms.Bijector.reconstruct`): the block then draws
exactly the numbers it drew in the forward pass. A rebuild that draws numbers before it
reruns its forward (the default ``reconstruct`` runs the inverse first, and an inverse
may draw) calls :func:`replay` to restore the snapshot at that point.

A block whose forward draws numbers in one order and whose inverse needs them in another
(RevNet's ``F`` then ``G`` forward, ``G`` then ``F`` inverse) runs each sub-function on its
own stream, :func:`substream` ``k`` of one seed drawn from the global generator: replaying
the global state replays every stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

RngState = tuple[Tensor, Tensor | None]

_REPLAY = threading.local()


def module_draws_random(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) draws from the global RNG in its current
    mode: a dropout layer with ``p > 0``, or multi-head attention with dropout, in training
    mode.

    Example:
        >>> module_draws_random(nn.Dropout(0.1)), module_draws_random(nn.Dropout(0.1).eval())
        (True, False)
    """
    if not module.training:
        return False
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, nn.MultiheadAttention):
        return module.dropout > 0
    return False


def get_rng_state(x: Tensor) -> RngState:
    """The global CPU RNG state, and the CUDA one of ``x``'s device for a CUDA ``x``."""
    cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    return torch.get_rng_state(), cuda


def set_rng_state(x: Tensor, state: RngState) -> None:
    """Restore a state taken by :func:`get_rng_state` on a tensor of the same device."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, x.device)


def rng_changed(x: Tensor, before: RngState) -> bool:
    """Whether any random number was drawn since ``before`` was taken."""
    after = get_rng_state(x)
    if not torch.equal(before[0], after[0]):
        return True
    return before[1] is not None and not torch.equal(before[1], after[1])


def _cuda_devices(device: torch.device) -> list[int]:
    """The CUDA device indices whose generators ``fork_rng`` must save for ``device``."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextmanager
def replaying(x: Tensor, state: RngState | None) -> Iterator[None]:
    """Run the body with the global RNG set to ``state`` (nothing to do for ``None``), and
    make :func:`replay` restore it again; the RNG state outside is left as it was."""
    if state is None:
        yield
        return
    previous = getattr(_REPLAY, "pending", None)
    with torch.random.fork_rng(devices=_cuda_devices(x.device)):
        set_rng_state(x, state)
        _REPLAY.pending = (x, state)
        try:
            yield
        finally:
            _REPLAY.pending = previous


def replay() -> None:
    """Inside a rebuild with replayed random numbers, restore the replayed state; a no-op
    otherwise (a rebuild of a block that drew nothing)."""
    pending = getattr(_REPLAY, "pending", None)
    if pending is not None:
        set_rng_state(*pending)


def draw_seed() -> int:
    """One seed from the global generator, for :func:`substream`."""
    return int(torch.randint(0, 2**62, (1,)).item())


@contextmanager
def substream(seed: int, k: int, device: torch.device) -> Iterator[None]:
    """Run the body on RNG stream ``k`` of ``seed`` and restore the global state after."""
    devices = _cuda_devices(device)
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed + k)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed + k)
        yield
