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
* ``reconstruct_inverse(x)`` does the same in the sampling direction (rebuild the
  inverse's input with ``forward``, recompute ``inverse``): :class:`Inverse` delegates its
  ``reconstruct`` to it, so one fused rebuild serves both directions.
* ``leaves()`` lists the blocks the engine rebuilds one by one (default: the block
  itself; a chain expands into its blocks).
* ``region()`` says where a block acts on only part of its input through an inner
  block (default ``None``: the whole input); consecutive blocks on one region share one
  split and one join.
* ``keeps_shape`` (class flag): the output has the input's shape.
* ``draws_random``: the block may draw from the global RNG in its current mode, so the
  engine snapshots the RNG state before it and replays it for the rebuild. The default
  derives it from the submodules (a dropout with ``p > 0`` in training mode; a bijector
  inside answers for itself); a block drawing numbers itself (Hutchinson probes)
  overrides it. A block that draws nothing is never snapshotted.

The initialisation protocol (read by :func:`flows.training.initialize`) has a default too:

* ``initialize_chunks(chunks, contexts)`` runs the data-dependent initialisation over a
  batch held as chunks and returns each chunk's forward output. The default runs the
  chunks through :meth:`Bijector.forward` one at a time; a block that initialises from
  data (``ActNorm``) first gathers its statistics over every chunk, and a container
  (``Chain``, ``Tail``) passes the chunks through its blocks in order. The statistics
  are those of the whole batch while no forward pass holds more than one chunk. The hook
  owns the list it is given and drops each input chunk once its output exists, so the
  batch is held about twice at a block boundary, whatever the nesting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from numbers import Real
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from flows.transforms.rng import module_draws_random, replay
from flows.transforms.switches import frozen_updates


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
        draws_random: the block may draw from the global RNG in its current mode
            (derived from its submodules by default; see :attr:`draws_random`).
    """

    exact_inverse: bool = True
    exact_logdet: bool = True
    keeps_shape: bool = True
    _memory_saving = True  # the class default; also what a block pickled without it reads

    def __init__(self) -> None:
        super().__init__()
        self.memory_saving = True

    @property
    def memory_saving(self) -> bool:
        """The memory-saving switch (see the class attributes); only ``True`` or ``False`` is
        taken (:func:`check_flag`), so ``"off"`` is not read as on."""
        return self._memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self._memory_saving = check_flag(value, f"{type(self).__name__}.memory_saving")

    def __setstate__(self, state: dict) -> None:
        """Load a block pickled by an older version (``memory_saving`` a plain attribute)."""
        if "memory_saving" in state:
            state["_memory_saving"] = state.pop("memory_saving")
        super().__setstate__(state)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} implements no forward; a Bijector subclass defines it")

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            f"{type(self).__name__} implements no inverse, which sampling and memory-saving backward (rebuilding "
            "its input from its output) need: define inverse, or set memory_saving = False on the block"
        )

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input from the output ``y`` and recompute the forward pass on it.

        Memory-saving backward calls it under grad, with the random numbers of the forward
        pass replayed. The default inverts without grad, replays the random numbers again
        (the inverse may have drawn some) and reruns :meth:`forward` on the rebuilt input.
        """
        return _rebuild_and_rerun(y, context, self.inverse, self)

    def reconstruct_inverse(self, x: Tensor, context: Tensor | None = None) -> Reconstruction:
        """:meth:`reconstruct` in the sampling direction: rebuild the inverse's input ``y``
        from its output ``x`` and recompute :meth:`inverse` on it under grad.

        :class:`~flows.transforms.Inverse` hands its rebuild to it, so a block that fuses
        one direction's rebuild can fuse the other's too. The default runs :meth:`forward`
        without grad, then :meth:`inverse`.
        """
        return _rebuild_and_rerun(x, context, self, self.inverse)

    def leaves(self) -> list[Bijector]:
        """The blocks memory-saving backward rebuilds one at a time, in application order."""
        return [self]

    def region(self) -> tuple[Region, Bijector] | None:
        """``(region, inner)`` when this block applies ``inner`` to ``region.split(x)[1]``
        and passes the rest through, ``inner`` keeping that part's shape; ``None`` (the
        default) when it acts on the whole input."""
        return None

    @property
    def draws_random(self) -> bool:
        """Whether this block may draw from the global RNG in its current mode.

        The default: whether any submodule does, a bijector answering for itself and any
        other module by :func:`~flows.transforms.rng.module_draws_random` (dropout with
        ``p > 0`` in training mode). Override it in a block that draws numbers itself.
        """
        return any(_subtree_draws_random(child) for child in self.children())

    @property
    def needs_initialization(self) -> bool:
        """Whether this block would set parameters from the data of its next training call
        (ActNorm before its first batch). Default: False."""
        return False

    def initialize_from(self, inputs: Callable[[int], Tensor], n: int) -> None:
        """Set the data-dependent parameters from the inputs ``inputs(0), ..., inputs(n - 1)``
        together (each call may recompute its input: read each more than once only if
        needed). Only called on a block whose :attr:`needs_initialization` is true."""
        raise NotImplementedError(f"{type(self).__name__} declares needs_initialization but no initialize_from")

    def _initialize_nested(self, chunks: list[Tensor], contexts: list[Tensor | None]) -> None:
        """Initialise the bijectors nested in this block's networks (a conditioner's
        hidden ActNorm) from the statistics of all chunks: one at a time, in the order the
        forward pass reaches them, each from its inputs on every chunk, computed by running
        this block's forward up to it (the ones before it already initialised)."""
        pending = _nested(self)
        while pending and self._initialize_first(pending, chunks, contexts):
            pending = _nested(self)

    def _initialize_first(self, pending: list[Bijector], chunks: list[Tensor], contexts: list[Tensor | None]) -> bool:
        """Initialise the first of ``pending`` that the forward pass reaches (False: none is)."""

        def stop(block: nn.Module, args: tuple) -> None:
            raise _Reached(block, args[0])

        def reach(k: int) -> _Reached | None:
            try:
                with frozen_updates():  # per-step state advances in the real pass only
                    self(chunks[k], contexts[k])
            except _Reached as reached:
                return reached.with_traceback(None)  # its frames would keep the activations
            return None

        handles = [m.register_forward_pre_hook(stop) for m in pending]
        try:
            first = reach(0)
            if first is None:  # not on this forward path: they initialise on their first call
                return False
            target = first.block
            target.initialize_from(lambda k: first.x if k == 0 else _input_of(reach(k), target), len(chunks))
            return True
        finally:
            for handle in handles:
                handle.remove()

    def initialize_chunks(self, chunks: list[Tensor], contexts: list[Tensor | None]) -> list[Tensor]:
        """Run the data-dependent initialisation over a batch given in chunks, and the chunks through.

        Called under ``torch.no_grad()`` in training mode. A block that initialises from
        data sets its parameters from the statistics of all chunks together (equal to those
        of the concatenated batch) before any chunk goes through it; a container hands the
        chunks to its blocks in order. The default has nothing to initialise: it runs
        :meth:`forward` on one chunk at a time. Per-step state (power iterations) advances
        on the first chunk only, as in one forward pass of the whole batch.

        Args:
            chunks: the parts of the batch, in order, each ``(B_k, ...)``. The list is
                consumed: its entries are set to ``None`` as they are used, so a chunk's
                memory is freed once its output exists.
            contexts: the context rows of each chunk (``None`` entries when unconditional).

        Returns:
            The forward output of each chunk.

        Example:
            >>> import torch
            >>> from flows.transforms import Squeeze
            >>> [y.shape for y in Squeeze().initialize_chunks([torch.randn(2, 1, 4, 4)], [None])]
            [torch.Size([2, 4, 2, 2])]
        """
        if len(contexts) != len(chunks):
            raise ValueError(f"initialize_chunks: {len(chunks)} chunks but {len(contexts)} contexts")
        self._initialize_nested(chunks, contexts)
        outputs = []
        for k, context in enumerate(contexts):
            x, chunks[k] = chunks[k], None
            with frozen_updates() if k else nullcontext():
                outputs.append(self(x, context)[0])
        return outputs


class _Reached(Exception):
    """Raised by a pre-hook to stop a forward pass at a nested block, carrying its input."""

    def __init__(self, block: Bijector, x: Tensor) -> None:
        super().__init__()
        self.block, self.x = block, x


def _input_of(reached: _Reached | None, block: Bijector) -> Tensor:
    if reached is None or reached.block is not block:
        raise RuntimeError(f"initialisation: the chunks reach {type(block).__name__} in different orders")
    return reached.x


def _nested(block: Bijector) -> list[Bijector]:
    """The bijectors inside ``block``'s networks (not its own sub-bijectors) still to initialise."""
    return [
        m
        for child in block.children()
        if not isinstance(child, Bijector)
        for m in child.modules()
        if isinstance(m, Bijector) and m.needs_initialization
    ]


def _subtree_draws_random(module: nn.Module) -> bool:
    if isinstance(module, Bijector):
        return module.draws_random
    return module_draws_random(module) or any(_subtree_draws_random(c) for c in module.children())


def region_runs(blocks: Iterable[Bijector]) -> list[tuple[Region | None, list[Bijector]]]:
    """``blocks`` grouped into runs of consecutive blocks on one :meth:`~Bijector.region`.

    Each run is ``(region, inner blocks)``: the inner blocks of consecutive restricted
    blocks with equal regions, which can run on one ``region.split`` and one ``join``
    (a multi-scale level's steps split and join its flat latent once, not once per step),
    or ``(None, blocks)`` for consecutive blocks acting on the whole input.

    Example:
        >>> from flows.transforms import ActNorm, Tail
        >>> runs = region_runs([Tail(ActNorm(1), 2, (1, 2)), Tail(ActNorm(1), 2, (1, 2)), ActNorm(4)])
        >>> [(region is None, len(inner)) for region, inner in runs]
        [(False, 2), (True, 1)]
    """
    runs: list[tuple[Region | None, list[Bijector]]] = []
    for block in blocks:
        restricted = block.region()
        region, inner = restricted if restricted is not None else (None, block)
        if not runs or runs[-1][0] != region:
            runs.append((region, []))
        runs[-1][1].append(inner)
    return runs


def _rebuild_and_rerun(
    out: Tensor,
    context: Tensor | None,
    rebuild: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]],
    rerun: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]],
) -> Reconstruction:
    """The unfused rebuild of either direction: ``rebuild`` the input without grad, replay
    the random numbers (``rebuild`` may have drawn some), ``rerun`` on it under grad."""
    with torch.no_grad():
        rebuilt, _ = rebuild(out, context)
    rebuilt = rebuilt.detach().requires_grad_(True)
    replay()
    output, logdet = rerun(rebuilt, context)
    return Reconstruction([rebuilt], single_part, output, logdet)


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


