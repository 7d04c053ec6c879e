"""Default conditioner networks for coupling layers."""

from __future__ import annotations

import torch
from torch import nn


def conv_conditioner(in_channels: int, out_channels: int, hidden_channels: int = 64) -> nn.Sequential:
    """Glow's coupling network: conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3.

    The last convolution is zero-initialised so a fresh coupling is the identity.
    """
    net = nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden_channels, hidden_channels, 1),
        nn.ReLU(),
        nn.Conv2d(hidden_channels, out_channels, 3, padding=1),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


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
