"""Multi-scale architecture with factor-out (RealNVP section 3.6, Glow section 3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from flows.transforms.affine_coupling import AffineCoupling
from flows.transforms.base import Bijector
from flows.transforms.chain import Chain
from flows.transforms.downsampling import InvertibleDownsampling
from flows.transforms.logit import Logit
from flows.transforms.masks import channel_mask
from flows.transforms.reshape import Reshape
from flows.transforms.squeeze import Squeeze
from flows.transforms.tail import Tail

Shape = tuple[int, ...]
# A level builder gets the level index and the tail's shape before the level, and returns
# the level's blocks as (bijector, in_shape, out_shape) triples in application order.
LevelBuilder = Callable[[int, Shape], list[tuple[Bijector, Shape, Shape]]]


class OddSizeError(ValueError):
    """A squeeze met an odd height or width; :class:`MultiScale` rewrites it in terms of
    the model's input size, its levels and the padding that fixes it."""


class MultiScale(Chain):
    """A multi-scale flow as one chain on a flat latent, with its level boundaries.

    The chain maps ``(B, C, H, W)`` images to a flat ``(B, D)`` latent. At each level but
    the last, after the level's blocks, the first half of the channels is factored out:
    it stays in the flat latent untouched by later levels (see
    :class:`~flows.transforms.Tail`). With ``split_prior=True`` the exiting half first
    passes an affine coupling conditioned on the kept half, Glow's learned prior
    ``N(mu(x_kept), sigma(x_kept))`` written as a bijector.

    ``latent_shapes`` lists the shape of each level's part of the latent in flat order,
    so a per-level temperature can be applied and a latent can be inspected by level.

    Args:
        input_shape: ``(C, H, W)``.
        levels: number of levels.
        build_level: returns the blocks of one level (see ``LevelBuilder``).
        logit_alpha: if not ``None``, a :class:`~flows.transforms.Logit` preprocessing
            for dequantized pixels in ``[0, 1]`` runs first.
        split_prior: learned prior for the factored-out halves.
        hidden_channels: width of the split-prior conditioner.
        context_features: conditions the split priors on a context of this size (the
            class predicts the prior of the factored-out halves too).
        normalize: hidden ActNorms in the split priors' conditioners
            (:func:`~flows.transforms.conditioners.conv_conditioner`).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        levels: int,
        build_level: LevelBuilder,
        logit_alpha: float | None = 0.05,
        split_prior: bool = False,
        hidden_channels: int = 64,
        context_features: int | None = None,
        normalize: bool = False,
    ) -> None:
        shape: Shape = tuple(input_shape)
        if len(shape) != 3:
            raise ValueError(f"MultiScale: input_shape must be (C, H, W), got {shape}")
        if levels < 1:
            raise ValueError(f"MultiScale: need levels >= 1, got {levels}")
        blocks: list[Bijector] = [] if logit_alpha is None else [Logit(logit_alpha)]
        blocks.append(Reshape(shape, (math.prod(shape),)))
        offset = 0
        latent_shapes: list[Shape] = []
        for level in range(levels):
            try:
                level_blocks = build_level(level, shape)
            except OddSizeError:
                raise ValueError(_unsqueezable(tuple(input_shape), shape, level, levels)) from None
            for bijector, in_shape, out_shape in level_blocks:
                if in_shape != shape:
                    raise ValueError(f"MultiScale: level {level} block expects {in_shape}, tail is {shape}")
                blocks.append(Tail(bijector, offset, in_shape, out_shape))
                shape = out_shape
            if level == levels - 1:
                break
            c, h, w = shape
            if c < 2:
                raise ValueError(f"MultiScale: cannot factor out half of {c} channel at level {level}")
            if split_prior:
                prior = AffineCoupling(
                    channel_mask(c, 1),
                    hidden_channels=hidden_channels,
                    context_features=context_features,
                    normalize=normalize,
                )
                blocks.append(Tail(prior, offset, shape))
            exit_shape = (c // 2, h, w)
            latent_shapes.append(exit_shape)
            offset += math.prod(exit_shape)
            shape = (c - c // 2, h, w)
        latent_shapes.append(shape)
        super().__init__(*blocks)
        self.input_shape = tuple(input_shape)
        self.latent_shapes = latent_shapes


def _unsqueezable(input_shape: Shape, tail: Shape, level: int, levels: int) -> str:
    """The fix for an input whose level ``level`` cannot be squeezed: fewer levels (all
    before it squeezed fine) or a padding divisible by two per squeeze still to come."""
    _, height, width = input_shape
    done = round(math.log2(height / tail[1]))
    needed = done + levels - level  # this level's squeeze and, at most, one per later level
    times = "once" if done == 0 else f"{done + 1} times"
    problem = (
        f"a {height}x{width} input cannot be squeezed {times} (level {level + 1} of {levels} would squeeze "
        f"{tail[1]}x{tail[2]})"
    )
    if 2**needed > 16 * max(height, width):  # a padding to many times the image's size fixes nothing
        fix = f"use levels<={level}" if level > 0 else "pad the images to an even size and use far fewer levels"
        return f"{problem}: {fix}"
    block = 2**needed
    padded = f"{-(-height // block) * block}x{-(-width // block) * block}"
    fewer = f"use levels<={level}, or " if level > 0 else ""
    mnist = " (mnist5k: flows.data.load('mnist5k', pad=32))" if (height, width) == (28, 28) else ""
    return f"{problem}: {fewer}pad the images to {padded}{mnist}"


DOWNSAMPLINGS = ("squeeze", "haar", "learned")


def squeeze_block(shape: Shape, downsampling: str = "squeeze") -> tuple[Bijector, Shape, Shape]:
    """A 2x2 space-to-depth step of a ``(C, H, W)`` tail, with a clear error for odd sizes.

    ``"squeeze"`` rearranges pixels (:class:`~flows.transforms.Squeeze`); ``"haar"`` is the
    fixed orthonormal Haar wavelet transform of each 2x2 patch; ``"learned"`` is a learnable
    orthogonal 2x2 patch transform started at Haar
    (:class:`~flows.transforms.InvertibleDownsampling`, iUNets). All have log-det 0.
    """
    if downsampling not in DOWNSAMPLINGS:
        raise ValueError(f"downsampling must be one of {DOWNSAMPLINGS}, got {downsampling!r}")
    c, h, w = shape
    if h % 2 or w % 2:
        raise OddSizeError(f"cannot squeeze a level of spatial size {h}x{w}: H and W must be even")
    if downsampling == "squeeze":
        block: Bijector = Squeeze()
    else:
        block = InvertibleDownsampling(c, 2, init="haar", learnable=downsampling == "learned")
    return block, shape, (4 * c, h // 2, w // 2)
