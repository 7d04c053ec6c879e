"""Glow's activation normalisation with data-dependent initialisation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flows.distributed import all_reduce_sum, world_size
from flows.transforms.base import Bijector, Reconstruction, check_size, check_tensor, single_part
from flows.transforms.switches import updates_frozen


class ActNorm(Bijector):
    """Per-channel affine map ``y = (x + bias) * exp(log_scale)``.

    Log-det ``sum_c log_scale_c`` times the number of spatial positions (1 for vectors);
    the inverse ``x = y * exp(-log_scale) - bias`` has minus that log-det.

    On its first forward call in training mode, ``bias`` and ``log_scale`` are set from
    the batch so the output has zero mean and unit variance per channel (in a
    multi-process run, of the global batch: the statistics are all-reduced, so every
    ``DistributedDataParallel`` replica initialises identically). A registered
    buffer records that this happened, so the state survives ``state_dict`` round trips
    and the initialisation never fires again, nor during a memory-saving recompute (where
    an ``Inverse(ActNorm)`` rebuilt by its forward would otherwise initialise mid-step).
    The buffer is read once, and again after ``load_state_dict``: to initialise afresh,
    load an uninitialised state rather than writing to the buffer.

    Args:
        channels: number of channels (images ``(B, C, H, W)``) or features (``(B, C)``).
        eps: floor on the standard deviation used by the initialisation.

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
                self._initialize(x)
            self._seen_initialized = True
        bias, log_scale = self._view(x)
        return (x + bias) * torch.exp(log_scale), self._logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y)
        bias, log_scale = self._view(y)
        return y * torch.exp(-log_scale) - bias, -self._logdet(y)

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input from ``y`` and recompute the forward under grad, as
        memory-saving backward needs, with one input check for both."""
        self._check(y)
        bias, log_scale = self._view(y)
        with torch.no_grad():
            x = y * torch.exp(-log_scale) - bias
        x.requires_grad_(True)
        return Reconstruction([x], single_part, (x + bias) * torch.exp(log_scale), self._logdet(x))

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_initialized = False  # the loaded buffer decides again

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        if world_size() > 1:
            mean, std = self._global_moments(x, dims)
        else:
            mean = x.mean(dim=dims)
            std = x.std(dim=dims, unbiased=False) if x.numel() // self.channels > 1 else torch.ones_like(mean)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std.clamp_min(self.eps)))
        self.initialized.fill_(True)

    def _global_moments(self, x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
        """Per-channel mean and standard deviation over every rank's batch (two passes, as
        the single-process ones): DDP replicas then initialise identically."""
        count = x.new_full((1,), x.numel() // self.channels)
        total = all_reduce_sum(torch.cat([x.sum(dim=dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = all_reduce_sum((x - mean.view(self._shape(x))).pow(2).sum(dim=dims))
        std = (centred / n).sqrt() if n > 1 else torch.ones_like(mean)
        return mean, std

    def _shape(self, x: Tensor) -> tuple[int, ...]:
        return (1, self.channels) + (1,) * (x.dim() - 2)

    def _view(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = self._shape(x)
        return self.bias.view(shape), self.log_scale.view(shape)

    def _logdet(self, x: Tensor) -> Tensor:
        positions = x[0, 0].numel()
        return (positions * self.log_scale.sum()).expand(x.shape[0]).to(x.dtype)

    def _check(self, x: Tensor) -> None:
        check_tensor(x, "ActNorm", (2, 3, 4, 5), "(B, C) or (B, C, ...)")
        check_size(x, "ActNorm", 1, self.channels, "channels")
