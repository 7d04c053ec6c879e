"""Rational-quadratic splines: exact round trips inside and outside the bound, the
log-derivative against autograd, the identity at zero parameters and in the tails."""

from __future__ import annotations

import pytest
import torch

from flows.models import NSF
from flows.transforms import RationalQuadraticCoupling, channel_mask, rational_quadratic_spline
from flows.transforms.spline import spline_from_parameters

F64 = torch.float64


def _parameters(n: int, bins: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(scale * torch.randn(n, k, generator=g, dtype=F64) for k in (bins, bins, bins - 1))  # type: ignore[return-value]


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_round_trip_inside_and_outside_the_bound(scale: float) -> None:
    x = torch.linspace(-6, 6, 4001, dtype=F64)
    w, h, d = _parameters(len(x), 8, scale)
    y, logdet = rational_quadratic_spline(x, w, h, d, bound=3.0)
    x_back, logdet_back = rational_quadratic_spline(y, w, h, d, bound=3.0, inverse=True)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-9)
    torch.testing.assert_close(logdet_back, logdet, rtol=0, atol=1e-8)
    outside = x.abs() > 3.0
    assert torch.equal(y[outside], x[outside]) and torch.equal(logdet[outside], torch.zeros_like(logdet[outside]))
    assert (y[~outside].abs() <= 3.0).all()  # the interval maps onto itself


def test_log_derivative_equals_autograd_and_the_map_is_monotone() -> None:
    x = torch.linspace(-2.999, 2.999, 2001, dtype=F64, requires_grad=True)
    w, h, d = _parameters(len(x), 6, 2.0)
    y, logdet = rational_quadratic_spline(x, w, h, d, bound=3.0)
    (slope,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(slope.log(), logdet, rtol=1e-9, atol=1e-9)
    same = rational_quadratic_spline(x.detach(), w[:1].expand_as(w), h[:1].expand_as(h), d[:1].expand_as(d))[0]
    assert (same.diff() > 0).all()


def test_zero_parameters_give_the_identity() -> None:
    x = torch.linspace(-4, 4, 101, dtype=F64)
    zeros = torch.zeros(101, 8, dtype=F64)
    y, logdet = rational_quadratic_spline(x, zeros, zeros, zeros[:, :7])
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, torch.zeros_like(logdet), rtol=0, atol=1e-12)
    coupling = RationalQuadraticCoupling(channel_mask(4, 0), image=False).double()
    v = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(coupling(v)[0], v, rtol=0, atol=1e-12)


def test_bad_spline_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="bins must be an integer >= 2"):
        RationalQuadraticCoupling(channel_mask(4, 0), bins=1, image=False)
    with pytest.raises(ValueError, match="tail_bound must be a positive number"):
        RationalQuadraticCoupling(channel_mask(4, 0), tail_bound=0.0, image=False)
    with pytest.raises(ValueError, match=r"input_shape must be \(D,\) with D >= 2"):
        NSF((1,))


def test_nsf_fits_a_bimodal_density_beyond_an_affine_coupling() -> None:
    """Two well-separated modes in one dimension, the other standard normal: a few hundred
    steps of a 2-step NSF reach a lower test NLL than a Gaussian fit (the affine limit)."""
    torch.manual_seed(0)
    def draw(n: int) -> torch.Tensor:
        mode = torch.randint(0, 2, (n, 1)).double() * 4 - 2
        return torch.cat([mode + 0.3 * torch.randn(n, 1, dtype=F64), torch.randn(n, 1, dtype=F64)], 1)

    model = NSF((2,), steps=2, hidden_channels=32, bins=8).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        (-model.log_prob(draw(256)).mean()).backward()
        opt.step()
    test = draw(4000)
    with torch.no_grad():
        nll = -model.log_prob(test).mean().item()
    gaussian = torch.distributions.MultivariateNormal(test.mean(0), torch.cov(test.T))
    assert nll < -gaussian.log_prob(test).mean().item() - 0.3


def test_maf_is_autoregressive_and_iaf_samples_in_one_pass() -> None:
    """Output i of a MAF block depends on inputs <= i only (a triangular Jacobian), and its
    inverse, D passes, is exact; Inverse(block) (IAF) maps back the other way."""
    from flows.transforms import Inverse, MaskedAutoregressive

    torch.manual_seed(0)
    block = MaskedAutoregressive(5, 16, transform="spline", bins=4, tail_bound=3.0).double()
    torch.nn.init.normal_(block.made.output.weight, std=0.3)
    x = torch.randn(1, 5, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda v: block(v)[0], x)[0, :, 0, :]
    assert torch.equal(jac.triu(1), torch.zeros_like(jac))
    z, logdet = block(x)
    torch.testing.assert_close(logdet, jac.diagonal().abs().log().sum().unsqueeze(0))
    torch.testing.assert_close(block.inverse(z)[0], x, rtol=0, atol=1e-10)
    iaf = Inverse(block)
    assert iaf.memory_saving and not block.memory_saving  # the fast direction rebuilds
    torch.testing.assert_close(iaf.inverse(iaf(z)[0])[0], z, rtol=0, atol=1e-10)


