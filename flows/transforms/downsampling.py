"""Learnable invertible down- and upsampling: orthogonal strided convolutions.

A convolution whose kernel size equals its stride ``s = (s_1, ..., s_d)`` cuts the input
into non-overlapping patches of ``P = s_1 * ... * s_d`` pixels and maps each patch
(all channels) linearly to one output pixel. Seen per patch it is a matrix; when that
matrix is orthogonal the transposed convolution with the same kernel undoes it exactly,
so the resampling is a bijector with log-det 0 (Etmann, Ke, Schönlieb 2020).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flows.transforms.base import Bijector, check_count, check_size, check_tensor, zero_logdet
from flows.transforms.inverse import Inverse

METHODS = ("exp", "cayley", "householder")
INITS = ("haar", "squeeze", "random")
_AXIS_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _as_stride(stride: int | tuple[int, ...], dims: int | None, where: str) -> tuple[int, ...]:
    """Normalise ``stride`` to a tuple of ``dims`` positive ints (dims 1, 2 or 3); errors
    name ``where`` (the layer the user built)."""
    if isinstance(stride, int):
        dims = 2 if dims is None else dims
        stride = (stride,) * dims
    else:
        stride = tuple(int(s) for s in stride)
        if dims is not None and len(stride) != dims:
            raise ValueError(f"{where}: stride {stride} has {len(stride)} entries but dims={dims}")
        dims = len(stride)
    if dims not in _CONV:
        raise ValueError(f"{where}: dims must be 1, 2 or 3, got {dims}")
    if any(s < 1 for s in stride):
        raise ValueError(f"{where}: every stride must be >= 1, got {stride}")
    return stride


def check_resampling(method: str, init: str, stride: tuple[int, ...], where: str, prefix: str = "") -> None:
    """Raise one line unless ``method`` and ``init`` are known and ``init`` covers ``stride``
    (Haar is defined for strides 1 and 2 only).

    Args:
        where: the layer the user built, e.g. ``"IUNet"``.
        prefix: how the user spelled the options, before ``method`` / ``init``
            (``"resampling_"`` for :class:`~flows.nn.IUNet`).
    """
    if method not in METHODS:
        raise ValueError(f"{where}: {prefix}method must be one of {METHODS}, got {method!r}")
    if init not in INITS:
        raise ValueError(f"{where}: {prefix}init must be one of {INITS}, got {init!r}")
    if init == "haar":
        _check_haar_stride(stride, where, f"{prefix}init")


def _check_haar_stride(stride: tuple[int, ...], where: str, option: str = "init") -> None:
    """Raise one line, naming the user's ``option``, unless every stride is 1 or 2."""
    if any(s not in (1, 2) for s in stride):
        raise ValueError(
            f"{where}: {option}='haar' needs strides of 1 or 2 per axis, got {stride}; "
            f"use {option}='squeeze' or 'random' for larger strides"
        )


def haar_matrix(stride: tuple[int, ...]) -> Tensor:
    """The orthonormal Haar analysis matrix of one ``stride`` patch, float64 ``(P, P)``.

    It is the Kronecker product over the axes of ``[[1, 1], [1, -1]] / sqrt(2)`` (stride 2)
    or ``[[1]]`` (stride 1). Row ``k`` is a filter, with ``k`` the row-major index of the
    per-axis bits (0 low-pass, 1 high-pass); column ``p`` is the row-major patch offset.
    In 2D the rows are LL, LH (high along W), HL (high along H), HH.

    Raises:
        ValueError: when a stride is neither 1 nor 2 (Haar is defined for pairs).
    """
    _check_haar_stride(stride, "haar_matrix")
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    m = torch.ones(1, 1, dtype=torch.float64)
    for s in stride:
        m = torch.kron(m, h2 if s == 2 else torch.ones(1, 1, dtype=torch.float64))
    return m


