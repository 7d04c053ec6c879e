"""Composition of bijectors, with optional memory-saving backward."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from flows.transforms import buffers
from flows.transforms.base import Bijector, region_runs
from flows.transforms.inverse import Inverse
from flows.transforms.invertible_backward import run_invertible_backward
from flows.transforms.rng import get_rng_state, set_rng_state
from flows.transforms.switches import frozen_updates, is_recomputing


class Chain(Bijector):
    """Composition ``f = f_n o ... o f_1`` of bijectors, applied in the order given.

    Forward ``y = f_n(...f_1(x))`` with ``log|det J_f(x)| = sum_k log|det J_{f_k}(x_{k-1})|``;
    the inverse runs the blocks' inverses in reverse order and returns minus that sum.

    With ``memory_saving = True`` (settable at any time, also between training steps),
    a forward pass under grad keeps none of the chain's intermediate activations: the
    backward pass rebuilds each block's input from its output with ``inverse`` and
    recomputes the block locally (see :mod:`flows.transforms.invertible_backward`).
    Nested chains are expanded into their blocks, so the saving holds at any nesting depth.
    A block with ``memory_saving = False`` opts out and runs under ordinary autograd.

    The sampling direction saves memory the same way: :meth:`inverse` under grad hands
    the engine ``Inverse(b)`` for the leaves in reverse order (the forward direction of the
    inverted chain), so it keeps only its output, and backward rebuilds each block's input
    with the block's forward (exact and one pass for couplings, ActNorm, 1x1 convolutions
    and MAF blocks) and recomputes the block's inverse with grad. Which inverted blocks take
    part is :attr:`flows.transforms.Inverse.memory_saving`'s rule (an i-ResNet block's
    fixed-point inverse does not). ``drift_tolerance`` guards the forward direction only.

    ``drift_tolerance`` (default ``None``) enables a reconstruction guard for
    memory-saving steps: after the forward pass the chain's input is rebuilt from its
    output (one extra inverse pass, no extra memory); when the relative max error exceeds
    the tolerance, a warning is issued and the step falls back to ordinary backward. The
    check and the fallback advance no per-step state (power iterations, buffers such as
    BatchNorm's running statistics): the step updates them once, as any other step does.

    Args:
        *bijectors: the blocks, in application order.

    Example:
        >>> import torch
        >>> from flows.transforms import ActNorm, AffineCoupling, Chain, channel_mask
        >>> chain = Chain(ActNorm(4), AffineCoupling(channel_mask(4, 0)))
        >>> y, logdet = chain(torch.randn(2, 4, 8, 8))
        >>> logdet.shape
        torch.Size([2])
    """

    _inverse_view: list[Inverse] | None = None

    def __init__(self, *bijectors: Bijector) -> None:
        super().__init__()
        if len(bijectors) == 1 and isinstance(bijectors[0], (list, tuple)):
            bijectors = tuple(bijectors[0])
        for b in bijectors:
            if not isinstance(b, Bijector):
                raise TypeError(f"Chain: every block must be a Bijector, got {type(b).__name__}")
        self.blocks = torch.nn.ModuleList(bijectors)
        self.memory_saving = False
        self.drift_tolerance: float | None = None

    @property
    def exact_inverse(self) -> bool:  # type: ignore[override]
        return all(b.exact_inverse for b in self.blocks)

    @property
    def exact_logdet(self) -> bool:  # type: ignore[override]
        return all(b.exact_logdet for b in self.blocks)

    @property
    def keeps_shape(self) -> bool:  # type: ignore[override]
        return all(b.keeps_shape for b in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> Bijector:
        return self.blocks[index]

    def __iter__(self) -> Iterator[Bijector]:
        return iter(self.blocks)

    def leaves(self) -> list[Bijector]:
        """The blocks with nested chains expanded, in application order."""
        out: list[Bijector] = []
        for b in self.blocks:
            out.extend(b.leaves())
        return out

    def initialize_chunks(self, chunks: list[Tensor], contexts: list[Tensor | None]) -> list[Tensor]:
        """Each block initialises from, and then transforms, its input's chunks, in order."""
        for b in self.blocks:
            chunks = b.initialize_chunks(chunks, contexts)
        return chunks

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not (self.memory_saving and torch.is_grad_enabled()) or is_recomputing():
            # Inside a memory-saving backward the enclosing segment already recomputes
            # this chain locally: a nested segment would rebuild and recompute it again.
            return self._forward_plain(x, context)
        if self.drift_tolerance is None:
            return self._run_memory_saving(self.leaves(), x, context)
        rng_state = get_rng_state(x)
        slots = buffers.slots(self)
        before_step = buffers.values(slots)
        y, logdet = self._run_memory_saving(self.leaves(), x, context)
        # The check runs on stand-in buffers: a module that updates buffers whatever
        # frozen_updates says (BatchNorm) changes only those.
        with frozen_updates(), buffers.standing_in(slots):
            start = buffers.versions(slots)
            passed = self._reconstructs(x, y, context)
            ignoring = buffers.changed_modules(slots, start)
        if passed:
            return y, logdet
        # Fallback: the same step again under ordinary autograd, leaf by leaf (nested
        # chains included), with the same random numbers and, for such modules, the
        # buffers from before the step (written as their own updates are, invisibly to
        # autograd), so the step updates them once.
        saved = dict(zip(slots, before_step))
        with torch.no_grad():
            for m, name in ignoring:
                m._buffers[name].data.copy_(saved[m, name])
        set_rng_state(x, rng_state)
        logdet = x.new_zeros(x.shape[0])
        with frozen_updates():
            for leaf in self.leaves():
                x, leaf_logdet = leaf(x, context)
                logdet = logdet + leaf_logdet
        return x, logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.memory_saving and torch.is_grad_enabled() and not is_recomputing():
            return self._run_memory_saving(self._inverted().leaves(), y, context)
        return self._run_plain(reversed(self.blocks), y, context, inverse=True)

    def _forward_plain(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._run_plain(self.blocks, x, context, inverse=False)

    @staticmethod
    def _run_plain(
        blocks: Iterable[Bijector], h: Tensor, context: Tensor | None, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """Run ``blocks`` (forward or inverse) under ordinary autograd.

        Consecutive blocks on one region (a level's steps in a multi-scale flow) run on
        one split and one join of it (:func:`~flows.transforms.base.region_runs`), and the
        log-det starts from the first block's: a Glow level then launches neither a copy of
        the flat latent per step nor a zero log-det per chain.
        """
        logdet: Tensor | None = None
        for region, inners in region_runs(blocks):
            rest, part = (None, h) if region is None else region.split(h)
            for b in inners:
                part, block_logdet = b.inverse(part, context) if inverse else b(part, context)
                logdet = block_logdet if logdet is None else logdet + block_logdet
            h = part if region is None else region.join(rest, part)
        return h, h.new_zeros(h.shape[0]) if logdet is None else logdet

    def _inverted(self) -> Inverse:
        """``Inverse(self)``, built once: its :meth:`~Inverse.leaves` are the inverted
        leaves the sampling direction runs (kept in a list, not as a submodule, which
        would make the chain its own descendant)."""
        if self._inverse_view is None:
            self._inverse_view = [Inverse(self)]
        return self._inverse_view[0]

    def _run_memory_saving(
        self, leaves: list[Bijector], x: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Run ``leaves`` in order, consecutive participating ones as memory-saving segments."""
        logdet = x.new_zeros(x.shape[0])
        segment: list[Bijector] = []
        for leaf in [*leaves, None]:
            if leaf is not None and leaf.memory_saving:
                segment.append(leaf)
                continue
            if segment:
                x, segment_logdet = run_invertible_backward(tuple(segment), x, context)
                logdet = logdet + segment_logdet
                segment = []
            if leaf is not None:
                x, leaf_logdet = leaf(x, context)
                logdet = logdet + leaf_logdet
        return x, logdet

    def _reconstructs(self, x: Tensor, y: Tensor, context: Tensor | None) -> bool:
        with torch.no_grad():
            x_rec, _ = self.inverse(y.detach(), context)
            error = ((x_rec - x).abs().max() / x.abs().max().clamp_min(1e-12)).item()
        if error <= self.drift_tolerance:
            return True
        warnings.warn(
            f"Chain: memory-saving reconstruction error {error:.3e} exceeds "
            f"drift_tolerance {self.drift_tolerance:.3e}; using ordinary backward for this step",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
