"""Tests of the i-ResNet block and spectral normalisation."""

from __future__ import annotations

import copy
import io
import math
import threading
import warnings

import pytest
import torch
from torch import nn

from flows.nn import Reversible
from flows.transforms import logdet_wanted, skipping_logdet
from flows.transforms.chain import Chain
from flows.transforms.residual import LipSwish, ResidualBlock
from flows.transforms.spectral_norm import (
    converge_spectral_norm,
    spectral_norm,
    spectral_norm_layers,
)
from flows.transforms.switches import frozen_updates, recomputing

F64 = torch.float64


def _saturate(block: ResidualBlock, scale: float = 4.0) -> ResidualBlock:
    """Scale every raw weight up so each layer is normalised to exactly ``lipschitz``.

    Default initialisations give layers of norm < 1, which would leave the spectral norm
    inactive and the Jacobians small; saturated blocks test the bound where it binds.
    """
    with torch.no_grad():
        for layer in spectral_norm_layers(block.net):
            layer.weight_orig.mul_(scale)
    return block


def _mlp(lipschitz: float = 0.9, dtype: torch.dtype = F64, **kwargs) -> ResidualBlock:
    block = ResidualBlock.mlp(3, 16, lipschitz=lipschitz, **kwargs).to(dtype)
    _saturate(block)
    converge_spectral_norm(block.net)
    return block


def _conv(lipschitz: float = 0.9, dtype: torch.dtype = F64, **kwargs) -> ResidualBlock:
    block = ResidualBlock.conv(2, 4, lipschitz=lipschitz, **kwargs).to(dtype)
    _saturate(block)
    with torch.no_grad():
        block.eval()(torch.zeros(1, 2, 4, 4, dtype=dtype))  # learn the conv input shapes
    converge_spectral_norm(block.net)
    return block


