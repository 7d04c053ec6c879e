"""Properties every bijector and model in the registry must have."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from flows.models import Flow, Glow
from flows.parity import gradient_parity
from flows.transforms import ActNorm, AffineCoupling, ResidualBlock, channel_mask
from flows.transforms.base import Reconstruction
from flows.transforms.rng import get_rng_state, replaying
from flows.transforms.spectral_norm import converge_spectral_norm, spectral_norm_estimate, spectral_norm_layers
from flows.transforms.switches import recomputing

from conftest import bijector_of, block_context, loss_of, prepared
from registry import CASES, CONDITIONAL_CASES, UNCONDITIONAL

IDS = sorted(CASES)


def seeded(fn, *args):
    """``fn(*args)`` with the global RNG at a fixed state: a stochastic log-det estimator
    then draws the same probes in both directions and on every copy of a module."""
    torch.manual_seed(1234)
    return fn(*args)


def parity_inputs(case, n: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """The input (and the raw context) of a parity check, each requiring grad where it can:
    the gradient with respect to a float context is compared too."""
    x = case.draw(n, dtype).requires_grad_(True)
    c = case.draw_context(n, dtype)
    if c is None:
        return [x]
    return [x, c.requires_grad_(True) if c.is_floating_point() else c]


def round_trip_tolerance(f, exact: float) -> float:
    """The suite's round-trip tolerance: ``exact`` for an exact inverse, 10x looser for an
    iterative one (``exact_inverse = False``), whose own stopping tolerance bounds it."""
    return exact if f.exact_inverse else 10 * exact


def _logdet_of_jacobian(f, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """``log|det|`` of the autograd Jacobian of ``f(., context)`` at one sample ``x``."""

    def flat(v: torch.Tensor) -> torch.Tensor:
        return f(v.view_as(x), context)[0].flatten()

    jac = torch.autograd.functional.jacobian(flat, x.flatten())
    assert jac.shape[0] == jac.shape[1], "a bijector must preserve the number of elements"
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("case_id", IDS)
@pytest.mark.parametrize("batch", [1, 5])
def test_shapes_and_logdet_layout(case_id: str, batch: int) -> None:
    module, case = prepared(case_id)
    f = bijector_of(module)
    x, c = case.draw(batch), block_context(module, case.draw_context(batch))
    y, logdet = f(x, c)
    assert y.shape[0] == batch and y[0].numel() == x[0].numel()
    assert (y.shape == x.shape) == f.keeps_shape
    assert logdet.shape == (batch,) and logdet.dtype == x.dtype and logdet.device == x.device
    x_back, inv_logdet = f.inverse(y, c)
    assert x_back.shape == x.shape and inv_logdet.shape == (batch,)


@pytest.mark.parametrize("case_id", IDS)
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_round_trip_float32(case_id: str, batch: int, mode: str) -> None:
    module, case = prepared(case_id, torch.float32)
    module.train(mode == "train")
    f = bijector_of(module)
    # Blocks may update state on each training call (power iterations): the second
    # forward runs on a copy taken before the first, so both see the same weights.
    f_again = copy.deepcopy(f)
    x = case.draw(batch, torch.float32)
    with torch.no_grad():
        c = block_context(module, case.draw_context(batch, torch.float32))
        y, logdet = seeded(f, x, c)
        x_back, inv_logdet = seeded(f.inverse, y, c)
        y_again, _ = seeded(f_again, x_back, c)
    tol = round_trip_tolerance(f, 1e-5)
    assert (x_back - x).abs().max().item() <= tol * max(1.0, x.abs().max().item())
    assert (y_again - y).abs().max().item() <= tol * max(1.0, y.abs().max().item())
    torch.testing.assert_close(logdet, -inv_logdet, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case_id", IDS)
def test_inverse_direction_round_trip(case_id: str) -> None:
    module, case = prepared(case_id)
    f = bijector_of(module).eval()
    with torch.no_grad():
        c = block_context(module, case.draw_context(5))
        y = f(case.draw(5), c)[0]
        x, inv_logdet = seeded(f.inverse, y, c)
        y_back, logdet = seeded(f, x, c)
    tol = round_trip_tolerance(f, 1e-9)
    torch.testing.assert_close(y_back, y, rtol=tol, atol=tol)
    torch.testing.assert_close(inv_logdet, -logdet, rtol=tol, atol=tol)


@pytest.mark.parametrize("case_id", IDS)
def test_logdet_matches_brute_force_jacobian(case_id: str) -> None:
    """Exact log-dets equal ``slogdet`` of the autograd Jacobian; a stochastic estimator
    (``exact_logdet = False``) does on average, within five standard errors over 200 draws
    (its cases are configured with a truncation bias far below that)."""
    module, case = prepared(case_id)
    f = bijector_of(module).eval()
    x = case.draw(3)
    c = block_context(module, case.draw_context(3))
    c = None if c is None else c.detach()
    y, logdet = f(x, c)
    brute = torch.stack(
        [_logdet_of_jacobian(f, x[i : i + 1], None if c is None else c[i : i + 1]) for i in range(x.shape[0])]
    )
    if not f.exact_logdet:
        draws = torch.stack([f(x, c)[1].detach() for _ in range(200)])
        error = (draws.mean(0) - brute).abs()
        assert (error <= 5 * draws.std(0) / 200**0.5 + 1e-3).all(), (error, draws.std(0))
        return
    torch.testing.assert_close(logdet.detach(), brute, rtol=1e-4, atol=1e-4)
    _, inv_logdet = f.inverse(y.detach(), c)
    torch.testing.assert_close(inv_logdet.detach(), -brute, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case_id", IDS)
def test_batch_independence(case_id: str) -> None:
    module, case = prepared(case_id)
    f = bijector_of(module).eval()
    x = case.draw(5)
    with torch.no_grad():
        c = block_context(module, case.draw_context(5))
        y, logdet = f(x, c)
        y0, logdet0 = f(x[:1], None if c is None else c[:1])
    torch.testing.assert_close(y[:1], y0, rtol=1e-10, atol=1e-10)
    if f.exact_logdet:  # a stochastic estimator draws other probes for another batch
        torch.testing.assert_close(logdet[:1], logdet0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case_id", IDS)
def test_every_parameter_gets_a_gradient(case_id: str) -> None:
    module, case = prepared(case_id)
    params = dict(module.named_parameters())
    if not params:
        pytest.skip("no parameters")
    module.zero_grad()
    loss_of(module, case.draw(5), case.draw_context(5)).backward()
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("case_id", IDS)
def test_state_dict_and_pickle_round_trip(case_id: str) -> None:
    module, case = prepared(case_id)
    x, raw_context = case.draw(4), case.draw_context(4)
    fresh = case.factory().to(torch.float64)
    fresh.load_state_dict(module.state_dict())
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for mode in (True, False):
        for other in (fresh, loaded):
            reference = copy.deepcopy(module).train(mode)  # same per-call state as `other`
            other = copy.deepcopy(other).train(mode)
            with torch.no_grad():
                expected = seeded(bijector_of(reference), x, block_context(reference, raw_context))
                got = seeded(bijector_of(other), x, block_context(other, raw_context))
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case_id", IDS)
def test_memory_saving_gradients_equal_plain_float64(case_id: str) -> None:
    """Parameter and input gradients, by :func:`flows.parity.gradient_parity` (the rule
    ``flows.check`` and ``flows bench`` report): float64 leaves only rounding."""
    module, case = prepared(case_id)
    report = gradient_parity(module, *parity_inputs(case, 4))
    assert report.error < 1e-10, report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case_id", IDS)
def test_memory_saving_gradients_equal_plain_on_cuda(case_id: str) -> None:
    """The same parity on a GPU (float64): the RNG replay, autocast replay and the fused
    reconstructs must hold on CUDA streams and generators too."""
    module, case = prepared(case_id)
    inputs = [t.cuda().detach().requires_grad_(t.requires_grad) for t in parity_inputs(case, 4)]
    report = gradient_parity(module.cuda(), *inputs)
    assert report.error < 1e-10, report


@pytest.mark.parametrize("case_id", IDS)
def test_memory_saving_gradients_equal_plain_float32(case_id: str) -> None:
    """Float32: reconstruction rounding enters the recomputed gradients; 1e-5 of the
    largest gradient holds on these toy depths (the drift grows with depth; see
    tests/test_memory_saving.py), looser only where a case says why."""
    module, case = prepared(case_id, torch.float32)
    report = gradient_parity(module, *parity_inputs(case, 4, torch.float32))
    assert report.error < max(1e-5, case.float32_grad_atol), report


@pytest.mark.parametrize("case_id", IDS)
def test_reconstruct_agrees_with_inverse_and_forward(case_id: str) -> None:
    """``reconstruct(y)`` (the memory-saving protocol, fused or the default) returns
    grad-leaf parts that join to the input, and the output and log-det of the forward pass
    recomputed on them; called as the engine calls it, inside ``recomputing()``."""
    module, case = prepared(case_id)
    f = bijector_of(module)
    x = case.draw(4)
    state = get_rng_state(x)  # replayed for the rebuild, as the engine replays it
    with torch.no_grad():
        c = block_context(module, case.draw_context(4))
        y, logdet = f(x, c)
    with recomputing(), replaying(y, state):
        rebuilt = f.reconstruct(y, c)
    assert isinstance(rebuilt, Reconstruction)
    assert all(p.is_leaf and p.requires_grad for p in rebuilt.inputs)
    tol = 1e-10 if f.exact_inverse else 1e-8
    torch.testing.assert_close(rebuilt.join(rebuilt.inputs), x, rtol=tol, atol=tol)
    torch.testing.assert_close(rebuilt.output, y, rtol=tol, atol=tol)
    torch.testing.assert_close(rebuilt.logdet, logdet, rtol=tol, atol=tol)
    assert rebuilt.output.requires_grad


def test_modules_pickled_before_cached_attributes_still_run() -> None:
    """ActNorm's ``_seen_initialized`` and a coupling's ``halves`` are caches with class
    defaults: a module whose pickled state lacks them (saved by an older version) runs."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    for module in (ActNorm(4), AffineCoupling(channel_mask(4, 1), hidden_channels=8)):
        module(x)
        state = dict(module.__dict__)
        for cached in ("_seen_initialized", "halves"):
            state.pop(cached, None)
        old = type(module).__new__(type(module))
        old.__setstate__(state)
        torch.testing.assert_close(old(x)[0], module(x)[0])


