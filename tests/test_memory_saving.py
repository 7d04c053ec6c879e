"""Memory-saving backward: memory that does not grow with depth, opt-out, mode switches,
RNG replay, the drift guard, and float32 drift against depth."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import flows
from flows.models import Glow
from flows.transforms import (
    ActNorm,
    AffineCoupling,
    Bijector,
    Chain,
    InvConv1x1,
    Inverse,
    ResidualBlock,
    RevCoupling,
    Tail,
    channel_mask,
)

from conftest import nll


def smooth_conditioner(in_channels: int, out_channels: int, hidden: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ELU(), nn.Conv2d(hidden, out_channels, 3, padding=1)
    )
    nn.init.normal_(net[-1].weight, std=0.01)
    return net


def glow_chain(depth: int, channels: int = 4, hidden: int = 16, smooth: bool = False) -> Chain:
    torch.manual_seed(0)
    steps = []
    for k in range(depth):
        mask = channel_mask(channels, k % 2)
        if smooth:
            half = channels // 2
            coupling = AffineCoupling(mask, conditioner=smooth_conditioner(half, 2 * (channels - half), hidden))
        else:
            coupling = AffineCoupling(mask, hidden_channels=hidden)
            nn.init.normal_(coupling.conditioner[-1].weight, std=0.01)
        steps.append(Chain(ActNorm(channels), InvConv1x1(channels, lu=True), coupling))
    return Chain(*steps)


def kept_bytes(chain: nn.Module, x: torch.Tensor) -> int:
    return flows.saved_bytes(lambda: nll(chain, x), exclude=chain)


def test_kept_bytes_do_not_grow_with_depth() -> None:
    x = torch.randn(8, 4, 8, 8)
    saving, plain = {}, {}
    for depth in (4, 32):
        chain = glow_chain(depth)
        chain(x)  # data-dependent init
        plain[depth] = kept_bytes(chain, x)
        chain.memory_saving = True
        saving[depth] = kept_bytes(chain, x)
    assert saving[32] <= 1.1 * saving[4]
    assert plain[32] >= 6 * plain[4]
    assert saving[4] < plain[4]


def test_multiscale_model_kept_bytes_do_not_grow_with_depth() -> None:
    x = torch.rand(8, 1, 8, 8)
    kept = {}
    for steps in (2, 16):
        torch.manual_seed(0)
        model = Glow((1, 8, 8), levels=2, steps=steps, hidden_channels=8)
        model.log_prob(x)
        model.memory_saving = True
        kept[steps] = flows.saved_bytes(lambda m=model: -m.log_prob(x).mean(), exclude=model)
    assert kept[16] <= 1.1 * kept[2]


def grads(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return list(torch.autograd.grad(nll(module, x), params))


def test_opt_out_block_keeps_its_activations_and_gradients_match() -> None:
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    chain = glow_chain(6).double()
    chain(x)
    expected = grads(chain, x)
    chain.memory_saving = True
    all_saving = kept_bytes(chain, x)
    chain[2][2].memory_saving = False  # the coupling of the third step
    with_opt_out = kept_bytes(chain, x)
    for a, b in zip(grads(chain, x), expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert with_opt_out > all_saving


def test_switching_mode_between_steps_matches_plain_training() -> None:
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)

    def train(switch: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8).double()
        # SGD with momentum: parameters move linearly in the gradients, so float64 rounding
        # stays at rounding level (Adam divides each entry by the root of its own second
        # moment, which blows up the rounding of entries near zero by lr / eps).
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        for step in range(4):
            model.memory_saving = switch and step % 2 == 0
            opt.zero_grad()
            (-model.log_prob(x).mean()).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(True), train(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_actnorm_initialises_once_and_identically_in_both_modes() -> None:
    x = torch.rand(32, 1, 8, 8, dtype=torch.float64)
    states = []
    for saving in (False, True):
        torch.manual_seed(2)
        model = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8).double()
        model.memory_saving = saving
        (-model.log_prob(x).mean()).backward()
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=0)


def test_dropout_inside_a_block_recomputes_identically() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(16, 4, 3, padding=1))
    chain = Chain(ActNorm(4), AffineCoupling(channel_mask(4, 0), conditioner=net), InvConv1x1(4)).double()
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    chain(x)
    results = []
    for saving in (False, True):
        chain.memory_saving = saving
        torch.manual_seed(7)
        results.append(grads(chain, x))
        after = torch.rand(1)  # the global RNG stream must continue as in plain mode
        results[-1].append(after)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class LossyInverse(Bijector):
    """A scaling whose inverse is wrong by ``error``: a stand-in for a badly conditioned block."""

    def __init__(self, error: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(0.3))
        self.error = error

    def forward(self, x, context=None):
        return x * self.log_scale.exp(), self.log_scale.expand(x.shape[0]) * x[0].numel()

    def inverse(self, y, context=None):
        return y * (-self.log_scale).exp() * (1 + self.error), -self.log_scale.expand(y.shape[0]) * y[0].numel()


def test_drift_guard_falls_back_to_ordinary_backward() -> None:
    chain = Chain(ActNorm(3), LossyInverse(1e-2), ActNorm(3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    chain(x)
    expected = grads(chain, x)
    chain.memory_saving = True
    wrong = grads(chain, x)
    assert max((a - b).abs().max().item() for a, b in zip(wrong, expected)) > 1e-4
    chain.drift_tolerance = 1e-6
    with pytest.warns(RuntimeWarning, match="drift_tolerance"):
        guarded = grads(chain, x)
    for a, b in zip(guarded, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_drift_guard_is_silent_when_reconstruction_is_good() -> None:
    chain = glow_chain(3).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    chain(x)
    chain.memory_saving = True
    chain.drift_tolerance = 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads(chain, x)


def test_context_manager_switches_and_restores() -> None:
    model = Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8)
    assert not model.memory_saving
    with flows.memory_saving(model):
        assert model.memory_saving
    assert not model.memory_saving
    with pytest.raises(ValueError, match="no Chain"):
        with flows.memory_saving(nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("depth", [4, 16, 64])
def test_float32_gradient_drift_grows_slowly_with_depth(depth: int) -> None:
    """Float32 parity, relative to the largest gradient entry: within 1e-5 up to depth 16,
    and growing at most linearly beyond (the input's reconstruction error grows about
    linearly: 1e-6 at depth 4, 4e-6 at depth 64 in this set-up).

    Smooth (ELU) conditioners: with ReLU, a reconstruction error of 1e-6 can move a
    hidden unit across the kink, which changes that unit's share of a weight gradient
    (one term of the batch sum; seen up to 2% of the largest entry at depth 64). That
    is a property of ReLU's discontinuous derivative, not drift of the method.
    """
    chain = glow_chain(depth, smooth=True)
    x = torch.randn(4, 4, 8, 8)
    chain(x)
    expected = grads(chain, x)
    chain.memory_saving = True
    got = grads(chain, x)
    scale = max(g.abs().max().item() for g in expected)
    error = max((a - b).abs().max().item() for a, b in zip(got, expected)) / scale
    assert error <= 1e-5 * max(1, depth / 16)


class AutocastProbe(Bijector):
    """A learnable scaling that records whether autocast was on at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(0.1))
        self.seen: list[bool] = []

    def forward(self, x, context=None):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return x * self.log_scale.exp(), self.log_scale.expand(x.shape[0]) * x[0].numel()

    def inverse(self, y, context=None):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return y * (-self.log_scale).exp(), -self.log_scale.expand(y.shape[0]) * y[0].numel()


