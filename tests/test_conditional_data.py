"""Conditional datasets (gaussian-linear, rotated-moons), their true densities, Dataset contexts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flows import data
from flows.data import Dataset


def _normal_log_prob(x: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    d = x.shape[1]
    return -((x - mean) ** 2).sum(1) / (2 * var) - 0.5 * d * math.log(2 * math.pi * var)


# ----------------------------------------------------------------------------- gaussian-linear


def test_gaussian_linear_pairs() -> None:
    d = data.load("gaussian-linear", n_train=4000, n_test=500, seed=1)
    assert d.name == "gaussian-linear" and not d.discrete and d.shape == (5,)
    assert tuple(d.train.shape) == (4000, 5) and tuple(d.test.shape) == (500, 5)
    assert tuple(d.train_context.shape) == (4000, 5) and tuple(d.test_context.shape) == (500, 5)
    assert d.train.dtype == d.train_context.dtype == torch.float32
    assert d.context_features == 5 and d.train_labels is None
    # theta ~ N(0, I) unstandardised, and x - theta ~ N(0, 0.1^2 I).
    assert d.train.mean(0).abs().max() < 0.1
    assert 0.9 < float(d.train.std()) < 1.1
    assert 0.095 < float((d.train_context - d.train).std()) < 0.105
    again = data.load("gaussian_linear", n_train=4000, n_test=500, seed=1)
    assert torch.equal(d.train, again.train) and torch.equal(d.test_context, again.test_context)
    assert not torch.equal(d.train, data.load("gaussian-linear", n_train=4000, n_test=500, seed=2).train)
    defaults = data.load("gaussian-linear")
    assert (len(defaults.train), len(defaults.test)) == (20000, 5000)


@pytest.mark.parametrize("noise", [0.1, 0.5])
def test_gaussian_linear_posterior_is_bayes_rule(noise: float) -> None:
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    x = theta + 0.7 * torch.randn(200, 5, generator=generator, dtype=torch.float64)
    # log p(theta | x) = log p(theta) + log p(x | theta) - log p(x), with p(x) = N(0, (1 + s^2) I).
    bayes = (
        _normal_log_prob(theta, torch.zeros(()), 1.0)
        + _normal_log_prob(x, theta, noise**2)
        - _normal_log_prob(x, torch.zeros(()), 1 + noise**2)
    )
    got = data.gaussian_linear_log_posterior(theta, x, noise=noise)
    assert got.dtype == torch.float64 and got.shape == (200,)
    torch.testing.assert_close(got, bayes, rtol=0, atol=1e-10)
    if noise == 0.1:
        torch.testing.assert_close(got, _normal_log_prob(theta, x / 1.01, 1 / 101), rtol=0, atol=1e-10)


def test_gaussian_linear_posterior_fits_the_data() -> None:
    # The mean log posterior of the data is minus the entropy of N(., v I): -D/2 (1 + log 2 pi v).
    d = data.load("gaussian-linear", n_train=2, n_test=20000)
    log_p = data.gaussian_linear_log_posterior(d.test, d.test_context)
    assert log_p.dtype == torch.float32
    variance = 0.01 / 1.01
    expected = -2.5 * (1 + math.log(2 * math.pi * variance))
    assert abs(float(log_p.double().mean()) - expected) < 0.05  # the standard error is 0.011


def test_gaussian_linear_posterior_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"theta and x must both be \(N, D\)"):
        data.gaussian_linear_log_posterior(torch.zeros(3, 5), torch.zeros(2, 5))


# ----------------------------------------------------------------------------- rotated-moons


def test_rotated_moons_points_and_context() -> None:
    d = data.load("rotated-moons", n_train=3000, n_test=300, seed=2)
    assert d.name == "rotated-moons" and d.shape == (2,) and not d.discrete
    assert tuple(d.train_context.shape) == (3000, 1) and d.context_features == 1
    c = d.train_context[:, 0]
    assert 0 <= float(c.min()) and float(c.max()) <= 1 and abs(float(c.mean()) - 0.5) < 0.03
    # Rotating back by pi c recovers unstandardised moons: mean (0.5, 0.25), radius from the origin
    # at most about 2.06 (the lower moon's tip (2, 0.5)) plus the noise.
    angle = -math.pi * c.double()
    x = d.train.double()
    back = torch.stack(
        [
            torch.cos(angle) * x[:, 0] - torch.sin(angle) * x[:, 1],
            torch.sin(angle) * x[:, 0] + torch.cos(angle) * x[:, 1],
        ],
        1,
    )
    torch.testing.assert_close(back.mean(0), torch.tensor([0.5, 0.25], dtype=torch.float64), atol=0.05, rtol=0)
    assert float(x.norm(dim=1).max()) < 2.4
    again = data.load("rotated_moons", n_train=3000, n_test=300, seed=2)
    assert torch.equal(d.train, again.train) and torch.equal(d.train_context, again.train_context)


def _grid(half_width: float = 2.6, spacing: float = 0.04) -> tuple[torch.Tensor, float]:
    axis = torch.arange(-half_width, half_width + 1e-9, spacing, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), spacing**2


@pytest.mark.parametrize("c", [0.0, 0.3, 0.75, 1.0])
def test_rotated_moons_density_integrates_to_one(c: float) -> None:
    # A Riemann sum of a density made of Gaussians of width 0.06 on a 0.04 grid is exact to
    # about exp(-2 pi^2 0.06^2 / 0.04^2) = 5e-20; what is left is the quadrature's own error.
    grid, area = _grid()
    log_p = data.rotated_moons_log_density(grid, torch.full((len(grid), 1), c, dtype=torch.float64))
    assert log_p.dtype == torch.float64
    assert abs(float(log_p.exp().sum()) * area - 1) < 1e-6


def test_rotated_moons_samples_match_the_quadrature() -> None:
    # Every rotation of the moons has the same entropy H, so the mean log-density of the data
    # over all contexts is -H, computed here on a grid from the quadrature density.
    grid, area = _grid()
    log_grid = data.moons_log_density(grid)
    negentropy = float((log_grid.exp() * log_grid).sum() * area)
    d = data.load("rotated-moons", n_train=2, n_test=20000, seed=5)
    log_p = data.rotated_moons_log_density(d.test, d.test_context)
    assert log_p.dtype == torch.float32 and log_p.shape == (20000,)
    mean, sem = float(log_p.double().mean()), float(log_p.double().std()) / math.sqrt(len(log_p))
    assert abs(mean - negentropy) < 4 * sem, (mean, negentropy, sem)
    # The context matters: the same points under the contexts of other points are less likely.
    shuffled = data.rotated_moons_log_density(d.test, d.test_context.roll(1, 0))
    assert float(shuffled.mean()) < mean - 1


def test_moons_quadrature_is_converged() -> None:
    d = data.load("rotated-moons", n_train=2, n_test=500, seed=3)
    x = d.test.double()
    coarse = data.rotated_moons_log_density(x, d.test_context, nodes=256)
    fine = data.rotated_moons_log_density(x, d.test_context, nodes=4096)
    torch.testing.assert_close(coarse, fine, rtol=0, atol=1e-9)


def test_moons_density_matches_the_toy_generator() -> None:
    # The quadrature density is the one the (unstandardised) moons toy samples from.
    from flows.data.toys import _moons

    points = torch.from_numpy(_moons(20000, np.random.default_rng(0)))
    log_p = data.moons_log_density(points)
    grid, area = _grid()
    log_grid = data.moons_log_density(grid)
    negentropy = float((log_grid.exp() * log_grid).sum() * area)
    assert abs(float(log_p.mean()) - negentropy) < 0.05


def test_rotated_moons_density_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 2\)"):
        data.rotated_moons_log_density(torch.zeros(3, 5), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="one context per point"):
        data.rotated_moons_log_density(torch.zeros(3, 2), torch.zeros(2, 1))


# ----------------------------------------------------------------------------- Dataset contexts


def test_dataset_checks_context() -> None:
    train, test = torch.zeros(3, 2), torch.zeros(2, 2)
    c_train, c_test = torch.zeros(3, 4), torch.ones(2, 4)
    ok = Dataset("ok", train, test, None, (2,), train_context=c_train, test_context=c_test)
    assert ok.context_features == 4 and "context_features=4" in repr(ok)
    assert Dataset("plain", train, test, None, (2,)).context_features is None
    with pytest.raises(ValueError, match="train_context given without test_context"):
        Dataset("bad", train, test, None, (2,), train_context=c_train)
    with pytest.raises(ValueError, match="test_context given without train_context"):
        Dataset("bad", train, test, None, (2,), test_context=c_test)
    with pytest.raises(ValueError, match=r"3 train_context rows for 2 train examples"):
        Dataset("bad", test, test, None, (2,), train_context=c_train, test_context=c_test)
    with pytest.raises(
        ValueError, match=r"train_context must be a floating-point tensor of shape \(3, C\), got a torch.int64"
    ):
        Dataset("bad", train, test, None, (2,), train_context=c_train.long(), test_context=c_test)
    with pytest.raises(ValueError, match=r"test_context must be a floating-point .* shape \(2,\)"):
        Dataset("bad", train, test, None, (2,), train_context=c_train, test_context=c_test[:, 0])
    with pytest.raises(ValueError, match="got a list"):
        Dataset("bad", train, test, None, (2,), train_context=[[0.0]] * 3, test_context=c_test)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same context features"):
        Dataset("bad", train, test, None, (2,), train_context=c_train, test_context=c_test[:, :3])


def test_dataset_num_classes() -> None:
    digits = data.load("digits")
    assert digits.num_classes == 10 and digits.context_features is None
    assert data.load("moons", n_train=10, n_test=5).num_classes is None


def test_conditional_names_are_listed() -> None:
    assert {"gaussian-linear", "rotated-moons"} <= set(data.NAMES)
    assert all(data.load(name, n_train=4, n_test=2).train_context is not None for name in data.CONDITIONAL)
    with pytest.raises(ValueError, match="gaussian-linear: need n_train >= 2"):
        data.load("gaussian-linear", n_train=1)