def test_gaussian_mixture_base_is_normalised_and_trains_under_a_flow() -> None:
    from flows.distributions import GaussianMixture
    from flows.models import Flow
    from flows.transforms import Chain, InvConv1x1

    base = GaussianMixture(2, components=3, spread=2.0).double()
    side = torch.linspace(-10, 10, 500, dtype=F64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        mass = base.log_prob(grid).exp().sum().item() * (side[1] - side[0]).item() ** 2
    assert abs(mass - 1) < 1e-3
    flow = Flow(Chain(InvConv1x1(2, lu=True)), base, input_shape=(2,)).double()
    flow.log_prob(flow.sample(8)).sum().backward()
    assert base.means.grad is not None and base.logits.grad is not None


def test_extreme_parameters_at_the_bin_size_minimum_still_invert() -> None:
    """Raw parameters of +-40 put all but one bin (and derivative) at its minimum: the map
    is then nearly flat or steep in places, and still inverts, inside and outside the bound."""
    x = torch.linspace(-4, 4, 2001, dtype=F64)
    g = torch.Generator().manual_seed(1)
    w, h = (40 * torch.sign(torch.randn(len(x), 8, generator=g, dtype=F64)) for _ in range(2))
    d = -40 * torch.ones(len(x), 7, dtype=F64)
    y, logdet = rational_quadratic_spline(x, w, h, d, bound=3.0)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    x_back, _ = rational_quadratic_spline(y, w, h, d, bound=3.0, inverse=True)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-6)


def test_float32_round_trip_inside_and_outside_the_bound() -> None:
    torch.manual_seed(0)
    coupling = RationalQuadraticCoupling(channel_mask(4, 0), image=False, tail_bound=2.0, hidden_channels=16)
    torch.nn.init.normal_(coupling.conditioner[-1].weight, std=0.5)
    x = 3 * torch.randn(512, 4)  # about half of the transformed entries lie beyond 2
    with torch.no_grad():
        y, logdet = coupling(x)
        x_back, inverse_logdet = coupling.inverse(y)
    assert (x[:, 2:].abs() > 2).float().mean() > 0.4
    assert (x_back - x).abs().max() <= 1e-5 * x.abs().max()
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=1e-5, atol=1e-4)


def test_both_ends_of_the_interval_are_exact() -> None:
    """The knots' last edge is the bound itself (normalised by the cumulative sum's last
    entry), so the log-derivative is exactly 0 at both ends and beyond, for any parameters."""
    bound = 3.0
    x = torch.tensor([-5.0, -bound, bound, 5.0], dtype=F64)
    for scale in (1.0, 10.0):
        w, h, d = _parameters(len(x), 8, scale)
        y, logdet = rational_quadratic_spline(x, w, h, d, bound=bound)
        assert torch.equal(logdet, torch.zeros_like(logdet))
        torch.testing.assert_close(y, x, rtol=0, atol=1e-14)


def test_the_inverse_at_the_bound_passes_the_identitys_gradient() -> None:
    """At y = +B the inverse is the identity's end (slope 1); rounding put xi just past 1 there
    for about a third of parameter draws, where the clamp passed a zero gradient."""
    torch.manual_seed(0)
    bound, n = 3.0, 1000
    y = torch.full((n,), bound, requires_grad=True)
    w, h, d = (p.float() for p in _parameters(n, 8, 1.0))
    for end in (bound, -bound):
        y = torch.full((n,), end, requires_grad=True)
        x, _ = rational_quadratic_spline(y, w, h, d, bound=bound, inverse=True)
        (grad,) = torch.autograd.grad(x.sum(), y)
        assert torch.equal(grad, torch.ones(n)), int((grad == 0).sum())


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"size": 6}, "3K - 1 values"),
        ({"size": 2}, "3K - 1 values"),
        ({"bound": 0.0}, "bound must be > 0"),
        ({"min_width": 0.125}, "leave no room for 8 bins"),
        ({"min_height": 0.5}, "leave no room for 8 bins"),
        ({"min_derivative": 1.0}, r"min_derivative must be in \[0, 1\)"),
    ],
)
def test_bad_spline_function_settings_are_one_line(settings: dict, message: str) -> None:
    """The public spline functions check their settings (they raised ZeroDivisionError, a math
    domain error or a torch.cat size error)."""
    size = settings.pop("size", 23)
    with pytest.raises(ValueError, match=message):
        spline_from_parameters(torch.zeros(4, 3), torch.zeros(4, 3, size), **settings)


