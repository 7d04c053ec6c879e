"""Flow and the multi-scale builders: round trips, densities, sampling, interpolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flows.models import MAF, NSF, Glow, IResNet, RealNVP, logdet_mode


def trained_a_little(model, x: torch.Tensor, steps: int = 5):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (-model.log_prob(x).mean()).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("builder", [Glow, RealNVP])
def test_multiscale_round_trip_float32(builder) -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    model = trained_a_little(builder((1, 8, 8), levels=2, steps=2, hidden_channels=16), x)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (8, 64)
        torch.testing.assert_close(model.decode(z), x, rtol=0, atol=1e-4)


def test_iresnet_round_trip_float32() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    model = trained_a_little(IResNet((1, 8, 8), levels=2, blocks=2, hidden_channels=16), x)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(model.encode(x)), x, rtol=0, atol=1e-4)


def test_iresnet_2d_exact_density_integrates_to_one() -> None:
    torch.manual_seed(0)
    data = torch.randn(256, 2) * torch.tensor([1.0, 0.3]) + torch.tensor([0.5, 0.0])
    model = trained_a_little(IResNet((2,), levels=1, blocks=2, hidden_channels=16), data, steps=30).double()
    grid = torch.linspace(-8, 8, 201, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad(), logdet_mode(model, "exact"):
        density = model.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    mass = density.sum().item() * (grid[1] - grid[0]).item() ** 2
    assert abs(mass - 1.0) < 0.02


def test_latent_shapes_partition_the_latent() -> None:
    model = Glow((3, 8, 8), levels=3, steps=1, hidden_channels=4)
    assert model.latent_shapes == [(6, 4, 4), (12, 2, 2), (48, 1, 1)]
    assert sum(math.prod(s) for s in model.latent_shapes) == 3 * 8 * 8


@pytest.mark.parametrize("builder", [Glow, RealNVP])
def test_2d_density_integrates_to_one(builder) -> None:
    torch.manual_seed(0)
    data = torch.randn(256, 2) * torch.tensor([1.0, 0.3]) + torch.tensor([0.5, 0.0])
    model = trained_a_little(builder((2,), levels=1, steps=4, hidden_channels=32), data, steps=30).double()
    grid = torch.linspace(-8, 8, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad():
        density = model.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    mass = density.sum().item() * (grid[1] - grid[0]).item() ** 2
    assert abs(mass - 1.0) < 0.02


def test_sample_shapes_and_temperature() -> None:
    torch.manual_seed(0)
    model = Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8).eval()
    assert model.sample(5).shape == (5, 1, 8, 8)
    assert model.sample(3, temperature=[0.5, 1.0]).shape == (3, 1, 8, 8)
    zero = model.sample(2, temperature=0.0)
    torch.testing.assert_close(zero, model.decode(torch.zeros(2, 64)))
    torch.manual_seed(1)
    cold = model.encode(model.sample(512, temperature=0.5)).std().item()
    torch.manual_seed(1)
    warm = model.encode(model.sample(512, temperature=1.0)).std().item()
    assert cold == pytest.approx(0.5 * warm, rel=1e-3)


def test_per_level_temperature_scales_each_level() -> None:
    torch.manual_seed(0)
    model = Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8).eval()
    torch.manual_seed(3)
    z = model.encode(model.sample(256, temperature=[0.0, 1.0]))
    first = math.prod(model.latent_shapes[0])
    assert z[:, :first].abs().max() < 1e-4
    assert z[:, first:].std() > 0.5


@pytest.mark.parametrize(
    "temperature",
    [0.5, np.float32(0.5), np.array(0.5), torch.tensor(0.5), torch.tensor([0.5, 0.5]), np.array([0.5, 0.5])],
    ids=["float", "numpy-scalar", "numpy-0d", "tensor-0d", "tensor-per-level", "numpy-per-level"],
)
def test_any_real_temperature_samples_as_the_float(temperature) -> None:
    model = Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8).eval()
    torch.manual_seed(0)
    expected = model.sample(2, temperature=0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(model.sample(2, temperature=temperature), expected)
    torch.manual_seed(0)
    assert model.sample_and_log_prob(2, temperature=temperature)[1].shape == (2,)


@pytest.mark.parametrize(
    ("temperature", "error", "match"),
    [
        ("hot", TypeError, r"Flow.sample: temperature must be a real number or a list of 2 \(one per latent"),
        (None, TypeError, "got NoneType"),
        (True, TypeError, "got bool"),
        ([0.5, "a"], TypeError, "a list of 2"),
        (torch.ones(1, 2), TypeError, "a list of 2"),
        ([0.5], ValueError, "got 1 temperatures for 2 latent levels"),
        (torch.tensor(-1.0), ValueError, "temperature must be a finite number >= 0"),
    ],
    ids=["str", "none", "bool", "list-with-str", "2d-tensor", "wrong-length", "negative-tensor"],
)
def test_a_bad_temperature_is_one_clear_error(temperature, error: type[Exception], match: str) -> None:
    model = Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8)
    with pytest.raises(error, match=match):
        model.sample(2, temperature=temperature)


@pytest.mark.parametrize("builder", [Glow, RealNVP, NSF, MAF], ids=lambda b: b.__name__)
def test_a_one_feature_vector_flow_is_refused_by_its_builder(builder) -> None:
    with pytest.raises(ValueError, match=rf"{builder.__name__}: input_shape must be \(D,\) with D >= 2 features"):
        builder((1,), steps=1, hidden_channels=4)


def test_an_iresnet_takes_one_feature() -> None:  # it splits nothing
    assert IResNet((1,), levels=1, blocks=1, hidden_channels=4).log_prob(torch.randn(3, 1)).shape == (3,)


def test_num_classes_embeds_labels_in_context_features() -> None:
    model = Glow((1, 4, 4), levels=1, steps=1, hidden_channels=8, num_classes=10, context_features=3)
    assert model.embedding(torch.tensor([0, 9])).shape == (2, 3)
    assert model.log_prob(torch.rand(2, 1, 4, 4), torch.tensor([0, 9])).shape == (2,)


def test_interpolation_endpoints_are_the_inputs() -> None:
    torch.manual_seed(0)
    model = RealNVP((1, 8, 8), levels=2, steps=1, hidden_channels=8).eval()
    x0, x1 = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        path = model.interpolate(x0, x1, steps=5)
    assert path.shape == (5, 2, 1, 8, 8)
    torch.testing.assert_close(path[0], x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(path[-1], x1, rtol=0, atol=1e-5)


def test_bits_per_dim_of_the_identity_is_the_uniform_baseline() -> None:
    """A flow whose density on [0, 1]^D is uniform has bits/dim = log2(n_levels)."""
    from flows.distributions import StandardNormal
    from flows.models import Flow
    from flows.transforms import Chain, Inverse, Logit

    class UniformLatent(StandardNormal):
        def log_prob(self, z):
            return torch.zeros(z.shape[0], dtype=z.dtype)

    # Logit(0) then its inverse is the identity on [0, 1]: the density is uniform.
    model = Flow(Chain(Logit(0.0), Inverse(Logit(0.0))), UniformLatent((1, 2, 2)), (1, 2, 2), n_levels=17)
    bpd = model.bits_per_dim(torch.rand(4, 1, 2, 2) * 0.9 + 0.05)
    torch.testing.assert_close(bpd, torch.full((4,), math.log2(17)))


@pytest.mark.parametrize("scale", ["tanh", "sigmoid", "exp"])
def test_image_realnvp_scale_reaches_every_step_coupling(scale: str) -> None:
    """The steps' couplings take ``scale``; the split priors keep their own ``tanh``."""
    from flows.transforms import AffineCoupling

    plain = RealNVP((1, 4, 4), levels=2, steps=1, hidden_channels=4, res_blocks=1, scale=scale)
    with_priors = RealNVP((1, 4, 4), levels=2, steps=1, hidden_channels=4, res_blocks=1, scale=scale, split_prior=True)
    steps = [m.scale for m in plain.modules() if isinstance(m, AffineCoupling)]
    assert len(steps) == 4 and set(steps) == {scale}  # 1 checkerboard, 1 channel, then 2 checkerboard
    everything = [m.scale for m in with_priors.modules() if isinstance(m, AffineCoupling)]
    assert sorted(everything) == sorted(steps + ["tanh"] * (len(everything) - len(steps)))
    assert plain.log_prob(torch.rand(2, 1, 4, 4)).isfinite().all()
