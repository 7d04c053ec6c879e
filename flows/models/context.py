"""What a conditional model does to its context before its blocks see it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flows.distributions import ConditionalDiagonalGaussian, StandardNormal
from flows.transforms.base import checks_values


class ClassEmbedding(nn.Module):
    """Class labels to learned vectors: ``c = E[y]`` for ``y`` in ``{0, ..., K-1}``.

    A model built with ``num_classes=K`` embeds its int64 labels with it, inside the model,
    so ``log_prob(x, context=labels)`` takes the labels themselves and the embedding
    trains with the flow.

    Args:
        num_classes: ``K``.
        features: size of one embedding vector (the context features of the blocks).

    Example:
        >>> import torch
        >>> ClassEmbedding(10, 4)(torch.tensor([0, 3])).shape
        torch.Size([2, 4])
    """

    def __init__(self, num_classes: int, features: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ClassEmbedding: num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes, features)

    def forward(self, labels: Tensor) -> Tensor:
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(
                f"ClassEmbedding: expected int64 class labels of shape (B,), got {got} "
                "(float context vectors go to a model built with context_features=)"
            )
        if checks_values(labels) and labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"ClassEmbedding: labels must lie in [0, {self.num_classes - 1}], got "
                f"{labels.min().item()}..{labels.max().item()}"
            )
        return self.embedding(labels)


CONTEXT_CHANNELS = 8
"""Channels a projection of the context adds to a conditional image conditioner's input."""

CLASS_EMBEDDING_FEATURES = 16
"""Width of the class embedding of a ``num_classes=K`` model without ``context_features``."""


def conditioning(
    builder: str,
    context_features: int | None = None,
    num_classes: int | None = None,
    embedding: nn.Module | None = None,
) -> tuple[int | None, nn.Module | None]:
    """The context width the blocks see and the embedding in front, from a builder's options.

    * ``context_features=C`` alone: float context vectors ``(B, C)`` go to the blocks as is.
    * ``num_classes=K``: int64 labels ``(B,)`` are embedded by a :class:`ClassEmbedding` of
      ``context_features`` (default 16) features inside the model.
    * ``embedding=net`` with ``context_features=C``: ``net`` maps the context (e.g. an
      observation image) to ``(B, C)`` and trains with the flow.

    Returns:
        ``(features, embedding)``: ``(None, None)`` for an unconditional model.
    """
    if context_features is not None and (
        isinstance(context_features, bool) or not isinstance(context_features, int) or context_features < 1
    ):
        raise ValueError(f"{builder}: context_features must be an integer >= 1, got {context_features!r}")
    if num_classes is not None:
        if embedding is not None:
            raise ValueError(f"{builder}: pass num_classes= or embedding=, not both")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"{builder}: num_classes must be an integer >= 2, got {num_classes!r}")
        features = context_features or CLASS_EMBEDDING_FEATURES
        return features, ClassEmbedding(num_classes, features)
    if embedding is not None:
        if context_features is None:
            raise ValueError(f"{builder}: embedding= needs context_features= (the embedding's output size)")
        if not isinstance(embedding, nn.Module):
            raise TypeError(f"{builder}: embedding must be an nn.Module, got {type(embedding).__name__}")
    return context_features, embedding


def base_distribution(shape: tuple[int, ...], context_features: int | None, hidden_features: int = 64) -> nn.Module:
    """``N(0, I)``, or for a conditional model a Gaussian whose mean and scale come from the
    context (Glow's class-conditional top prior)."""
    if context_features is None:
        return StandardNormal(shape)
    return ConditionalDiagonalGaussian(shape, context_features, hidden_features)
