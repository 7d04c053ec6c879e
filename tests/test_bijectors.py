"""Properties every bijector and model in the registry must have."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from flows.transforms import ActNorm, AffineCoupling, Chain, channel_mask
from flows.transforms.base import Reconstruction
from flows.transforms.switches import recomputing

from conftest import bijector_of, nll, prepared
from registry import CASES

IDS = sorted(CASES)


def _logdet_of_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    def flat(v: torch.Tensor) -> torch.Tensor:
        return f(v.view_as(x))[0].flatten()

    jac = torch.autograd.functional.jacobian(flat, x.flatten())
    assert jac.shape[0] == jac.shape[1], "a bijector must preserve the number of elements"
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("case_id", IDS)
@pytest.mark.parametrize("batch", [1, 5])
def test_shapes_and_logdet_layout(case_id: str, batch: int) -> None:
    module, case = prepared(case_id)
    f = bijector_of(module)
    x = case.draw(batch)
    y, logdet = f(x)
    assert y.shape[0] == batch and y[0].numel() == x[0].numel()
    assert logdet.shape == (batch,) and logdet.dtype == x.dtype and logdet.device == x.device
    x_back, inv_logdet = f.inverse(y)
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
        y, logdet = f(x)
        x_back, inv_logdet = f.inverse(y)
        y_again, _ = f_again(x_back)
    scale = max(1.0, x.abs().max().item())
    assert (x_back - x).abs().max().item() <= 1e-5 * scale
    assert (y_again - y).abs().max().item() <= 1e-5 * max(1.0, y.abs().max().item())
    torch.testing.assert_close(logdet, -inv_logdet, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case_id", IDS)
def test_inverse_direction_round_trip(case_id: str) -> None:
    module, case = prepared(case_id)
    f = bijector_of(module).eval()
    with torch.no_grad():
        y = f(case.draw(5))[0]
        x, inv_logdet = f.inverse(y)
        y_back, logdet = f(x)
    torch.testing.assert_close(y_back, y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inv_logdet, -logdet, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case_id", IDS)
def test_logdet_matches_brute_force_jacobian(case_id: str) -> None:
    module, case = prepared(case_id)
    f = bijector_of(module).eval()
    x = case.draw(3)
    y, logdet = f(x)
    brute = torch.stack([_logdet_of_jacobian(f, x[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(logdet.detach(), brute, rtol=1e-4, atol=1e-4)
    _, inv_logdet = f.inverse(y.detach())
    torch.testing.assert_close(inv_logdet.detach(), -brute, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case_id", IDS)
def test_batch_independence(case_id: str) -> None:
    module, case = prepared(case_id)
    f = bijector_of(module).eval()
    x = case.draw(5)
    with torch.no_grad():
        y, logdet = f(x)
        y0, logdet0 = f(x[:1])
    torch.testing.assert_close(y[:1], y0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet[:1], logdet0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case_id", IDS)
def test_every_parameter_gets_a_gradient(case_id: str) -> None:
    module, case = prepared(case_id)
    params = dict(module.named_parameters())
    if not params:
        pytest.skip("no parameters")
    module.zero_grad()
    nll(bijector_of(module), case.draw(5)).backward()
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("case_id", IDS)
def test_state_dict_and_pickle_round_trip(case_id: str) -> None:
    module, case = prepared(case_id)
    x = case.draw(4)
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
                expected = bijector_of(reference)(x)
                got = bijector_of(other)(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _chains(module: torch.nn.Module) -> list[Chain]:
    return [m for m in module.modules() if isinstance(m, Chain)]


def _gradients(module, x, memory_saving: bool) -> list[torch.Tensor]:
    module = copy.deepcopy(module)  # both modes start from the same per-call state
    f = bijector_of(module)
    if not _chains(module):
        f = Chain(f)
    for chain in _chains(f):
        chain.memory_saving = memory_saving
    params = [p for p in module.parameters() if p.requires_grad]
    x = x.clone().requires_grad_(True)
    grads = torch.autograd.grad(nll(f, x), [x, *params])
    for chain in _chains(f):
        chain.memory_saving = False
    return list(grads)


@pytest.mark.parametrize("case_id", IDS)
def test_memory_saving_gradients_equal_plain_float64(case_id: str) -> None:
    module, case = prepared(case_id)
    x = case.draw(4)
    plain = _gradients(module, x, memory_saving=False)
    saving = _gradients(module, x, memory_saving=True)
    for a, b in zip(saving, plain):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case_id", IDS)
def test_memory_saving_gradients_equal_plain_on_cuda(case_id: str) -> None:
    """The same parity on a GPU (float64): the RNG replay, autocast replay and the fused
    reconstructs must hold on CUDA streams and generators too."""
    module, case = prepared(case_id)
    module = module.cuda()
    x = case.draw(4).cuda()
    plain = _gradients(module, x, memory_saving=False)
    saving = _gradients(module, x, memory_saving=True)
    for a, b in zip(saving, plain):
        assert a.is_cuda
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case_id", IDS)
def test_memory_saving_gradients_equal_plain_float32(case_id: str) -> None:
    """Float32: reconstruction rounding enters the recomputed gradients; rtol 1e-5 / atol 1e-6
    hold on these toy depths (the drift grows with depth; see tests/test_memory_saving.py)."""
    module, case = prepared(case_id, torch.float32)
    x = case.draw(4, torch.float32)
    plain = _gradients(module, x, memory_saving=False)
    saving = _gradients(module, x, memory_saving=True)
    scale = max(g.abs().max().item() for g in plain)
    for a, b in zip(saving, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=case.float32_grad_atol * max(1.0, scale))


@pytest.mark.parametrize("case_id", IDS)
def test_reconstruct_agrees_with_inverse_and_forward(case_id: str) -> None:
    """``reconstruct(y)`` (the memory-saving protocol, fused or the default) returns
    grad-leaf parts that join to the input, and the output and log-det of the forward pass
    recomputed on them; called as the engine calls it, inside ``recomputing()``."""
    module, case = prepared(case_id)
    f = bijector_of(module)
    x = case.draw(4)
    with torch.no_grad():
        y, logdet = f(x)
    with recomputing():
        rebuilt = f.reconstruct(y)
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