def test_coupling_split_follows_a_loaded_mask() -> None:
    torch.manual_seed(0)
    source = AffineCoupling(channel_mask(4, 1), hidden_channels=8)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    target = AffineCoupling(channel_mask(4, 0), hidden_channels=8)
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(target(x)[0], source(x)[0])
    torch.testing.assert_close(target.inverse(source(x)[0])[0], x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case_id", [c for c in IDS if not bijector_of(CASES[c].factory()).exact_inverse])
def test_iterative_inverses_hold_their_lipschitz_bound(case_id: str) -> None:
    """``exact_inverse = False`` (i-ResNet's fixed point) rests on ``Lip(g) < 1``: after
    training steps and one training-mode forward pass, every spectrally normalised layer's
    true operator norm (power iteration run to convergence on a copy) is within 3% of the
    block's ``lipschitz``."""
    module, case = prepared(case_id)
    f = bijector_of(module).train()
    with torch.no_grad():
        f(case.draw(8), block_context(module, case.draw_context(8)))
    blocks = [m for m in f.modules() if isinstance(m, ResidualBlock)]
    assert blocks
    for block in blocks:
        for layer in spectral_norm_layers(block.net):
            estimate = spectral_norm_estimate(layer).item()
            converged = copy.deepcopy(layer)
            converge_spectral_norm(converged)
            true_norm = spectral_norm_estimate(converged).item() * min(1.0, block.lipschitz / estimate)
            assert true_norm <= 1.03 * block.lipschitz, (case_id, true_norm, block.lipschitz)


@pytest.mark.parametrize("case_id", UNCONDITIONAL)
def test_unconditional_blocks_accept_and_ignore_a_context(case_id: str) -> None:
    module, case = prepared(case_id)
    f = bijector_of(module).eval()
    x = case.draw(3)
    context = torch.randn(3, 2, dtype=x.dtype)
    with torch.no_grad():
        y, logdet = seeded(f, x)
        y_c, logdet_c = seeded(f, x, context)
        x_c, _ = seeded(f.inverse, y, context)
    torch.testing.assert_close(y_c, y, rtol=0, atol=0)
    torch.testing.assert_close(logdet_c, logdet, rtol=0, atol=0)
    torch.testing.assert_close(x_c, seeded(f.inverse, y)[0], rtol=0, atol=0)


@pytest.mark.parametrize("case_id", sorted(CONDITIONAL_CASES))
def test_conditional_cases_depend_on_and_require_their_context(case_id: str) -> None:
    """After training steps the output moves with the context, and a missing context is
    one clear error."""
    module, case = prepared(case_id)
    f = bijector_of(module).eval()
    x = case.draw(4)
    with torch.no_grad():
        y_a = f(x, block_context(module, case.draw_context(4)))[0]
        y_b = f(x, block_context(module, case.draw_context(4)))[0]
    assert (y_a - y_b).abs().max() > 1e-6
    with pytest.raises(ValueError, match="context"):
        module.log_prob(x) if isinstance(module, Flow) else f(x)


def test_actnorm_keeps_scale_1_for_channels_constant_in_its_first_batch() -> None:
    """A constant first batch (a zeros smoke test) has no spread to normalise: 1/eps scales
    would make every later batch overflow, so those channels keep scale 1, with a warning."""
    norm = ActNorm(3)
    first = torch.zeros(8, 3, 4, 4)
    first[:, 0] = torch.randn(8, 4, 4)  # channel 0 varies, channels 1 and 2 do not
    with pytest.warns(UserWarning, match="ActNorm: 2 of 3 channels are constant in the initialisation batch"):
        norm(first)
    assert norm.log_scale[1:].eq(0).all() and norm.log_scale[0] != 0
    torch.manual_seed(0)
    glow = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8)
    with pytest.warns(UserWarning, match="constant in the initialisation batch"):
        glow.log_prob(torch.zeros(4, 1, 8, 8))
    assert torch.isfinite(glow.log_prob(torch.rand(4, 1, 8, 8))).all()
