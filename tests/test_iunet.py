"""IUNet: round trip, memory-saving gradient parity, constant activation memory in depth,
layout and error messages."""

from __future__ import annotations

import pytest
import torch

import flows
from flows.nn.iunet import ChannelCoupling, IUNet
from flows.transforms.chain import Chain

SHAPES = {1: (2, 4, 32), 2: (2, 4, 16, 16), 3: (2, 4, 8, 8, 8)}


def randomized(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so the net is no longer the identity it starts as."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def kept_bytes(net: IUNet, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward: distinct storages of saved tensors (parameters
    excluded, they live anyway), plus the output the memory-saving engine keeps (counted
    once if the hooks already saw it)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = net(x)
    if net.memory_saving:
        storages[y.untyped_storage().data_ptr()] = y.untyped_storage().nbytes()
    return sum(storages.values())


def grads(
    net: IUNet, x: torch.Tensor, weight: torch.Tensor, memory_saving: bool
) -> list[torch.Tensor]:
    net.memory_saving = memory_saving
    net.zero_grad()
    x = x.detach().requires_grad_(True)
    y, logdet = net.bijector(x)
    ((y * weight).sum() + logdet.sum()).backward()
    return [x.grad, *(p.grad for p in net.parameters())]


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_round_trip_float32(dims: int, coupling: str) -> None:
    torch.manual_seed(0)
    net = randomized(
        IUNet(4, levels=3, blocks_per_level=2, dims=dims, coupling=coupling, hidden_channels=8)
    )
    x = torch.randn(SHAPES[dims])
    y = net(x)
    assert y.shape == x.shape
    assert (y - x).abs().max() > 0.1, "the randomized net should not be the identity"
    torch.testing.assert_close(net.inverse(y), x, atol=1e-5, rtol=0)
    y2, logdet = net.bijector(x)
    assert logdet.shape == (2,)
    x2, inv_logdet = net.bijector.inverse(y2)
    torch.testing.assert_close(-inv_logdet, logdet, atol=1e-5, rtol=1e-5)


def test_identity_at_init_and_anisotropic_stride() -> None:
    net = IUNet(4, levels=3, blocks_per_level=1, dims=2, stride=(2, 1), hidden_channels=8)
    x = torch.randn(1, 4, 8, 3)
    torch.testing.assert_close(net(x), x, atol=1e-6, rtol=0)
    randomized(net)
    torch.testing.assert_close(net.inverse(net(x)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("dims", [2, 3])
def test_memory_saving_gradients_equal_ordinary(dims: int, coupling: str) -> None:
    torch.manual_seed(1)
    net = randomized(
        IUNet(
            4,
            levels=3,
            blocks_per_level=1,
            dims=dims,
            coupling=coupling,
            hidden_channels=8,
            resampling_method="cayley",
        )
    )
    x = torch.randn(SHAPES[dims])
    weight = torch.randn_like(x)
    # float64: the reconstruction is exact to rounding, so the gradients agree tightly.
    net64 = net.double()
    plain = grads(net64, x.double(), weight.double(), memory_saving=False)
    saving = grads(net64, x.double(), weight.double(), memory_saving=True)
    for a, b in zip(saving, plain):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # float32: inverse reconstruction drifts by ~1e-6 per stage; 12 stages here give
    # relative gradient differences of ~1e-5, well inside rtol 1e-4 / atol 1e-5.
    net32 = net.float()
    plain = grads(net32, x, weight, memory_saving=False)
    saving = grads(net32, x, weight, memory_saving=True)
    for a, b in zip(saving, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_kept_bytes_do_not_grow_with_depth(dims: int) -> None:
    torch.manual_seed(2)
    x = torch.randn(SHAPES[dims])
    depths = [(2, 1), (3, 2), (4, 3)] if dims == 2 else [(2, 1), (3, 2)]
    saving, plain = [], []
    for levels, blocks in depths:
        net = IUNet(4, levels=levels, blocks_per_level=blocks, dims=dims, hidden_channels=8)
        saving.append(kept_bytes(net, x))
        net.memory_saving = False
        plain.append(kept_bytes(net, x))
    assert max(saving) <= 1.1 * min(saving), saving
    assert saving[-1] == x.numel() * x.element_size()  # only the output
    assert plain[-1] > 2 * plain[0], plain  # ordinary autograd does grow


def test_memory_saving_switches() -> None:
    net = IUNet(4, levels=2, blocks_per_level=1, hidden_channels=8, memory_saving=False)
    assert not net.memory_saving and isinstance(net.bijector, Chain)
    with flows.memory_saving(net):
        assert net.memory_saving and net.bijector.memory_saving
    assert not net.memory_saving


def test_layout_and_channel_counts() -> None:
    net = IUNet(8, levels=3, blocks_per_level=[1, 2, 3], dims=3, skip_fraction=0.75)
    assert net.level_channels == [8, 16, 32]
    text = net.layout((16, 16, 16))
    assert "level 1: 16 ch @ 8x8x8 -> skip 12, down 4 -> 32 ch" in text
    assert text.endswith("channels: 8-16-32-16-8")
    assert IUNet(4, levels=3, blocks_per_level=1).level_channels == [4, 8, 16]


def test_errors() -> None:
    net = IUNet(4, levels=3, blocks_per_level=1, hidden_channels=8)
    with pytest.raises(
        ValueError, match=r"axis W \(tensor dim 3\) has size 10, not divisible by .* = 4"
    ):
        net(torch.randn(1, 4, 16, 10))
    with pytest.raises(ValueError, match="expected 4 channels"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, C, H, W\)"):
        net(torch.randn(1, 4, 16, 16, 16))
    with pytest.raises(ValueError, match="level 0 has 6 channels; skip_fraction=0.25 gives 1.5"):
        IUNet(6, levels=3, blocks_per_level=1, skip_fraction=0.25)
    with pytest.raises(ValueError, match="a coupling needs >= 2"):
        IUNet(1, levels=1, blocks_per_level=1)
    with pytest.raises(ValueError, match="one entry per level"):
        IUNet(4, levels=3, blocks_per_level=[1, 2])
    with pytest.raises(ValueError, match="coupling must be one of"):
        ChannelCoupling(4, coupling="spline")
