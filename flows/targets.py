"""Unnormalised target densities for variational inference (:mod:`flows.variational`).

A target is known up to its normaliser: ``log_prob(x) = log p*(x)`` with
``p(x) = p*(x) / Z``. Each target is a small :class:`Target` with ``dim``, ``log_prob``
and ``log_normalizer`` (``log Z``): in closed form where there is one, by quadrature on a
fine grid for the 2D energies (cached; exact to about ``1e-6`` nats there), so the
log-normaliser estimate of a fit can be checked on every target. :data:`TARGETS` maps the
names ``flows train --objective reverse-kl --target NAME`` takes to their classes.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor, nn


class Target(nn.Module):
    """An unnormalised density ``p*(x)`` on ``R^dim``.

    Subclasses implement :meth:`log_prob` (float64-safe, on the input's device and dtype)
    and set ``dim`` (buffers are cast to the input's device and dtype on use, so a target is
    never moved); ``log_normalizer`` is ``log Z = log int p*(x) dx``. 2D targets give
    ``bounds``, a box holding all but a negligible part of the mass (the quadrature's
    domain, and the view of figures).

    Attributes:
        dim: the dimension.
        bounds: ``(lo, hi)`` of the square box ``[lo, hi]^2`` of a 2D target, else ``None``.
        modes: the number of well-separated modes of equal mass. A fit whose samples
            cover ``m`` of them estimates ``log Z`` low by ``log(modes / m)``
            (:func:`modes_covered` inverts that), which its ESS cannot show.
    """

    dim: int = 2
    bounds: tuple[float, float] | None = None
    modes: int = 1

    def log_prob(self, x: Tensor) -> Tensor:  # pragma: no cover
        """``log p*(x)`` of each row of ``x``, ``(B,)`` for ``x`` of shape ``(B, dim)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """:meth:`log_prob`."""
        return self.log_prob(x)

    @cached_property
    def log_normalizer(self) -> float:
        """``log Z``: by the midpoint rule on a 1000 x 1000 grid over ``bounds`` (2D).

        The integrand is smooth and negligible at the box's edges, where the midpoint rule
        converges faster than any power of the spacing: 1000 and 2000 points per axis agree
        to 1e-9 nats on the targets here.
        """
        if self.bounds is None or self.dim != 2:
            raise NotImplementedError(f"{type(self).__name__}: no log normaliser")
        lo, hi = self.bounds
        n = 1000
        h = (hi - lo) / n
        axis = lo + h * (torch.arange(n, dtype=torch.float64) + 0.5)
        total = []
        for row in axis.split(250):  # 250 x 1000 points at a time
            grid = torch.stack(torch.meshgrid(row, axis, indexing="ij"), -1).reshape(-1, 2)
            total.append(torch.logsumexp(self.log_prob(grid), 0))
        return float(torch.logsumexp(torch.stack(total), 0)) + 2 * math.log(h)

    def _check(self, x: Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: expected points of shape (B, {self.dim}), got {shape}")


class RingMixture(Target):
    """Equal mixture of ``k`` isotropic Gaussians on a circle of radius ``radius``.

    ``log p*(x) = logsumexp_j(-|x - m_j|^2 / (2 s^2))`` with ``m_j = r (cos 2 pi j/k,
    sin 2 pi j/k)``, so ``Z = k 2 pi s^2``. Well-separated modes: a mode-seeking reverse
    KL fit that drops one estimates ``log Z`` low by ``log(k/(k-1))``, which its ESS
    (computed from its own samples) does not show.

    Example:
        >>> import torch
        >>> target = RingMixture()
        >>> target.log_prob(torch.zeros(1, 2)).shape, round(target.log_normalizer, 4)
        (torch.Size([1]), 2.0847)
    """

    bounds = (-5.0, 5.0)

    def __init__(self, k: int = 8, radius: float = 3.0, scale: float = 0.4) -> None:
        super().__init__()
        self.k, self.radius, self.scale = k, radius, scale
        self.modes = k
        angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
        self.register_buffer("means", radius * torch.stack([angle.cos(), angle.sin()], 1), persistent=False)

    def log_prob(self, x: Tensor) -> Tensor:
        self._check(x)
        d2 = (x[:, None, :] - self.means.to(x)).pow(2).sum(-1)
        return torch.logsumexp(-0.5 * d2 / self.scale**2, dim=1)

    @cached_property
    def log_normalizer(self) -> float:
        return math.log(self.k * 2 * math.pi * self.scale**2)


class TwoMoons(Target):
    """A two-moons energy in the form of Rezende & Mohamed's ``U_1`` (its ring narrower: 0.2, not 0.4).

    ``log p*(x) = -(|x| - 2)^2 / (2 * 0.2^2) + log(exp(-(x_1 - 2)^2 / (2 * 0.6^2)) +
    exp(-(x_1 + 2)^2 / (2 * 0.6^2)))``: a ring of radius 2 with two lobes at
    ``x_1 = +-2``. ``Z`` by quadrature.

    References:
        Rezende, Mohamed. Variational Inference with Normalizing Flows. arXiv:1505.05770.

    Example:
        >>> round(TwoMoons().log_normalizer, 3)
        1.23
    """

    bounds = (-4.0, 4.0)
    modes = 2

    def log_prob(self, x: Tensor) -> Tensor:
        self._check(x)
        ring = -0.5 * ((x.norm(dim=1) - 2) / 0.2).pow(2)
        lobes = torch.logaddexp(-0.5 * ((x[:, 0] - 2) / 0.6).pow(2), -0.5 * ((x[:, 0] + 2) / 0.6).pow(2))
        return ring + lobes


class DoubleWell(Target):
    """A 2D double well: ``log p*(x) = -barrier (x_1^2 - 1)^2 - x_2^2 / 2``.

    Two modes at ``x_1 = +-1`` separated by a barrier of ``barrier`` nats at ``x_1 = 0``
    (a Boltzmann-generator test system). ``Z = sqrt(2 pi) int exp(-barrier (t^2 - 1)^2)
    dt``, by quadrature.

    Example:
        >>> round(DoubleWell().log_normalizer, 3)
        0.865
    """

    bounds = (-6.0, 6.0)
    modes = 2

    def __init__(self, barrier: float = 4.0) -> None:
        super().__init__()
        self.barrier = barrier

    def log_prob(self, x: Tensor) -> Tensor:
        self._check(x)
        return -self.barrier * (x[:, 0].pow(2) - 1).pow(2) - 0.5 * x[:, 1].pow(2)


class CorrelatedGaussian(Target):
    """An unnormalised correlated Gaussian in ``dim`` dimensions.

    ``log p*(x) = -(x - m)^T S^{-1} (x - m) / 2`` with ``S_ij = s_i s_j rho^|i - j|`` (an
    AR(1) correlation, scales ``s_i`` log-spaced over ``[0.5, 2]``) and ``m_i`` a ramp over
    ``[-1, 1]``, so ``log Z = dim/2 log(2 pi) + log det S / 2``, exactly.

    Args:
        dim: the dimension (10 to 50 in the experiments).
        rho: the correlation of neighbours, in ``(-1, 1)``.

    Example:
        >>> import torch
        >>> target = CorrelatedGaussian(10)
        >>> target.log_prob(target.mean[None]).item() == 0
        True
    """

    def __init__(self, dim: int = 20, rho: float = 0.9) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"CorrelatedGaussian: dim must be an integer >= 1, got {dim!r}")
        if not -1 < rho < 1:
            raise ValueError(f"CorrelatedGaussian: rho must be in (-1, 1), got {rho!r}")
        self.dim, self.rho = dim, rho
        i = torch.arange(dim, dtype=torch.float64)
        scales = torch.logspace(math.log10(0.5), math.log10(2.0), dim, dtype=torch.float64)
        covariance = scales[:, None] * scales[None, :] * rho ** (i[:, None] - i[None, :]).abs()
        self.register_buffer("mean", torch.linspace(-1.0, 1.0, dim, dtype=torch.float64), persistent=False)
        self.register_buffer("cholesky", torch.linalg.cholesky(covariance), persistent=False)

    def log_prob(self, x: Tensor) -> Tensor:
        self._check(x)
        centred = (x - self.mean.to(x)).T
        u = torch.linalg.solve_triangular(self.cholesky.to(x), centred, upper=False)
        return -0.5 * u.pow(2).sum(0)

    @cached_property
    def log_normalizer(self) -> float:
        return 0.5 * self.dim * math.log(2 * math.pi) + float(self.cholesky.diagonal().log().sum())


def modes_covered(target: Target, log_z_error: float) -> int:
    """How many of ``target``'s equal-mass modes a fit covers, from its ``log Z`` error.

    An importance-sampling estimate from ``q``'s samples sees only the mass where ``q``
    puts samples: ``m`` modes of ``modes`` give ``log Z_hat - log Z ~ log(m / modes)``, so
    ``m = round(modes * exp(error))``, clipped to ``[0, modes]``. A mode ``q`` covers
    thinly still counts (its weights make up the mass), so this counts modes lost.

    Example:
        >>> import math
        >>> modes_covered(TwoMoons(), -math.log(2) + 0.01), modes_covered(RingMixture(), -0.02)
        (1, 8)
    """
    return min(target.modes, max(0, round(target.modes * math.exp(log_z_error))))


TARGETS: dict[str, type[Target]] = {
    "ring": RingMixture,
    "two-moons": TwoMoons,
    "double-well": DoubleWell,
    "gaussian": CorrelatedGaussian,
}
"""Target name -> class (built with its defaults by the command line)."""


def make_target(name: str) -> Target:
    """The target called ``name`` (a key of :data:`TARGETS`), with its default settings.

    Raises:
        ValueError: an unknown name, listing the known ones.

    Example:
        >>> make_target("gaussian").dim
        20
    """
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]()
