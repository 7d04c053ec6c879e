"""Conditional datasets ``p(x | c)`` whose conditional densities are known.

Each dataset's examples are what a conditional flow models and its context (``train_context``
/ ``test_context``, float ``(N, C)``) is what it conditions on. The true conditional
log-density comes with each, so the gap of a trained ``q(x | c)`` to it is an expected KL
divergence, ``E_{c, x ~ p}[log p(x | c) - log q(x | c)] >= 0``, whose floor is 0. Neither
dataset is standardised: the closed forms hold for the stored values as they are.

- ``gaussian-linear`` (simulation-based inference; Lueckmann et al. 2021, "Benchmarking
  Simulation-Based Inference", arXiv:2101.04653): ``theta ~ N(0, I_5)``,
  ``x | theta ~ N(theta, s^2 I_5)`` with ``s = 0.1``. The examples are ``theta``, the context
  is the observation ``x``, and the posterior is Gaussian:
  ``p(theta | x) = N(x / (1 + s^2), s^2 / (1 + s^2) I)`` (precision ``1 + 1 / s^2``), see
  :func:`gaussian_linear_log_posterior`.
- ``rotated-moons``: ``c ~ U[0, 1]``, ``x = R(pi c) m`` with ``m`` a point of the (unstandardised)
  two-moons density and ``R(a)`` the rotation by ``a`` about the origin; the context is ``c``.
  See :func:`rotated_moons_log_density`.

Example:
    >>> data = gaussian_linear(n_train=100, n_test=10)
    >>> tuple(data.train.shape), tuple(data.train_context.shape)
    ((100, 5), (100, 5))
    >>> gaussian_linear_log_posterior(data.test, data.test_context).shape
    torch.Size([10])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from flows.data.dataset import Dataset
from flows.data.toys import _as_tensor, _moons

GAUSSIAN_LINEAR_DIM = 5
"""Dimension of ``theta`` and of ``x`` in the Gaussian linear task."""

GAUSSIAN_LINEAR_NOISE = 0.1
"""Standard deviation ``s`` of the observation noise of the Gaussian linear task."""

MOONS_NOISE = 0.06
"""Standard deviation of the Gaussian noise of the two-moons density (``toys._moons``)."""

QUADRATURE_NODES = 512
"""Gauss-Legendre nodes over the half-circle parameter in :func:`rotated_moons_log_density`."""


def _check_sizes(name: str, n_train: int, n_test: int) -> None:
    if n_train < 2 or n_test < 1:
        raise ValueError(f"{name}: need n_train >= 2 and n_test >= 1, got {n_train}, {n_test}")


def gaussian_linear(
    n_train: int = 20000, n_test: int = 5000, seed: int = 0, noise: float = GAUSSIAN_LINEAR_NOISE
) -> Dataset:
    """The Gaussian linear inference task as a conditional :class:`Dataset`.

    ``theta ~ N(0, I_5)`` and ``x = theta + noise * eps`` with ``eps ~ N(0, I_5)``. The
    examples are ``theta`` ``(N, 5)``, the context the observations ``x`` ``(N, 5)``; a flow
    trained on it is a posterior estimate ``q(theta | x)``.

    Args:
        n_train: training pairs.
        n_test: test pairs.
        seed: seed of the numpy generator; the same seed gives the same pairs.
        noise: the observation noise ``s`` (> 0).

    Returns:
        A continuous :class:`Dataset` named ``gaussian-linear``, shape ``(5,)``, float32,
        with ``train_context`` / ``test_context``; not standardised.
    """
    _check_sizes("gaussian-linear", n_train, n_test)
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(f"gaussian-linear: noise must be a finite number > 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    theta = rng.normal(size=(n, GAUSSIAN_LINEAR_DIM))
    x = theta + noise * rng.normal(size=(n, GAUSSIAN_LINEAR_DIM))
    return Dataset(
        "gaussian-linear",
        _as_tensor(theta[:n_train]),
        _as_tensor(theta[n_train:]),
        None,
        (GAUSSIAN_LINEAR_DIM,),
        train_context=_as_tensor(x[:n_train]),
        test_context=_as_tensor(x[n_train:]),
    )


def gaussian_linear_log_posterior(theta: Tensor, x: Tensor, noise: float = GAUSSIAN_LINEAR_NOISE) -> Tensor:
    """The exact posterior log-density ``log p(theta | x)`` of the Gaussian linear task.

    With prior ``N(0, I)`` and likelihood ``N(x; theta, s^2 I)`` the posterior is Gaussian with
    precision ``1 + 1 / s^2``, mean ``x / (1 + s^2)`` and variance ``v = s^2 / (1 + s^2)``:
    ``log p(theta | x) = -|theta - x / (1 + s^2)|^2 / (2 v) - (D / 2) log(2 pi v)``.
    For ``s = 0.1``: ``N(x / 1.01, I / 101)``.

    Args:
        theta: parameters ``(N, D)``.
        x: observations ``(N, D)``, one per row of ``theta``.
        noise: the observation noise ``s``.

    Returns:
        ``(N,)``, computed in float64 and returned in ``theta``'s dtype.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 5)
        >>> round(float(gaussian_linear_log_posterior(torch.zeros(1, 5), x)), 4)  # 2.5 log(101 / 2pi)
        6.9431
    """
    if theta.dim() != 2 or x.shape != theta.shape:
        raise ValueError(
            f"gaussian_linear_log_posterior: theta and x must both be (N, D), got {tuple(theta.shape)} "
            f"and {tuple(x.shape)}"
        )
    t, o = theta.double(), x.double().to(theta.device)
    variance = noise**2 / (1 + noise**2)
    mean = o / (1 + noise**2)
    d = theta.shape[1]
    log_p = -((t - mean) ** 2).sum(1) / (2 * variance) - 0.5 * d * math.log(2 * math.pi * variance)
    return log_p.to(theta.dtype)


def _rotate(points: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate each row of ``points`` ``(N, 2)`` by its ``angle`` ``(N,)`` counter-clockwise."""
    c, s = np.cos(angle), np.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return np.stack([c * x - s * y, s * x + c * y], 1)


