r"""Gradient parity: how far memory-saving backward's gradients are from ordinary autograd's.

One rule, used by :func:`flows.check`, ``flows bench``, the tests and the experiments, so
their numbers compare. For a scalar loss :math:`L` and the tensors :math:`t` it is
differentiated with respect to (the trainable parameters, and the inputs that require
grad), with :math:`g_t` the gradient under ordinary autograd and :math:`\tilde g_t` under
memory-saving backward, the reported error is

.. math::

    \varepsilon = \frac{\max_t \|\tilde g_t - g_t\|_\infty}{\max_t \|g_t\|_\infty},

the largest absolute difference of any gradient entry over the largest gradient entry.
It does not depend on the loss's scale (a sum or a mean over the batch give the same
number), and a gradient missing in one mode counts as zeros there. With exact
reconstructions it is rounding: about ``1e-15`` to ``1e-12`` in float64, ``1e-7`` to
``1e-5`` in float32, growing with depth as float32 reconstruction errors accumulate
block after block.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flows.memory import memory_saving
from flows.transforms.actnorm import ActNorm
from flows.transforms.base import Bijector
from flows.transforms.chain import Chain
from flows.transforms.switches import frozen_updates

__all__ = ["ParityReport", "gradient_parity", "pending_initialization", "ramp_nll"]


@dataclass(frozen=True)
class ParityReport:
    """What :func:`gradient_parity` measured.

    Attributes:
        error: ``max_t max|g~_t - g_t| / max_t max|g_t|`` over every compared tensor ``t``
            (``g`` ordinary, ``g~`` memory-saving); ``nan`` if a gradient is not finite,
            ``inf`` if all ordinary gradients are zero but some memory-saving one is not.
        scale: the denominator, ``max_t max|g_t|``, the largest ordinary gradient entry.
        per_tensor: for each compared tensor, by parameter name (``"input[i]"`` for the
            ``i``-th input), ``max|g~_t - g_t|`` over the same ``scale``: the largest
            entry is ``error``.
    """

    error: float
    scale: float
    per_tensor: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> str | None:
        """The name of the tensor with the largest difference (``None`` if none compared)."""
        if not self.per_tensor:
            return None
        return max(self.per_tensor, key=lambda name: _nan_first(self.per_tensor[name]))

    def __str__(self) -> str:
        worst = f", worst {self.worst} ({self.per_tensor[self.worst]:.1e})" if self.worst else ""
        return (
            f"gradient parity {self.error:.1e} (max |memory-saving - ordinary| over "
            f"{len(self.per_tensor)} gradients / largest gradient {self.scale:.1e}){worst}"
        )


def ramp_nll(output: Any) -> Tensor:
    r"""The default loss of :func:`gradient_parity`: a Gaussian NLL around a fixed ramp.

    For a bijector's ``(y, logdet)`` it is
    :math:`\frac1B \sum_b \big(\tfrac12 \|y_b - m\|^2 - \mathrm{logdet}_b\big)` with the
    mean :math:`m_i = -1 + 2i/(D-1)` (``torch.linspace(-1, 1, D)`` over the ``D`` elements
    of one flattened ``y_b``); for a plain tensor output (``flows.nn.Reversible``) the
    same without the log-det; a 0-d tensor is taken as the loss itself. The mean is a ramp,
    not zero: a loss invariant under rotations would give orthogonal blocks (permutations,
    orthogonal convolutions) an all-zero parameter gradient, leaving only rounding noise to
    compare.

    Args:
        output: ``(y, logdet)`` with ``y`` of shape ``(B, ...)`` and ``logdet`` ``(B,)``,
            or a tensor ``(B, ...)``, or a 0-d loss.

    Returns:
        A 0-d tensor.

    Example:
        >>> import torch
        >>> ramp_nll((torch.tensor([[-1.0, 1.0]]), torch.zeros(1)))
        tensor(0.)
    """
    logdet = None
    if isinstance(output, tuple) and len(output) == 2 and all(isinstance(t, Tensor) for t in output):
        output, logdet = output
    if not isinstance(output, Tensor):
        raise TypeError(
            f"ramp_nll: expected a tensor or a (y, logdet) pair of tensors, got {type(output).__name__}; "
            "pass gradient_parity a loss= or an objective="
        )
    if output.dim() == 0:
        return output
    y = output.reshape(output.shape[0], -1)
    mean = torch.linspace(-1.0, 1.0, y.shape[1], dtype=y.dtype, device=y.device)
    per_sample = 0.5 * (y - mean).pow(2).sum(1)
    if logdet is not None:
        per_sample = per_sample - logdet
    return per_sample.mean()


def pending_initialization(module: nn.Module) -> list[str]:
    """Names of the layers in ``module`` whose data-dependent initialisation is still due.

    That is every :class:`~flows.transforms.ActNorm` in training mode that has not
    initialised yet: its next forward call in training mode would set its parameters from
    the batch. :func:`gradient_parity` refuses such a module (it freezes per-step state, so
    the layer would stay the identity in both passes, which is not the model that trains):
    initialise first, e.g. with :func:`flows.training.initialize` or one forward pass in
    training mode under ``torch.no_grad()``.

    Example:
        >>> import torch
        >>> from flows.transforms import ActNorm, Chain
        >>> chain = Chain(ActNorm(2))
        >>> pending_initialization(chain)
        ['blocks.0']
        >>> _ = chain(torch.randn(8, 2))
        >>> pending_initialization(chain)
        []
    """
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, ActNorm) and m.training and not bool(m.initialized)
    ]


def gradient_parity(
    module: nn.Module,
    *inputs: Any,
    loss: Callable[[Any], Tensor] | None = None,
    objective: Callable[..., Tensor] | None = None,
    copy_module: bool = True,
) -> ParityReport:
    """Compare gradients under ordinary and memory-saving backward on one batch.

    Two passes build the loss and differentiate it (``torch.autograd.grad``, so no
    ``.grad`` is written) with respect to the trainable parameters of ``module`` and the
    inputs that require grad: once with every :class:`~flows.transforms.Chain` in it
    switched to ordinary backward, once to memory-saving backward (with
    :func:`flows.memory_saving`, which restores the previous settings). Both passes
    start from identical states:

    * each runs on its own deep copy of ``module`` (``copy_module=True``, the default), so
      nothing a pass does (a lazily drawn power-iteration vector, a BatchNorm's running
      statistics) reaches the other pass or the caller's module;
    * each starts from the same global random state (:func:`torch.random.fork_rng`, CUDA
      included), so dropout, Hutchinson probes and roulette draws are the same, and the
      global state is left as it was;
    * both run inside :func:`~flows.transforms.switches.frozen_updates`: spectral norm's
      power iteration does not advance, so both use the module's current weights.

    The caller initialises: an ActNorm whose data-dependent initialisation is still due
    would stay the identity under ``frozen_updates``, so such a module is refused (see
    :func:`pending_initialization`).

    What runs: ``module`` itself, except that a :class:`~flows.transforms.Bijector`
    containing no chain (a single block) is wrapped in a one-block ``Chain`` so that its
    own inverse or ``reconstruct`` is what memory-saving backward uses. The loss is
    ``objective(runner, *inputs)`` if given (``runner`` is the module that runs: the copy,
    or the wrapping chain); else ``loss(runner(*inputs))``; else, for a
    :class:`~flows.models.Flow`, ``-runner.log_prob(*inputs).mean()``, and for any other
    module :func:`ramp_nll` of its output.

    Args:
        module: a bijector, a :class:`~flows.models.Flow`, or any ``nn.Module`` holding
            chains (``flows.nn.Reversible``, ``IUNet``, MEFT's ``ReversibleStack``, a
            network around them). It must be deep-copyable unless ``copy_module=False``.
        *inputs: the arguments of ``module`` (or of ``objective``), e.g. a batch
            ``x`` of shape ``(B, ...)``; tensors that require grad are compared too, as
            ``"input[i]"``. Each pass gets detached copies, so ``inputs`` are not touched.
        loss: maps the module's output to a 0-d loss (e.g.
            ``lambda y: F.cross_entropy(head(y), labels)``).
        objective: builds the 0-d loss from the module that runs and the inputs, for
            losses that call more than ``forward`` (a classifier around a reversible
            trunk, ``bits_per_dim``). At most one of ``loss`` and ``objective``.
        copy_module: ``False`` runs both passes on ``module`` itself (for a module too
            large to copy); then only ``frozen_updates`` separates the passes, so a
            module whose forward changes state even so (power-iteration vectors drawn
            lazily on a first call) gets passes that differ, and the caller's module
            keeps what they changed.

    Returns:
        A :class:`ParityReport`; its ``error`` is the number to compare with a tolerance.

    Raises:
        ValueError: both ``loss`` and ``objective``; an initialisation still due; nothing
            to differentiate; a non-scalar loss; no chain to switch.

    Example:
        >>> import torch
        >>> from flows.transforms import AffineCoupling, Chain, InvConv1x1, channel_mask
        >>> _ = torch.manual_seed(0)
        >>> chain = Chain(InvConv1x1(4), AffineCoupling(channel_mask(4, 0))).double()
        >>> report = gradient_parity(chain, torch.randn(2, 4, 4, 4, dtype=torch.float64))
        >>> report.error < 1e-10
        True
        >>> chain.memory_saving  # the caller's module is untouched
        False
    """
    if loss is not None and objective is not None:
        raise ValueError("gradient_parity: pass loss= or objective=, not both")
    pending = pending_initialization(module)
    if pending:
        raise ValueError(
            f"gradient_parity: {type(module).__name__} has ActNorm layers not yet initialised "
            f"({', '.join(pending[:3])}{', ...' if len(pending) > 3 else ''}); run the data-dependent "
            "initialisation first (flows.training.initialize, or one forward pass in training mode)"
        )
    build = _objective(module, loss, objective)
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    names += [f"input[{i}]" for i, t in enumerate(inputs) if _wants_grad(t)]
    if not names:
        raise ValueError(
            f"gradient_parity: {type(module).__name__} has no trainable parameter and no input requires grad"
        )
    devices = sorted({t.device for t in _tensors(module, inputs) if t.is_cuda}, key=str)
    ordinary = _gradients(module, inputs, build, False, copy_module, devices)
    saving = _gradients(module, inputs, build, True, copy_module, devices)
    return _compare(names, ordinary, saving)


def _objective(
    module: nn.Module, loss: Callable[[Any], Tensor] | None, objective: Callable[..., Tensor] | None
) -> Callable[..., Tensor]:
    from flows.models.flow import Flow

    if objective is not None:
        return objective
    if loss is not None:
        return lambda m, *args: loss(m(*args))
    if isinstance(module, Flow):
        return lambda m, *args: -m.log_prob(*args).mean()
    return lambda m, *args: ramp_nll(m(*args))


def _wants_grad(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad


def _tensors(module: nn.Module, inputs: tuple[Any, ...]) -> Iterator[Tensor]:
    yield from module.parameters()
    yield from module.buffers()
    yield from (t for t in inputs if isinstance(t, Tensor))


def _gradients(
    module: nn.Module,
    inputs: tuple[Any, ...],
    build: Callable[..., Tensor],
    saving: bool,
    copy_module: bool,
    devices: list[torch.device],
) -> list[Tensor | None]:
    """One pass: the gradients of the loss, parameters first, then the inputs that require grad."""
    target = copy.deepcopy(module) if copy_module else module
    single = isinstance(target, Bijector) and not any(isinstance(m, Chain) for m in target.modules())
    runner = Chain(target) if single else target
    params = [p for p in target.parameters() if p.requires_grad]
    # Fresh leaves: the caller's tensors get no graph, and a non-leaf input gets its own gradient.
    args = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in inputs]
    wrt = params + [t for t in args if _wants_grad(t)]
    with ExitStack() as stack:
        stack.enter_context(memory_saving(runner, saving))
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(frozen_updates())
        stack.enter_context(torch.enable_grad())
        value = build(runner, *args)
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"gradient_parity: the loss must be a 0-d tensor, got {shape}")
        return list(torch.autograd.grad(value, wrt, allow_unused=True))


def _compare(names: list[str], ordinary: list[Tensor | None], saving: list[Tensor | None]) -> ParityReport:
    if not names:
        return ParityReport(0.0, 0.0, {})
    rows = []
    for a, b in zip(ordinary, saving):
        ref = a if a is not None else b
        if ref is None or ref.numel() == 0:
            rows.append(torch.zeros(2, dtype=torch.float64))
            continue
        a = torch.zeros_like(ref) if a is None else a
        b = torch.zeros_like(ref) if b is None else b
        rows.append(torch.stack([(b - a).abs().max(), a.abs().max()]).double())
    # One transfer for all the maxima: one device synchronisation on CUDA, not one per tensor.
    device = next((r.device for r in rows if r.is_cuda), rows[0].device)
    values = torch.stack([r.to(device) for r in rows]).cpu()
    diff, scale = values[:, 0].max().item(), values[:, 1].max().item()
    if math.isnan(scale) or math.isnan(diff):
        error = math.nan
    elif scale > 0:
        error = diff / scale
    else:
        error = 0.0 if diff == 0 else math.inf
    denominator = scale if scale > 0 else 1.0
    per_tensor = {name: d / denominator for name, d in zip(names, values[:, 0].tolist())}
    return ParityReport(error, scale, per_tensor)


def _nan_first(value: float) -> float:
    return math.inf if math.isnan(value) else value
