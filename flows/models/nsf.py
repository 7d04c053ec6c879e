"""Neural spline flow for vectors: rational-quadratic spline couplings and LU linear maps."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from flows.models.context import base_distribution, conditioning
from flows.models.flow import Flow, check_sizes
from flows.transforms.chain import Chain
from flows.transforms.inv_conv import InvConv1x1
from flows.transforms.masks import channel_mask
from flows.transforms.spline import RationalQuadraticCoupling


def NSF(
    input_shape: Sequence[int],
    steps: int = 5,
    hidden_channels: int = 64,
    bins: int = 8,
    tail_bound: float = 5.0,
    context_features: int | None = None,
    num_classes: int | None = None,
    embedding: nn.Module | None = None,
    n_levels: int = 256,
) -> Flow:
    """Neural spline flow (Durkan et al. 2019, arXiv:1906.04032, RQ-NSF (C)) for ``(D,)`` vectors.

    ``steps`` times: a learned invertible linear map (LU-parametrised,
    :class:`~flows.transforms.InvConv1x1` on vectors: ``W = P L (U + diag(s))``,
    ``log|det W| = sum log|s|``), then a :class:`~flows.transforms.RationalQuadraticCoupling`
    of ``bins`` bins on ``[-tail_bound, tail_bound]`` (identity outside) whose MLP
    conditioner (two hidden layers of ``hidden_channels``) sees the other half of the
    features, and the context when conditional; the halves alternate. Base ``N(0, I)``,
    or for a conditional model a Gaussian whose mean and scale the context predicts.

    Args:
        input_shape: ``(D,)`` with ``D >= 2``.
        steps: linear map + coupling pairs.
        hidden_channels: conditioner width.
        bins: spline bins.
        tail_bound: half-width of the spline's interval.
        context_features: a conditional model on ``(B, C)`` float contexts, e.g. the
            observation ``x`` of a posterior ``q(theta | x)``.
        num_classes: a class-conditional model on int64 labels, embedded inside it.
        embedding: a network mapping the context to ``context_features`` features.
        n_levels: levels of discrete data, for ``bits_per_dim``.

    Example:
        >>> import torch
        >>> posterior = NSF((5,), steps=2, hidden_channels=16, context_features=5)
        >>> posterior.sample(3, context=torch.randn(3, 5)).shape
        torch.Size([3, 5])
    """
    shape = check_sizes("NSF", input_shape, steps=steps, hidden_channels=hidden_channels, bins=bins)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"NSF: input_shape must be (D,) with D >= 2 features, got {shape}")
    features, embed = conditioning("NSF", context_features, num_classes, embedding)
    d = shape[0]
    blocks = []
    for k in range(steps):
        coupling = RationalQuadraticCoupling(
            channel_mask(d, k % 2),
            bins=bins,
            tail_bound=tail_bound,
            hidden_channels=hidden_channels,
            image=False,
            context_features=features,
        )
        blocks.append(Chain(InvConv1x1(d, lu=True), coupling))
    base = base_distribution(shape, features, hidden_channels)
    return Flow(Chain(*blocks), base, shape, n_levels, conditional=features is not None, embedding=embed)
