"""The bijector contract.

1. ``forward`` goes data -> latent (the density direction); ``Flow.log_prob`` calls only
   ``forward``.
2. Both directions return ``(output, logdet)``. ``logdet`` is a ``(batch,)`` tensor on the
   input's device and dtype, the log-determinant of the direction called, so the forward
   and inverse log-dets of the same point cancel.
3. Output and log-det come from one pass: a conditioner network is never run twice.
4. ``Chain(*bijectors)`` applies them in the order given; ``Inverse(b)`` swaps directions.
5. Capability flags are class attributes: ``exact_inverse`` (False for a fixed-point
   inverse) and ``exact_logdet`` (False for stochastic estimators). Tests and the
   memory-saving machinery read the flags instead of special-casing classes.
6. Data-dependent initialisation (``ActNorm``) happens once, guarded by a buffer, and never
   re-fires during a memory-saving recompute.
7. A multi-scale model is itself a bijector whose forward returns a flat ``(B, D)`` latent.
8. Inside :func:`~flows.transforms.switches.skipping_logdet` (layers that discard
   log-dets, such as :class:`flows.nn.Reversible`) a block whose log-det costs more than
   its map may return a zero log-det.

The memory-saving protocol (read by :mod:`flows.transforms.invertible_backward`) has
defaults on :class:`Bijector`, so a new bijector needs only ``forward`` and ``inverse``:

* ``memory_saving``: on a :class:`~flows.transforms.Chain` it switches memory-saving
  backward on; on any other block ``False`` opts that block out (its activations are kept
  by ordinary autograd).
* ``reconstruct(y)`` rebuilds the block's input from its output and recomputes the
  forward pass under grad, returning a :class:`Reconstruction`. The default runs
  ``inverse`` without grad, then ``forward``; a block overrides it to fuse the two (a
  coupling then runs its conditioner once, not twice).
* ``leaves()`` lists the blocks the engine rebuilds one by one (default: the block
  itself; a chain expands into its blocks).
* ``region()`` says where a block acts on only part of its input through an inner
  block (default ``None``: the whole input); consecutive blocks on one region share one
  split and one join.
* ``keeps_shape`` (class flag): the output has the input's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from flows.transforms.rng import replay


class Reconstruction(NamedTuple):
    """A block's input rebuilt from its output, and its forward pass recomputed on it.

    Attributes:
        inputs: grad-requiring leaf tensors, the parts of the block's input.
        join: assembles the input (or its gradient) from parts shaped like ``inputs``.
        output: the forward output recomputed from ``inputs`` (with a graph to them and
            to the block's parameters).
        logdet: the forward log-det recomputed likewise, ``(batch,)``.
    """

    inputs: list[Tensor]
    join: Callable[[list[Tensor]], Tensor]
    output: Tensor
    logdet: Tensor


class Region(Protocol):
    """The part of a tensor a restricted block acts on (see :meth:`Bijector.region`).

    Regions compare equal when they select the same part of the same layout.
    """

    def split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(rest, part)`` of ``h``."""
        ...

    def join(self, rest: Tensor, part: Tensor) -> Tensor:
        """The inverse of :meth:`split`."""
        ...


class Bijector(nn.Module):
    """Base class of every invertible transform.

    A bijector ``f`` maps ``x`` to ``y = f(x)`` and reports ``log|det df/dx|`` per sample.
    Subclasses implement :meth:`forward` and :meth:`inverse`, each returning
    ``(output, logdet)`` with ``logdet`` of shape ``(batch,)``. Both take an optional
    ``context`` (a ``(batch, ...)`` tensor a conditional bijector depends on, or ``None``);
    a bijector that does not use it accepts and ignores it. They may override the
    memory-saving protocol (:meth:`reconstruct`, :meth:`leaves`, :meth:`region`) for speed.

    Attributes:
        exact_inverse: ``inverse`` is exact up to float rounding (False for iterative ones).
        exact_logdet: ``logdet`` is exact (False for stochastic estimators).
        keeps_shape: the output has the input's shape (False for squeezes and reshapes).
        memory_saving: for a non-chain block, ``False`` opts it out of memory-saving
            backward inside a memory-saving chain.
    """

    exact_inverse: bool = True
    exact_logdet: bool = True
    keeps_shape: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.memory_saving = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input from the output ``y`` and recompute the forward pass on it.

        Memory-saving backward calls it under grad, with the random numbers of the forward
        pass replayed. The default inverts without grad, replays the random numbers again
        (the inverse may have drawn some) and reruns :meth:`forward` on the rebuilt input.
        """
        with torch.no_grad():
            x, _ = self.inverse(y, context)
        x = x.detach().requires_grad_(True)
        replay()
        output, logdet = self(x, context)
        return Reconstruction([x], single_part, output, logdet)

    def leaves(self) -> list[Bijector]:
        """The blocks memory-saving backward rebuilds one at a time, in application order."""
        return [self]

    def region(self) -> tuple[Region, Bijector] | None:
        """``(region, inner)`` when this block applies ``inner`` to ``region.split(x)[1]``
        and passes the rest through, ``inner`` keeping that part's shape; ``None`` (the
        default) when it acts on the whole input."""
        return None


def single_part(parts: list[Tensor]) -> Tensor:
    """The ``join`` of a :class:`Reconstruction` whose input is one part."""
    return parts[0]


def zero_logdet(x: Tensor) -> Tensor:
    """A ``(batch,)`` zero log-det on ``x``'s device and dtype."""
    return x.new_zeros(x.shape[0])


def check_tensor(x: Tensor, name: str, ndim: int | tuple[int, ...], what: str) -> None:
    """Raise a clear error when ``x`` is not a floating tensor of the expected rank.

    Args:
        x: the tensor to check.
        name: the bijector's name, for the message.
        ndim: the accepted number of dimensions (batch included).
        what: a human description of the expected layout, e.g. ``"(B, C, H, W)"``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in allowed:
        raise ValueError(f"{name}: expected input of shape {what}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def check_size(x: Tensor, name: str, dim: int, expected: int, what: str) -> None:
    """Raise a clear error when ``x.shape[dim] != expected`` (e.g. wrong channel count)."""
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected {expected} {what} (dim {dim}), got {x.shape[dim]} "
            f"in input of shape {tuple(x.shape)}"
        )


def check_context(context: Tensor | None, x: Tensor, name: str, features: int) -> None:
    """Raise a clear error unless ``context`` is a ``(B, features)`` float tensor for ``x``'s batch."""
    if context is None:
        raise ValueError(f"{name}: this block is conditional (context_features={features}); pass context=")
    if not isinstance(context, Tensor) or context.dim() != 2 or not context.is_floating_point():
        got = f"{tuple(context.shape)} {context.dtype}" if isinstance(context, Tensor) else type(context).__name__
        raise ValueError(
            f"{name}: expected a float context of shape (B, {features}), got {got} "
            "(int64 class labels go to a model built with num_classes=, which embeds them)"
        )
    if context.shape != (x.shape[0], features):
        raise ValueError(
            f"{name}: context of shape {tuple(context.shape)} does not match input batch "
            f"{x.shape[0]} with {features} context features"
        )


def checks_values(x: Tensor) -> bool:
    """Whether a value check of ``x`` (finite, in the domain) is cheap here: on the CPU only
    (on an accelerator it would synchronise the device on every call) and not while
    ``torch.compile`` traces (a branch on tensor values breaks the graph). Elsewhere a bad
    value shows as a non-finite output instead, which training reports."""
    if x.device.type != "cpu":
        return False
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return not (is_compiling is not None and is_compiling())
