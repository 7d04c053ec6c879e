"""i-ResNet: a multi-scale flow of invertible residual blocks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from flows.models.context import base_distribution, conditioning
from flows.models.flow import Flow, check_sizes
from flows.models.multiscale import DOWNSAMPLINGS, MultiScale, Shape, squeeze_block
from flows.transforms.actnorm import ActNorm
from flows.transforms.base import Bijector
from flows.transforms.chain import Chain
from flows.transforms.residual import ResidualBlock


def IResNet(
    input_shape: Sequence[int],
    levels: int = 3,
    blocks: int = 4,
    hidden_channels: int = 64,
    lipschitz: float = 0.9,
    logdet: str = "series",
    n_terms: int = 5,
    n_probes: int = 1,
    actnorm: bool = True,
    split_prior: bool = False,
    logit_alpha: float | None = 0.05,
    n_levels: int = 256,
    downsampling: str = "squeeze",
    context_features: int | None = None,
    num_classes: int | None = None,
    embedding: nn.Module | None = None,
    **block_kwargs: Any,
) -> Flow:
    """Invertible residual network (Behrmann et al. 2019) as a multi-scale :class:`Flow`.

    Every block is ``x -> ActNorm -> x + g(x)`` with ``Lip(g) < 1`` (a
    :class:`~flows.transforms.ResidualBlock`); the flow's log-det sums the ActNorm terms and
    each block's ``log det(I + J_g)``, estimated by the block's ``logdet`` mode.

    Images ``(C, H, W)``: each level downsamples 2x2 (squeeze by default), runs ``blocks``
    blocks with the i-ResNet conv ``g`` (3x3 -> 1x1 -> 3x3 convs, LipSwish) and factors out
    half of the channels; the last level keeps all. Inputs are dequantized pixels in
    ``[0, 1]`` passed through ``Logit(logit_alpha)`` first. Vectors ``(D,)``:
    ``levels * blocks`` blocks with MLP ``g``, no preprocessing.

    ``"series"`` (the paper's estimator) is biased by its truncation; train with it or with
    ``"unbiased"`` and report likelihoods with :func:`logdet_mode` set to ``"exact"`` (small
    inputs) or a long series with many probes.

    Args:
        input_shape: ``(C, H, W)`` or ``(D,)``.
        levels: number of scales.
        blocks: residual blocks per level.
        hidden_channels: width of ``g``.
        lipschitz: spectral-norm coefficient of every layer of ``g``, in ``(0, 1)``.
        logdet: ``"series"``, ``"unbiased"`` or ``"exact"``.
        n_terms: terms of the power series (``"series"``).
        n_probes: Hutchinson probes per sample.
        actnorm: an :class:`~flows.transforms.ActNorm` before every block.
        split_prior: learned prior for factored-out halves.
        logit_alpha: Logit preprocessing margin (``None``: no preprocessing).
        n_levels: grey levels of the data, for ``bits_per_dim``.
        downsampling: ``"squeeze"``, ``"haar"`` or ``"learned"`` (see
            :func:`~flows.models.multiscale.squeeze_block`).
        context_features: a conditional model on ``(B, C)`` float contexts (or the width
            of the class or user embedding). The context enters each ``g`` as a learned
            shift of its input, so the Lipschitz constraint is in ``x`` only; split priors
            and the top prior (a context-predicted Gaussian) see it too.
        num_classes: a class-conditional model on int64 labels, embedded inside it.
        embedding: a network mapping the context to ``context_features`` features.
        **block_kwargs: further :class:`~flows.transforms.ResidualBlock` arguments
            (``inverse_tol``, ``max_iter``, ``n_exact_terms``, ...).

    References:
        Behrmann et al., "Invertible Residual Networks", arXiv:1811.00995.

    Example:
        >>> import torch
        >>> model = IResNet((1, 8, 8), levels=2, blocks=1, hidden_channels=8)
        >>> model.log_prob(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3])
    """
    shape = check_sizes(
        "IResNet", input_shape, splits_features=False, levels=levels, blocks=blocks, hidden_channels=hidden_channels,
        n_terms=n_terms, switches={"actnorm": actnorm, "split_prior": split_prior},
        choices={"downsampling": (downsampling, DOWNSAMPLINGS)},
    )
    features, embed = conditioning("IResNet", context_features, num_classes, embedding)
    conditional = {"conditional": features is not None, "embedding": embed}
    settings = dict(lipschitz=lipschitz, logdet=logdet, n_terms=n_terms, n_probes=n_probes, **block_kwargs)
    settings["context_features"] = features

    def step(residual: ResidualBlock, channels: int) -> Bijector:
        return Chain(ActNorm(channels), residual) if actnorm else residual

    if len(shape) == 1:
        steps = [
            step(ResidualBlock.mlp(shape[0], hidden_channels, **settings), shape[0]) for _ in range(levels * blocks)
        ]
        return Flow(Chain(*steps), base_distribution(shape, features, hidden_channels), shape, n_levels, **conditional)

    def build_level(level: int, tail: Shape) -> list[tuple[Bijector, Shape, Shape]]:
        down = squeeze_block(tail, downsampling)
        c = down[2][0]
        residuals = [
            (step(ResidualBlock.conv(c, hidden_channels, **settings), c), down[2], down[2]) for _ in range(blocks)
        ]
        return [down, *residuals]

    bijector = MultiScale(shape, levels, build_level, logit_alpha, split_prior, hidden_channels, features)
    base = base_distribution((bijector[-1].size,), features, hidden_channels)
    return Flow(bijector, base, shape, n_levels, **conditional)


@contextmanager
def logdet_mode(model: nn.Module, mode: str, **settings: Any) -> Iterator[None]:
    """Temporarily switch the log-det estimator of every :class:`ResidualBlock` in ``model``.

    Example: ``with logdet_mode(model, "exact"): bpd = model.bits_per_dim(x)`` reports the
    exact likelihood of a model trained with the series estimator; ``settings`` may also
    set ``n_terms`` and ``n_probes``.
    """
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    if not blocks:
        raise ValueError(f"logdet_mode: {type(model).__name__} holds no ResidualBlock")
    saved = [(b.logdet_mode, {k: getattr(b, k) for k in settings}) for b in blocks]
    for b in blocks:
        b.set_logdet(mode, **settings)
    try:
        yield
    finally:
        for b, (old_mode, old_settings) in zip(blocks, saved):
            b.set_logdet(old_mode, **old_settings)
