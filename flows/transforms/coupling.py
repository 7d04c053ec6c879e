"""Mask handling shared by the additive and affine couplings."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flows.transforms.base import Bijector, Reconstruction, check_context, check_size, check_tensor
from flows.transforms.conditioners import ContextInput, conv_conditioner, mlp_conditioner
from flows.transforms.downsampling import _AXIS_NAMES


class MaskedCoupling(Bijector):
    """A coupling layer ``y_B = h(x_B; theta(x_A))``, ``y_A = x_A`` split by a mask.

    The mask's ones mark the conditioning part ``A``. A 1-D mask of length ``C`` selects
    channels of ``(B, C, *S)`` inputs with ``dims`` spatial axes (``(B, C, L)`` signals,
    ``(B, C, H, W)`` images, ``(B, C, D, H, W)`` volumes) or features of ``(B, C)``
    vectors; the conditioner sees only the selected channels and predicts parameters for
    the others. A 2-D ``(H, W)`` mask selects pixels (all channels) of images; the
    conditioner sees ``x * mask`` and predicts parameters for every element, of which the
    masked-out ones are used.

    Subclasses define the elementwise map ``h`` through :meth:`couple` and :meth:`uncouple`
    and how many parameters it needs per transformed element (``params_per_element``); both
    receive :meth:`coupling_parameters` of the conditioner's output, computed once per call
    (and once per memory-saving rebuild, for its inverse and its recompute together).

    Args:
        mask: 1-D channel/feature mask or 2-D spatial mask (ones = conditioning).
        channels: number of channels; required with a 2-D mask and the default conditioner.
        hidden_channels: width of the default conditioner.
        conditioner: a module mapping the conditioning input to the parameters; the default
            is a zero-initialised ``dims``-D CNN (Glow's conv3 -> ReLU -> conv1 -> ReLU ->
            conv3, :func:`~flows.transforms.conditioners.conv_conditioner`) or MLP
            (``image=False``), so a fresh coupling is the identity.
        image: whether a 1-D mask acts on ``(B, C, *S)`` inputs (True) or vectors (False).
        dims: number of spatial axes ``S`` with a 1-D mask and ``image=True``: 1, 2 (the
            default) or 3. A 2-D mask acts on images and needs ``dims=2``.
        context_features: size ``C`` of a context vector ``(B, C)`` the coupling is
            conditioned on (``None``: unconditional, a context passed is ignored). The
            conditioner then sees ``[x_A, c]`` (vectors) or ``x_A`` with a learned
            projection of ``c`` broadcast as ``context_channels`` extra channels
            (:class:`~flows.transforms.conditioners.ContextInput`); a user-supplied
            conditioner must accept that many more input channels or features.
        context_channels: channels the context projection adds for image-like inputs.
        normalize: an ActNorm after each hidden layer of the default convolutional
            conditioner (``conv_conditioner(normalize=True)``, Glow's); no effect on the
            MLP or on a conditioner passed in.

    Example:
        >>> import torch
        >>> from flows.transforms import AffineCoupling, channel_mask
        >>> coupling = AffineCoupling(channel_mask(4, 1), hidden_channels=8, dims=3)
        >>> x = torch.randn(2, 4, 3, 4, 5)
        >>> y, logdet = coupling(x)
        >>> y.shape, logdet.shape
        (torch.Size([2, 4, 3, 4, 5]), torch.Size([2]))
        >>> torch.allclose(coupling.inverse(y)[0], x)
        True
    """

    params_per_element: int = 1
    # "kept-first" / "kept-last" when the channel halves are contiguous ranges (every
    # channel mask): they split by slicing and join by one cat, with no gather. A class
    # default (None: the gather) so modules pickled before it existed load too.
    halves: str | None = None
    # A class default too, for modules pickled before 1-D and 3-D inputs were supported.
    dims: int = 2

    def __init__(
        self,
        mask: Tensor,
        channels: int | None = None,
        hidden_channels: int = 64,
        conditioner: nn.Module | None = None,
        image: bool = True,
        dims: int = 2,
        context_features: int | None = None,
        context_channels: int = 8,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.dim() not in (1, 2) or not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("coupling mask must be a 1-D channel or 2-D spatial mask of 0/1 values")
        if mask.sum() == 0 or mask.sum() == mask.numel():
            raise ValueError("coupling mask must condition on some elements and transform others")
        if dims not in _AXIS_NAMES:
            raise ValueError(f"{name}: dims must be 1, 2 or 3, got {dims}")
        self.spatial = mask.dim() == 2
        self.image = image or self.spatial
        if dims != 2 and not (self.image and not self.spatial):
            what = "a 2-D spatial mask acts on (B, C, H, W) images" if self.spatial else "vectors have no spatial axes"
            raise ValueError(f"{name}: dims={dims} needs a 1-D channel mask on images; {what}")
        self.dims = dims
        k = self.params_per_element
        self.context_input = None if context_features is None else ContextInput(
            context_features, context_channels, self.image
        )
        extra = 0 if self.context_input is None else self.context_input.added
        if self.spatial:
            self.register_buffer("mask", mask.view(1, 1, *mask.shape))
            if conditioner is None:
                if channels is None:
                    raise ValueError("coupling with a spatial mask needs `channels` for its default conditioner")
                conditioner = conv_conditioner(channels + extra, k * channels, hidden_channels, normalize=normalize)
            self.channels = channels
        else:
            kept = torch.nonzero(mask).flatten()
            changed = torch.nonzero(mask == 0).flatten()
            self.register_buffer("kept", kept)
            self.register_buffer("changed", changed)
            self.register_buffer("merge", torch.argsort(torch.cat([kept, changed])))
            self.halves = self._contiguous_halves()
            self.channels = mask.numel()
            if channels is not None and channels != self.channels:
                raise ValueError(f"coupling: channels={channels} but the mask has {self.channels}")
            if conditioner is None:
                if image:
                    conditioner = conv_conditioner(
                        len(kept) + extra, k * len(changed), hidden_channels, dims, normalize=normalize
                    )
                else:
                    conditioner = mlp_conditioner(len(kept) + extra, k * len(changed), hidden_channels)
        self.conditioner = conditioner

    def _contiguous_halves(self) -> str | None:
        if torch.equal(self.kept, torch.arange(len(self.kept), device=self.kept.device)):
            return "kept-first"
        if torch.equal(self.changed, torch.arange(len(self.changed), device=self.changed.device)):
            return "kept-last"
        return None

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        if not self.spatial:
            self.halves = self._contiguous_halves()  # the loaded mask decides

    def coupling_parameters(self, theta: Tensor) -> Any:
        """What :meth:`couple` and :meth:`uncouple` take, from the conditioner's output
        ``theta`` (the default: ``theta`` itself); work both directions share goes here."""
        return theta

    def couple(self, x: Tensor, theta: Any) -> tuple[Tensor, Tensor | None]:  # pragma: no cover
        """Map the transformed part; return it and its elementwise log-scale (or None)."""
        raise NotImplementedError

    def uncouple(self, y: Tensor, theta: Any) -> tuple[Tensor, Tensor | None]:  # pragma: no cover
        """Invert :meth:`couple`; return ``x`` and the forward elementwise log-scale (or None)."""
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(x, context, self.couple, sign=1.0)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(y, context, self.uncouple, sign=-1.0)

    def _context_join(self) -> ContextInput | None:
        """The context input of a conditional coupling (``None``: unconditional; also for
        modules pickled before contexts, which have no such entry)."""
        return self._modules.get("context_input")

    def _theta(self, kept: Tensor, context: Tensor | None) -> Tensor:
        """The conditioner's output on the conditioning part (and the context)."""
        join = self._context_join()
        if join is None:
            return self.conditioner(kept)
        return self.conditioner(join(kept, context))

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        name = type(self).__name__
        join = self._context_join()
        if join is not None:
            check_context(context, x, name, join.context_features)
        if self.image:
            check_tensor(x, name, self.dims + 2, f"(B, C, {', '.join(_AXIS_NAMES[self.dims])})")
        else:
            check_tensor(x, name, 2, "(B, D)")
        if self.channels is not None:
            check_size(x, name, 1, self.channels, "channels" if self.image else "features")
        if self.spatial and tuple(x.shape[2:]) != tuple(self.mask.shape[2:]):
            raise ValueError(
                f"{name}: spatial mask is {tuple(self.mask.shape[2:])} but input is "
                f"{tuple(x.shape[2:])} (H, W)"
            )

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input from ``y`` and recompute the forward, running the conditioner once.

        Used by memory-saving backward (under grad). The conditioning part passes unchanged,
        so the conditioner's output is the same for the inverse and the recompute: it runs
        once, with grad, on that part as a leaf; the transformed part is solved from it
        and recoupled. Returns ``([kept, changed], join, y, logdet)``; ``join`` assembles
        the input (or its gradient) from the two parts as the forward assembles its output.
        """
        return self._fused_rebuild(y, context, inverse=False)

    def reconstruct_inverse(self, x: Tensor, context: Tensor | None = None) -> Reconstruction:
        """:meth:`reconstruct` in the sampling direction (an ``Inverse(coupling)`` block):
        the conditioner runs once, the transformed part is recoupled without grad and
        uncoupled with grad."""
        return self._fused_rebuild(x, context, inverse=True)

    def _fused_rebuild(self, out: Tensor, context: Tensor | None, inverse: bool) -> Reconstruction:
        """The one-conditioner-pass rebuild of the direction called (``inverse``: of
        :meth:`inverse`, whose input is rebuilt by :meth:`couple`)."""
        self._check(out, context)
        # The parts must be leaves; the engine's ``out`` needs no grad (and no detach op).
        kept, changed = self._split(out.detach() if out.requires_grad else out)
        kept.requires_grad_(True)
        theta = self.coupling_parameters(self._theta(kept, context))
        solve, rerun = (self.couple, self.uncouple) if inverse else (self.uncouple, self.couple)
        with torch.no_grad():
            rebuilt, _ = solve(changed, theta)
        rebuilt.requires_grad_(True)
        part, log_scale = rerun(rebuilt, theta)
        logdet = self._logdet(log_scale, out, -1.0 if inverse else 1.0)
        return Reconstruction([kept, rebuilt], self._join_parts, self._join(kept, part), logdet)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The conditioner's input and the coupling's input (the whole tensor for a spatial
        mask, whose untransformed positions :meth:`_join` discards)."""
        if self.spatial:
            return x * self.mask, x
        # One split op: its backward is one cat, not two scatters into zeros and a sum.
        n_kept = len(self.kept)
        if self.halves == "kept-first":
            kept, changed = x.split([n_kept, x.shape[1] - n_kept], dim=1)
            return kept, changed
        if self.halves == "kept-last":
            changed, kept = x.split([x.shape[1] - n_kept, n_kept], dim=1)
            return kept, changed
        return x[:, self.kept], x[:, self.changed]

    def _join(self, kept: Tensor, out: Tensor) -> Tensor:
        if self.spatial:
            return kept * self.mask + out * (1 - self.mask)
        if self.halves == "kept-first":
            return torch.cat([kept, out], 1)
        if self.halves == "kept-last":
            return torch.cat([out, kept], 1)
        return torch.cat([kept, out], 1)[:, self.merge]

    def _join_parts(self, parts: list[Tensor]) -> Tensor:
        return self._join(*parts)

    def _logdet(self, log_scale: Tensor | None, x: Tensor, sign: float) -> Tensor:
        if log_scale is None:
            return x.new_zeros(x.shape[0])
        if self.spatial:
            log_scale = log_scale * (1 - self.mask)
        total = log_scale.flatten(1).sum(1)
        return total if sign > 0 else -total

    def _run(self, x: Tensor, context: Tensor | None, fn, sign: float) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        kept, changed = self._split(x)
        out, log_scale = fn(changed, self.coupling_parameters(self._theta(kept, context)))
        return self._join(kept, out), self._logdet(log_scale, x, sign)
