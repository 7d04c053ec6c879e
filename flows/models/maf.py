"""Masked autoregressive flow for vectors."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from flows.models.context import base_distribution, conditioning
from flows.models.flow import Flow, check_sizes
from flows.transforms.autoregressive import MaskedAutoregressive
from flows.transforms.chain import Chain
from flows.transforms.permute import Permute


def MAF(
    input_shape: Sequence[int],
    steps: int = 5,
    hidden_channels: int = 64,
    transform: str = "affine",
    bins: int = 8,
    tail_bound: float = 5.0,
    context_features: int | None = None,
    num_classes: int | None = None,
    embedding: nn.Module | None = None,
    n_levels: int = 256,
    scale: str = "softplus",
) -> Flow:
    """Masked autoregressive flow (Papamakarios et al. 2017, arXiv:1705.07057) for ``(D,)`` vectors.

    ``steps`` :class:`~flows.transforms.MaskedAutoregressive` blocks (a MADE with two
    hidden layers of ``hidden_channels``; ``"affine"`` ``z = s x + t``, ``s = softplus(a) +
    10^-3``, or ``"spline"`` elementwise maps),
    the feature order reversed between blocks. Density evaluation is one pass per block;
    sampling ``D`` passes per block. Base ``N(0, I)``, or a context-predicted Gaussian for
    a conditional model. Its blocks opt out of memory-saving backward (see
    :class:`~flows.transforms.MaskedAutoregressive`).

    Args:
        input_shape: ``(D,)`` with ``D >= 2``.
        steps: autoregressive blocks.
        hidden_channels: MADE width.
        transform: ``"affine"`` (MAF) or ``"spline"`` (autoregressive NSF).
        bins: spline bins.
        tail_bound: spline interval half-width.
        context_features: a conditional model on ``(B, C)`` float contexts.
        num_classes: a class-conditional model on int64 labels, embedded inside it in
            ``context_features`` features (16 if not given).
        embedding: a network mapping the context to ``context_features`` features.
        n_levels: levels of discrete data, for ``bits_per_dim``.
        scale: the affine scale map, ``"softplus"`` or ``"tanh"`` (``exp(tanh a)``, the
            default of defaults version 3; see :class:`~flows.transforms.MaskedAutoregressive`).

    Example:
        >>> import torch
        >>> model = MAF((4,), steps=2, hidden_channels=16)
        >>> model.log_prob(torch.randn(3, 4)).shape
        torch.Size([3])
    """
    shape = check_sizes("MAF", input_shape, vector_only=True, steps=steps, hidden_channels=hidden_channels)
    features, embed = conditioning("MAF", context_features, num_classes, embedding)
    d = shape[0]
    blocks: list = []
    for k in range(steps):
        if k:
            blocks.append(Permute(d))
        blocks.append(
            MaskedAutoregressive(
                d,
                hidden_channels,
                transform,
                bins=bins,
                tail_bound=tail_bound,
                context_features=features,
                scale=scale,
            )
        )
    base = base_distribution(shape, features, hidden_channels)
    return Flow(Chain(*blocks), base, shape, n_levels, conditional=features is not None, embedding=embed)
