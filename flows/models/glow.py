"""Glow: ActNorm, invertible 1x1 convolution and coupling, in a multi-scale flow."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from flows.models.context import base_distribution, conditioning
from flows.models.flow import Flow, check_sizes
from flows.models.multiscale import DOWNSAMPLINGS, MultiScale, Shape, squeeze_block
from flows.transforms.actnorm import ActNorm
from flows.transforms.additive_coupling import AdditiveCoupling
from flows.transforms.affine_coupling import AffineCoupling
from flows.transforms.base import Bijector
from flows.transforms.chain import Chain
from flows.transforms.inv_conv import InvConv1x1
from flows.transforms.masks import channel_mask
from flows.transforms.permute import Permute
from flows.transforms.spline import RationalQuadraticCoupling

COUPLINGS = {"affine": AffineCoupling, "additive": AdditiveCoupling, "spline": RationalQuadraticCoupling}
PERMUTATIONS = ("conv1x1", "shuffle", "reverse")


def glow_step(
    channels: int,
    hidden_channels: int,
    coupling: str = "affine",
    permutation: str = "conv1x1",
    lu: bool = True,
    image: bool = True,
    seed: int = 0,
    context_features: int | None = None,
    normalize: bool = False,
) -> Chain:
    """One step of flow: ``ActNorm -> permutation -> coupling`` on ``channels`` channels
    (the coupling conditioned on a context of ``context_features``, if given; its
    convolutional conditioner with hidden ActNorms if ``normalize``)."""
    if coupling not in COUPLINGS:
        raise ValueError(f"Glow: coupling must be one of {sorted(COUPLINGS)}, got {coupling!r}")
    if permutation == "conv1x1":
        mix: Bijector = InvConv1x1(channels, lu=lu)
    elif permutation in ("shuffle", "reverse"):
        mix = Permute(channels, permutation, seed=seed)
    else:
        raise ValueError(f"Glow: permutation must be one of {PERMUTATIONS}, got {permutation!r}")
    couple = COUPLINGS[coupling](
        channel_mask(channels, 0),
        hidden_channels=hidden_channels,
        image=image,
        context_features=context_features,
        normalize=normalize,
    )
    return Chain(ActNorm(channels), mix, couple)


def Glow(
    input_shape: Sequence[int],
    levels: int = 3,
    steps: int = 8,
    hidden_channels: int = 64,
    coupling: str = "affine",
    permutation: str = "conv1x1",
    lu: bool = True,
    split_prior: bool = True,
    normalize: bool = False,
    logit_alpha: float | None = None,
    n_levels: int = 256,
    downsampling: str = "squeeze",
    context_features: int | None = None,
    num_classes: int | None = None,
    embedding: nn.Module | None = None,
) -> Flow:
    """Glow (Kingma and Dhariwal 2018, arXiv:1807.03039) as a :class:`Flow`.

    Images ``(C, H, W)``: each level squeezes, runs ``steps`` steps of flow
    (``ActNorm -> 1x1 conv (or a fixed permutation) -> coupling``) and factors out half
    of the channels; the last level keeps all. As in the paper, there is no preprocessing by
    default: inputs may be dequantized pixels in ``[0, 1]`` or centred in ``[-0.5, 0.5]``
    (ActNorm absorbs the offset). ``logit_alpha`` puts RealNVP's ``Logit`` in front, for
    inputs in ``[0, 1]`` only. Vectors ``(D,)``: ``levels * steps`` steps with MLP
    conditioners, no squeeze, no preprocessing.

    The learned split prior (``split_prior``, the exiting half
    ``z ~ N(mu(x_kept), sigma(x_kept))``, the Glow code's default) is on by default: on 5000
    real MNIST digits (L=2, K=8, hidden 128, 500 Adam steps) it took test bits/dim from
    2.49 to 2.07 (docs/images.md). Hidden ActNorms in the conditioners (``normalize``, also
    the Glow code's) are off: there they cost 1.25x the step time and gave 2.10. Each
    squeeze halves H and W, so ``levels`` squeezes need H and W divisible by ``2**levels``.

    Args:
        input_shape: ``(C, H, W)`` or ``(D,)`` with ``D >= 2``.
        levels: number of scales.
        steps: steps of flow per level.
        hidden_channels: conditioner width.
        coupling: ``"affine"``, ``"additive"`` or ``"spline"`` (rational-quadratic,
            8 bins on ``[-3, 3]``: the NSF paper's Glow with spline couplings).
        permutation: ``"conv1x1"``, ``"shuffle"`` or ``"reverse"``.
        lu: LU-decomposed 1x1 convolution.
        split_prior: learned prior for factored-out halves (``False``: a standard normal).
        normalize: an ActNorm after each hidden convolution of every convolutional
            conditioner (couplings and split priors), as in the Glow code.
        logit_alpha: margin of a Logit preprocessing for ``[0, 1]`` inputs (``None``: none).
        n_levels: grey levels of the data, for ``bits_per_dim``.
        downsampling: ``"squeeze"``, ``"haar"`` or ``"learned"`` (see
            :func:`~flows.models.multiscale.squeeze_block`).
        context_features: a conditional model on float context vectors ``(B, C)`` (or the
            width of the class or user embedding). Every coupling sees the context, the
            split priors too, and the top prior is a Gaussian whose mean and scale the
            context predicts (the Glow code's ``ycond``).
        num_classes: a class-conditional model on int64 labels, embedded inside it in
            ``context_features`` features (16 if not given).
        embedding: a network mapping the context (e.g. an observation) to
            ``context_features`` features, trained with the flow.

    Example:
        >>> import torch
        >>> model = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=16)
        >>> model.log_prob(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4])
        >>> digits = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=16, num_classes=10)
        >>> digits.sample(3, context=torch.tensor([0, 1, 2]), temperature=0.7).shape
        torch.Size([3, 1, 8, 8])
    """
    shape = check_sizes(
        "Glow", input_shape, levels=levels, steps=steps, hidden_channels=hidden_channels,
        switches={"lu": lu, "split_prior": split_prior, "normalize": normalize},
        choices={"downsampling": (downsampling, DOWNSAMPLINGS)},
    )
    features, embed = conditioning("Glow", context_features, num_classes, embedding)
    conditional = {"conditional": features is not None, "embedding": embed}
    options = dict(coupling=coupling, permutation=permutation, lu=lu, context_features=features, normalize=normalize)
    if len(shape) == 1:
        blocks = [glow_step(shape[0], hidden_channels, image=False, seed=k, **options) for k in range(levels * steps)]
        return Flow(Chain(*blocks), base_distribution(shape, features, hidden_channels), shape, n_levels, **conditional)

    def build_level(level: int, tail: Shape) -> list[tuple[Bijector, Shape, Shape]]:
        squeeze = squeeze_block(tail, downsampling)
        c = squeeze[2][0]
        return [squeeze] + [
            (glow_step(c, hidden_channels, seed=level * steps + k, **options), squeeze[2], squeeze[2])
            for k in range(steps)
        ]

    bijector = MultiScale(
        shape, levels, build_level, logit_alpha, split_prior, hidden_channels, features, normalize=normalize
    )
    base = base_distribution((bijector[-1].size,), features, hidden_channels)
    return Flow(bijector, base, shape, n_levels, **conditional)
