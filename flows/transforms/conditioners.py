"""Default conditioner networks for coupling layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flows.transforms.actnorm import ActNorm

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_conditioner(
    in_channels: int,
    out_channels: int,
    hidden_channels: int = 64,
    dims: int = 2,
    activation: Callable[[], nn.Module] = nn.ReLU,
    normalize: bool = False,
) -> nn.Sequential:
    """Glow's coupling network: conv3 -> ReLU -> conv1 -> ReLU -> conv3 over ``dims`` spatial axes.

    The last convolution is zero-initialised so a fresh coupling is the identity. With
    ``normalize=True`` each hidden convolution is followed by an ActNorm
    (:class:`HiddenActNorm`), as in the Glow code's ``conv2d``: the first batch sets every
    hidden channel to zero mean and unit variance, so the conditioner starts well scaled
    whatever its input's scale, and its output layer learns at a uniform rate.

    Args:
        in_channels: channels of the conditioning part.
        out_channels: parameters predicted per position (e.g. ``2 k`` for ``k`` affine channels).
        hidden_channels: width of the two hidden layers.
        dims: spatial axes of the input ``(B, C, *S)``: 1, 2 (images, the default) or 3.
        activation: builds each hidden nonlinearity (default ``nn.ReLU``, Glow's choice).
        normalize: an ActNorm after each hidden convolution (Glow's conditioner).

    Example:
        >>> import torch
        >>> net = conv_conditioner(2, 4, hidden_channels=8, dims=3)
        >>> net(torch.randn(1, 2, 4, 4, 4)).abs().max().item()
        0.0
    """
    if dims not in _CONV:
        raise ValueError(f"conv_conditioner: dims must be 1, 2 or 3, got {dims}")
    conv = _CONV[dims]

    def hidden(layer: nn.Module) -> list[nn.Module]:
        return [layer, HiddenActNorm(hidden_channels), activation()] if normalize else [layer, activation()]

    net = nn.Sequential(
        *hidden(conv(in_channels, hidden_channels, 3, padding=1)),
        *hidden(conv(hidden_channels, hidden_channels, 1)),
        conv(hidden_channels, out_channels, 3, padding=1),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class HiddenActNorm(nn.Module):
    """An :class:`~flows.transforms.ActNorm` as a layer of a network: ``h = (x + b) * exp(s)``
    per channel, initialised on the first training batch to zero mean and unit variance
    (once, guarded as ActNorm's own initialisation, so a memory-saving recompute never
    re-fires it); a conditioner needs no log-det, so it is dropped.

    Example:
        >>> import torch
        >>> norm = HiddenActNorm(3)
        >>> h = norm(5 + 2 * torch.randn(16, 3, 4, 4))
        >>> bool(h.mean().abs() < 1e-4), tuple(h.shape)
        (True, (16, 3, 4, 4))
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ActNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)[0]


def mlp_conditioner(in_features: int, out_features: int, hidden_features: int = 64) -> nn.Sequential:
    """A two-hidden-layer MLP with a zero-initialised last layer (identity coupling at init)."""
    net = nn.Sequential(
        nn.Linear(in_features, hidden_features),
        nn.ReLU(),
        nn.Linear(hidden_features, hidden_features),
        nn.ReLU(),
        nn.Linear(hidden_features, out_features),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class ResidualConditioner(nn.Module):
    """RealNVP's ResNet conditioner: conv3x3 in, ``blocks`` residual blocks, conv3x3 out.

    Each residual block is ``h + conv3x3(relu(conv3x3(relu(h))))``; the output
    convolution is zero-initialised so a fresh coupling is the identity. No batch
    normalisation: its running statistics would be updated twice by a memory-saving
    recompute.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            )
            for _ in range(blocks)
        )
        self.head = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(torch.relu(h))


class ContextInput(nn.Module):
    """Joins a context vector to a conditioner's input.

    For vectors ``(B, D)`` the context ``c`` of shape ``(B, context_features)`` is
    concatenated as is: ``[x, c]``. For inputs with spatial axes ``(B, C, *S)`` a learned
    linear projection ``W c + b`` to ``context_channels`` channels is broadcast over every
    position and concatenated along the channels: ``[x, broadcast(W c + b)]`` (the
    conditional Glow's choice; FiLM would scale the hidden features instead).

    Args:
        context_features: ``C``, the size of one context vector.
        context_channels: channels the projection adds to an image-like input.
        image: whether the input has spatial axes.

    Example:
        >>> import torch
        >>> join = ContextInput(3, context_channels=4, image=True)
        >>> join(torch.randn(2, 5, 6, 6), torch.randn(2, 3)).shape
        torch.Size([2, 9, 6, 6])
    """

    def __init__(self, context_features: int, context_channels: int = 8, image: bool = True) -> None:
        super().__init__()
        if context_features < 1 or context_channels < 1:
            raise ValueError(
                f"ContextInput: context_features and context_channels must be >= 1, got "
                f"{context_features} and {context_channels}"
            )
        self.context_features = context_features
        self.image = image
        self.projection = nn.Linear(context_features, context_channels) if image else None
        self.added = context_channels if image else context_features

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            return torch.cat([x, context.to(x.dtype)], dim=1)
        c = self.projection(context.to(x.dtype))
        c = c.view(*c.shape, *(1,) * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
        return torch.cat([x, c], dim=1)