class InvertibleDownsampling(Bijector):
    r"""Orthogonal strided convolution: ``(B, C, *S) -> (B, C * P, *S / s)``, log-det 0.

    With stride ``s = (s_1, ..., s_d)`` and ``P = prod(s)``, write ``x_c[i, p]`` for input
    channel ``c`` at offset ``p`` (row-major in the patch) of the patch at output
    position ``i``. Output channel ``g n + k`` of group ``g`` is

    .. math::
        y_{gn+k}[i] = \sum_{c \in g} \sum_p M^{(g)}_{k,\,c'P+p}\, x_c[i, p],
        \qquad M^{(g)} = Q(A_g)\, M_0^{(g)},

    where ``c'`` is ``c``'s index within its group. Per channel (``full=False``, the
    default, as in iunets) there are ``C`` groups of ``n = P``; with ``full=True`` one
    group of ``n = C P`` mixes channels too (more expressive; its matrix grows as
    ``(C P)^2``). ``M_0`` is the fixed structured matrix of the init (rebuilt in float64
    on use, so it is exact in any dtype) and ``Q`` maps the unconstrained parameter ``A``
    to an orthogonal matrix with ``Q(A_0) = I`` exactly, so the layer starts exactly at
    its ``init`` and training moves it along the orthogonal group:

    - ``"exp"``: ``Q = exp(A - A^T)`` (``torch.linalg.matrix_exp``), ``A_0 = 0``;
    - ``"cayley"``: ``Q = (I - S)^{-1} (I + S)``, ``S = A - A^T``, ``A_0 = 0``;
    - ``"householder"``: ``Q = H(v_1) ... H(v_m)``, ``H(v) = I - 2 v v^T / v^T v``, with
      ``m = 2(n - 1)`` reflections starting in equal pairs ``v = e_1, e_1, e_2, e_2, ...``
      (each pair cancels exactly; the pairs' tangent directions span all of
      :math:`\mathfrak{so}(n)`, so no direction is lost at the start).

    Inits: ``"haar"`` (``M_0`` = orthonormal Haar wavelet filters per channel, output
    channel ``c P + k`` is subband ``k`` of channel ``c``, see :func:`haar_matrix`),
    ``"squeeze"`` (``M_0 = I``: output channel ``c P + p`` is channel ``c`` at patch
    offset ``p``, which in 2D with stride 2 is :class:`~flows.transforms.Squeeze`
    exactly) and ``"random"`` (``M_0 = I`` and a standard normal ``A``, so ``M = Q(A)`` is a
    random orthogonal matrix, orthogonal to the working precision in any dtype).

    Forward is ``conv(x, W, stride=s)`` with ``W = M`` reshaped to ``(C P, C/G, *s)``;
    the inverse is ``x = conv_transpose(y, W, stride=s)``, i.e. ``M^T`` per patch, exact
    because ``M^T M = I``. The map is orthogonal, so ``log|det J| = 0`` in both
    directions. ``M`` is assembled once per call.

    Args:
        channels: input channels ``C``.
        stride: an int (the same on every axis) or a tuple with one stride per spatial
            axis (anisotropic allowed, e.g. ``(2, 1)``); a tuple fixes ``dims``.
        method: ``"exp"``, ``"cayley"`` or ``"householder"``.
        init: ``"haar"`` (strides 1 or 2 only), ``"squeeze"`` or ``"random"``.
        learnable: whether ``A`` is a trainable parameter (False keeps ``M`` fixed).
        dims: number of spatial axes (1, 2 or 3); default from ``stride`` or 2.
        full: one orthogonal matrix over all ``C P`` channels instead of one per channel.

    Input ``(B, C, *S)`` with every ``S_i`` divisible by ``s_i``; output
    ``(B, C P, *(S_i / s_i))``.

    References:
        Etmann, Ke, Schönlieb. iUNets: learnable invertible up- and downsampling for
        large-scale inverse problems. arXiv:2005.05220.

    Example:
        >>> import torch
        >>> down = InvertibleDownsampling(3, stride=2)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y, logdet = down(x)
        >>> y.shape, logdet
        (torch.Size([2, 12, 4, 4]), tensor([0., 0.]))
        >>> torch.allclose(down.inverse(y)[0], x, atol=1e-6)
        True
    """

    keeps_shape = False

    def __init__(
        self,
        channels: int,
        stride: int | tuple[int, ...] = 2,
        method: str = "exp",
        init: str = "haar",
        learnable: bool = True,
        dims: int | None = None,
        full: bool = False,
    ) -> None:
        super().__init__()
        check_count(channels, "InvertibleDownsampling: channels")
        self.stride = _as_stride(stride, dims, "InvertibleDownsampling")
        check_resampling(method, init, self.stride, "InvertibleDownsampling")
        self.dims = len(self.stride)
        self.channels = channels
        self.factor = math.prod(self.stride)
        self.method, self.init, self.learnable, self.full = method, init, learnable, full
        groups = 1 if full else channels
        n = channels * self.factor // groups
        self.groups, self.n = groups, n
        if method == "householder":
            reflections = 2 * (n - 1)
            if init == "random":
                weight = torch.randn(groups, reflections, n)
            else:
                start = torch.eye(n).repeat_interleave(2, dim=0)[:reflections]
                weight = start.expand(groups, reflections, n).clone()
        else:
            weight = torch.randn(groups, n, n) if init == "random" else torch.zeros(groups, n, n)
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def initial_matrix(self) -> Tensor:
        """The fixed structured factor ``M_0`` (``(G, n, n)``; identity for ``"random"``).

        Built in float64 and rounded once to the weight's dtype, so e.g. the Haar entries
        ``(1/sqrt 2)^2`` are exactly 0.5 in float32, and exact to float64 precision after
        ``.double()`` (no buffer that was rounded to float32 at construction).
        """
        per_group = self.channels // self.groups
        if self.init == "haar":
            block = haar_matrix(self.stride)
        else:
            block = torch.eye(self.factor, dtype=torch.float64)
        m0 = torch.kron(torch.eye(per_group, dtype=torch.float64), block)
        return m0.to(device=self.weight.device, dtype=self.weight.dtype).expand(
            self.groups, self.n, self.n
        )

    def orthogonal_factor(self) -> Tensor:
        """``Q(A)``, ``(G, n, n)``: the learned rotation applied after ``M_0``."""
        a = self.weight
        if self.method == "exp":
            return torch.linalg.matrix_exp(a - a.transpose(-1, -2))
        eye = torch.eye(self.n, dtype=a.dtype, device=a.device).expand_as(a)
        if self.method == "cayley":
            skew = a - a.transpose(-1, -2)
            return torch.linalg.solve(eye - skew, eye + skew)
        return self._reflect(eye)

    def _reflect(self, m: Tensor) -> Tensor:
        """``H(v_1) ... H(v_m) m``: the last reflection is applied first."""
        v = self.weight
        for i in reversed(range(v.shape[1])):
            u = v[:, i : i + 1, :]  # (G, 1, n)
            coef = 2.0 / (u * u).sum(-1, keepdim=True)  # (G, 1, 1)
            m = m - coef * u.transpose(-1, -2) @ (u @ m)
        return m

    def kernel_matrix(self) -> Tensor:
        """The orthogonal matrices ``M = Q(A) M_0``, shape ``(G, n, n)``."""
        m0 = self.initial_matrix()
        if self.init != "random" and not self.learnable:
            return m0  # Q(A_0) = I exactly
        if self.method == "householder":
            return self._reflect(m0)
        return self.orthogonal_factor() @ m0

    def kernel(self, dtype: torch.dtype | None = None) -> Tensor:
        """The convolution kernel ``(C P, C / G, *stride)`` built from :meth:`kernel_matrix`."""
        w = self.kernel_matrix().reshape(
            self.channels * self.factor, self.channels // self.groups, *self.stride
        )
        return w if dtype is None else w.to(dtype)

    def _check_fine(self, x: Tensor, name: str) -> None:
        check_tensor(x, name, self.dims + 2, f"(B, C, {', '.join(_AXIS_NAMES[self.dims])})")
        check_size(x, name, 1, self.channels, "channels")
        for axis, (size, s) in enumerate(zip(x.shape[2:], self.stride)):
            if size % s:
                raise ValueError(
                    f"{name}: spatial axis {_AXIS_NAMES[self.dims][axis]} (tensor dim {axis + 2}) "
                    f"has size {size}, not divisible by its stride {s}; "
                    f"input shape {tuple(x.shape)}"
                )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_fine(x, type(self).__name__)
        y = _CONV[self.dims](x, self.kernel(x.dtype), stride=self.stride, groups=self.groups)
        return y, zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        name = f"{type(self).__name__}.inverse"
        check_tensor(
            y, name, self.dims + 2, f"(B, C*{self.factor}, {', '.join(_AXIS_NAMES[self.dims])})"
        )
        check_size(y, name, 1, self.channels * self.factor, "channels")
        x = _CONV_T[self.dims](y, self.kernel(y.dtype), stride=self.stride, groups=self.groups)
        return x, zero_logdet(y)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, stride={self.stride}, method={self.method!r}, "
            f"init={self.init!r}, learnable={self.learnable}, full={self.full}"
        )


