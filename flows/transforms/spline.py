"""Monotone rational-quadratic splines (Neural Spline Flows) and their coupling layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flows.transforms.coupling import MaskedCoupling


def _knots(raw: Tensor, bound: float, minimum: float) -> tuple[Tensor, Tensor]:
    """Bin sizes from unnormalised ``raw`` (``(..., K)``): each at least ``minimum`` of the
    interval ``[-bound, bound]``, summing to it; returns ``(sizes, left edges)``."""
    bins = raw.shape[-1]
    fractions = minimum + (1 - minimum * bins) * torch.softmax(raw, dim=-1)
    edges = F.pad(torch.cumsum(fractions, dim=-1), (1, 0))
    edges = 2 * bound * edges - bound
    # Pin the last edge: rounding in the cumulative sum must not move the interval's end.
    edges = torch.cat([edges[..., :-1], torch.full_like(edges[..., :1], bound)], dim=-1)
    return edges[..., 1:] - edges[..., :-1], edges[..., :-1]


def _select(values: Tensor, index: Tensor) -> Tensor:
    return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


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
        >>> x = torch.linspace(-4, 4, 9)
        >>> w, h, d = torch.randn(9, 5), torch.randn(9, 5), torch.randn(9, 4)
        >>> y, logdet = rational_quadratic_spline(x, w, h, d)
        >>> x_back, _ = rational_quadratic_spline(y, w, h, d, inverse=True)
        >>> bool(torch.allclose(x_back, x, atol=1e-5))
        True
    """
    bins = raw_widths.shape[-1]
    if min_width * bins > 1 or min_height * bins > 1:
        raise ValueError(f"rational_quadratic_spline: minimum bin size too large for {bins} bins")
    inside = (x >= -bound) & (x <= bound)
    # Clamp so the spline's arithmetic stays finite outside; those entries are replaced.
    z = x.clamp(-bound, bound)
    widths, x_knots = _knots(raw_widths, bound, min_width)
    heights, y_knots = _knots(raw_heights, bound, min_height)
    shift = math.log(math.expm1(1 - min_derivative))
    interior = min_derivative + F.softplus(raw_derivatives + shift)
    ones = torch.ones_like(interior[..., :1])
    derivatives = torch.cat([ones, interior, ones], dim=-1)

    knots = y_knots if inverse else x_knots
    index = (torch.searchsorted(knots.contiguous(), z.unsqueeze(-1).contiguous()).squeeze(-1) - 1).clamp(0, bins - 1)
    w, h = _select(widths, index), _select(heights, index)
    xk, yk = _select(x_knots, index), _select(y_knots, index)
    d0, d1 = _select(derivatives, index), _select(derivatives[..., 1:], index)
    s = h / w
    delta = d1 + d0 - 2 * s
    if inverse:
        dy = z - yk
        a = h * (s - d0) + dy * delta
        b = h * d0 - dy * delta
        c = -s * dy
        discriminant = (b.pow(2) - 4 * a * c).clamp_min(0)
        xi = (2 * c / (-b - discriminant.sqrt())).clamp(0, 1)
        out = xk + xi * w
    else:
        xi = ((z - xk) / w).clamp(0, 1)
        out = yk + h * (s * xi.pow(2) + d0 * xi * (1 - xi)) / (s + delta * xi * (1 - xi))
    one_minus = 1 - xi
    denominator = s + delta * xi * one_minus
    numerator = s.pow(2) * (d1 * xi.pow(2) + 2 * s * xi * one_minus + d0 * one_minus.pow(2))
    logabsdet = torch.log(numerator) - 2 * torch.log(denominator)
    return torch.where(inside, out, x), torch.where(inside, logabsdet, torch.zeros_like(logabsdet))


class RationalQuadraticCoupling(MaskedCoupling):
    """Coupling whose transformed part goes through a rational-quadratic spline (NSF).

    ``y_A = x_A``; each element of ``x_B`` is mapped by the monotone spline of
    :func:`rational_quadratic_spline` with ``bins`` bins on ``[-tail_bound, tail_bound]``
    (identity outside), its ``3 bins - 1`` parameters predicted by the conditioner from
    ``x_A`` (and the context); ``log|det J| = sum log|dy/dx|`` over ``B``. The inverse is
    exact (the quadratic's root), so round trips hold to rounding inside and outside the
    bound. A zero conditioner output is the identity, so a fresh coupling with the default
    zero-initialised conditioner is the identity.

    Args:
        mask: as for :class:`~flows.transforms.coupling.MaskedCoupling`.
        bins: ``K``, the number of bins.
        tail_bound: ``B``.
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

    def __init__(self, mask: Tensor, bins: int = 8, tail_bound: float = 3.0, **kwargs: object) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"RationalQuadraticCoupling: bins must be an integer >= 2, got {bins!r}")
        if not (isinstance(tail_bound, (int, float)) and math.isfinite(tail_bound) and tail_bound > 0):
            raise ValueError(f"RationalQuadraticCoupling: tail_bound must be a positive number, got {tail_bound!r}")
        self.bins = bins
        self.params_per_element = 3 * bins - 1
        super().__init__(mask, **kwargs)  # type: ignore[arg-type]
        self.tail_bound = float(tail_bound)

    def _spline(self, x: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        # theta holds the parameters parameter-major along dim 1: (B, P * C, *S) -> (B, C, *S, P).
        p = self.params_per_element
        theta = theta.view(theta.shape[0], p, -1, *theta.shape[2:]).movedim(1, -1)
        k = self.bins
        widths, heights, derivatives = theta[..., :k], theta[..., k : 2 * k], theta[..., 2 * k :]
        return rational_quadratic_spline(x, widths, heights, derivatives, self.tail_bound, inverse=inverse)

    def couple(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(x, theta, inverse=False)

    def uncouple(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(y, theta, inverse=True)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, tail_bound={self.tail_bound}"
