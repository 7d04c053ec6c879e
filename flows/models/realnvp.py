"""RealNVP: checkerboard and channel-masked affine (or spline) couplings in a multi-scale flow."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from flows.models.context import CONTEXT_CHANNELS, base_distribution, conditioning
from flows.models.flow import Flow, check_sizes
from flows.models.multiscale import DOWNSAMPLINGS, MultiScale, Shape, squeeze_block
from flows.transforms.actnorm import ActNorm
from flows.transforms.affine_coupling import SCALES, AffineCoupling
from flows.transforms.base import Bijector
from flows.transforms.chain import Chain
from flows.transforms.conditioners import ResidualConditioner
from flows.transforms.inverse import Inverse
from flows.transforms.masks import channel_mask, checkerboard_mask
from flows.transforms.spline import RationalQuadraticCoupling

COUPLINGS = ("affine", "spline")
DIRECTIONS = ("density", "sampling")
SPLINE_BINS = 8


def _coupling(kind: str, mask, scale: str = "tanh", **kwargs) -> Bijector:
    """An affine coupling with log-scale map ``scale``, or a rational-quadratic spline
    coupling (``SPLINE_BINS`` bins on ``[-3, 3]``)."""
    if kind == "affine":
        return AffineCoupling(mask, scale=scale, **kwargs)
    return RationalQuadraticCoupling(mask, bins=SPLINE_BINS, **kwargs)


def _coupling_step(
    mask,
    channels: int,
    hidden_channels: int,
    res_blocks: int,
    context_features: int | None = None,
    coupling: str = "affine",
    actnorm: bool = True,
    scale: str = "tanh",
) -> Chain:
    """ActNorm (unless ``actnorm`` is False) then a coupling with a ResNet conditioner
    (which sees the context as ``CONTEXT_CHANNELS`` extra channels in a conditional model)."""
    extra = 0 if context_features is None else CONTEXT_CHANNELS
    per_element = 2 if coupling == "affine" else 3 * SPLINE_BINS - 1
    if mask.dim() == 2:
        net = ResidualConditioner(channels + extra, per_element * channels, hidden_channels, res_blocks)
    else:
        kept = int(mask.sum())
        net = ResidualConditioner(kept + extra, per_element * (channels - kept), hidden_channels, res_blocks)
    layer = _coupling(
        coupling,
        mask,
        channels=channels,
        conditioner=net,
        context_features=context_features,
        context_channels=CONTEXT_CHANNELS,
        scale=scale,
    )
    return Chain(ActNorm(channels), layer) if actnorm else Chain(layer)


def RealNVP(
    input_shape: Sequence[int],
    levels: int = 2,
    steps: int = 3,
    hidden_channels: int = 64,
    res_blocks: int = 2,
    split_prior: bool = False,
    logit_alpha: float | None = 0.05,
    n_levels: int = 256,
    downsampling: str = "squeeze",
    coupling: str = "affine",
    context_features: int | None = None,
    num_classes: int | None = None,
    embedding: nn.Module | None = None,
    actnorm: bool = True,
    direction: str = "density",
    scale: str = "tanh",
) -> Flow:
    """RealNVP (Dinh, Sohl-Dickstein, Bengio 2017, arXiv:1605.08803) as a :class:`Flow`.

    Images ``(C, H, W)``: each level but the last runs ``steps`` checkerboard-masked
    affine couplings, squeezes, runs ``steps`` channel-masked couplings and factors out
    half of the channels; the last level runs ``steps + 1`` checkerboard couplings
    (the paper's 3, squeeze, 3, and 4 at the end). Masks alternate parity. Conditioners
    are ResNets; an ActNorm precedes each coupling (in place of the paper's batch
    normalisation, which a memory-saving recompute would update twice).
    Vectors ``(D,)``: ``levels * steps`` alternating feature-masked couplings with MLP
    conditioners.

    Args:
        input_shape: ``(C, H, W)`` or ``(D,)``.
        levels: number of scales.
        steps: couplings per phase.
        hidden_channels: conditioner width.
        res_blocks: residual blocks per conditioner.
        split_prior: learned prior for factored-out halves.
        logit_alpha: Logit preprocessing margin (``None``: none).
        n_levels: grey levels of the data, for ``bits_per_dim``.
        downsampling: ``"squeeze"``, ``"haar"`` or ``"learned"`` (see
            :func:`~flows.models.multiscale.squeeze_block`).
        coupling: ``"affine"`` (the paper's) or ``"spline"`` (rational-quadratic, 8 bins
            on ``[-3, 3]``, arXiv:1906.04032).
        context_features: a conditional model on ``(B, C)`` float contexts (or the width
            of the class or user embedding): couplings, split priors and the top prior
            (a context-predicted Gaussian) all see it.
        num_classes: a class-conditional model on int64 labels, embedded inside it.
        embedding: a network mapping the context to ``context_features`` features.
        actnorm: an ActNorm before each coupling (False: couplings alone). Fitting an
            unnormalised target (:mod:`flows.variational`) showed no difference either
            way at 10 seeds (docs/variational.md).
        direction: the direction each vector coupling's map is written in. ``"density"``
            (the paper's): ``y_B = x_B exp(s) + t`` from data to latent, so sampling solves
            ``x_B = (z_B - t) exp(-s)``. ``"sampling"``: each coupling wrapped in
            :class:`~flows.transforms.Inverse`, so sampling runs ``x_B = z_B exp(s) + t``
            (normflows' and an IAF's way) and ``log_prob`` solves it; the same family and
            cost, a different parametrisation to optimise. Fitting an unnormalised target
            (:mod:`flows.variational`) by its samples lost fewer modes this way
            (docs/variational.md). Vector inputs only.
        scale: the log-scale map of the steps' affine couplings
            (:class:`~flows.transforms.AffineCoupling`): ``"tanh"`` (bounded, the default),
            ``"sigmoid"`` (Glow's) or ``"exp"`` (unbounded, as normflows writes its couplings
            for variational inference); split priors keep ``tanh``.

    Example:
        >>> import torch
        >>> model = RealNVP((1, 8, 8), levels=2, steps=2, hidden_channels=8, res_blocks=1)
        >>> model.sample(3).shape
        torch.Size([3, 1, 8, 8])
    """
    shape = check_sizes(
        "RealNVP", input_shape, levels=levels, steps=steps, hidden_channels=hidden_channels, res_blocks=res_blocks,
        switches={"split_prior": split_prior, "actnorm": actnorm},
        choices={"downsampling": (downsampling, DOWNSAMPLINGS)},
    )
    if coupling not in COUPLINGS:
        raise ValueError(f"RealNVP: coupling must be one of {COUPLINGS}, got {coupling!r}")
    if scale not in SCALES:
        raise ValueError(f"RealNVP: scale must be one of {SCALES}, got {scale!r}")
    if scale != "tanh" and coupling != "affine":
        raise ValueError(
            f"RealNVP: scale={scale!r} is for affine couplings; a spline coupling has no log-scale map: "
            "drop scale= or use coupling='affine'"
        )
    if direction not in DIRECTIONS:
        raise ValueError(f"RealNVP: direction must be one of {DIRECTIONS}, got {direction!r}")
    if direction != "density" and len(shape) != 1:
        raise ValueError(f"RealNVP: direction={direction!r} is for vector inputs (D,), got {shape}; use 'density'")
    features, embed = conditioning("RealNVP", context_features, num_classes, embedding)
    conditional = {"conditional": features is not None, "embedding": embed}
    if len(shape) == 1:
        d = shape[0]
        couplings = [
            _coupling(
                coupling, channel_mask(d, k % 2), scale, hidden_channels=hidden_channels, image=False,
                context_features=features,
            )
            for k in range(levels * steps)
        ]
        if direction == "sampling":
            couplings = [Inverse(layer) for layer in couplings]
        blocks = [Chain(*([ActNorm(d)] if actnorm else []), layer) for layer in couplings]
        return Flow(Chain(*blocks), base_distribution(shape, features, hidden_channels), shape, n_levels, **conditional)

    step_options = {
        "hidden_channels": hidden_channels, "res_blocks": res_blocks, "context_features": features,
        "coupling": coupling, "actnorm": actnorm, "scale": scale,
    }

    def checkerboard(tail: Shape, count: int) -> list[tuple[Bijector, Shape, Shape]]:
        c, h, w = tail
        return [
            (
                _coupling_step(checkerboard_mask(h, w, k % 2), c, **step_options),
                tail,
                tail,
            )
            for k in range(count)
        ]

    def build_level(level: int, tail: Shape) -> list[tuple[Bijector, Shape, Shape]]:
        if level == levels - 1:
            return checkerboard(tail, steps + 1)
        squeeze = squeeze_block(tail, downsampling)
        c = squeeze[2][0]
        channel = [
            (
                _coupling_step(channel_mask(c, k % 2), c, **step_options),
                squeeze[2],
                squeeze[2],
            )
            for k in range(steps)
        ]
        return checkerboard(tail, steps) + [squeeze] + channel

    bijector = MultiScale(shape, levels, build_level, logit_alpha, split_prior, hidden_channels, features)
    base = base_distribution((bijector[-1].size,), features, hidden_channels)
    return Flow(bijector, base, shape, n_levels, **conditional)