class InvertibleUpsampling(Inverse):
    """Orthogonal transposed convolution ``(B, C, *S) -> (B, C / P, *S * s)``, log-det 0.

    The inverse of an :class:`InvertibleDownsampling` with ``C / P`` channels, its own
    (untied) parameters: forward is its transposed convolution (``M^T`` per patch),
    inverse its strided convolution. ``init="haar"`` is the inverse Haar transform and
    ``init="squeeze"`` is depth-to-space (the inverse of ``Squeeze`` in 2D).

    Args:
        channels: input (coarse) channels ``C``; must be divisible by ``P = prod(stride)``.
        stride, method, init, learnable, dims, full: as for
            :class:`InvertibleDownsampling`.

    Example:
        >>> import torch
        >>> up = InvertibleUpsampling(8, stride=(2, 2, 2))
        >>> up(torch.randn(1, 8, 2, 3, 4))[0].shape
        torch.Size([1, 1, 4, 6, 8])
    """

    def __init__(
        self,
        channels: int,
        stride: int | tuple[int, ...] = 2,
        method: str = "exp",
        init: str = "haar",
        learnable: bool = True,
        dims: int | None = None,
        full: bool = False,
    ) -> None:
        strides = _as_stride(stride, dims, "InvertibleUpsampling")
        check_resampling(method, init, strides, "InvertibleUpsampling")
        factor = math.prod(strides)
        if channels % factor:
            raise ValueError(
                f"InvertibleUpsampling: channels ({channels}) must be divisible by the stride "
                f"product {factor} (stride {strides})"
            )
        super().__init__(
            InvertibleDownsampling(channels // factor, strides, method, init, learnable, full=full)
        )

    @property
    def downsampling(self) -> InvertibleDownsampling:
        """The :class:`InvertibleDownsampling` this layer inverts."""
        return self.bijector
