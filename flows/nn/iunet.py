"""The fully invertible U-Net (i-UNet) with memory-saving backward, in 1D, 2D and 3D."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn

from flows.nn.reversible import Reversible
from flows.transforms.additive_coupling import AdditiveCoupling
from flows.transforms.affine_coupling import AffineCoupling
from flows.transforms.base import (
    Bijector,
    check_count,
    check_finite,
    check_flag,
    check_like_module,
    check_size,
    check_tensor,
    is_count,
)
from flows.transforms.chain import Chain
from flows.transforms.conditioners import conv_conditioner
from flows.transforms.coupling import MaskedCoupling
from flows.transforms.downsampling import (
    _AXIS_NAMES,
    InvertibleDownsampling,
    InvertibleUpsampling,
    _as_stride,
    check_resampling,
)
from flows.transforms.masks import channel_mask
from flows.transforms.reshape import Reshape
from flows.transforms.tail import Tail

COUPLINGS: dict[str, type[MaskedCoupling]] = {"additive": AdditiveCoupling, "affine": AffineCoupling}


def _layout_name(dims: int) -> str:
    return f"(B, C, {', '.join(_AXIS_NAMES[dims])})"


def check_state(x: Tensor, name: str, channels: int, stride: tuple[int, ...], depth: int) -> None:
    """Raise a clear error unless ``x`` is ``(B, channels, *S)`` with ``S_i`` divisible by
    ``stride_i ** depth`` on every axis."""
    dims = len(stride)
    check_tensor(x, name, dims + 2, _layout_name(dims))
    check_size(x, name, 1, channels, "channels")
    check_spatial(tuple(x.shape[2:]), name, stride, depth, f"input shape {tuple(x.shape)}")


def check_spatial(spatial: tuple[int, ...], name: str, stride: tuple[int, ...], depth: int, what: str = "") -> None:
    """Raise a clear error unless ``spatial`` has one size per stride, each divisible by
    ``stride_i ** depth``."""
    dims = len(stride)
    what = what or f"spatial shape {spatial}"
    if len(spatial) != dims:
        # Only a spatial size passed on its own gets here (check_tensor vets whole inputs),
        # and the usual slip is passing x.shape.
        raise ValueError(
            f"{name}: expected {dims} spatial sizes {_AXIS_NAMES[dims]}, got {what}; "
            f"pass x.shape[2:] of a {_layout_name(dims)} input, not x.shape"
        )
    for axis, (n, s) in enumerate(zip(spatial, stride)):
        if n % s**depth:
            raise ValueError(
                f"{name}: spatial axis {_AXIS_NAMES[dims][axis]} (tensor dim {axis + 2}) has size "
                f"{n}, not divisible by stride**downsamplings = {s}**{depth} = {s**depth}; {what}"
            )


class IUNet(nn.Module):
    r"""Fully invertible U-Net (i-UNet): ``y = f(x)`` with ``x`` and ``y`` of one shape.

    With ``L = levels``, level ``l`` works at spatial size ``S / s^l`` with ``c_l``
    channels (``c_0 = channels``). Down path, for ``l = 0 .. L-2``: ``blocks_per_level[l]``
    coupling blocks on ``(c_l, S / s^l)``; split off the first ``k_l = f c_l`` channels
    as a skip (``f = skip_fraction``); invertibly downsample the other ``c_l - k_l`` to
    ``c_{l+1} = (c_l - k_l) P`` channels (``P = prod(s)``, an
    :class:`~flows.transforms.downsampling.InvertibleDownsampling`). Bottom: coupling
    blocks at level ``L-1``. Up path, for ``l = L-2 .. 0``: invertibly upsample
    ``c_{l+1} -> c_l - k_l`` channels (an
    :class:`~flows.transforms.downsampling.InvertibleUpsampling` with its own parameters),
    concatenate ``[skip_l, upsampled]`` along channels, coupling blocks.

    One block is two channel couplings
    (:class:`~flows.transforms.AdditiveCoupling` or
    :class:`~flows.transforms.AffineCoupling` with ``channel_mask(c_l, 0)`` then
    ``channel_mask(c_l, 1)``), so both halves change. With ``x_A`` the conditioning half
    and ``theta = NN(x_A)``: additive ``y_B = x_B + theta``, ``log|det J| = 0``; affine
    ``(a, t) = theta``, ``y_B = x_B exp(tanh a) + t``, ``log|det J| = sum tanh a``;
    ``y_A = x_A``. The conditioner ``NN`` is the project's ``dims``-D
    :func:`~flows.transforms.conditioners.conv_conditioner` (conv3 -> conv1 -> conv3,
    last layer zero-initialised) passed to the coupling with LeakyReLU(0.1) activations
    instead of the default ReLU: the i-UNet keeps the activation it was built and
    measured with (LeakyReLU passes gradient for negative pre-activations too).

    Every piece is invertible, so ``x = f^{-1}(y)`` exactly (up to rounding); with
    additive couplings ``log|det J_f| = 0``, with affine ones it is the sum of the
    couplings' log-scales. At initialisation (zero-initialised conditioners, identical
    down- and upsampling inits) ``f`` is the identity.

    The net is composed from :mod:`flows.transforms` blocks. Read flat per sample, the
    state is ``[skip_0, ..., skip_{l-1}, current]``: the skips split off so far, then the
    current ``(c_l, S / s^l)`` tensor, channel-major. Splitting channels off for a skip
    only moves the boundary (the skip's channels come first in the current tensor), and
    concatenating a skip with the upsampled tensor is the boundary moved back. So for an
    input of spatial size ``S`` the net is the :class:`~flows.transforms.Chain`
    ``Reshape((C, *S), (D,))``, one :class:`~flows.transforms.Tail` per level's coupling
    blocks and per resampling (offset: the skips before it), ``Reshape`` back, run by a
    :class:`flows.nn.Reversible`. The couplings and resamplings are built once and
    registered here; the chain of each spatial size is built on first use and cached
    (a thin wrapper that owns no parameters; :meth:`chain` returns it). With
    ``memory_saving=True`` (the default) training keeps only the output: backward
    rebuilds and recomputes block by block, each coupling with its fused
    ``reconstruct`` (its conditioner runs once, not twice), the flat state split and
    joined once per run of couplings on one level, and activation memory does not grow
    with ``levels`` or ``blocks_per_level``.

    Non-invertible channel lifting and projection stay outside: add e.g. a ``Conv2d``
    from 1 to ``channels`` before it and one back after it.

    Args:
        channels: input (= output) channels ``c_0``.
        levels: number of resolution levels ``L`` (``L - 1`` down- and upsamplings).
        blocks_per_level: coupling blocks at each level on each side, an int or one per
            level (the bottom level's count is used once).
        dims: number of spatial axes (1, 2 or 3); a stride tuple must have this length.
        stride: resampling stride, an int or one per axis (anisotropic allowed).
        coupling: ``"additive"`` (volume-preserving) or ``"affine"``.
        hidden_channels: conditioner width: ``None`` (``c_l`` at level ``l``), an int,
            or one per level.
        skip_fraction: fraction of channels split off for the skip at each downsampling;
            ``c_l * skip_fraction`` must be a whole number in ``[1, c_l - 1]``.
        memory_saving: keep only the output for backward (settable later).
        resampling_method: ``"exp"``, ``"cayley"`` or ``"householder"``.
        resampling_init: ``"haar"``, ``"squeeze"`` or ``"random"``.
        learnable_resampling: train the up- and downsampling kernels.

    Shapes: ``(B, channels, *S)`` in and out, each ``S_i`` divisible by
    ``stride_i ** (levels - 1)``.

    References:
        Etmann, Ke, Schönlieb. iUNets: learnable invertible up- and downsampling for
        large-scale inverse problems. arXiv:2005.05220.

    Example:
        >>> import torch
        >>> net = IUNet(4, levels=3, blocks_per_level=1, hidden_channels=8)
        >>> x = torch.randn(2, 4, 16, 16)
        >>> y = net(x)
        >>> y.shape
        torch.Size([2, 4, 16, 16])
        >>> torch.allclose(net.inverse(y), x, atol=1e-5)
        True
        >>> print(net.layout((16, 16)).splitlines()[1])
        level 0: 4 ch @ 16x16 -> skip 2, down 2 -> 8 ch
        >>> z, logdet = net.chain((16, 16))(x)   # as a bijector: output and log-det
        >>> logdet.shape
        torch.Size([2])
    """

    def __init__(
        self,
        channels: int,
        levels: int,
        blocks_per_level: int | Sequence[int] = 2,
        dims: int = 2,
        stride: int | tuple[int, ...] = 2,
        coupling: str = "additive",
        hidden_channels: int | Sequence[int] | None = None,
        skip_fraction: float = 0.5,
        memory_saving: bool = True,
        resampling_method: str = "exp",
        resampling_init: str = "haar",
        learnable_resampling: bool = True,
    ) -> None:
        super().__init__()
        check_count(channels, "IUNet: channels")
        check_count(levels, "IUNet: levels")
        if coupling not in COUPLINGS:
            raise ValueError(f"IUNet: coupling must be one of {tuple(COUPLINGS)}, got {coupling!r}")
        self.stride = _as_stride(stride, dims, "IUNet")
        check_resampling(resampling_method, resampling_init, self.stride, "IUNet", prefix="resampling_")
        learnable_resampling = check_flag(learnable_resampling, "IUNet.learnable_resampling")
        self.dims, self.levels, self.coupling = len(self.stride), levels, coupling
        factor = math.prod(self.stride)
        blocks = self._per_level(blocks_per_level, "blocks_per_level")
        if not all(is_count(b, 0) for b in blocks):
            raise ValueError(f"IUNet: blocks_per_level must be integers >= 0, got {blocks}")

        level_channels, skips = [channels], []
        for level in range(levels - 1):
            c = level_channels[-1]
            if c < 2:
                raise ValueError(
                    f"IUNet: level {level} has {c} channel, too few to split off a skip and keep "
                    f"the rest (needs >= 2): lift the input to more channels with an ordinary conv "
                    f"first, or use fewer levels than {levels}"
                )
            skip = c * skip_fraction
            if skip != int(skip) or not 1 <= skip <= c - 1:
                raise ValueError(
                    f"IUNet: level {level} has {c} channels; skip_fraction={skip_fraction} gives "
                    f"{skip:g} skip channels, which must be a whole number in [1, {c - 1}]: "
                    "choose channels divisible accordingly (e.g. a power of 2)"
                )
            skips.append(int(skip))
            level_channels.append((c - int(skip)) * factor)
        for level, c in enumerate(level_channels):
            if c < 2 and blocks[level] > 0:
                raise ValueError(
                    f"IUNet: level {level} has {c} channel(s); a coupling needs >= 2 "
                    "(lift the input to more channels with an ordinary conv first)"
                )
        hidden = (
            [hidden_channels] * levels
            if hidden_channels is None
            else self._per_level(hidden_channels, "hidden_channels")
        )
        hidden = [c if h is None else h for c, h in zip(level_channels, hidden)]
        if not all(is_count(h, 1) for h in hidden):
            raise ValueError(f"IUNet: hidden_channels must be integers >= 1 (or None), got {hidden_channels!r}")
        self.channels = channels
        self.level_channels, self.skips, self.blocks, self.hidden = level_channels, skips, blocks, hidden

        resample = dict(method=resampling_method, init=resampling_init, learnable=learnable_resampling)

        def couplings(level: int) -> Chain:
            return Chain(*(self._coupling(level, parity) for _ in range(blocks[level]) for parity in (0, 1)))

        # Built in application order (down path, bottom, up path): the parameters are drawn
        # from the global generator in that order.
        down_blocks, downsamplings = [], []
        for level in range(levels - 1):
            down_blocks.append(couplings(level))
            kept = level_channels[level] - skips[level]
            downsamplings.append(InvertibleDownsampling(kept, self.stride, **resample))
        down_blocks.append(couplings(levels - 1))
        up_blocks, upsamplings = [None] * (levels - 1), [None] * (levels - 1)
        for level in reversed(range(levels - 1)):
            upsamplings[level] = InvertibleUpsampling(level_channels[level + 1], self.stride, **resample)
            up_blocks[level] = couplings(level)
        # Index = level. down_blocks[levels - 1] is the bottom; the other lists have L - 1.
        self.down_blocks = nn.ModuleList(down_blocks)
        self.downsamplings = nn.ModuleList(downsamplings)
        self.upsamplings = nn.ModuleList(upsamplings)
        self.up_blocks = nn.ModuleList(up_blocks)
        # The layout of each spatial size: thin chains over the modules above, not
        # registered (state_dict, .to() and parameters() go through the lists above).
        self._reversibles: dict[tuple[int, ...], Reversible] = {}
        self.memory_saving = memory_saving

    def _coupling(self, level: int, parity: int) -> MaskedCoupling:
        c, hidden = self.level_channels[level], self.hidden[level]
        mask = channel_mask(c, parity)
        cls = COUPLINGS[self.coupling]
        kept = int(mask.sum())
        conditioner = conv_conditioner(
            kept,
            cls.params_per_element * (c - kept),
            hidden,
            self.dims,
            activation=partial(nn.LeakyReLU, 0.1),
        )
        return cls(mask, conditioner=conditioner, dims=self.dims)

    def _per_level(self, value, name: str) -> list:
        if not isinstance(value, (list, tuple)):  # one value for every level (checked by the caller)
            return [value] * self.levels
        value = list(value)
        if len(value) != self.levels:
            raise ValueError(f"IUNet: {name} needs one entry per level ({self.levels}), got {value}")
        return value

    @property
    def memory_saving(self) -> bool:
        """Whether training keeps only the output (settable between steps).

        The switch is held by the per-level coupling chains (so
        :func:`flows.memory_saving` finds it); each call runs its spatial size's chain
        with the current setting.
        """
        return all(chain.memory_saving for chain in self._level_chains())

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        value = check_flag(value, "IUNet.memory_saving")
        for chain in self._level_chains():
            chain.memory_saving = value

    def _level_chains(self) -> list[Chain]:
        return [*self.down_blocks, *self.up_blocks]

    def chain(self, shape: Sequence[int]) -> Chain:
        """The i-UNet for inputs of spatial size ``shape`` (``x.shape[2:]``) as a bijector
        returning ``(y, logdet)`` on ``(B, channels, *shape)``, set to the current
        :attr:`memory_saving` (built on first use, then cached; it shares this net's
        modules and parameters)."""
        shape = tuple(shape)
        check_spatial(shape, "IUNet.chain", self.stride, self.levels - 1)
        return self._reversible(shape).chain

    def _reversible(self, shape: tuple[int, ...]) -> Reversible:
        reversible = self._reversibles.get(shape)
        if reversible is None:
            reversible = self._reversibles[shape] = Reversible(*self._blocks(shape))
        reversible.memory_saving = self.memory_saving
        return reversible

    def _blocks(self, spatial: tuple[int, ...]) -> list[Bijector]:
        """Reshape to flat, a ``Tail`` per level's couplings and per resampling, Reshape back
        (``spatial`` already checked by the caller)."""

        def size(level: int) -> tuple[int, ...]:
            return tuple(n // s**level for n, s in zip(spatial, self.stride))

        def couplings(chain: Chain, offset: int, level: int) -> list[Bijector]:
            return [Tail(chain, offset, (self.level_channels[level], *size(level)))] if len(chain) else []

        event = (self.channels, *spatial)
        flat = (math.prod(event),)
        blocks: list[Bijector] = [Reshape(event, flat)]
        offsets = [0]  # where level l's current part starts in the flat state
        for level in range(self.levels - 1):
            c, k = self.level_channels[level], self.skips[level]
            blocks += couplings(self.down_blocks[level], offsets[level], level)
            offsets.append(offsets[level] + k * math.prod(size(level)))
            blocks.append(
                Tail(
                    self.downsamplings[level],
                    offsets[level + 1],
                    (c - k, *size(level)),
                    (self.level_channels[level + 1], *size(level + 1)),
                )
            )
        blocks += couplings(self.down_blocks[self.levels - 1], offsets[-1], self.levels - 1)
        for level in reversed(range(self.levels - 1)):
            c, k = self.level_channels[level], self.skips[level]
            blocks.append(
                Tail(
                    self.upsamplings[level],
                    offsets[level + 1],
                    (self.level_channels[level + 1], *size(level + 1)),
                    (c - k, *size(level)),
                )
            )
            blocks += couplings(self.up_blocks[level], offsets[level], level)
        blocks.append(Reshape(flat, event))
        return blocks

    def forward(self, x: Tensor) -> Tensor:
        """``y = f(x)``, ``(B, channels, *S)`` -> the same shape (the log-det is dropped)."""
        self._check_input(x, "IUNet")
        return self._reversible(tuple(x.shape[2:]))(x)

    def inverse(self, y: Tensor) -> Tensor:
        """``x = f^{-1}(y)``."""
        self._check_input(y, "IUNet.inverse")
        return self._reversible(tuple(y.shape[2:])).inverse(y)

    def _check_input(self, x: Tensor, name: str) -> None:
        """One line for an input the net cannot take: layout and sizes, then empty batch,
        device and dtype against the parameters, then NaN or inf (one of them would spread
        to most of the output)."""
        check_state(x, name, self.channels, self.stride, self.levels - 1)
        check_like_module(x, self, name)
        check_finite(x, name)

    def layout(self, shape: Sequence[int] | None = None) -> str:
        """The channels (and, given a spatial ``shape``, sizes) at every level, as text.

        Args:
            shape: spatial input size ``S`` (e.g. ``(64, 64)``); without it the sizes
                are written relative to ``S`` (``S/2x2`` at level 1 with stride 2 in 2D).
        """
        if shape is not None:
            shape = tuple(shape)
            check_spatial(shape, "IUNet.layout", self.stride, self.levels - 1)
        lines = [
            f"IUNet {self.dims}D, stride {self.stride}, {self.levels} levels, "
            f"{self.coupling} couplings, blocks per level {self.blocks}"
        ]
        for level, c in enumerate(self.level_channels):
            if shape is None:
                where = "S" if level == 0 else f"S/{'x'.join(str(s**level) for s in self.stride)}"
            else:
                where = "x".join(str(n // s**level) for n, s in zip(shape, self.stride))
            text = f"level {level}: {c} ch @ {where}"
            if level < self.levels - 1:
                k = self.skips[level]
                text += f" -> skip {k}, down {c - k} -> {self.level_channels[level + 1]} ch"
            else:
                text += " (bottom)"
            lines.append(text)
        lines.append("channels: " + "-".join(map(str, self.level_channels + self.level_channels[-2::-1])))
        return "\n".join(lines)