def rotated_moons(n_train: int = 20000, n_test: int = 5000, seed: int = 0) -> Dataset:
    """Two moons rotated by an angle the context sets, as a conditional :class:`Dataset`.

    ``c ~ U[0, 1]`` and ``x = R(pi c) m``, with ``m`` drawn from the two-moons density (two
    half circles of radius 1 with Gaussian noise of standard deviation 0.06, unstandardised)
    and ``R(a)`` the counter-clockwise rotation by ``a`` about the origin.

    Args:
        n_train: training points.
        n_test: test points.
        seed: seed of the numpy generator.

    Returns:
        A continuous :class:`Dataset` named ``rotated-moons`` of shape ``(2,)`` with a
        context ``c`` of shape ``(N, 1)``; not standardised.
    """
    _check_sizes("rotated-moons", n_train, n_test)
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    moons = _moons(n, rng)
    c = rng.random(n)
    x = _rotate(moons, np.pi * c)
    context = c[:, None]
    return Dataset(
        "rotated-moons",
        _as_tensor(x[:n_train]),
        _as_tensor(x[n_train:]),
        None,
        (2,),
        train_context=_as_tensor(context[:n_train]),
        test_context=_as_tensor(context[n_train:]),
    )


@functools.lru_cache(maxsize=4)
def _moons_quadrature(nodes: int) -> tuple[Tensor, Tensor]:
    """The moons' quadrature centres ``(2 * nodes, 2)`` and log-weights ``(2 * nodes,)``, float64
    (cached; scipy's Gauss-Legendre rule, which for many nodes is much faster than numpy's
    eigenvalue one)."""
    from scipy.special import roots_legendre

    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2:
        raise ValueError(f"moons_log_density: nodes must be an integer >= 2, got {nodes!r}")
    unit, weight = roots_legendre(nodes)
    t = torch.from_numpy(0.5 * np.pi * (unit + 1))  # [-1, 1] -> [0, pi]
    # dt = (pi / 2) du, and the mixture weight is 1 / (2 pi): log w_k + log(1/4).
    log_w = torch.from_numpy(np.log(weight)) - math.log(4.0)
    upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    return torch.cat([upper, lower]), torch.cat([log_w, log_w])