def test_shared_parameters_broadcast_like_per_row_ones() -> None:
    """(D, 3K - 1) parameters for (B, D) inputs give what the same parameters copied to
    every row give: the knots are built once and broadcast."""
    from flows.transforms.spline import spline_from_parameters

    g = torch.Generator().manual_seed(2)
    x = 4 * torch.randn(6, 3, generator=g, dtype=F64)
    shared = torch.randn(3, 14, generator=g, dtype=F64)
    for inverse in (False, True):
        got = spline_from_parameters(x, shared, 3.0, inverse=inverse)
        want = spline_from_parameters(x, shared.expand(6, 3, 14).clone(), 3.0, inverse=inverse)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_transform_kept_splines_the_conditioning_half_elementwise() -> None:
    """``transform_kept=True``: the kept half goes through its own unconditional spline
    (the identity while its parameters are zero), the other half is conditioned on the
    kept half's input; the inverse undoes both."""
    torch.manual_seed(0)
    mask = channel_mask(4, 0)
    coupling = RationalQuadraticCoupling(
        mask, bins=6, image=False, hidden_channels=8, identity_init=False, transform_kept=True
    ).double()
    kept = coupling.kept.tolist()
    x = 2 * torch.randn(16, 4, dtype=F64)
    torch.testing.assert_close(coupling(x)[0][:, kept], x[:, kept], rtol=0, atol=1e-12)  # zero: the identity
    with torch.no_grad():
        coupling.kept_spline.normal_()
    y, logdet = coupling(x)
    # Kept feature j depends on x_j only, through the shared spline.
    expected, expected_logdet = rational_quadratic_spline(
        x[:, kept], *torch.split(coupling.kept_spline.expand(16, -1, -1), [6, 6, 5], dim=-1), bound=3.0
    )
    torch.testing.assert_close(y[:, kept], expected, rtol=0, atol=1e-12)
    plain = RationalQuadraticCoupling(mask, bins=6, image=False, hidden_channels=8).double()
    plain.conditioner.load_state_dict(coupling.conditioner.state_dict())
    changed = coupling.changed.tolist()
    y_plain, logdet_plain = plain(x)
    torch.testing.assert_close(y[:, changed], y_plain[:, changed], rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_plain + expected_logdet.sum(1), rtol=0, atol=1e-10)
    x_back, inverse_logdet = coupling.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=0, atol=1e-10)


def test_identity_init_false_starts_near_but_not_at_the_identity() -> None:
    torch.manual_seed(0)
    coupling = RationalQuadraticCoupling(channel_mask(4, 0), image=False, hidden_channels=16, identity_init=False)
    assert coupling.conditioner[-1].weight.abs().sum() > 0
    x = torch.randn(64, 4)
    y, logdet = coupling(x)
    assert 0 < (y - x).abs().max() < 1.0 and logdet.abs().max() > 0
    with pytest.raises(ValueError, match="identity_init=False re-initialises the default conditioner"):
        RationalQuadraticCoupling(
            channel_mask(4, 0), image=False, identity_init=False, conditioner=torch.nn.Linear(2, 46)
        )
    with pytest.raises(ValueError, match="transform_kept=True needs vectors"):
        RationalQuadraticCoupling(channel_mask(4, 0), transform_kept=True, hidden_channels=8)


@pytest.mark.parametrize("transform_kept, passes", [(False, 1), (True, 2)])
def test_sampling_direction_rebuild_fuses_only_when_the_kept_half_passes(transform_kept: bool, passes: int) -> None:
    """In the sampling direction (``Chain.inverse`` under memory saving) a spline coupling
    rebuilds with the coupling's one-conditioner-pass rebuild unless it also maps its kept
    half, where the conditioner's input is not read off the output: then forward rebuilds,
    inverse recomputes (two passes). Gradients equal ordinary autograd's either way."""
    from flows.transforms import Chain

    torch.manual_seed(0)
    block = RationalQuadraticCoupling(
        channel_mask(4, 0), bins=4, tail_bound=3.0, hidden_channels=8, image=False,
        identity_init=False, transform_kept=transform_kept,
    ).double()
    chain = Chain(block, RationalQuadraticCoupling(channel_mask(4, 1), bins=4, image=False).double())
    z = torch.randn(6, 4, dtype=torch.float64)

    def grads(saving: bool) -> tuple[list[torch.Tensor], int]:
        chain.memory_saving = saving
        chain.zero_grad()
        x, logdet = chain.inverse(z)
        calls = [0]
        handle = block.conditioner.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        (x.square().sum() + logdet.sum()).backward()
        handle.remove()
        return [p.grad.clone() for p in chain.parameters()], calls[0]

    plain, _ = grads(False)
    saving, backward_passes = grads(True)
    assert backward_passes == passes
    for g, h in zip(saving, plain):
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-12)
