"""The fully invertible U-Net (i-UNet) with memory-saving backward, in 1D, 2D and 3D."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flows.transforms.base import Bijector, check_size, check_tensor
from flows.transforms.chain import Chain
from flows.transforms.downsampling import (
    _AXIS_NAMES,
    InvertibleDownsampling,
    InvertibleUpsampling,
    _as_stride,
)
from flows.transforms.switches import skipping_logdet

_CONV_LAYER = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
COUPLINGS = ("additive", "affine")


def _layout_name(dims: int) -> str:
    return f"(B, C, {', '.join(_AXIS_NAMES[dims])})"


class ChannelCoupling(Bijector):
    r"""Coupling over channel halves of ``(B, C, *S)`` inputs with 1, 2 or 3 spatial axes.

    Split the channels into ``x_A`` (conditioning) and ``x_B`` (transformed): with
    ``parity=0`` ``A`` is the first ``floor(C/2)`` channels, with ``parity=1`` the last
    ``floor(C/2)``. With ``theta = NN(x_A)``, a ``dims``-dimensional CNN
    (conv3 -> LeakyReLU -> conv1 -> LeakyReLU -> conv3, last layer zero-initialised so a
    fresh coupling is the identity):

    - additive: ``y_B = x_B + t``; ``x_B = y_B - t``; ``log|det J| = 0``;
    - affine: ``(a, t) = theta``, ``s = tanh(a)``, ``y_B = x_B exp(s) + t``;
      ``x_B = (y_B - t) exp(-s)``; ``log|det J| = sum s`` (minus that for the inverse).

    ``y_A = x_A`` in both cases. The project's
    :class:`~flows.transforms.AdditiveCoupling` / ``AffineCoupling`` take 2D images only;
    this is the same map for any number of spatial axes.

    Args:
        channels: channels ``C`` (>= 2).
        dims: number of spatial axes (1, 2 or 3).
        coupling: ``"additive"`` or ``"affine"``.
        hidden_channels: width of the conditioner.
        parity: which half conditions (0: first half, 1: second half).

    References:
        Dinh, Krueger, Bengio. NICE: Non-linear Independent Components Estimation.
        arXiv:1410.8516. Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP.
        arXiv:1605.08803.

    Example:
        >>> import torch
        >>> layer = ChannelCoupling(4, dims=3, coupling="affine", hidden_channels=8)
        >>> y, logdet = layer(torch.randn(2, 4, 4, 4, 4))
        >>> y.shape, logdet.shape
        (torch.Size([2, 4, 4, 4, 4]), torch.Size([2]))
    """

    def __init__(
        self,
        channels: int,
        dims: int = 2,
        coupling: str = "additive",
        hidden_channels: int = 32,
        parity: int = 0,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"ChannelCoupling: needs at least 2 channels to split, got {channels}")
        if dims not in _CONV_LAYER:
            raise ValueError(f"ChannelCoupling: dims must be 1, 2 or 3, got {dims}")
        if coupling not in COUPLINGS:
            raise ValueError(
                f"ChannelCoupling: coupling must be one of {COUPLINGS}, got {coupling!r}"
            )
        if parity not in (0, 1):
            raise ValueError(f"ChannelCoupling: parity must be 0 or 1, got {parity}")
        self.channels, self.dims, self.coupling, self.parity = channels, dims, coupling, parity
        half = channels // 2
        self.kept = half
        self.changed = channels - half
        conv = _CONV_LAYER[dims]
        out = self.changed * (2 if coupling == "affine" else 1)
        self.conditioner = nn.Sequential(
            conv(self.kept, hidden_channels, 3, padding=1),
            nn.LeakyReLU(0.1),
            conv(hidden_channels, hidden_channels, 1),
            nn.LeakyReLU(0.1),
            conv(hidden_channels, out, 3, padding=1),
        )
        nn.init.zeros_(self.conditioner[-1].weight)
        nn.init.zeros_(self.conditioner[-1].bias)

    def _split(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        check_tensor(x, name, self.dims + 2, _layout_name(self.dims))
        check_size(x, name, 1, self.channels, "channels")
        if self.parity == 0:
            return x[:, : self.kept], x[:, self.kept :]
        return x[:, self.changed :], x[:, : self.changed]

    def _merge(self, kept: Tensor, changed: Tensor) -> Tensor:
        return torch.cat([kept, changed] if self.parity == 0 else [changed, kept], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = self._split(x, type(self).__name__)
        theta = self.conditioner(x_a)
        if self.coupling == "additive":
            return self._merge(x_a, x_b + theta), x.new_zeros(x.shape[0])
        raw, shift = theta.chunk(2, dim=1)
        log_scale = torch.tanh(raw)
        return self._merge(x_a, x_b * torch.exp(log_scale) + shift), log_scale.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y_a, y_b = self._split(y, f"{type(self).__name__}.inverse")
        theta = self.conditioner(y_a)
        if self.coupling == "additive":
            return self._merge(y_a, y_b - theta), y.new_zeros(y.shape[0])
        raw, shift = theta.chunk(2, dim=1)
        log_scale = torch.tanh(raw)
        return self._merge(y_a, (y_b - shift) * torch.exp(-log_scale)), -log_scale.flatten(1).sum(1)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, dims={self.dims}, coupling={self.coupling!r}, "
            f"parity={self.parity}"
        )


class UNetStage(Bijector):
    r"""Apply ``bijector`` to the current part of an i-UNet state, leaving the skips.

    The whole U-Net keeps one tensor of the input's shape ``(B, C, *S)``. Read flat per
    sample it is ``[skip_0, skip_1, ..., skip_{k-1}, current]``: the skips split off so
    far (skip ``j`` of ``c_j`` channels at level ``j``, i.e. spatial size ``S / s^j``),
    then the current ``(c, *S / s^l)`` tensor, each flattened channel-major. Splitting
    channels off for a skip only moves the boundary (the skip's channels come first in
    the current tensor), and concatenating a skip with the upsampled tensor along
    channels is the same boundary moved back. Every stage therefore maps the state to a
    state of the same shape, the U-Net is a plain :class:`~flows.transforms.Chain` of
    stages, and the memory-saving engine keeps only its output, whatever the depth.

    Forward ``y = [head, flat(f(view(x_tail)))]``, log-det that of ``f``; the inverse
    uses ``f^{-1}``. Shape-agnostic: the spatial sizes come from the state each call.

    Args:
        bijector: the map of the current part, from ``(in_channels, *S / s^in_level)`` to
            ``(out_channels, *S / s^out_level)``.
        channels: channels ``C`` of the state (the U-Net's input).
        stride: the per-axis stride of one resampling.
        head: ``(channels, level)`` of each skip before the current part.
        in_level, in_channels: level and channels of the part before ``bijector``.
        out_level, out_channels: level and channels after it.
        depth: the deepest level of the U-Net (spatial sizes must divide by ``s^depth``).
    """

    def __init__(
        self,
        bijector: Bijector,
        channels: int,
        stride: tuple[int, ...],
        head: Sequence[tuple[int, int]],
        in_level: int,
        in_channels: int,
        out_level: int | None = None,
        out_channels: int | None = None,
        depth: int = 0,
    ) -> None:
        super().__init__()
        self.bijector = bijector
        self.channels, self.stride, self.depth = channels, tuple(stride), depth
        self.head = tuple(head)
        self.in_level, self.in_channels = in_level, in_channels
        self.out_level = in_level if out_level is None else out_level
        self.out_channels = in_channels if out_channels is None else out_channels

    @property
    def exact_inverse(self) -> bool:  # type: ignore[override]
        return self.bijector.exact_inverse

    @property
    def exact_logdet(self) -> bool:  # type: ignore[override]
        return self.bijector.exact_logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform_current(x, self.bijector.forward, self.in_level, self.in_channels)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform_current(y, self.bijector.inverse, self.out_level, self.out_channels)

    def _transform_current(self, x: Tensor, fn, level: int, channels: int) -> tuple[Tensor, Tensor]:
        check_state(x, "IUNet", self.channels, self.stride, self.depth)
        spatial = x.shape[2:]

        def size_at(j: int) -> tuple[int, ...]:
            return tuple(n // s**j for n, s in zip(spatial, self.stride))

        offset = sum(c * math.prod(size_at(j)) for c, j in self.head)
        flat = x.flatten(1)
        # A contiguous copy of the current part: a view would make the blocks' saved inputs
        # hold the whole state (skips included) alive under ordinary backward.
        current = flat[:, offset:].reshape(x.shape[0], channels, *size_at(level)).contiguous()
        out, logdet = fn(current)
        out = out.flatten(1)
        if offset:
            out = torch.cat([flat[:, :offset], out], dim=1)
        return out.reshape(x.shape), logdet

    def extra_repr(self) -> str:
        return (
            f"head={self.head}, in=(level {self.in_level}, {self.in_channels} ch), "
            f"out=(level {self.out_level}, {self.out_channels} ch)"
        )


def check_state(x: Tensor, name: str, channels: int, stride: tuple[int, ...], depth: int) -> None:
    """Raise a clear error unless ``x`` is ``(B, channels, *S)`` with ``S_i`` divisible by
    ``stride_i ** depth`` on every axis."""
    dims = len(stride)
    check_tensor(x, name, dims + 2, _layout_name(dims))
    check_size(x, name, 1, channels, "channels")
    for axis, (n, s) in enumerate(zip(x.shape[2:], stride)):
        if n % s**depth:
            raise ValueError(
                f"{name}: spatial axis {_AXIS_NAMES[dims][axis]} (tensor dim {axis + 2}) has size "
                f"{n}, not divisible by stride**downsamplings = {s}**{depth} = {s**depth}; "
                f"input shape {tuple(x.shape)}"
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
    concatenate ``[skip_l, upsampled]`` along channels, coupling blocks. One block is two
    :class:`ChannelCoupling` layers with opposite parities, so both halves change.

    Every piece is invertible, so ``x = f^{-1}(y)`` exactly (up to rounding); with
    additive couplings ``log|det J_f| = 0``, with affine ones it is the sum of the
    couplings' log-scales. At initialisation (zero-initialised conditioners, identical
    down- and upsampling inits) ``f`` is the identity.

    The net is a :class:`~flows.transforms.Chain` of :class:`UNetStage` blocks over a
    state of the input's shape (skips first, then the current tensor), so with
    ``memory_saving=True`` (the default) training keeps only the output: backward
    rebuilds every stage's input with its inverse and recomputes it, and activation
    memory does not grow with ``levels`` or ``blocks_per_level``.

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
        if levels < 1:
            raise ValueError(f"IUNet: levels must be >= 1, got {levels}")
        self.stride = _as_stride(stride, dims)
        self.dims, self.levels, self.coupling = len(self.stride), levels, coupling
        factor = math.prod(self.stride)
        blocks = self._per_level(blocks_per_level, "blocks_per_level")
        if any(b < 0 for b in blocks):
            raise ValueError(f"IUNet: blocks_per_level must be >= 0, got {blocks}")

        level_channels, skips = [channels], []
        for level in range(levels - 1):
            c = level_channels[-1]
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
        self.level_channels, self.skips, self.blocks, self.hidden = (
            level_channels,
            skips,
            blocks,
            hidden,
        )

        depth = levels - 1
        resample = dict(
            method=resampling_method, init=resampling_init, learnable=learnable_resampling
        )

        def stage(
            bijector: Bijector,
            head: list[tuple[int, int]],
            level: int,
            c: int,
            out_level: int | None = None,
            out_c: int | None = None,
        ) -> UNetStage:
            return UNetStage(
                bijector, channels, self.stride, head, level, c, out_level, out_c, depth
            )

        def couplings(level: int, head: list[tuple[int, int]]) -> list[UNetStage]:
            c = level_channels[level]
            return [
                stage(
                    ChannelCoupling(c, self.dims, coupling, hidden[level], parity), head, level, c
                )
                for _ in range(blocks[level])
                for parity in (0, 1)
            ]

        stages: list[UNetStage] = []
        for level in range(levels - 1):
            head = [(skips[j], j) for j in range(level)]
            stages += couplings(level, head)
            kept = level_channels[level] - skips[level]
            down = InvertibleDownsampling(kept, self.stride, **resample)
            stages.append(
                stage(
                    down,
                    [*head, (skips[level], level)],
                    level,
                    kept,
                    level + 1,
                    level_channels[level + 1],
                )
            )
        stages += couplings(levels - 1, [(skips[j], j) for j in range(levels - 1)])
        for level in reversed(range(levels - 1)):
            head = [(skips[j], j) for j in range(level)]
            kept = level_channels[level] - skips[level]
            up = InvertibleUpsampling(level_channels[level + 1], self.stride, **resample)
            stages.append(
                stage(
                    up,
                    [*head, (skips[level], level)],
                    level + 1,
                    level_channels[level + 1],
                    level,
                    kept,
                )
            )
            stages += couplings(level, head)
        self.channels = channels
        self.bijector = Chain(*stages)
        self.bijector.memory_saving = memory_saving

    def _per_level(self, value, name: str) -> list:
        if isinstance(value, int):
            return [value] * self.levels
        value = list(value)
        if len(value) != self.levels:
            raise ValueError(
                f"IUNet: {name} needs one entry per level ({self.levels}), got {value}"
            )
        return value

    @property
    def memory_saving(self) -> bool:
        """Whether training keeps only the output (settable between steps)."""
        return self.bijector.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self.bijector.memory_saving = bool(value)

    def forward(self, x: Tensor) -> Tensor:
        """``y = f(x)``, ``(B, channels, *S)`` -> the same shape (the log-det is dropped)."""
        check_state(x, "IUNet", self.channels, self.stride, self.levels - 1)
        with skipping_logdet():
            return self.bijector(x)[0]

    def inverse(self, y: Tensor) -> Tensor:
        """``x = f^{-1}(y)``."""
        check_state(y, "IUNet.inverse", self.channels, self.stride, self.levels - 1)
        return self.bijector.inverse(y)[0]

    def layout(self, shape: Sequence[int] | None = None) -> str:
        """The channels (and, given a spatial ``shape``, sizes) at every level, as text.

        Args:
            shape: spatial input size ``S`` (e.g. ``(64, 64)``); without it the sizes
                are written relative to ``S`` (``S/2x2`` at level 1 with stride 2 in 2D).
        """
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
        lines.append(
            "channels: " + "-".join(map(str, self.level_channels + self.level_channels[-2::-1]))
        )
        return "\n".join(lines)
