"""RevCoupling and the Reversible layer: invertibility, log-det, memory-saving gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flows.diagnostics import saved_bytes
from flows.nn.reversible import Reversible
from flows.transforms.rev_coupling import RevCoupling


def conv_block(channels: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh(), nn.Dropout(dropout),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


def mlp(width: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(2 * width, width))


def conv_stack(depth: int, channels: int = 4, dropout: float = 0.0, a: float = 1.0,
               b: float = 1.0) -> Reversible:
    half = channels // 2
    return Reversible(*[
        RevCoupling(conv_block(half, dropout), conv_block(half, dropout), a=a, b=b)
        for _ in range(depth)
    ])


def token_stack(depth: int, width: int = 6, dropout: float = 0.0) -> Reversible:
    return Reversible(*[
        RevCoupling(mlp(width, dropout), mlp(width, dropout), split_dim=-1) for _ in range(depth)
    ])


def grads(model: nn.Module, x: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Gradients of a fixed loss w.r.t. the input and every parameter."""
    torch.manual_seed(seed)
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y.sin() * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]


def assert_grads_close(g1, g2, rtol: float, atol: float) -> None:
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape,split_dim", [((3, 4, 5, 5), 1), ((3, 7, 6), -1)],
                         ids=["image", "tokens"])
