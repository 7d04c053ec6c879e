"""Monotone rational-quadratic splines (Neural Spline Flows) and their coupling layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.transforms.base import Bijector, Reconstruction, check_count
from flows.transforms.coupling import MaskedCoupling


def _edges(raw: Tensor, bound: float, minimum: Tensor | float) -> Tensor:
    """Knot positions ``(..., K + 1)`` on ``[-bound, bound]`` from unnormalised bin sizes
    ``raw`` ``(..., K)``: each bin at least ``minimum`` of the interval.

    A softmax with the floor folded in: ``e = exp(raw - max)``, each size ``e_k + c S``
    (``S = sum e``, ``c = minimum / (1 - K minimum)``), normalised by its cumulative sum's
    last entry, so both ends are exactly ``-bound`` and ``bound`` (the identity tails meet
    the spline bitwise). Written out rather than ``torch.softmax``: on CPU that kernel
    took ~0.13 us per row of 8 bins, about 5x these few elementwise ops
    (``docs/vector.md``).
    """
    bins = raw.shape[-1]
    e = torch.exp(raw - raw.detach().amax(-1, keepdim=True))  # the shift cancels; no overflow
    sizes = e + (minimum / (1 - minimum * bins)) * e.sum(-1, keepdim=True)
    cumulative = F.pad(torch.cumsum(sizes, -1), (1, 0))
    return (cumulative / cumulative[..., -1:]) * (2 * bound) - bound


def check_spline_settings(name: str, bins: object, tail_bound: object) -> None:
    check_count(bins, f"{name}: bins", 2)
    if not (isinstance(tail_bound, (int, float)) and math.isfinite(tail_bound) and tail_bound > 0):
        raise ValueError(f"{name}: tail_bound must be a positive number, got {tail_bound!r}")


def _checked_bins(size: int, bound: float, min_width: float, min_height: float, min_derivative: float) -> int:
    """The number of bins ``K`` of a ``(..., 3K - 1)`` parameter row, the settings checked (a
    bound, minimum bin sizes and slope for which the spline exists), else one ``ValueError``."""
    if size < 5 or (size + 1) % 3:
        raise ValueError(
            f"rational_quadratic_spline: parameters must end in 3K - 1 values for K >= 2 bins, got {size}"
        )
    bins = (size + 1) // 3
    if not bound > 0:
        raise ValueError(f"rational_quadratic_spline: the bound must be > 0, got {bound!r}")
    if not (0 <= min_width * bins < 1 and 0 <= min_height * bins < 1):
        raise ValueError(
            f"rational_quadratic_spline: minimum bin sizes {min_width!r} / {min_height!r} leave no room for "
            f"{bins} bins; give them below 1/{bins}"
        )
    if not 0 <= min_derivative < 1:
        raise ValueError(f"rational_quadratic_spline: min_derivative must be in [0, 1), got {min_derivative!r}")
    return bins


def spline_from_parameters(
    x: Tensor,
    parameters: Tensor,
    bound: float = 3.0,
    inverse: bool = False,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """:func:`rational_quadratic_spline` with its parameters packed in one tensor.

    ``parameters`` is ``(..., 3K - 1)``: ``K`` raw widths, ``K`` raw heights, ``K - 1`` raw
    interior derivatives, the layout a conditioner's output slices into without a copy
    (the coupling and MAF blocks call this directly). Its leading shape broadcasts
    against ``x``'s: shared parameters (``(D, 3K - 1)`` for ``(B, D)`` inputs) build their
    knots once, not once per row.
    """
    bins = _checked_bins(parameters.shape[-1], bound, min_width, min_height, min_derivative)
    raw = parameters[..., : 2 * bins].unflatten(-1, (2, bins))
    floor = min_width if min_width == min_height else raw.new_tensor([[min_width], [min_height]])
    edges = _edges(raw, bound, floor)  # (..., 2, K + 1): x knots, y knots
    shift = math.log(math.expm1(1 - min_derivative))  # a zero raw value gives d = 1
    interior = min_derivative + F.softplus(parameters[..., 2 * bins :] + shift)
    derivatives = F.pad(interior, (1, 1), value=1.0)  # d_0 = d_K = 1: the tails' slope
    table = torch.cat([edges, derivatives.unsqueeze(-2)], dim=-2)  # (..., 3, K + 1)

    # Clamp so the spline's arithmetic stays finite outside; those entries are replaced.
    z = x.clamp(-bound, bound)
    # The bin: how many interior knots lie at or below z (K - 1 comparisons, no copy).
    k = (z.unsqueeze(-1) >= edges[..., int(inverse), 1:-1]).sum(-1)
    index = torch.stack([k, k + 1], -1).unsqueeze(-2).expand(*k.shape, 3, 2)
    table = table.expand(*k.shape, 3, bins + 1)  # a view: shared parameters are not copied
    low, high = table.gather(-1, index).unbind(-1)  # (..., 3) each: x, y, d at both knots
    x0, y0, d0 = low.unbind(-1)
    w, h, _ = (high - low).unbind(-1)
    d1 = high[..., 2]
    s = h / w
    delta = (d0 + d1).sub(s, alpha=2)
    if inverse:
        dy = z - y0
        a = torch.addcmul(h * (s - d0), dy, delta)
        b = torch.addcmul(h * d0, dy, delta, value=-1)
        c = -s * dy
        discriminant = torch.addcmul(b * b, a, c, value=-4).clamp_min(0)
        xi = (2 * c / (-b - discriminant.sqrt())).clamp(0, 1)
        out = torch.addcmul(x0, xi, w)
    else:
        xi = (z - x0) / w
    one_minus = 1 - xi
    t = xi * one_minus
    xi2 = xi * xi
    denominator = torch.addcmul(s, delta, t)
    if not inverse:
        out = torch.addcdiv(y0, h * torch.addcmul(d0 * t, s, xi2), denominator)
    inner = torch.addcmul(torch.addcmul(d1 * xi2, s, t, value=2), d0, one_minus * one_minus)
    # log(s^2 inner / denominator^2); exactly 0 at both ends (xi = 0 or 1 with d = 1 there),
    # so no mask is needed for the entries outside the bound.
    logabsdet = torch.log(inner).add(torch.log(s / denominator), alpha=2)
    # The bounds themselves take the identity too (the spline meets it there with slope 1):
    # rounding can put an inverse's xi just past 1 at y = B, where the clamp passes no gradient.
    return torch.where(x.abs() < bound, out, x), logabsdet


def rational_quadratic_spline(
    x: Tensor,
    raw_widths: Tensor,
    raw_heights: Tensor,
    raw_derivatives: Tensor,
    bound: float = 3.0,
    inverse: bool = False,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    r"""Elementwise monotone rational-quadratic spline on ``[-B, B]``, identity outside.

    ``K`` bins with widths ``w_k`` and heights ``h_k`` (softmax of the raw values, each at
    least ``min_width`` / ``min_height`` of ``2B``) join knots ``(x_k, y_k)``; the interior
    knot derivatives ``d_k = min_derivative + softplus(raw + c)`` (``c`` makes a zero raw
    value give ``d = 1``), and ``d_0 = d_K = 1`` so the spline meets the identity tails
    smoothly. In bin ``k``, with ``xi = (x - x_k) / w_k`` and ``s_k = h_k / w_k``:

    .. math::

        y = y_k + \frac{h_k [s_k \xi^2 + d_k \xi (1 - \xi)]}
                       {s_k + (d_{k+1} + d_k - 2 s_k) \xi (1 - \xi)}, \qquad
        \frac{dy}{dx} = \frac{s_k^2 [d_{k+1} \xi^2 + 2 s_k \xi (1 - \xi) + d_k (1 - \xi)^2]}
                             {[s_k + (d_{k+1} + d_k - 2 s_k) \xi (1 - \xi)]^2}.

    The inverse solves ``a xi^2 + b xi + c = 0`` for ``xi`` in ``[0, 1]`` with
    ``a = h_k (s_k - d_k) + (y - y_k) delta``, ``b = h_k d_k - (y - y_k) delta``,
    ``c = -s_k (y - y_k)``, ``delta = d_{k+1} + d_k - 2 s_k``, in the form
    ``xi = 2c / (-b - sqrt(b^2 - 4ac))``, which does not cancel when ``a`` is small.

    Args:
        x: inputs (``y`` for ``inverse=True``), any shape ``(...)``.
        raw_widths, raw_heights: ``(..., K)`` unnormalised bin widths and heights.
        raw_derivatives: ``(..., K - 1)`` unconstrained interior knot derivatives.
        bound: ``B``.
        inverse: evaluate the inverse map.
        min_width, min_height, min_derivative: floors that keep the map well conditioned.

    Returns:
        ``(output, logabsdet)`` elementwise; ``logabsdet`` is ``log|dy/dx|`` at the forward
        input (the inverse returns it too, for the point it reconstructs: negate it for the
        inverse direction's log-det).

    References:
        Durkan, Bekasov, Murray, Papamakarios. Neural Spline Flows. arXiv:1906.04032.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)  # some draws make a slope near the floor, where float32 loses digits
        >>> x = torch.linspace(-4, 4, 9)
        >>> w, h, d = torch.randn(9, 5), torch.randn(9, 5), torch.randn(9, 4)
        >>> y, logdet = rational_quadratic_spline(x, w, h, d)
        >>> x_back, _ = rational_quadratic_spline(y, w, h, d, inverse=True)
        >>> bool(torch.allclose(x_back, x, atol=1e-5))
        True
    """
    bins = raw_widths.shape[-1]
    if raw_heights.shape[-1] != bins or raw_derivatives.shape[-1] != bins - 1:
        raise ValueError(
            f"rational_quadratic_spline: expected K widths, K heights and K - 1 derivatives, got "
            f"{raw_widths.shape[-1]}, {raw_heights.shape[-1]} and {raw_derivatives.shape[-1]}"
        )
    parameters = torch.cat([raw_widths, raw_heights, raw_derivatives], dim=-1)
    return spline_from_parameters(
        x, parameters, bound, inverse, min_width=min_width, min_height=min_height, min_derivative=min_derivative
    )


class RationalQuadraticCoupling(MaskedCoupling):
    """Coupling whose transformed part goes through a rational-quadratic spline (NSF).

    ``y_A = x_A``; each element of ``x_B`` is mapped by the monotone spline of
    :func:`rational_quadratic_spline` with ``bins`` bins on ``[-tail_bound, tail_bound]``
    (identity outside), its ``3 bins - 1`` parameters predicted by the conditioner from
    ``x_A`` (and the context); ``log|det J| = sum log|dy/dx|`` over ``B``. The inverse is
    exact (the quadratic's root), so round trips hold to rounding inside and outside the
    bound. A zero conditioner output is the identity, so a fresh coupling with the default
    zero-initialised conditioner is the identity; ``identity_init=False`` gives the default
    conditioner's last layer PyTorch's default initialisation instead (a random spline
    near the identity), which trains faster from the start (the vector NSF's choice:
    with a zero last layer the hidden layers get no gradient until it has moved).

    Args:
        mask: as for :class:`~flows.transforms.coupling.MaskedCoupling`.
        bins: ``K``, the number of bins.
        tail_bound: ``B``.
        identity_init: zero-initialise the default conditioner's last layer.
        logit_scale: factor on the conditioner's raw bin widths and heights (the softmax
            logits) before the spline, ``c`` in ``softmax(c * a)``; the derivatives are
            not scaled. ``1 / sqrt(hidden)`` is nflows' and normflows' spline couplings'
            choice: flatter bins at the start and, under Adam, bin sizes that move ``c``
            times as fast, which the conditional NSF takes (``docs/vector.md``: on the
            5-D Gaussian posterior test ``log q`` 4.12-4.15 -> 4.24-4.25 on three seeds).
        transform_kept: also map the conditioning half, by a learned unconditional spline
            ``y_A = RQS(x_A; phi)`` with ``phi`` a ``(|A|, 3K - 1)`` parameter (zero at
            first: the identity), the NSF paper's eqs. 4-6; vectors only. The conditioner
            still sees ``x_A``, so the inverse undoes the kept half's spline first;
            ``log|det J|`` adds that spline's log-derivatives.
        **kwargs: :class:`~flows.transforms.coupling.MaskedCoupling` arguments
            (``channels``, ``hidden_channels``, ``conditioner``, ``image``, ``dims``,
            ``context_features``).

    References:
        Durkan, Bekasov, Murray, Papamakarios. Neural Spline Flows. arXiv:1906.04032.

    Example:
        >>> import torch
        >>> from flows.transforms import channel_mask
        >>> coupling = RationalQuadraticCoupling(channel_mask(4, 0), bins=6, image=False)
        >>> x = torch.randn(3, 4)
        >>> y, logdet = coupling(x)
        >>> torch.allclose(coupling.inverse(y)[0], x), logdet.shape
        (True, torch.Size([3]))
    """

    def __init__(
        self,
        mask: Tensor,
        bins: int = 8,
        tail_bound: float = 3.0,
        identity_init: bool = True,
        transform_kept: bool = False,
        logit_scale: float = 1.0,
        **kwargs: object,
    ) -> None:
        name = type(self).__name__
        check_spline_settings(name, bins, tail_bound)
        if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"{name}: logit_scale must be a positive number, got {logit_scale!r}")
        if not identity_init and kwargs.get("conditioner") is not None:
            raise ValueError(
                f"{name}: identity_init=False re-initialises the default conditioner; "
                "initialise a conditioner you pass yourself"
            )
        self.bins = bins
        self.params_per_element = 3 * bins - 1
        super().__init__(mask, **kwargs)  # type: ignore[arg-type]
        self.tail_bound = float(tail_bound)
        if logit_scale != 1.0:
            # Not persistent: it follows from the constructor's arguments, and a state dict
            # saved without it still loads.
            factors = torch.ones(self.params_per_element)
            factors[: 2 * bins] = logit_scale
            self.register_buffer("logit_scale", factors, persistent=False)
        if not identity_init:
            self.conditioner[-1].reset_parameters()
        if transform_kept:
            if self.image:
                raise ValueError(f"{name}: transform_kept=True needs vectors (image=False) and a 1-D mask")
            # Zero: the identity on the conditioning half until trained.
            self.kept_spline = nn.Parameter(torch.zeros(len(self.kept), self.params_per_element))

    def _kept_spline(self) -> Tensor | None:
        """The kept half's spline parameters (``None``: the kept half passes unchanged; also
        for modules pickled before the option, which have no such entry)."""
        return self._parameters.get("kept_spline")

    def coupling_parameters(self, theta: Tensor) -> Tensor:
        """The conditioner's output as spline parameters, ``(B, C, *S, P)``, with the
        logits scaled (``theta`` holds them parameter-major along dim 1: ``(B, P * C, *S)``);
        one layout for :meth:`couple` and :meth:`uncouple` (and a rebuild's both)."""
        p = self.params_per_element
        theta = theta.view(theta.shape[0], p, -1, *theta.shape[2:]).movedim(1, -1)
        factors = self._buffers.get("logit_scale")  # absent: 1, also for modules pickled before it
        return theta if factors is None else theta * factors

    def couple(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return spline_from_parameters(x, theta, self.tail_bound)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        phi = self._kept_spline()
        if phi is None:
            return super().forward(x, context)
        self._check(x, context)
        kept, _ = self._split(x)
        theta = self.coupling_parameters(self._theta(kept, context))
        # One spline over all D features: the kept ones with the learned, unconditional
        # parameters, the others with the conditioner's, laid out in the input's order, so
        # the output needs no split and join and the second map costs no second call.
        shared = phi.expand(x.shape[0], -1, -1)
        parameters = self._join(shared, theta)  # (B, D, 3K - 1)
        y, logabsdet = spline_from_parameters(x, parameters, self.tail_bound)
        return y, logabsdet.sum(1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        phi = self._kept_spline()
        if phi is None:
            return super().inverse(y, context)
        self._check(y, context)
        y_kept, y_changed = self._split(y)
        # The conditioner saw the kept half before its spline: undo that first.
        kept, logabsdet_kept = spline_from_parameters(y_kept, phi, self.tail_bound, inverse=True)
        changed, logabsdet = self.uncouple(y_changed, self.coupling_parameters(self._theta(kept, context)))
        return self._join(kept, changed), -(logabsdet_kept.sum(1) + logabsdet.sum(1))

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        if self._kept_spline() is None:
            return super().reconstruct(y, context)
        # The kept half changes too, so the coupling's one-conditioner-pass rebuild (which
        # reads the conditioner's input off the output) does not apply: invert, recompute.
        return Bijector.reconstruct(self, y, context)

    def reconstruct_inverse(self, x: Tensor, context: Tensor | None = None) -> Reconstruction:
        if self._kept_spline() is None:
            return super().reconstruct_inverse(x, context)
        # As in reconstruct: with the kept half mapped, rebuild with forward, recompute.
        return Bijector.reconstruct_inverse(self, x, context)

    def uncouple(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return spline_from_parameters(y, theta, self.tail_bound, inverse=True)

    def extra_repr(self) -> str:
        factors = self._buffers.get("logit_scale")
        scale = "" if factors is None else f", logit_scale={factors[0].item():.4g}"
        return f"bins={self.bins}, tail_bound={self.tail_bound}{scale}"

