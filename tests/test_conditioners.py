"""The default conditioner networks: values, gradients and layouts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flows.transforms.conditioners import ConvConditioner, ResidualConditioner, conv_conditioner


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
def test_channels_last_conditioner_matches_the_plain_network(dtype: torch.dtype, normalize: bool) -> None:
    """The channels-last layout changes the rounding only: output and every gradient are
    those of an ``nn.Sequential`` of the same layers, and the output comes back NCHW."""
    torch.manual_seed(0)
    net = conv_conditioner(6, 12, hidden_channels=16, normalize=normalize).to(dtype)
    assert isinstance(net, ConvConditioner)
    nn.init.normal_(net[-1].weight, std=0.1)
    plain = nn.Sequential(*copy.deepcopy(net))
    x = torch.randn(8, 6, 5, 7, dtype=dtype)
    outputs = []
    for module in (net, plain):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        (y * torch.arange(y.numel(), dtype=dtype).view_as(y).cos()).sum().backward()
        outputs.append((y, xi.grad, [p.grad for p in module.parameters()]))
    (y, gx, gp), (y0, gx0, gp0) = outputs
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(y, y0, **tol)
    torch.testing.assert_close(gx, gx0, **tol)
    for g, g0 in zip(gp, gp0):
        torch.testing.assert_close(g, g0, **tol)
    assert y.is_contiguous() and gx.is_contiguous()


def test_residual_conditioner_runs_channels_last_with_the_values_of_nchw() -> None:
    torch.manual_seed(0)
    net = ResidualConditioner(3, 6, hidden_channels=8, blocks=2)
    nn.init.normal_(net.head.weight, std=0.1)
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    y = net(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y, net._run(x), rtol=1e-5, atol=1e-6)  # _run: the layers on x as given


def test_parameters_and_their_gradients_keep_their_layout() -> None:
    """Only the activations are laid out channels-last: a utility that views parameters or
    gradients flat (``parameters_to_vector``, LBFGS) still can."""
    net = conv_conditioner(2, 4, hidden_channels=8)
    net(torch.randn(3, 2, 4, 4)).square().sum().backward()
    for p in net.parameters():
        assert p.is_contiguous() and p.grad.is_contiguous()
    params = list(net.parameters())
    assert nn.utils.parameters_to_vector([p.grad for p in params]).numel() == sum(p.numel() for p in params)


def test_state_dict_is_that_of_a_sequential() -> None:
    """Checkpoints of either load into the other (the keys are the layers' indices)."""
    net = conv_conditioner(2, 4, hidden_channels=8)
    plain = nn.Sequential(*copy.deepcopy(net))
    assert list(net.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(net.state_dict())
    net.load_state_dict(plain.state_dict())
