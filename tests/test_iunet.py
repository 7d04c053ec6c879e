"""IUNet and the channel couplings it is built from, in 1D, 2D and 3D: round trip, log-det,
memory-saving gradient parity, one conditioner run per coupling in backward, constant
activation memory in depth, layout and error messages."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import flows
from flows.nn.iunet import IUNet
from flows.parity import gradient_parity
from flows.transforms import AdditiveCoupling, AffineCoupling, Chain, Tail, channel_mask, checkerboard_mask
from flows.transforms.coupling import MaskedCoupling
from flows.transforms.switches import recomputing
from flows.transforms.tail import TailRegion

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


def _logdet_of_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """``log|det J|`` of ``f`` at each sample of ``x``, from the autograd Jacobian."""
    out = []
    for row in x:

        def flat(v: torch.Tensor, shape=row.shape) -> torch.Tensor:
            return f(v.view(1, *shape))[0].flatten()

        out.append(torch.linalg.slogdet(torch.autograd.functional.jacobian(flat, row.flatten()))[1])
    return torch.stack(out)


# ----------------------------------------------------------------------------- couplings in 1D / 3D
COUPLINGS = {
    "additive-1d": (lambda: AdditiveCoupling(channel_mask(4, 0), hidden_channels=8, dims=1), (3, 4, 10)),
    "affine-1d": (lambda: AffineCoupling(channel_mask(4, 1), hidden_channels=8, dims=1), (3, 4, 10)),
    "affine-1d-interleaved": (
        lambda: AffineCoupling(torch.tensor([1, 0, 0, 1, 0]), hidden_channels=8, dims=1),
        (3, 5, 6),
    ),
    "additive-3d": (lambda: AdditiveCoupling(channel_mask(4, 1), hidden_channels=8, dims=3), (3, 4, 2, 4, 2)),
    "affine-3d": (lambda: AffineCoupling(channel_mask(5, 0), hidden_channels=8, dims=3), (3, 5, 3, 2, 4)),
}


def _coupling(case: str) -> tuple[MaskedCoupling, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = COUPLINGS[case]
    coupling = randomized(factory().double(), scale=0.3)
    return coupling, torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("case", sorted(COUPLINGS))
def test_coupling_round_trip_and_reconstruct(case: str) -> None:
    coupling, x = _coupling(case)
    y, logdet = coupling(x)
    assert y.shape == x.shape and logdet.shape == (x.shape[0],)
    assert (y - x).abs().max() > 1e-2, "the randomized coupling should not be the identity"
    x_back, inv_logdet = coupling.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inv_logdet, -logdet, rtol=1e-12, atol=1e-12)
    with recomputing():
        rebuilt = coupling.reconstruct(y)
    torch.testing.assert_close(rebuilt.join(rebuilt.inputs), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rebuilt.output, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rebuilt.logdet, logdet, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(COUPLINGS))
def test_coupling_logdet_matches_brute_force_jacobian(case: str) -> None:
    coupling, x = _coupling(case)
    torch.testing.assert_close(coupling(x)[1], _logdet_of_jacobian(coupling, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", sorted(COUPLINGS))
def test_coupling_memory_saving_gradients_equal_plain(case: str) -> None:
    coupling, x = _coupling(case)
    report = gradient_parity(coupling, x.requires_grad_(True))
    assert report.error < 1e-12, report


def test_coupling_conditioner_has_the_input_dims() -> None:
    for dims, conv in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        coupling = AffineCoupling(channel_mask(4, 0), hidden_channels=8, dims=dims)
        assert [type(m) for m in coupling.conditioner] == [conv, nn.ReLU, conv, nn.ReLU, conv]
        assert coupling.dims == dims
    # The 2-D default is unchanged: Glow's network, zero-initialised last layer.
    default = AffineCoupling(channel_mask(4, 0))
    assert default.dims == 2 and isinstance(default.conditioner[0], nn.Conv2d)
    assert default.conditioner[0].out_channels == 64 and not default.conditioner[-1].weight.any()


def test_coupling_dims_errors() -> None:
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3, got 4"):
        AffineCoupling(channel_mask(4, 0), dims=4)
    with pytest.raises(ValueError, match="needs a 1-D channel mask on images; a 2-D spatial mask"):
        AffineCoupling(checkerboard_mask(4, 4), channels=2, dims=3)
    with pytest.raises(ValueError, match="vectors have no spatial axes"):
        AdditiveCoupling(channel_mask(4, 0), image=False, dims=1)
    coupling = AdditiveCoupling(channel_mask(4, 0), hidden_channels=8, dims=3)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, C, D, H, W\)"):
        coupling(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, C, L\)"):
        AdditiveCoupling(channel_mask(4, 0), hidden_channels=8, dims=1)(torch.randn(2, 4, 4, 4))


# ----------------------------------------------------------------------------- IUNet
def grads(net: IUNet, x: torch.Tensor, weight: torch.Tensor, memory_saving: bool) -> list[torch.Tensor]:
    net.memory_saving = memory_saving
    net.zero_grad()
    x = x.detach().requires_grad_(True)
    y, logdet = net.chain(x.shape[2:])(x)
    ((y * weight).sum() + logdet.sum()).backward()
    return [x.grad, *(p.grad for p in net.parameters())]


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_round_trip_float32(dims: int, coupling: str) -> None:
    torch.manual_seed(0)
    net = randomized(IUNet(4, levels=3, blocks_per_level=2, dims=dims, coupling=coupling, hidden_channels=8))
    x = torch.randn(SHAPES[dims])
    y = net(x)
    assert y.shape == x.shape
    assert (y - x).abs().max() > 0.1, "the randomized net should not be the identity"
    torch.testing.assert_close(net.inverse(y), x, atol=1e-5, rtol=0)
    y2, logdet = net.chain(x.shape[2:])(x)
    torch.testing.assert_close(y2, y)
    assert logdet.shape == (2,)
    x2, inv_logdet = net.chain(x.shape[2:]).inverse(y2)
    torch.testing.assert_close(-inv_logdet, logdet, atol=1e-5, rtol=1e-5)


def test_logdet_matches_brute_force_jacobian() -> None:
    torch.manual_seed(0)
    net = randomized(IUNet(4, levels=2, blocks_per_level=1, dims=1, coupling="affine", hidden_channels=8)).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    chain = net.chain((8,))
    logdet = chain(x)[1]
    assert logdet.abs().min() > 1e-3
    torch.testing.assert_close(logdet, _logdet_of_jacobian(chain, x), rtol=1e-10, atol=1e-10)


def test_identity_at_init_and_anisotropic_stride() -> None:
    net = IUNet(4, levels=3, blocks_per_level=1, dims=2, stride=(2, 1), hidden_channels=8)
    x = torch.randn(1, 4, 8, 3)
    torch.testing.assert_close(net(x), x, atol=1e-6, rtol=0)
    randomized(net)
    torch.testing.assert_close(net.inverse(net(x)), x, atol=1e-5, rtol=0)


def test_composed_from_transforms_blocks() -> None:
    """The couplings are the project's channel couplings, the layout is ``Tail``s; the
    modules are registered once, whatever the spatial sizes run."""
    torch.manual_seed(0)
    net = IUNet(4, levels=3, blocks_per_level=[1, 2, 1], dims=2, coupling="affine", hidden_channels=8)
    couplings = [m for m in net.modules() if isinstance(m, MaskedCoupling)]
    assert len(couplings) == 2 * (1 + 2 + 1 + 2 + 1)
    assert all(type(m) is AffineCoupling and m.dims == 2 and not m.spatial for m in couplings)
    assert [m.halves for m in net.down_blocks[1]] == ["kept-first", "kept-last"] * 2
    assert isinstance(net.down_blocks[0][0].conditioner[1], nn.LeakyReLU)
    keys, n_params = set(net.state_dict()), len(list(net.parameters()))
    for shape in ((8, 8), (16, 4)):
        chain = net.chain(shape)
        assert isinstance(chain, Chain) and chain is net.chain(shape)  # cached
        assert sum(isinstance(b, Tail) for b in chain) == 5 + 4  # coupling runs + resamplings
        net(torch.randn(2, 4, *shape))
    assert set(net.state_dict()) == keys and len(list(net.parameters())) == n_params
    # The net deep-copies, pickles and loads its state with the per-shape chains.
    x = torch.randn(2, 4, 8, 8)
    randomized(net)
    for other in (copy.deepcopy(net), torch.load(_saved(net), weights_only=False)):
        torch.testing.assert_close(other(x), net(x))
    fresh = IUNet(4, levels=3, blocks_per_level=[1, 2, 1], dims=2, coupling="affine", hidden_channels=8)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), net(x))


def _saved(module: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("dims", [1, 2, 3])
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
    # float64: the reconstruction is exact to rounding, so the gradients agree tightly
    # (log-det gradients included, through the chain's (y, logdet)).
    net64 = net.double()
    plain = grads(net64, x.double(), weight.double(), memory_saving=False)
    saving = grads(net64, x.double(), weight.double(), memory_saving=True)
    for a, b in zip(saving, plain):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert gradient_parity(net64, x.double().requires_grad_(True)).error < 1e-12
    # float32: inverse reconstruction drifts by ~1e-6 per stage; 12 stages here give
    # relative gradient differences of ~1e-5, well inside rtol 1e-4 / atol 1e-5.
    net32 = net.float()
    plain = grads(net32, x, weight, memory_saving=False)
    saving = grads(net32, x, weight, memory_saving=True)
    for a, b in zip(saving, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_memory_saving_backward_runs_each_conditioner_once(coupling: str) -> None:
    """A training step calls each conditioner twice with memory saving (the forward pass,
    then once in backward: the coupling's fused ``reconstruct`` rebuilds its input and
    recomputes it with one conditioner run), once without. The i-UNet's former private
    coupling had no fused reconstruct and made 3 calls (forward, inverse, recompute)."""
    torch.manual_seed(0)
    net = randomized(IUNet(4, levels=3, blocks_per_level=2, dims=2, coupling=coupling, hidden_channels=8))
    calls: dict[int, int] = {}
    conditioners = [m.conditioner for m in net.modules() if isinstance(m, MaskedCoupling)]
    assert len(conditioners) == 2 * 2 * 5
    for conditioner in conditioners:
        conditioner.register_forward_hook(lambda m, args, out: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
    x = torch.randn(SHAPES[2])
    for memory_saving, expected in ((True, 2), (False, 1)):
        net.memory_saving = memory_saving
        calls.clear()
        net(x).pow(2).mean().backward()
        assert sorted(calls.values()) == [expected] * len(conditioners), (memory_saving, calls)


def test_memory_saving_splits_the_state_once_per_level_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine splits the flat state once per run of couplings on one level: the number
    of splits in a memory-saving step does not depend on how many couplings a level has."""
    counts = []
    split = TailRegion.split

    def counting(self, *args, **kwargs):
        counts[-1] += 1
        return split(self, *args, **kwargs)

    monkeypatch.setattr(TailRegion, "split", counting)
    x = torch.randn(SHAPES[2])
    for blocks in (1, 3):
        torch.manual_seed(0)
        net = IUNet(4, levels=3, blocks_per_level=blocks, hidden_channels=8)
        counts.append(0)
        net(x).pow(2).mean().backward()
    assert counts[0] == counts[1] > 0, counts


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
    assert not net.memory_saving and not net.chain((16, 16)).memory_saving
    with flows.memory_saving(net):
        assert net.memory_saving and net.chain((16, 16)).memory_saving
    assert not net.memory_saving
    net.memory_saving = True
    assert net.chain((16, 16)).memory_saving and net.chain((8, 8)).memory_saving