def test_recompute_replays_autocast() -> None:
    probe = AutocastProbe()
    chain = Chain(probe, ActNorm(3))
    chain.memory_saving = True
    x = torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nll(chain, x)
    loss.backward()  # outside the autocast region, as training loops do
    assert probe.seen == [True, True, True]  # forward, then the backward's inverse and recompute


def test_bfloat16_autocast_glow_gradients_agree_within_bfloat16_error() -> None:
    """Under bf16 autocast the conditioners run in bf16 but the invertible path stays in
    float32 (the 1x1 convolution runs outside autocast), so memory-saving backward rebuilds
    inputs as well as in float32: its gradients differ from ordinary bf16 ones by less than
    bf16 itself differs from float32 (before, a bf16 1x1 convolution made them 2.5x that)."""
    torch.manual_seed(0)
    model = Glow((2, 8, 8), levels=2, steps=2, hidden_channels=8)
    x = torch.rand(4, 2, 8, 8)
    with torch.no_grad():
        model.log_prob(x)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def grads(saving: bool, bf16: bool) -> list[torch.Tensor]:
        m = copy.deepcopy(model)
        m.memory_saving = saving
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = -m.log_prob(x).mean()
        return list(torch.autograd.grad(loss, list(m.parameters())))

    def gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max(((u - v).abs().max() / u.abs().max().clamp_min(1e-12)).item() for u, v in zip(a, b))

    ordinary_bf16 = grads(False, True)
    assert gap(ordinary_bf16, grads(True, True)) < gap(grads(False, False), ordinary_bf16)


