"""Conditional flows: normalised conditional densities, embeddings trained end to end,
class-conditional sampling, and clear errors for a missing or malformed context."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flows.models import NSF, Glow, RealNVP
from flows.parity import gradient_parity


def _trained_2d_model() -> nn.Module:
    """A conditional 2D model moved away from the identity by a few steps on p(x | c)."""
    torch.manual_seed(0)
    model = RealNVP((2,), levels=1, steps=4, hidden_channels=16, context_features=1).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        c = torch.rand(128, 1, dtype=torch.float64) * 2 - 1
        x = torch.randn(128, 2, dtype=torch.float64) * 0.5 + torch.cat([c, -c], 1) * 2
        opt.zero_grad()
        (-model.log_prob(x, c).mean()).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("context", [-0.8, 0.0, 0.9])
def test_conditional_density_integrates_to_one(context: float) -> None:
    """Riemann sum of p(x | c) over [-8, 8]^2 on a 400 x 400 grid, for several contexts."""
    model = _trained_2d_model()
    side = torch.linspace(-8, 8, 400, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    c = torch.full((grid.shape[0], 1), context, dtype=torch.float64)
    with torch.no_grad():
        density = model.log_prob(grid, c).exp()
    cell = (side[1] - side[0]).item() ** 2
    assert abs(density.sum().item() * cell - 1.0) < 1e-2


def test_a_user_embedding_network_trains_with_the_flow_in_both_modes() -> None:
    """An observation CNN maps a (1, 8, 8) image context to 4 features; its gradients under
    memory-saving backward equal ordinary ones, and they are not zero."""
    torch.manual_seed(0)
    embedding = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 4))
    model = Glow((1, 4, 4), levels=2, steps=2, hidden_channels=8, embedding=embedding, context_features=4).double()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    observation = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):  # ActNorm initialisation, then away from the zero-initialised start
        opt.zero_grad()
        (-model.log_prob(x, observation).mean()).backward()
        opt.step()
    report = gradient_parity(model, x, observation)
    assert report.error < 1e-10, report
    model.zero_grad()
    model.memory_saving = True
    (-model.log_prob(x, observation).mean()).backward()
    assert embedding[0].weight.grad.abs().sum() > 0


def test_class_conditional_sampling_and_interpolation() -> None:
    torch.manual_seed(0)
    model = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8, num_classes=10, split_prior=True)
    labels = torch.arange(10)
    x = model.sample(10, context=labels, temperature=0.7)
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()
    z = model.encode(x, labels)
    torch.testing.assert_close(model.decode(z, labels), x, rtol=1e-4, atol=1e-4)
    path = model.interpolate(x[:2], x[2:4], steps=3, context=labels[:2])
    assert path.shape == (3, 2, 1, 8, 8)
    torch.testing.assert_close(model(x, labels), model.log_prob(x, labels))


def test_missing_or_malformed_contexts_are_one_clear_error() -> None:
    classes = Glow((1, 4, 4), levels=1, steps=1, hidden_channels=8, num_classes=3)
    vectors = Glow((2,), levels=1, steps=1, hidden_channels=8, context_features=2)
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(ValueError, match="conditional; pass context="):
        classes.log_prob(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        classes.log_prob(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="int64 class labels"):
        classes.log_prob(x, torch.rand(4, 3))
    with pytest.raises(ValueError, match="one row per example"):
        classes.sample(4, context=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"float context of shape \(B, 2\)"):
        vectors.log_prob(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="does not match"):
        vectors.log_prob(torch.randn(4, 2), torch.randn(4, 3))
    with pytest.raises(TypeError, match="temperature="):
        vectors.sample(4, 0.7)
    with pytest.raises(ValueError, match="num_classes= or embedding="):
        Glow((2,), num_classes=3, embedding=nn.Identity(), context_features=2)
    with pytest.raises(ValueError, match="needs context_features"):
        Glow((2,), embedding=nn.Identity())
    assert math.isfinite(vectors.log_prob(torch.randn(4, 2), torch.randn(4, 2)).sum().item())


def test_a_non_finite_context_is_one_clear_error_wherever_the_input_is_checked() -> None:
    model = NSF((5,), steps=2, hidden_channels=16, context_features=3)
    bad = torch.full((4, 3), float("nan"))
    with pytest.raises(ValueError, match="Flow.log_prob: context contains non-finite values"):
        model.log_prob(torch.randn(4, 5), context=bad)
    with pytest.raises(ValueError, match="Flow.sample: context contains non-finite values"):
        model.sample(4, context=bad.clone().fill_(float("inf")))
    with pytest.raises(ValueError, match="Flow.sample_and_log_prob: context contains non-finite values"):
        model.sample_and_log_prob(4, context=bad)
    model.validate_args = False  # switched off with the input checks
    assert torch.isnan(model.log_prob(torch.randn(4, 5), context=bad)).all()
