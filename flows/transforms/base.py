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
8. Inside :func:`~flows.transforms.logdet_context.skipping_logdet` (layers that discard
   log-dets, such as :class:`flows.nn.Reversible`) a block whose log-det costs more than
   its map may return a zero log-det.

Every bijector also carries ``memory_saving``: on a :class:`~flows.transforms.Chain` it
switches memory-saving backward on; on any other block ``False`` opts that block out
(its activations are kept by ordinary autograd).
"""

from __future__ import annotations

from torch import Tensor, nn


class Bijector(nn.Module):
    """Base class of every invertible transform.

    A bijector ``f`` maps ``x`` to ``y = f(x)`` and reports ``log|det df/dx|`` per sample.
    Subclasses implement :meth:`forward` and :meth:`inverse`, each returning
    ``(output, logdet)`` with ``logdet`` of shape ``(batch,)``.

    Attributes:
        exact_inverse: ``inverse`` is exact up to float rounding (False for iterative ones).
        exact_logdet: ``logdet`` is exact (False for stochastic estimators).
        memory_saving: for a non-chain block, ``False`` opts it out of memory-saving
            backward inside a memory-saving chain.
    """

    exact_inverse: bool = True
    exact_logdet: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.memory_saving = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def single_part(parts: list[Tensor]) -> Tensor:
    """The ``join`` of a ``reconstruct`` whose input is one part (see
    :func:`flows.transforms.invertible_backward.run_invertible_backward`)."""
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