def test_drift_fallback_replays_dropout_and_skips_state_updates() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4))
    chain = Chain(ActNorm(4), AffineCoupling(channel_mask(4, 0), conditioner=net, image=False), LossyInverse(1e-2))
    x = torch.randn(6, 4)
    chain(x)
    chain.memory_saving = True
    chain.drift_tolerance = 1e-6
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning, match="drift_tolerance"):
        y_guarded, _ = chain(x)
    chain.memory_saving = False
    torch.manual_seed(1)
    y_plain, _ = chain(x)
    torch.testing.assert_close(y_guarded, y_plain)


def test_nested_chains_are_rebuilt_once_per_step_with_fused_couplings() -> None:
    """A step chain inside a multi-scale Tail is rebuilt block by block, once; each coupling
    runs its conditioner once in the forward pass and once in backward, and no Glow block
    runs its separate inverse (each has a fused reconstruct)."""
    model = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8)
    x = torch.rand(4, 1, 8, 8)
    model.log_prob(x)
    couplings = [m for m in model.modules() if isinstance(m, AffineCoupling)]
    calls = {"conditioner": 0, "inverse": 0}

    def count_conditioner(*_):
        calls["conditioner"] += 1

    for c in couplings:
        c.conditioner.register_forward_pre_hook(count_conditioner)
    for block in model.modules():
        if isinstance(block, (AffineCoupling, ActNorm, InvConv1x1)):
            original_inverse = block.inverse
            block.inverse = lambda y, f=original_inverse: (calls.__setitem__("inverse", calls["inverse"] + 1), f(y))[1]
    model.memory_saving = True
    model.bits_per_dim(x).mean().backward()
    assert calls == {"conditioner": 2 * len(couplings), "inverse": 0}


def test_sampling_direction_rebuilds_couplings_with_one_conditioner_pass() -> None:
    """Memory-saving backward through ``Flow.sample_and_log_prob`` rebuilds each
    ``Inverse(block)`` with the block's fused ``reconstruct_inverse``: each coupling's
    conditioner runs once in the sampling pass and once in backward, and no Glow block runs
    its separate forward or inverse there; the gradients equal ordinary autograd's."""
    torch.manual_seed(0)
    model = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8, split_prior=False).double()
    model.log_prob(torch.rand(4, 1, 8, 8, dtype=torch.float64))  # initialise ActNorm
    for p in model.parameters():  # away from the zero-initialised last layers
        p.data.add_(0.05 * torch.randn_like(p))

    def grads(saving: bool) -> list[torch.Tensor]:
        model.memory_saving = saving
        model.zero_grad()
        torch.manual_seed(1)
        x, log_q = model.sample_and_log_prob(4)
        (x.square().mean() + log_q.mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(False)
    couplings = [m for m in model.modules() if isinstance(m, AffineCoupling)]
    blocks = [m for m in model.modules() if isinstance(m, (AffineCoupling, ActNorm, InvConv1x1))]
    calls = {"conditioner": 0, "forward or inverse": 0}

    def count(key: str):  # type: ignore[no-untyped-def]
        def hook(*_) -> None:
            calls[key] += 1

        return hook

    handles = [c.conditioner.register_forward_pre_hook(count("conditioner")) for c in couplings]
    originals = [(b, b.forward, b.inverse) for b in blocks]
    for b, forward, inverse in originals:
        b.forward = lambda *a, f=forward: (count("forward or inverse")(), f(*a))[1]
        b.inverse = lambda *a, f=inverse: (count("forward or inverse")(), f(*a))[1]
    model.memory_saving = True
    torch.manual_seed(1)
    x, log_q = model.sample_and_log_prob(4)
    sampling_calls = dict(calls)
    for key in calls:
        calls[key] = 0
    model.zero_grad()
    (x.square().mean() + log_q.mean()).backward()
    for handle in handles:
        handle.remove()
    for b, *_ in originals:
        del b.forward, b.inverse
    assert calls == {"conditioner": len(couplings), "forward or inverse": 0}
    assert sampling_calls["conditioner"] == len(couplings)
    for p, g in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


def test_backward_does_not_import_sympy() -> None:
    """``torch.autograd.grad``'s checks of explicit output gradients import torch's
    symbolic-shapes module (sympy, about 35 MiB resident) on first use; the engine calls
    the autograd engine's entry directly, without them."""
    script = (
        "import sys, torch, flows\n"
        "model = flows.models.Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4)\n"
        "model.memory_saving = True\n"
        "model.log_prob(torch.rand(2, 1, 4, 4)).sum().backward()\n"
        "assert model.bijector.blocks[-1].bijector.blocks[0].log_scale.grad is not None\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_actnorm_initialisation_follows_a_loaded_state() -> None:
    """ActNorm reads its ``initialized`` buffer once (a CUDA read would synchronise every
    step); loading a state dict makes it read the loaded buffer again."""
    fresh = ActNorm(2)
    trained = ActNorm(2)
    trained(torch.randn(16, 2, 3, 3) * 3 + 1)
    assert bool(trained.initialized)
    trained.load_state_dict(fresh.state_dict())  # back to an uninitialised state
    x = torch.randn(16, 2, 3, 3) * 5 - 2
    y, _ = trained(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    fresh.load_state_dict(trained.state_dict())  # an initialised state: no new initialisation
    torch.testing.assert_close(fresh(x)[0], y)


def test_uninitialised_inverse_actnorm_does_not_initialise_in_the_recompute() -> None:
    """Rebuilding an ``Inverse(ActNorm)`` runs ActNorm's forward; it must not initialise
    there (ordinary backward never initialises it in this direction either)."""
    torch.manual_seed(0)
    chain = Chain(InvConv1x1(3), Inverse(ActNorm(3))).double()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)

    def grads(saving: bool) -> list[torch.Tensor]:
        model = copy.deepcopy(chain)
        model.memory_saving = saving
        params = list(model.parameters())
        return list(torch.autograd.grad(nll(model, x.requires_grad_(True)), [x, *params]))

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _batchnorm_revnet() -> Chain:
    """RevLib's iRevNet pattern: BatchNorm inside the coupling functions."""

    def branch() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))

    return Chain(*[RevCoupling(branch(), branch()) for _ in range(3)])