def _exact_logdet(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the autograd Jacobian of ``x + g(x)``, one sample at a time."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda z: z + block.net(z[None])[0], xi)
        out.append(torch.linalg.slogdet(jac.reshape(xi.numel(), xi.numel())).logabsdet)
    return torch.stack(out)


# -- LipSwish and spectral normalisation ------------------------------------------------


def test_lipswish_is_1_lipschitz() -> None:
    act = LipSwish()
    x = torch.linspace(-20, 20, 20001, dtype=F64, requires_grad=True)
    for rho in (-3.0, 0.0, 0.54, 3.0):
        with torch.no_grad():
            act.rho.fill_(rho)
        (d,) = torch.autograd.grad(act(x).sum(), x)
        assert d.abs().max() <= 1.0
    assert act.rho.requires_grad


@pytest.mark.parametrize("lipschitz", [0.5, 0.9])
def test_dense_spectral_norm_bound(lipschitz: float) -> None:
    block = _mlp(lipschitz)
    for layer in spectral_norm_layers(block.net):
        norm = torch.linalg.matrix_norm(layer.weight, ord=2)
        assert norm <= lipschitz + 1e-3
        assert norm >= lipschitz - 1e-3  # saturated: the bound is tight


def _conv_matrix(layer: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The explicit matrix of the conv operator (no bias) on inputs of ``in_shape``."""
    weight = layer.weight.detach()
    x = torch.zeros(1, *in_shape, dtype=weight.dtype)
    jac = torch.autograd.functional.jacobian(lambda z: layer._conv_forward(z, weight, None), x)
    n_in = math.prod(in_shape)
    return jac.reshape(-1, n_in)


@pytest.mark.parametrize(
    "layer, in_shape",
    [
        (nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)),
        (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 6)),
        (nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), (2, 4, 4)),
        (nn.Conv1d(2, 3, 5, padding=2, dilation=1), (2, 9)),
        (nn.Conv3d(2, 2, 3, padding=1, groups=2), (2, 3, 3, 4)),
    ],
    ids=["conv2d", "conv2d-stride2", "conv2d-circular", "conv1d", "conv3d-groups"],
)
def test_conv_spectral_norm_bound(layer: nn.Module, in_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        layer.weight.mul_(5.0)
    spectral_norm(layer, lipschitz=0.9)
    layer(torch.randn(2, *in_shape, dtype=F64))
    converge_spectral_norm(layer)
    sigma = torch.linalg.matrix_norm(_conv_matrix(layer, in_shape), ord=2)
    assert sigma <= 0.9 + 1e-3
    assert sigma >= 0.9 - 1e-3  # the weight was scaled up, so the bound is tight
    # The operator norm is not the reshaped kernel's norm (the tempting shortcut).
    kernel = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    assert abs(torch.linalg.matrix_norm(kernel, ord=2) - sigma) > 1e-3


def test_block_conv_layers_bounded() -> None:
    block = _conv()
    shapes = [(2, 4, 4), (4, 4, 4), (4, 4, 4)]
    for layer, shape in zip(spectral_norm_layers(block.net), shapes):
        assert torch.linalg.matrix_norm(_conv_matrix(layer, shape), ord=2) <= 0.9 + 1e-3


def test_power_iteration_updates_only_when_allowed() -> None:
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(4, 4), init_iterations=1)
    x = torch.randn(3, 4)
    layer.eval()(x)
    u0 = layer.weight_u.clone()
    assert torch.equal(u0, layer.weight_u)  # eval: no update
    layer.train()
    with frozen_updates():
        layer(x)
    assert torch.equal(u0, layer.weight_u)
    with recomputing():
        layer(x)
    assert torch.equal(u0, layer.weight_u)
    layer(x)
    assert not torch.equal(u0, layer.weight_u)


def test_inverse_never_updates_power_iteration() -> None:
    torch.manual_seed(0)
    block = ResidualBlock.mlp(3, 8, n_power_iterations=1)
    for layer in spectral_norm_layers(block.net):  # unconverged, so every update shows
        layer.weight_u.copy_(torch.randn_like(layer.weight_u)).div_(layer.weight_u.norm())
    x = torch.randn(5, 3)
    y, _ = block.train()(x)  # one update, here
    reference = copy.deepcopy(block)
    x_back, _ = block.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)  # the weights of that forward
    for a, b in zip(spectral_norm_layers(block.net), spectral_norm_layers(reference.net)):
        assert torch.equal(a.weight_u, b.weight_u)
        assert torch.equal(a.weight_v, b.weight_v)


# -- inverse ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_inverse_float32_lipschitz_09(kind: str) -> None:
    torch.manual_seed(0)
    block = (_mlp if kind == "mlp" else _conv)(0.9, dtype=torch.float32, logdet="exact")
    x = torch.randn(8, 3) if kind == "mlp" else torch.randn(8, 2, 4, 4)
    block.train()
    y, logdet = block(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        x_rec, inv_logdet = block.inverse(y)
    assert (x_rec - x).abs().max() <= 1e-5
    assert torch.allclose(inv_logdet, -logdet, atol=1e-4)
    assert not x_rec.requires_grad
    assert block.exact_inverse is False


def test_non_convergence_warns_or_raises() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=F64)
    block = _mlp(0.9, max_iter=2, on_no_convergence="raise")
    y, _ = block(x)
    with pytest.raises(RuntimeError, match=r"did not converge in 2 iterations: residual"):
        block.inverse(y)
    block.on_no_convergence = "warn"
    with pytest.warns(RuntimeWarning, match="did not converge"):
        x_rec, _ = block.inverse(y)
    assert x_rec.shape == x.shape


def test_non_convergence_reports_the_residual_and_the_real_error() -> None:
    """Issue 16.7: the message named the last step (1.9e-2) the achieved error while the
    reconstruction was 18.9 away. Here g(x) = -0.99 x: the iterates approach monotonically
    and steps shrink by 0.99, so the error is 99 times the last step (the bound is tight),
    and the residual 0.99 times it."""
    layer = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(-4 * torch.eye(3))
    block = ResidualBlock(layer, lipschitz=0.99, max_iter=20, on_no_convergence="raise").double()
    x = torch.full((2, 3), 10.0, dtype=F64)
    y, _ = block(x)
    with pytest.raises(RuntimeError) as info:
        block.inverse(y)
    message = str(info.value)
    block.on_no_convergence = "warn"
    with pytest.warns(RuntimeWarning):
        x_rec, _ = block.inverse(y)
    residual = (x_rec + block.net(x_rec) - y).abs().max().item()
    error = (x_rec - x).abs().max().item()
    step = float(message.split("last step max|x_k - x_(k-1)| = ")[1].split()[0])
    reported = float(message.split("residual max|x + g(x) - y| = ")[1].split(";")[0])
    bound = float(message.split("error max|x - x*| <= ")[1].split()[0])
    assert reported == pytest.approx(residual, rel=1e-3)
    assert bound == pytest.approx(error, rel=1e-2)
    assert error > 50 * step  # what the old message called the error
    assert "observed contraction rate 0.9900" in message
    assert error > 1.0 and step < 0.2


# -- log-det estimators -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_exact_logdet_matches_autograd_jacobian(kind: str) -> None:
    torch.manual_seed(0)
    block = (_mlp if kind == "mlp" else _conv)(0.9, logdet="exact").eval()
    x = torch.randn(3, 3, dtype=F64) if kind == "mlp" else torch.randn(3, 2, 4, 4, dtype=F64)
    _, logdet = block(x)
    assert logdet.shape == (3,)
    assert torch.allclose(logdet, _exact_logdet(block, x), atol=1e-10)
    assert logdet.abs().max() > 1e-3  # saturated weights: a non-trivial log-det
    assert block.exact_logdet is True


def _estimates(block: ResidualBlock, x: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([block(x)[1] for _ in range(n)])


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_series_unbiased_when_tail_negligible(probe: str) -> None:
    # Lipschitz 0.5 per layer, three layers: Lip(g) <= 0.125, so with 8 terms the truncation
    # bias is at most D Lip^9 / (9 (1 - Lip)) ~ 5e-9, far below the statistical error.
    torch.manual_seed(0)
    block = _mlp(0.5, logdet="series", n_terms=8, probe=probe).eval()
    x = torch.randn(4, 3, dtype=F64)
    exact = _exact_logdet(block, x)
    est = _estimates(block, x, 400)
    stderr = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - exact).abs() <= 5 * stderr + 1e-8).all()
    assert block.exact_logdet is False


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_series_is_the_truncated_power_series_of_the_probe(probe: str) -> None:
    # Replaying the RNG gives the probe v the block drew; its estimate must then equal
    # sum_{k<=n} (-1)^{k+1} v^T J^k v / k exactly (the formula, checked without noise).
    torch.manual_seed(0)
    block = _mlp(0.9, logdet="series", n_terms=4, probe=probe).eval()
    x = torch.randn(3, 3, dtype=F64)
    jac = torch.stack(
        [torch.autograd.functional.jacobian(lambda z: block.net(z[None])[0], xi) for xi in x]
    )
    torch.manual_seed(7)
    _, logdet = block(x)
    torch.manual_seed(7)
    v = block._draw_probe(x)
    expected = torch.zeros(3, dtype=F64)
    w = v
    for k in range(1, 5):
        w = torch.einsum("bi,bij->bj", w, jac)
        expected += (-1) ** (k + 1) * (w * v).sum(1) / k
    assert torch.allclose(logdet, expected, atol=1e-12)


def test_unbiased_russian_roulette() -> None:
    torch.manual_seed(0)
    block = _mlp(0.5, logdet="unbiased", n_exact_terms=1, roulette_p=0.5).eval()
    x = torch.randn(4, 3, dtype=F64)
    exact = _exact_logdet(block, x)
    est = _estimates(block, x, 400)
    stderr = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - exact).abs() <= 5 * stderr + 1e-8).all()
    assert block.exact_logdet is False


@pytest.mark.parametrize("mode", ["exact", "series", "unbiased"])
def test_logdet_is_trainable(mode: str) -> None:
    torch.manual_seed(0)
    block = _mlp(0.9, logdet=mode, n_exact_terms=2).train()
    _, logdet = block(torch.randn(4, 3, dtype=F64))
    # The Jacobian depends on every weight and LipSwish beta (not on the output bias).
    params = [p for name, p in block.named_parameters() if not name.endswith("bias")]
    grads = torch.autograd.grad(logdet.sum(), params, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


# -- memory-saving chain ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, mode",
    [("mlp", "exact"), ("mlp", "series"), ("mlp", "unbiased"), ("conv", "series")],
)
def test_memory_saving_parity(kind: str, mode: str) -> None:
    torch.manual_seed(0)
    make = _mlp if kind == "mlp" else _conv
    kwargs = dict(logdet=mode, n_terms=4, inverse_tol=1e-13, max_iter=500)
    plain = Chain(make(0.9, **kwargs), make(0.9, **kwargs)).train()
    # Unconverged power iteration, so an extra update in the recompute would change weights.
    for layer in spectral_norm_layers(plain):
        layer.weight_u.add_(0.3 * torch.randn_like(layer.weight_u))
        layer.weight_u.div_(layer.weight_u.norm())
    saving = copy.deepcopy(plain)
    saving.memory_saving = True
    x = torch.randn(4, 3, dtype=F64) if kind == "mlp" else torch.randn(2, 2, 4, 4, dtype=F64)

    def grads(chain: Chain) -> list[torch.Tensor]:
        torch.manual_seed(123)  # same probes (and roulette draws) in both runs
        y, logdet = chain(x)
        loss = (y**2).sum() - logdet.sum()
        return torch.autograd.grad(loss, list(chain.parameters()))

    g_plain, g_saving = grads(plain), grads(saving)
    for a, b in zip(g_plain, g_saving):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    # Power iteration ran once per block per step in both, not again in the recompute.
    for a, b in zip(spectral_norm_layers(plain), spectral_norm_layers(saving)):
        assert torch.equal(a.weight_u, b.weight_u)


# -- state and errors ---------------------------------------------------------------------


def test_state_dict_and_pickle_round_trip() -> None:
    torch.manual_seed(0)
    block = _conv(logdet="exact").eval()
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    y, logdet = block(x)
    fresh = ResidualBlock.conv(2, 4, logdet="exact").double().eval()  # conv vectors empty
    fresh.load_state_dict(block.state_dict())
    y2, logdet2 = fresh(x)
    assert torch.equal(y, y2) and torch.equal(logdet, logdet2)
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x)[0], y)


def test_bad_inputs_raise_clear_errors() -> None:
    block = ResidualBlock.mlp(3, 8)
    with pytest.raises(TypeError, match="floating-point"):
        block(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, \.\.\.\)"):
        block(torch.randn(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        block.inverse([1.0, 2.0])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="use torch.no_grad"):
        block(torch.randn(2, 3))
    with pytest.raises(ValueError, match="same shape"):
        ResidualBlock(nn.Linear(3, 4))(torch.randn(2, 3))
    with pytest.raises(ValueError, match="lipschitz must be in"):
        ResidualBlock.mlp(3, 8, lipschitz=1.0)
    with pytest.raises(ValueError, match="logdet must be one of"):
        ResidualBlock.mlp(3, 8, logdet="neumann")
    with pytest.raises(ValueError, match="n_terms must be"):
        ResidualBlock.mlp(3, 8, n_terms=0)
    with pytest.raises(ValueError, match="on_no_convergence"):
        ResidualBlock.mlp(3, 8, on_no_convergence="ignore")
    with pytest.raises(ValueError, match="no nn.Linear"):
        ResidualBlock(nn.Tanh())
    with pytest.raises(TypeError, match="BatchNorm1d"):
        ResidualBlock(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="activation must be one of"):
        ResidualBlock.mlp(3, 8, activation="relu6")
    with pytest.raises(TypeError, match="expected nn.Linear"):
        spectral_norm(nn.Tanh())
    with pytest.raises(ValueError, match="already normalised"):
        spectral_norm(spectral_norm(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="has not been called yet"):
        converge_spectral_norm(ResidualBlock.conv(2, 4).net)


def _count_logdets(blocks: list[ResidualBlock]) -> dict[str, int]:
    calls = {"logdet": 0}
    for block in blocks:
        original = block._logdet

        def counted(*args, f=original, **kwargs):
            calls["logdet"] += 1
            return f(*args, **kwargs)

        block._logdet = counted
    return calls


def test_skipping_logdet_returns_zero_without_vector_jacobian_products() -> None:
    block = _mlp(logdet="series", n_terms=3)
    calls = _count_logdets([block])
    x = torch.randn(4, 3, dtype=F64)
    y_full, logdet_full = block(x)
    assert calls["logdet"] == 1 and logdet_full.abs().max() > 0
    with skipping_logdet():
        y, logdet = block(x)
        x_back, inverse_logdet = block.inverse(y)
    assert calls["logdet"] == 1
    torch.testing.assert_close(y, y_full)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    assert torch.equal(logdet, torch.zeros(4, dtype=F64)) and torch.equal(inverse_logdet, -logdet)
    assert logdet_wanted()


def test_skipping_logdet_is_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError), skipping_logdet():
        with skipping_logdet():
            assert not logdet_wanted()
        assert not logdet_wanted()
        raise RuntimeError("boom")
    assert logdet_wanted()


@pytest.mark.parametrize("memory_saving", [False, True])
def test_reversible_residual_stack_computes_no_logdet(memory_saving: bool) -> None:
    """flows.nn.Reversible discards log-dets: its i-ResNet blocks skip them in the forward
    pass and in the memory-saving recompute, and the gradients match ordinary autograd's."""
    torch.manual_seed(0)
    blocks = [_conv(logdet="series", n_terms=2) for _ in range(3)]
    x = torch.randn(2, 2, 4, 4, dtype=F64, requires_grad=True)
    # Reference: the same blocks in a plain chain, log-dets computed (and discarded).
    y, logdet = Chain(*blocks)(x)
    assert logdet.abs().max() > 0
    y.pow(2).sum().backward()
    layer = Reversible(*blocks)
    expected = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    x.grad = None
    layer.zero_grad()
    calls = _count_logdets(blocks)
    layer.memory_saving = memory_saving
    layer(x).pow(2).sum().backward()
    assert calls["logdet"] == 0
    for a, b in zip([x.grad, *(p.grad for p in layer.parameters())], expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_skipping_logdet_stays_on_its_thread() -> None:
    """A classifier skipping log-dets on one thread leaves another thread's density
    model its log-dets (the switch is per thread, like grad mode)."""
    block = _mlp(logdet="exact")
    x = torch.randn(3, 3, dtype=F64)
    entered, release = threading.Event(), threading.Event()

    def classifier_thread() -> None:
        with skipping_logdet():
            entered.set()
            release.wait(10)

    other = threading.Thread(target=classifier_thread)
    other.start()
    try:
        assert entered.wait(10)
        _, logdet = block(x)
    finally:
        release.set()
        other.join()
    torch.testing.assert_close(logdet, _exact_logdet(block, x))


def test_two_calls_before_one_backward_keep_the_power_iteration_out_of_the_graph() -> None:
    """Each training call advances the spectral norm's vectors in place; the graph of an
    earlier call kept them, so a second call before its backward (gradient accumulation, a
    block used twice) failed with "modified by an inplace operation"."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ELU(), nn.Conv2d(8, 4, 3, padding=1))
    block = ResidualBlock(net).double().train()
    x = torch.randn(3, 4, 6, 6, dtype=F64, requires_grad=True)
    y1, logdet1 = block(x)
    y2, logdet2 = block(x.flip(0))
    (y1.square().sum() + y2.sum() + logdet1.sum() + logdet2.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