def test_layout_and_channel_counts() -> None:
    net = IUNet(8, levels=3, blocks_per_level=[1, 2, 3], dims=3, skip_fraction=0.75)
    assert net.level_channels == [8, 16, 32]
    text = net.layout((16, 16, 16))
    assert "level 1: 16 ch @ 8x8x8 -> skip 12, down 4 -> 32 ch" in text
    assert text.endswith("channels: 8-16-32-16-8")
    assert IUNet(4, levels=3, blocks_per_level=1).level_channels == [4, 8, 16]


def test_errors() -> None:
    net = IUNet(4, levels=3, blocks_per_level=1, hidden_channels=8)
    with pytest.raises(ValueError, match=r"axis W \(tensor dim 3\) has size 10, not divisible by .* = 4"):
        net(torch.randn(1, 4, 16, 10))
    with pytest.raises(ValueError, match=r"IUNet.inverse: spatial axis H .* size 6"):
        net.inverse(torch.randn(1, 4, 6, 16))
    with pytest.raises(ValueError, match="expected 4 channels"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, C, H, W\)"):
        net(torch.randn(1, 4, 16, 16, 16))
    with pytest.raises(ValueError, match=r"expected 2 spatial sizes"):
        net.chain((16,))
    with pytest.raises(ValueError, match="level 0 has 6 channels; skip_fraction=0.25 gives 1.5"):
        IUNet(6, levels=3, blocks_per_level=1, skip_fraction=0.25)
    with pytest.raises(ValueError, match="a coupling needs >= 2"):
        IUNet(1, levels=1, blocks_per_level=1)
    # Non-integer sizes: raw TypeErrors from torch before, or a conv error deep in the net.
    with pytest.raises(ValueError, match=r"levels must be an integer >= 1, got 2\.5"):
        IUNet(4, 2.5)
    with pytest.raises(ValueError, match="blocks_per_level must be integers >= 0"):
        IUNet(4, 2, blocks_per_level=1.5)
    with pytest.raises(ValueError, match="hidden_channels must be integers >= 1"):
        IUNet(4, 2, hidden_channels=0)
    with pytest.raises(ValueError, match="one entry per level"):
        IUNet(4, levels=3, blocks_per_level=[1, 2])
    with pytest.raises(ValueError, match="coupling must be one of"):
        IUNet(4, levels=2, coupling="spline")