@pytest.mark.parametrize("drift_tolerance", [None, 1.0, 0.0])
def test_batchnorm_statistics_update_once_per_step_in_both_modes(drift_tolerance: float | None) -> None:
    """Running statistics after memory-saving steps equal ordinary training's, and
    ``num_batches_tracked`` counts one per step (the rebuild used to add a second); also
    through the drift guard (1.0: check passes, 0.0: falls back to ordinary backward)."""
    torch.manual_seed(0)
    plain = _batchnorm_revnet().double()
    saving = copy.deepcopy(plain)
    saving.memory_saving = True
    saving.drift_tolerance = drift_tolerance
    x = torch.randn(3, 6, 4, 4, 4, dtype=torch.float64)
    for model in (plain, saving):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for batch in x:
            opt.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the forced fallback warns
                nll(model, batch).backward()
            opt.step()
    for (name, a), b in zip(plain.named_buffers(), saving.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    tracked = [b.item() for n, b in saving.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked == [len(x)] * 6
    for p, q in zip(plain.parameters(), saving.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-10)


def test_parameters_changed_in_place_before_backward_raise() -> None:
    """Ordinary autograd raises when a saved parameter changed in place before backward;
    the memory-saving rebuild would silently use the new weights: it raises too."""
    chain = glow_chain(2)
    chain.memory_saving = True
    x = torch.randn(4, 4, 4, 4)
    loss = nll(chain, x)
    with torch.no_grad():
        chain[1][2].conditioner[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        loss.backward()


def _batchnorm_mlp_revnet() -> Chain:
    def net() -> nn.Sequential:
        return nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))

    return Chain(RevCoupling(net(), net()), RevCoupling(net(), net())).double()


def test_batchnorm_with_an_ordinary_graph_alive_backpropagates() -> None:
    """BatchNorm saves its running statistics for ordinary backward: the memory-saving
    rebuild must leave those tensors untouched, whether the ordinary graph is another
    micro-batch of an accumulation or an opted-out block behind the drift guard."""
    torch.manual_seed(0)
    chain = _batchnorm_mlp_revnet()
    x1, x2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    chain.memory_saving = False
    y1, l1 = chain(x1)
    chain.memory_saving = True
    y2, l2 = chain(x2)
    (y1.sum() + l1.sum() + y2.sum() + l2.sum()).backward()
    guarded = _batchnorm_mlp_revnet()
    guarded[1].memory_saving = False
    guarded.memory_saving = True
    guarded.drift_tolerance = 1e-3
    y, logdet = guarded(x1)
    (y.sum() + logdet.sum()).backward()
    assert all(p.grad is not None for p in guarded.parameters())


def test_gradient_accumulation_rebuilds_with_each_forward_passes_state() -> None:
    """Two forward passes, then one backward: the second pass advances the spectral-norm
    power iteration, but the first pass's rebuild uses the vectors the first pass used."""
    torch.manual_seed(0)
    base = Chain(*[ResidualBlock.mlp(3, 16, logdet="exact", power_iteration_tol=None) for _ in range(2)])
    base = base.double().train()
    with torch.no_grad():  # as after optimiser steps: the power iteration lags the weights
        for p in base.parameters():
            p.add_(0.3 * torch.randn_like(p))
    xs = torch.randn(2, 4, 3, dtype=torch.float64)

    def loss(chain: Chain, x: torch.Tensor) -> torch.Tensor:
        y, logdet = chain(x)
        return y.pow(2).sum() - logdet.sum()

    plain = copy.deepcopy(base)
    expected = [torch.autograd.grad(loss(plain, x), list(plain.parameters())) for x in xs]
    saving = copy.deepcopy(base)
    saving.memory_saving = True
    got = torch.autograd.grad(loss(saving, xs[0]) + loss(saving, xs[1]), list(saving.parameters()))
    for g, a, b in zip(got, *expected):
        torch.testing.assert_close(g, a + b, rtol=1e-10, atol=1e-12)


def test_a_tail_opted_out_as_a_whole_keeps_its_activations() -> None:
    model = Glow((1, 4, 4), levels=1, steps=2, hidden_channels=8)
    x = torch.rand(4, 1, 4, 4)
    model.bits_per_dim(x)  # ActNorm initialisation
    model.memory_saving = True
    step = next(b for b in model.bijector if isinstance(b, Tail) and len(b.leaves()) > 1)
    step.memory_saving = False
    assert model.bijector.leaves().count(step) == 1
    saving_all = flows.saved_bytes(lambda: model.bits_per_dim(x).mean(), exclude=model)
    step.memory_saving = True
    assert flows.saved_bytes(lambda: model.bits_per_dim(x).mean(), exclude=model) < saving_all


def test_a_tail_pickled_before_regions_loads_and_runs() -> None:
    """Whole-model pickles of an older version: ``memory_saving`` was an instance
    attribute, ``shape_preserving`` set by builders, and no region was kept."""
    torch.manual_seed(0)
    tail = Tail(Chain(ActNorm(2), InvConv1x1(2)), 4, (2, 2, 2))
    tail.memory_saving = False
    x = torch.randn(3, 12)
    expected = tail(x)[0]
    state = dict(tail.__dict__)
    state["memory_saving"] = state.pop("_memory_saving")
    state["shape_preserving"] = True
    del state["_region"]
    old = Tail.__new__(Tail)
    old.__setstate__(state)
    assert old.memory_saving is False and old.leaves() == [old]
    torch.testing.assert_close(old(x)[0], expected)


def test_a_block_without_inverse_names_the_fix_in_memory_saving_backward() -> None:
    class Doubling(Bijector):  # forward only
        def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            return 2 * x, torch.full((x.shape[0],), x[0].numel() * math.log(2.0))

    block = Doubling()
    chain = Chain(block, AffineCoupling(channel_mask(4, 0), hidden_channels=8, image=False))
    chain.memory_saving = True
    x = torch.randn(3, 4, requires_grad=True)
    y, logdet = chain(x)
    with pytest.raises(NotImplementedError, match="Doubling implements no inverse.*set memory_saving = False"):
        (y.sum() + logdet.sum()).backward()
    block.memory_saving = False  # the fix it names: ordinary autograd for that block
    y, logdet = chain(x)
    (y.sum() + logdet.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_memory_saving_switch_takes_only_a_bool() -> None:
    """``model.memory_saving = "off"`` would read as on: every user-facing switch refuses it."""
    flow = Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4)
    inverse = Inverse(ActNorm(2))
    tail = Tail(ActNorm(2), 2, (2,))
    chain, block = Chain(ActNorm(2)), ActNorm(2)
    owners = ((flow, "Flow"), (inverse, "Inverse"), (tail, "Tail"), (chain, "Chain"), (block, "ActNorm"))
    for owner, name in owners:
        for value in ("off", 0, None):
            with pytest.raises(TypeError, match=rf"^{name}.memory_saving must be True or False, got "):
                owner.memory_saving = value
        owner.memory_saving = False
        assert owner.memory_saving is False


def test_a_block_pickled_with_the_switch_as_an_attribute_loads_with_it() -> None:
    """Before the switch was a property, ``memory_saving`` lived in the instance dict."""
    import pickle

    block = ActNorm(2)
    state = block.__dict__.copy()
    state["memory_saving"] = state.pop("_memory_saving")
    state["memory_saving"] = False
    old = ActNorm.__new__(ActNorm)
    old.__setstate__(state)
    assert old.memory_saving is False and "memory_saving" not in old.__dict__
    assert pickle.loads(pickle.dumps(old)).memory_saving is False
