"""Spectral norm inside i-ResNet blocks: RNG isolation (issue 15.1) and the bound held
during training (issue 15.2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flows.parity import gradient_parity
from flows.transforms import Chain, ResidualBlock
from flows.transforms.spectral_norm import spectral_norm, spectral_norm_layers
from flows.transforms.switches import frozen_updates, recomputing

F64 = torch.float64


def _operator_norm(layer: nn.Module) -> float:
    """The true norm of the operator a layer last used (dense matrix, or the conv applied
    to every basis vector of its learned input shape)."""
    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return torch.linalg.matrix_norm(weight, ord=2).item()
    shape = tuple(layer.weight_v.shape[1:])
    n = math.prod(shape)
    basis = torch.eye(n, dtype=weight.dtype).reshape(n, *shape)
    matrix = layer._conv_forward(basis, weight, None).reshape(n, -1)
    return torch.linalg.matrix_norm(matrix, ord=2).item()


@pytest.mark.parametrize("mode", ["series", "unbiased"])
def test_fresh_stochastic_block_first_memory_saving_step_has_exact_gradients(mode: str) -> None:
    # A fresh conv layer draws its power-iteration vectors on its first call, inside the
    # block whose RNG state memory-saving backward replays; from the global stream that
    # shifted the recompute's probes (gradients off by 1.78).
    torch.manual_seed(0)
    chain = Chain(ResidualBlock.conv(2, 4, logdet=mode)).double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    report = gradient_parity(chain, x, loss=lambda out: out[1].sum())
    assert report.error < 1e-10


def test_a_fresh_layer_never_draws_from_the_global_stream() -> None:
    torch.manual_seed(0)
    layer = spectral_norm(nn.Conv2d(2, 3, 3, padding=1).double())
    x5, x6 = torch.randn(2, 2, 5, 5, dtype=F64), torch.randn(2, 2, 6, 6, dtype=F64)
    state = torch.get_rng_state()
    layer(x5)  # first call: vectors drawn for 5 x 5 inputs
    layer(x6)  # a new input shape: drawn again
    assert torch.equal(torch.get_rng_state(), state)
    assert layer.weight_v.shape == (1, 2, 6, 6)


@pytest.mark.parametrize("kind, seed", [("conv", 1), ("mlp", 1)])
def test_bound_holds_after_40_adam_steps_at_lr_1e_2(kind: str, seed: int) -> None:
    # One power iteration per call let ||W||/c reach 1.08 (conv) and 1.13 (mlp) here; the
    # default tolerance holds every layer within 3% of c (the README's stated figure).
    torch.manual_seed(seed)
    if kind == "conv":
        block, x = ResidualBlock.conv(2, 8), 2 * torch.randn(32, 2, 4, 4)
    else:
        block, x = ResidualBlock.mlp(2, 32), 2 * torch.randn(64, 2)
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-2)
    for _ in range(41):  # 40 steps, then the forward pass after the last one
        y, logdet = block(x)
        loss = (0.5 * y.pow(2).flatten(1).sum(1) - logdet).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    block(x)
    for layer in spectral_norm_layers(block):
        assert _operator_norm(layer) <= 0.9 * 1.03


def test_power_iteration_to_a_tolerance_stays_frozen_when_asked() -> None:
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(6, 6), init_iterations=1, tol=1e-6, max_power_iterations=50)
    x = torch.randn(3, 6)
    u0 = layer.weight_u.clone()
    with frozen_updates():
        layer(x)
    with recomputing():
        layer(x)
    assert torch.equal(u0, layer.weight_u)
    layer.eval()(x)
    assert torch.equal(u0, layer.weight_u)
    layer.train()(x)  # converges within the cap: the estimate is the matrix norm
    sigma = (layer.weight_u @ layer.weight_orig @ layer.weight_v).item()
    assert sigma == pytest.approx(torch.linalg.matrix_norm(layer.weight_orig.detach(), 2).item(), rel=1e-6)


def test_tolerance_options_are_checked() -> None:
    with pytest.raises(ValueError, match="power_iteration_tol"):
        ResidualBlock.mlp(2, 4, power_iteration_tol=0.0)
    with pytest.raises(ValueError, match="max_power_iterations"):
        ResidualBlock.mlp(2, 4, n_power_iterations=5, max_power_iterations=2)
    with pytest.raises(ValueError, match="tol must be"):
        spectral_norm(nn.Linear(2, 2), tol=2.0)