def test_round_trip_and_logdet_cancel(shape, split_dim):
    torch.manual_seed(0)
    half = shape[split_dim] // 2
    f, g = (conv_block(half), conv_block(half)) if split_dim == 1 else (mlp(half), mlp(half))
    block = RevCoupling(f, g, a=0.7, b=-1.3, split_dim=split_dim).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y, logdet = block(x)
    x_rec, inv_logdet = block.inverse(y)
    assert y.shape == x.shape and logdet.shape == (shape[0],)
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet + inv_logdet, torch.zeros(shape[0], dtype=torch.float64))
    expected = (x[0].numel() // 2) * (math.log(0.7) + math.log(1.3))
    torch.testing.assert_close(logdet, torch.full((shape[0],), expected, dtype=torch.float64))


def brute_logdet(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = []
    shape = x.shape[1:]
    for xi in x:
        jac = torch.autograd.functional.jacobian(
            lambda v: block(v.view(1, *shape))[0].flatten(), xi.flatten())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def test_logdet_matches_jacobian():
    torch.manual_seed(0)
    block = RevCoupling(conv_block(2), conv_block(2), a=0.5, b=-2.0).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(block(x)[1], brute_logdet(block, x))


def test_momentum_net_coupling():
    torch.manual_seed(0)
    gamma = 0.8
    block = RevCoupling(
        mlp(3), nn.Identity(), a=gamma, split_dim=-1,
        coupling_forward=(lambda v, fx: gamma * v + (1 - gamma) * fx, None),
        coupling_inverse=(lambda v_new, fx: (v_new - (1 - gamma) * fx) / gamma, None),
    ).double()
    v, x = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    y, logdet = block(torch.cat([v, x], dim=-1))
    v_new = gamma * v + (1 - gamma) * block.f(x)
    torch.testing.assert_close(y, torch.cat([v_new, x + v_new], dim=-1))
    torch.testing.assert_close(block.inverse(y)[0], torch.cat([v, x], dim=-1))
    torch.testing.assert_close(logdet, brute_logdet(block, torch.cat([v, x], dim=-1)))


def test_errors():
    block = RevCoupling(nn.Identity(), nn.Identity())
    with pytest.raises(ValueError, match="odd size 5"):
        block(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="nonzero"):
        RevCoupling(nn.Identity(), nn.Identity(), a=0.0)
    with pytest.raises(ValueError, match="batch"):
        RevCoupling(nn.Identity(), nn.Identity(), split_dim=0)
    for dim in (3, 5, -4):  # wrapped by % before: "the batch dimension", or torch's IndexError
        with pytest.raises(ValueError, match=f"split_dim {dim} is not a dimension of the input of shape"):
            RevCoupling(nn.Identity(), nn.Identity(), split_dim=dim)(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="coupling_inverse"):
        RevCoupling(nn.Identity(), nn.Identity(), coupling_forward=lambda s, f: s + f)


@pytest.mark.parametrize("make,shape", [(conv_stack, (2, 4, 5, 5)), (token_stack, (2, 3, 12))],
                         ids=["conv", "tokens"])
def test_memory_saving_gradients_float64(make, shape):
    torch.manual_seed(0)
    model = make(6).double()
    x = torch.randn(*shape, dtype=torch.float64)
    model.memory_saving = False
    plain = grads(model, x)
    model.memory_saving = True
    saving = grads(model, x)
    assert_grads_close(plain, saving, rtol=1e-10, atol=1e-12)


def test_memory_saving_gradients_float32():
    # float32 reconstruction drift grows with depth; 6 well-conditioned blocks stay within
    # rtol 1e-5 / atol 1e-6.
    torch.manual_seed(0)
    model = conv_stack(6)
    x = torch.randn(2, 4, 5, 5)
    model.memory_saving = False
    plain = grads(model, x)
    model.memory_saving = True
    assert_grads_close(plain, grads(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["f", "both"])
def test_dropout_recomputes_identically(where):
    torch.manual_seed(0)
    model = token_stack(4, dropout=0.3).double().train()
    if where == "f":
        for block in model:
            for m in block.g.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
    x = torch.randn(4, 3, 12, dtype=torch.float64)
    model.memory_saving = False
    plain = grads(model, x, seed=7)
    model.memory_saving = True
    saving = grads(model, x, seed=7)
    assert_grads_close(plain, saving, rtol=1e-10, atol=1e-12)
    # Same seed, same masks: the memory-saving step is deterministic too.
    assert_grads_close(saving, grads(model, x, seed=7), rtol=0, atol=0)


class _FunctionalDropout(nn.Module):
    """tanh(linear(h)) with a dropout mask drawn by ``F.dropout``: no dropout module to find."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(torch.tanh(self.linear(h)), p=0.3, training=self.training)


def test_functional_dropout_declared_stochastic_recomputes_identically():
    # The block says it draws (stochastic=True), so the engine must snapshot the seed it
    # draws for F's and G's substreams and replay it for the rebuild.
    torch.manual_seed(0)
    blocks = [RevCoupling(_FunctionalDropout(6), _FunctionalDropout(6), split_dim=-1) for _ in range(2)]
    for block in blocks:
        block.stochastic = True
    model = Reversible(*blocks).double().train()
    assert all(block.draws_random for block in blocks)
    x = torch.randn(4, 12, dtype=torch.float64)
    model.memory_saving = False
    plain = grads(model, x, seed=7)
    model.memory_saving = True
    assert_grads_close(plain, grads(model, x, seed=7), rtol=1e-10, atol=1e-12)


def test_shared_rng_stream_would_break_dropout_in_f_and_g():
    # Forcing F and G onto the one global stream: the inverse evaluates G first and hands
    # it F's mask, so memory-saving gradients go wrong. This is why RevCoupling splits them.
    torch.manual_seed(0)
    model = token_stack(2, dropout=0.3).double().train()
    for block in model:
        block.stochastic = False
    x = torch.randn(4, 3, 12, dtype=torch.float64)
    model.memory_saving = False
    plain = grads(model, x, seed=7)
    model.memory_saving = True
    saving = grads(model, x, seed=7)
    assert max((a - b).abs().max().item() for a, b in zip(plain, saving)) > 1e-3


def test_opt_out_and_switching_between_steps():
    torch.manual_seed(0)
    model = conv_stack(4).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    model.memory_saving = False
    plain = grads(model, x)
    model.memory_saving = True
    model[1].memory_saving = False
    assert_grads_close(plain, grads(model, x), rtol=1e-10, atol=1e-12)

    def loss():
        return model(x).pow(2).sum()

    all_saving = conv_stack(4).double()
    all_saving.load_state_dict(model.state_dict())
    assert saved_bytes(lambda: all_saving(x).pow(2).sum(), all_saving) < saved_bytes(loss, model)
    model[1].memory_saving = True

    # Alternate the mode every step; the trajectory equals plain training.
    reference = conv_stack(4).double()
    reference.load_state_dict(model.state_dict())
    reference.memory_saving = False
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, reference))
    for step in range(4):
        model.memory_saving = step % 2 == 0
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_bytes_kept_do_not_grow_with_depth():
    x = torch.randn(8, 4, 6, 6)

    def kept(depth: int, saving: bool, loss=lambda y: y.pow(2).sum()) -> int:
        torch.manual_seed(0)
        model = conv_stack(depth)
        model.memory_saving = saving
        return saved_bytes(lambda: loss(model(x)), model)

    assert kept(32, True) <= 1.1 * kept(4, True)
    assert kept(32, False) > 6 * kept(4, False)
    # The engine keeps exactly its output (a sum saves nothing itself).
    assert kept(32, True, loss=lambda y: y.sum()) == x.numel() * x.element_size()


def test_memory_saving_backward_runs_f_and_g_once_per_block() -> None:
    """The fused reconstruction evaluates F and G once each (with grad) per block."""
    calls = {"f": 0, "g": 0}

    def counted(name: str) -> nn.Module:
        net = nn.Linear(3, 3)
        net.register_forward_pre_hook(lambda *_: calls.__setitem__(name, calls[name] + 1))
        return net

    stack = Reversible(*[RevCoupling(counted("f"), counted("g")) for _ in range(3)])
    x = torch.randn(4, 6, dtype=torch.float64)
    stack.double()
    stack(x).pow(2).sum().backward()
    assert calls == {"f": 3 + 3, "g": 3 + 3}  # forward once each, backward once each


@pytest.mark.parametrize(
    "f,g,shape,message",
    [
        (mlp(3), mlp(3), (2, 8),
         r"expected 6 along split_dim -1 \(two halves of the 3 that the Linear starting F takes\), got 8"),
        (nn.Identity(), nn.Conv2d(2, 2, 1), (2, 6, 3, 3),
         r"expected 4 along split_dim 1 \(two halves of the 2 that the Conv2d starting G takes\), got 6"),
    ],
    ids=["tokens", "known-from-g"],
)
def test_wrong_split_size_names_the_first_layer(f, g, shape, message):
    split_dim = -1 if len(shape) == 2 else 1
    block = RevCoupling(f, g, split_dim=split_dim)
    with pytest.raises(ValueError, match="^RevCoupling: " + message):
        block(torch.randn(*shape))


def test_split_size_of_an_opaque_function_is_not_guessed():
    # A function whose input size is unknowable without running it: F's own error stands.
    block = RevCoupling(lambda h: h @ torch.eye(3), nn.Identity(), split_dim=-1)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        block(torch.randn(2, 8))


@pytest.mark.parametrize("half", [0, 1], ids=["half1", "half2"])
def test_merge_that_its_inverse_does_not_undo(half):
    def wrong_merge(v, fx):
        return v * fx + v

    def wrong_unmerge(out, fx):
        return out - fx

    merges = [None, None]
    unmerges = [None, None]
    merges[half], unmerges[half] = wrong_merge, wrong_unmerge
    message = (
        rf"^RevCoupling: coupling_inverse \(wrong_unmerge\) does not invert coupling_forward \(wrong_merge\) "
        rf"for half {half + 1}: .* is off by"
    )
    with pytest.raises(ValueError, match=message):
        RevCoupling(nn.Identity(), nn.Identity(), coupling_forward=tuple(merges), coupling_inverse=tuple(unmerges))


def test_merge_check_accepts_merges_on_captured_tensors():
    # The probe is 0-d, so a merge broadcasting against a float32 parameter it captured runs.
    gamma = torch.full((3,), 0.1)
    RevCoupling(mlp(3), nn.Identity(), split_dim=-1,
                coupling_forward=(lambda v, fx: gamma * v + (1 - gamma) * fx, None),
                coupling_inverse=(lambda out, fx: (out - (1 - gamma) * fx) / gamma, None))


class _Zero(nn.Module):
    """A G that ignores its input (a branch switched off): nothing to differentiate."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h)


def test_g_may_use_parameters_registered_elsewhere_in_the_block_or_be_constant() -> None:
    """The rebuild pulled G's gradient only to ``g.parameters()``: a G using parameters
    registered elsewhere in the block (a bound method, MEFT's shared layer) got none; a G
    without grad crashed the rebuild."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    shared = RevCoupling(mlp(3), lin.forward)
    shared.lin = lin  # registered on the block, not under G
    for block in (shared, RevCoupling(mlp(3), _Zero())):
        model = Reversible(block).double()
        x = torch.randn(4, 6, dtype=torch.float64)
        model.memory_saving = False
        plain = grads(model, x)
        model.memory_saving = True
        assert_grads_close(plain, grads(model, x), rtol=1e-10, atol=1e-12)
