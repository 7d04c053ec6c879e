"""Glow's activation normalisation with data-dependent initialisation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flows.distributed import all_reduce_sum
from flows.transforms.base import Bijector, Reconstruction, check_size, check_tensor, single_part
from flows.transforms.switches import updates_frozen


class ActNorm(Bijector):
    """Per-channel affine map ``y = (x + bias) * exp(log_scale)``.

    Log-det ``sum_c log_scale_c`` times the number of spatial positions (1 for vectors);
    the inverse ``x = y / exp(log_scale) - bias`` has minus that log-det.

    On its first forward call in training mode, ``bias`` and ``log_scale`` are set from
    the batch so the output has zero mean and unit variance per channel (in a
    multi-process run, of the global batch: the statistics are all-reduced, so every
    ``DistributedDataParallel`` replica initialises identically).
    :meth:`initialize_chunks` sets them from a batch given in chunks instead, with the
    moments of the whole batch (:func:`flows.training.initialize`). A registered
    buffer records that this happened, so the state survives ``state_dict`` round trips
    and the initialisation never fires again, nor during a memory-saving recompute (where
    an ``Inverse(ActNorm)`` rebuilt by its forward would otherwise initialise mid-step).
    The buffer is read once, and again after ``load_state_dict``: to initialise afresh,
    load an uninitialised state rather than writing to the buffer.

    Args:
        channels: number of channels (images ``(B, C, H, W)``) or features (``(B, C)``).
        eps: a channel whose standard deviation in the initialisation batch is at most
            ``eps`` (constant there) keeps scale 1, with a warning.

    References:
        Kingma, Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
        arXiv:1807.03039.

    Example:
        >>> import torch
        >>> norm = ActNorm(3)
        >>> y, _ = norm(5 + 2 * torch.randn(64, 3, 4, 4))
        >>> bool(y.mean().abs() < 1e-4)
        True
    """

    # Python mirror of the buffer once it has been read True: reading a CUDA buffer
    # synchronises the device, which would stall every training step. A class attribute,
    # so modules pickled before it existed load too.
    _seen_initialized = False

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        if self.training and not self._seen_initialized and not updates_frozen():
            if not self.initialized:
                self.initialize_from(lambda k: x, 1)
            self._seen_initialized = True
        return self._map(x, *self._view(x), inverse=False), self._logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y)
        return self._map(y, *self._view(y), inverse=True), -self._logdet(y)

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input from ``y`` and recompute the forward under grad, as
        memory-saving backward needs, with one input check for both."""
        return self._fused_rebuild(y, inverse=False)

    def reconstruct_inverse(self, x: Tensor, context: Tensor | None = None) -> Reconstruction:
        """:meth:`reconstruct` in the sampling direction (an ``Inverse(ActNorm)``); it
        never initialises, as ordinary backward in that direction does not."""
        return self._fused_rebuild(x, inverse=True)

    def _fused_rebuild(self, out: Tensor, inverse: bool) -> Reconstruction:
        self._check(out)
        # One view of the parameters and one exp, with grad, for the rebuild and the recompute.
        view = self._view(out)
        with torch.no_grad():
            rebuilt = self._map(out, *view, inverse=not inverse)
        rebuilt.requires_grad_(True)
        output, logdet = self._map(rebuilt, *view, inverse), self._logdet(rebuilt)
        return Reconstruction([rebuilt], single_part, output, -logdet if inverse else logdet)

    @staticmethod
    def _map(x: Tensor, bias: Tensor, scale: Tensor, inverse: bool) -> Tensor:
        """``(x + bias) scale``, or its inverse ``x / scale - bias`` (one division: no
        second exp, and one rounding where ``x exp(-log_scale)`` has two)."""
        if inverse:
            return x / scale - bias
        return (x + bias) * scale

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_initialized = False  # the loaded buffer decides again

    def initialize_chunks(self, chunks: list[Tensor], contexts: list[Tensor | None]) -> list[Tensor]:
        """Set ``bias`` and ``log_scale`` from the moments of all chunks together (of every
        rank's chunks in a multi-process run), then run the chunks through."""
        for x in chunks:
            self._check(x)
        if self.needs_initialization:
            self.initialize_from(lambda k: chunks[k], len(chunks))
        return super().initialize_chunks(chunks, contexts)

    @property
    def needs_initialization(self) -> bool:  # type: ignore[override]
        return self.training and not self._seen_initialized and not updates_frozen() and not bool(self.initialized)

    @torch.no_grad()
    def initialize_from(self, inputs: Callable[[int], Tensor], n: int) -> None:
        """Set ``bias`` and ``log_scale`` from the moments of ``inputs(0), ..., inputs(n - 1)``."""
        mean, std = self._moments(inputs, n)
        # A channel without spread in the batch (a constant smoke-test batch, a blank border)
        # says nothing about its scale; 1/eps would blow up every later batch.
        flat = std <= self.eps
        if flat.any():
            warnings.warn(
                f"ActNorm: {int(flat.sum())} of {self.channels} channels are constant in the initialisation "
                "batch; their scale is left at 1 (initialise with a batch of real data)",
                stacklevel=2,
            )
        self.bias.copy_(-mean)
        self.log_scale.copy_(torch.where(flat, torch.zeros_like(std), -torch.log(std)))
        self.initialized.fill_(True)

    def _moments(self, inputs: Callable[[int], Tensor], n: int) -> tuple[Tensor, Tensor]:
        """Per-channel mean and standard deviation over the inputs and every rank's batch.

        Two passes over the inputs (the sum, then the sum of squared deviations from the
        mean), not ``E[x^2] - E[x]^2``, which cancels catastrophically for data far from
        zero. The sums are all-reduced, so DDP replicas initialise identically.
        """
        parts = []
        for x in map(inputs, range(n)):
            self._check(x)
            parts.append(torch.cat([x.sum(dim=_reduced(x)), x.new_full((1,), x.numel() // self.channels)]))
        total = all_reduce_sum(torch.stack(parts).sum(0))
        count = total[-1]
        mean = total[:-1] / count
        centred = all_reduce_sum(
            sum((x - mean.view(self._shape(x))).pow(2).sum(dim=_reduced(x)) for x in map(inputs, range(n)))
        )
        # One value per channel has no spread to normalise: keep the scale at 1.
        std = (centred / count).sqrt() if count > 1 else torch.ones_like(mean)
        return mean, std

    def _shape(self, x: Tensor) -> tuple[int, ...]:
        return (1, self.channels) + (1,) * (x.dim() - 2)

    def _view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``bias`` and ``scale = exp(log_scale)`` shaped to broadcast over ``x``."""
        shape = self._shape(x)
        return self.bias.view(shape), torch.exp(self.log_scale).view(shape)

    def _logdet(self, x: Tensor) -> Tensor:
        # H W times the sum, on the parameter's scalar: nothing per position or sample.
        return (self.log_scale.sum() * math.prod(x.shape[2:])).expand(x.shape[0]).to(x.dtype)

    def _check(self, x: Tensor) -> None:
        check_tensor(x, "ActNorm", (2, 3, 4, 5), "(B, C) or (B, C, ...)")
        check_size(x, "ActNorm", 1, self.channels, "channels")


def _reduced(x: Tensor) -> list[int]:
    """The dimensions ActNorm's moments sum over: all but the channels."""
    return [0, *range(2, x.dim())]