def moons_log_density(points: Tensor, nodes: int = QUADRATURE_NODES, chunk: int = 2048) -> Tensor:
    """The log-density of the unstandardised two-moons toy, by quadrature.

    The moons are an equal mixture of two half circles, ``u(t) = (cos t, sin t)`` and
    ``l(t) = (1 - cos t, 1/2 - sin t)`` with ``t ~ U[0, pi]``, convolved with ``N(0, s^2 I)``,
    ``s = 0.06``:
    ``p(y) = (1 / 2pi) int_0^pi [N(y; u(t), s^2 I) + N(y; l(t), s^2 I)] dt``.
    The integral over ``t`` is a Gauss-Legendre rule with ``nodes`` nodes, summed in log
    space (logsumexp) in float64: far from the moons every term underflows in linear space.
    The integrand varies on the scale ``s`` in ``t`` (radius 1); at 512 nodes the widest gap
    between nodes is about ``s / 6`` and the log-density of points drawn from the moons
    changes by less than ``1e-9`` from 256 to 4096 nodes (a test checks it).

    Args:
        points: ``(N, 2)``.
        nodes: quadrature nodes.
        chunk: rows evaluated at once (memory grows as ``chunk * nodes``).

    Returns:
        ``(N,)`` log-densities, in ``points``' dtype.
    """
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"moons_log_density: expected points of shape (N, 2), got {tuple(points.shape)}")
    centres, log_w = _moons_quadrature(nodes)
    s2 = MOONS_NOISE**2
    log_norm = -math.log(2 * math.pi * s2)
    y = points.detach().double().cpu()
    centres_sq = (centres**2).sum(1)
    out = []
    for part in y.split(chunk):
        # |y - m|^2 = |y|^2 + |m|^2 - 2 y.m as one matmul; in float64 the cancellation costs
        # nothing that matters (|y|^2 is O(10), the terms that count are O(s^2) = O(1e-3)).
        d2 = ((part**2).sum(1, keepdim=True) + centres_sq - 2 * part @ centres.T).clamp_min(0)
        out.append(torch.logsumexp(log_w - d2 / (2 * s2), 1) + log_norm)
    return torch.cat(out).to(device=points.device, dtype=points.dtype)


def rotated_moons_log_density(x: Tensor, c: Tensor, nodes: int = QUADRATURE_NODES) -> Tensor:
    """The true conditional log-density ``log p(x | c)`` of ``rotated-moons``.

    A rotation has unit Jacobian, so ``p(x | c) = p_moons(R(-pi c) x)``, with ``p_moons``
    from :func:`moons_log_density` (quadrature in float64).

    Args:
        x: points ``(N, 2)``.
        c: contexts ``(N, 1)`` (or ``(N,)``) in ``[0, 1]``, one per point.
        nodes: quadrature nodes.

    Returns:
        ``(N,)`` log-densities, in ``x``'s dtype.

    Example:
        >>> import torch
        >>> data = rotated_moons(n_train=100, n_test=50)
        >>> log_p = rotated_moons_log_density(data.test, data.test_context)
        >>> log_p.shape, bool(torch.isfinite(log_p).all())
        (torch.Size([50]), True)
    """
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"rotated_moons_log_density: expected x of shape (N, 2), got {tuple(x.shape)}")
    angle = c.detach().double().cpu().reshape(-1)
    if angle.shape[0] != x.shape[0] or c.numel() != x.shape[0]:
        raise ValueError(
            f"rotated_moons_log_density: expected one context per point ({x.shape[0]}, 1), got {tuple(c.shape)}"
        )
    back = _rotate(x.detach().double().cpu().numpy(), -np.pi * angle.numpy())
    log_p = moons_log_density(torch.from_numpy(back), nodes=nodes)
    return log_p.to(device=x.device, dtype=x.dtype)


CONDITIONAL = {"gaussian-linear": gaussian_linear, "rotated-moons": rotated_moons}
"""Conditional datasets by name."""

LOG_DENSITIES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gaussian-linear": gaussian_linear_log_posterior,
    "rotated-moons": rotated_moons_log_density,
}
"""The true ``log p(x | c)`` of each conditional dataset, ``(examples, context) -> (N,)``, as
its loader draws it by default (``gaussian-linear`` at noise 0.1)."""
