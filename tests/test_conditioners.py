"""The default conditioner networks: gradients as exact as float32 allows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flows.transforms.conditioners import conv_conditioner


@pytest.mark.parametrize("shape", [(64, 2, 14, 14), (64, 6, 8, 8), (16, 4, 7, 7)])
def test_conv_conditioner_gradients_agree_with_float64(shape: tuple[int, ...]) -> None:
    """At mnist's first level (2 channels, 14x14, hidden 128) a channels-last layout gave
    input gradients 1e-2 off (docs/speed.md); the network as built must stay near float64."""
    torch.manual_seed(0)
    net = conv_conditioner(shape[1], 2 * shape[1], hidden_channels=128)
    nn.init.normal_(net[-1].weight, std=0.05)
    x = torch.randn(*shape)

    def gradients(module: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
        leaf = inputs.detach().requires_grad_(True)
        module(leaf).pow(2).sum().backward()
        return [leaf.grad.double(), *(p.grad.double() for p in module.parameters())]

    exact = gradients(copy.deepcopy(net).double(), x.double())
    for got, want in zip(gradients(net, x), exact):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