def check_like_module(x: Tensor, module: nn.Module, where: str) -> None:
    """Refuse, with one line, an input ``module`` cannot take: an empty batch, another
    device than its parameters', or another dtype (unless autocast is on, which mixes them).
    A module without parameters takes any."""
    if x.shape[0] == 0:
        raise ValueError(f"{where}: empty batch (shape {tuple(x.shape)}); pass at least one example")
    reference = next(module.parameters(), None)
    if reference is None:
        return
    if not x.is_floating_point() and reference.is_floating_point():
        raise TypeError(f"{where}: expected floating-point input, got dtype {x.dtype}; convert it (x.float())")
    if x.device != reference.device:
        raise ValueError(f"{where}: input on {x.device}, model on {reference.device}; move one with .to()")
    if x.dtype != reference.dtype and not _autocast(x.device.type):
        raise TypeError(
            f"{where}: input dtype {x.dtype} differs from the model's {reference.dtype}; "
            f"convert the input (x.to({reference.dtype})) or the model (model.to({x.dtype}))"
        )


def check_flag(value: object, where: str) -> bool:
    """``value`` if it is a boolean switch (Python or NumPy ``bool``); else one ``TypeError``
    line, so that ``net.memory_saving = "off"`` is not read as on.

    Example:
        >>> check_flag(False, "Reversible.memory_saving")
        False
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{where} must be True or False, got {value!r}")


def is_count(value: object, least: int) -> bool:
    """Whether ``value`` is a Python integer (not a ``bool``) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_count(value: object, where: str, least: int = 1) -> int:
    """``value`` if it is an integer >= ``least`` (a size, a number of bins), else one
    ``ValueError`` line naming ``where``.

    Example:
        >>> check_count(3, "IUNet: levels")
        3
    """
    if not is_count(value, least):
        raise ValueError(f"{where} must be an integer >= {least}, got {value!r}")
    return value  # type: ignore[return-value]


def check_real(value: object, where: str, *, nonzero: bool = False) -> float:
    """``value`` as a float if it is a finite real number (nonzero, or >= 0 when not
    ``nonzero``), else one ``ValueError`` line naming ``where``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value != 0 if nonzero else value >= 0):
        return float(value)
    need = "a finite nonzero number (the inverse divides by it)" if nonzero else "a finite number >= 0"
    raise ValueError(f"{where} must be {need}, got {value!r}")


def check_finite(x: Tensor, where: str, what: str = "input") -> None:
    """Refuse NaN or inf in ``x`` where the check is cheap (:func:`checks_values`)."""
    if checks_values(x) and not torch.isfinite(x).all():
        raise ValueError(f"{where}: {what} contains non-finite values (NaN or inf)")


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has no per-device query)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


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
