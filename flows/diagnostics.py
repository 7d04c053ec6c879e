"""User-facing checks of invertibility, log-dets, gradients and memory."""

from __future__ import annotations

import platform
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from flows.parity import gradient_parity, pending_initialization
from flows.transforms.base import Bijector
from flows.transforms.chain import Chain


def saved_bytes(fn: Callable[[], Tensor], exclude: nn.Module | None = None) -> int:
    """Bytes autograd keeps for backward in the graph of ``fn()``, once ``fn`` returns.

    Every tensor saved for backward (by built-in ops and by custom autograd Functions'
    ``save_for_backward``, the memory-saving engine's kept output included) passes
    through :func:`torch.autograd.graph.saved_tensors_hooks`. Those still alive when
    ``fn`` returns are the ones the loss's graph holds (graphs built and freed inside
    ``fn``, e.g. a block's internal vector-Jacobian products, are not counted); distinct
    storages are counted once. Storages of ``exclude``'s parameters are not counted: they
    live anyway.

    Args:
        fn: builds the graph and returns the loss.
        exclude: a module whose parameters are not counted.

    Returns:
        The number of bytes, device-independent.
    """
    skip = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude is not None else set()
    saved: list[weakref.ref[Tensor]] = []

    def pack(t: Tensor) -> Tensor:
        # A detached alias lives exactly as long as the graph node that saved it (the
        # tensor itself would form a reference cycle with its own grad_fn and never die).
        alias = t.detach()
        saved.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    storages: dict[int, int] = {}
    for ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss
    return sum(storages.values())


class _OpCounter(TorchDispatchMode):
    """Counts every aten operator that reaches the dispatcher's Python mode, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> Counter[str]:
    """The aten operators ``fn()`` runs, by name (a backward pass inside ``fn`` included).

    A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees each operator after
    autograd and after composite operators have been decomposed, so the count is that of
    the kernels launched (views and ``detach`` included), the same on any machine and
    under any load: the measure of a launch-bound step's overhead that a timing is not.

    Args:
        fn: runs the code to count; its result is discarded.

    Returns:
        A :class:`collections.Counter` from operator name (``"mul"``, ``"convolution"``)
        to calls; ``sum(counts.values())`` is the total.

    Example:
        >>> import torch
        >>> counts = count_ops(lambda: torch.ones(3).mul(2).sum())
        >>> counts["mul"], sum(counts.values())
        (1, 3)
    """
    with _OpCounter() as counter:
        fn()
    return counter.counts


@dataclass
class CheckReport:
    """What :func:`check` measured; ``None`` where a check did not apply.

    Attributes:
        roundtrip_error: ``max|f^{-1}(f(x)) - x|``.
        logdet_cancel_error: ``max|logdet_forward + logdet_inverse|`` at the same points.
        logdet_error: ``max|logdet - log|det J||`` against the autograd Jacobian.
        gradient_error: the :func:`flows.parity.gradient_parity` error, ``max|g_saving -
            g_ordinary| / max|g_ordinary|`` over all gradient entries; ``None`` without
            trainable parameters or anything to switch.
    """

    roundtrip_error: float
    logdet_cancel_error: float
    logdet_error: float | None
    gradient_error: float | None

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3e}"

        return (
            f"round trip max error      {fmt(self.roundtrip_error)}\n"
            f"forward+inverse log-det   {fmt(self.logdet_cancel_error)}\n"
            f"log-det vs Jacobian       {fmt(self.logdet_error)}\n"
            f"memory-saving grad error  {fmt(self.gradient_error)} (max abs / largest gradient)"
        )


def check(
    bijector: nn.Module, x: Tensor, max_jacobian_dim: int = 256, context: Tensor | None = None
) -> CheckReport:
    """Check a bijector or a :class:`~flows.models.Flow` on a batch ``x`` (given ``context``).

    Reports the round-trip error ``max|f^{-1}(f(x)) - x|``, how far forward and inverse
    log-dets are from cancelling, the log-det error against ``log|det J|`` of the
    brute-force autograd Jacobian (when one sample has at most ``max_jacobian_dim``
    elements), and the gradient parity of memory-saving backward,
    :func:`flows.parity.gradient_parity` with its default loss (``-log_prob(x).mean()``
    for a Flow, :func:`flows.parity.ramp_nll` of ``f(x)`` for a bijector; a single block
    runs in a one-block chain): the largest difference of any gradient entry over the
    largest gradient entry, the number ``flows bench``, the tests and the experiments report.

    The parity is measured first, on copies of the module as it is, so state that the
    first call of a fresh module creates (lazily drawn power-iteration vectors) is part of
    what is checked. Only a data-dependent initialisation that is still due (ActNorm in
    training mode) runs before it, on ``bijector`` itself, as the first training step would.

    A conditional model or block is checked at ``context`` (one row per row of ``x``):
    every evaluation sees it, a Flow's embedded as its ``log_prob`` would (class labels
    through its embedding).

    Args:
        bijector: a bijector or a :class:`~flows.models.Flow`.
        x: a batch ``(B, ...)`` of its inputs.
        max_jacobian_dim: the largest sample size whose Jacobian is built.
        context: ``(B, ...)`` for a conditional model or block, else ``None``.

    Returns:
        A :class:`CheckReport`.

    Example:
        >>> import torch
        >>> from flows.transforms import ActNorm, Chain, InvConv1x1
        >>> report = check(Chain(ActNorm(3), InvConv1x1(3)), torch.randn(4, 3, 2, 2))
        >>> report.roundtrip_error < 1e-5
        True
        >>> report.gradient_error < 1e-4
        True
    """
    from flows.models.flow import Flow

    f = bijector.bijector if isinstance(bijector, Flow) else bijector
    inputs = (x,) if context is None else (x, context)
    with torch.no_grad():
        c = bijector._embed(context, x.shape[0], "flows.check") if isinstance(bijector, Flow) else context
        given = () if c is None else (c,)  # an unconditional block need not take a context
        if pending_initialization(bijector):
            f(x, *given)
    gradient_error = None
    switchable = isinstance(bijector, Bijector) or any(isinstance(m, Chain) for m in bijector.modules())
    if switchable and any(p.requires_grad for p in bijector.parameters()):
        gradient_error = gradient_parity(bijector, *inputs).error
    with torch.no_grad():
        y, logdet = f(x, *given)
        x_rec, inv_logdet = f.inverse(y, *given)
    roundtrip = (x_rec - x).abs().max().item()
    cancel = (logdet + inv_logdet).abs().max().item()
    logdet_error = None
    if x[0].numel() <= max_jacobian_dim:
        brute = torch.stack(
            [_jacobian_logdet(f, x[i : i + 1], *(t[i : i + 1] for t in given)) for i in range(x.shape[0])]
        )
        logdet_error = (brute - logdet).abs().max().item()
    return CheckReport(roundtrip, cancel, logdet_error, gradient_error)


def _jacobian_logdet(f: nn.Module, x: Tensor, *context: Tensor) -> Tensor:
    def flat(v: Tensor) -> Tensor:
        return f(v.view_as(x), *context)[0].flatten()

    jac = torch.autograd.functional.jacobian(flat, x.flatten())
    return torch.linalg.slogdet(jac)[1]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows: for the
    hardware line that benchmarks print next to their figures."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