def test_switches_must_be_booleans() -> None:
    """``"off"`` is truthy: read as a bool it would leave memory saving on."""
    net = IUNet(4, levels=2, blocks_per_level=1, hidden_channels=8)
    with pytest.raises(TypeError, match="^IUNet.memory_saving must be True or False, got 'off'$"):
        net.memory_saving = "off"
    assert net.memory_saving
    with pytest.raises(TypeError, match="^IUNet.memory_saving must be True or False, got 0$"):
        IUNet(4, levels=2, memory_saving=0)
    with pytest.raises(TypeError, match="^IUNet.learnable_resampling must be True or False, got 'no'$"):
        IUNet(4, levels=2, learnable_resampling="no")


def test_non_finite_input_is_refused() -> None:
    net = IUNet(4, levels=3, blocks_per_level=1, hidden_channels=8)
    x = torch.randn(1, 4, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^IUNet: input contains non-finite values \(NaN or inf\)$"):
        net(x)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^IUNet.inverse: input contains non-finite values"):
        net.inverse(x)


def test_input_unlike_the_net_is_refused() -> None:
    net = IUNet(4, levels=3, blocks_per_level=1, hidden_channels=8)
    with pytest.raises(TypeError, match=r"^IUNet: input dtype torch.float64 differs from the model's torch.float32; "):
        net(torch.randn(1, 4, 16, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^IUNet.inverse: input dtype torch.float16 differs"):
        net.inverse(torch.randn(1, 4, 16, 16).half())
    with pytest.raises(ValueError, match=r"^IUNet: empty batch \(shape \(0, 4, 16, 16\)\)"):
        net(torch.randn(0, 4, 16, 16))
    with pytest.raises(TypeError, match="^IUNet: expected a floating-point tensor, got dtype torch.int64$"):
        net(torch.zeros(1, 4, 16, 16, dtype=torch.int64))
    net.double()(torch.randn(1, 4, 16, 16, dtype=torch.float64))  # converting the net is the fix


def test_chain_and_layout_take_the_spatial_size() -> None:
    net = IUNet(16, levels=3, blocks_per_level=1, hidden_channels=8)
    x = torch.randn(1, 16, 32, 32)
    expected = r"^IUNet.chain: expected 2 spatial sizes .* \(1, 16, 32, 32\); pass x.shape\[2:\]"
    with pytest.raises(ValueError, match=expected):
        net.chain(x.shape)
    with pytest.raises(ValueError, match=r"^IUNet.layout: expected 2 spatial sizes .*; pass x.shape\[2:\]"):
        net.layout(x.shape)
    with pytest.raises(ValueError, match=r"^IUNet.layout: spatial axis W .* size 30"):
        net.layout((32, 30))
    assert net.chain(x.shape[2:])(x)[0].shape == x.shape
    assert "level 2: 64 ch @ 8x8 (bottom)" in net.layout(x.shape[2:])


def test_option_errors_name_the_option() -> None:
    expected = r"^IUNet: resampling_init='haar' needs strides of 1 or 2 per axis, got \(3, 3\); use resampling_init="
    with pytest.raises(ValueError, match=expected):
        IUNet(16, 2, stride=3)
    IUNet(16, 2, stride=3, resampling_init="squeeze")  # the fix the message names
    with pytest.raises(ValueError, match="^IUNet: resampling_method must be one of"):
        IUNet(4, 2, resampling_method="svd")
    with pytest.raises(ValueError, match="^IUNet: resampling_init must be one of"):
        IUNet(4, 2, resampling_init="wavelet")
    expected = r"^IUNet: level 0 has 1 channel, too few to split off a skip .* or use fewer levels than 2$"
    with pytest.raises(ValueError, match=expected):
        IUNet(1, 2)
    with pytest.raises(ValueError, match=r"^IUNet: level 1 has 1 channel, too few"):
        IUNet(2, 3, stride=1)
    with pytest.raises(ValueError, match="^IUNet: dims must be 1, 2 or 3, got 4$"):
        IUNet(4, 2, dims=4)
    with pytest.raises(ValueError, match=r"^IUNet: stride \(2, 2, 2\) has 3 entries but dims=2$"):
        IUNet(4, 2, stride=(2, 2, 2))
    with pytest.raises(ValueError, match=r"^IUNet: every stride must be >= 1, got \(0, 0\)$"):
        IUNet(4, 2, stride=0)
