"""Variational inference: sampling with log-densities, memory-saving backward in the
sampling direction, the targets, the objectives and the log-normaliser estimate."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import flows
from flows.distributions import GaussianMixture
from flows.models import MAF, NSF, Flow, Glow, RealNVP
from flows.models.registry import build_model
from flows.parity import gradient_parity, ramp_nll
from flows.targets import TARGETS, CorrelatedGaussian, RingMixture, Target, make_target, modes_covered
from flows.transforms import (
    ActNorm,
    AffineCoupling,
    Chain,
    InvConv1x1,
    Inverse,
    MaskedAutoregressive,
    ResidualBlock,
    Squeeze,
    Tail,
    channel_mask,
)
from flows.variational import (
    DivergedError,
    VIConfig,
    _density_image,
    fit,
    importance_diagnostics,
    log_weights,
    objective_loss,
    save_target_figure,
)

from conftest import prepared
from registry import CASES

# Every registry model can sample: the Flow cases.
MODELS = sorted(case_id for case_id, case in CASES.items() if isinstance(case.factory(), Flow))
# Models whose sampling pass has a graph (an i-ResNet's fixed-point inverse has none).
DIFFERENTIABLE = [case_id for case_id in MODELS if CASES[case_id].factory().bijector.exact_inverse]


def vi_loss(model: Flow, context: torch.Tensor | None, n: int = 6) -> torch.Tensor:
    """A reverse-KL-like loss of ``n`` samples: a ramp Gaussian energy of ``x`` plus ``log q``."""
    x, log_q = model.sample_and_log_prob(n, context)
    return ramp_nll((x, -log_q))


@pytest.mark.parametrize("case_id", MODELS)
def test_sample_and_log_prob_agrees_with_sample_then_log_prob(case_id: str) -> None:
    model, case = prepared(case_id)
    model.eval()  # training mode would advance spectral norm's power iteration in log_prob
    context = case.draw_context(7)
    torch.manual_seed(3)
    expected = model.sample(7, context)
    torch.manual_seed(3)
    x, log_q = model.sample_and_log_prob(7, context)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    atol = 1e-8 if model.bijector.exact_inverse else 1e-6  # a fixed-point inverse's tolerance
    torch.testing.assert_close(log_q, model.log_prob(x, context), rtol=1e-9, atol=atol)


@pytest.mark.parametrize("case_id", DIFFERENTIABLE)
def test_sampling_direction_memory_saving_gradients_equal_plain(case_id: str) -> None:
    model, case = prepared(case_id)
    context = case.draw_context(6)
    if context is not None and context.is_floating_point():
        context.requires_grad_(True)  # its gradient flows through the engine too
    inputs = () if context is None else (context,)
    report = gradient_parity(model, *inputs, objective=lambda m, *c: vi_loss(m, c[0] if c else None))
    assert report.error < 1e-10, str(report)


@pytest.mark.parametrize("case_id", DIFFERENTIABLE)
def test_sampling_direction_keeps_less_with_memory_saving(case_id: str) -> None:
    model, case = prepared(case_id)
    context = case.draw_context(6)
    kept = {}
    for saving in (False, True):
        model.memory_saving = saving
        torch.manual_seed(0)
        kept[saving] = flows.saved_bytes(lambda: vi_loss(model, context), exclude=model)
    assert kept[True] < kept[False]


@pytest.mark.parametrize(
    "name, input_shape, depth",
    [("realnvp", (4,), "steps"), ("nsf", (4,), "steps"), ("maf", (4,), "steps"), ("glow", (1, 8, 8), "steps")],
)
def test_sampling_direction_kept_bytes_are_flat_in_depth(name: str, input_shape: tuple, depth: str) -> None:
    kept = {}
    for steps in (2, 16):
        torch.manual_seed(0)
        kw = {"levels": 2} if len(input_shape) == 3 else {}
        model = build_model(name, input_shape, **{depth: steps}, hidden_channels=8, **kw)
        model.memory_saving = True
        torch.manual_seed(1)
        kept[steps] = flows.saved_bytes(lambda m=model: vi_loss(m, None, n=16), exclude=model)
    assert kept[16] <= 1.1 * kept[2], kept


def test_float32_sampling_parity_on_a_deep_flow() -> None:
    """Float32: the rebuilt inputs drift by rounding block after block; at 32 affine
    couplings the gradients agree within 1e-5 of the largest entry."""
    torch.manual_seed(0)
    model = RealNVP((6,), levels=1, steps=32, hidden_channels=16)
    with torch.no_grad():
        model.log_prob(model.sample(64))  # ActNorm's data-dependent initialisation
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # away from the identity the zero-init gives
    assert gradient_parity(model, objective=lambda m: vi_loss(m, None, n=32)).error < 1e-5


def test_inverted_leaves_follow_the_rules() -> None:
    """Inverse(chain) inverts the leaves in reverse order; a Tail's region maps to the same
    region with the inner block inverted; a fixed-point inverse opts out; an own opt-out
    makes the wrapper one leaf."""
    a, b = AffineCoupling(channel_mask(4, 0), image=False), AffineCoupling(channel_mask(4, 1), image=False)
    inverted = Inverse(Chain(a, Chain(b))).leaves()
    assert [leaf.bijector for leaf in inverted] == [b, a]
    tail = Tail(AffineCoupling(channel_mask(2, 0), hidden_channels=4), 8, (2, 2, 2))
    region, inner = Inverse(tail).region()
    assert region == tail.region()[0] and isinstance(inner, Inverse) and inner.bijector is tail.bijector
    assert Inverse(Squeeze()).region() is None
    assert not Inverse(ResidualBlock.mlp(3, 8)).memory_saving
    maf = MaskedAutoregressive(3, 8)
    assert Inverse(maf).memory_saving and not maf.memory_saving  # the one-pass direction rebuilds
    whole = Inverse(Chain(a, b))
    whole.memory_saving = False
    assert whole.leaves() == [whole]


def test_an_inverted_chain_inside_a_forward_chain_is_rebuilt_leaf_by_leaf() -> None:
    """The forward direction uses the same expansion: ``Inverse(Chain(...))`` inside a
    memory-saving chain is rebuilt block by block, with gradients equal to plain ones."""
    torch.manual_seed(0)
    inner = Chain(AffineCoupling(channel_mask(4, 0), image=False, hidden_channels=8), InvConv1x1(4, lu=True))
    chain = Chain(ActNorm(4), Inverse(inner)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    chain(x)  # ActNorm's initialisation
    with torch.no_grad():
        for p in chain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert len(chain.leaves()) == 3
    assert gradient_parity(chain, x).error < 1e-10


def test_temperature_gives_the_tempered_base_density() -> None:
    torch.manual_seed(0)
    model = Glow((1, 4, 4), levels=2, steps=1, hidden_channels=8).double().eval()
    for temperature in (0.7, [0.5, 0.8]):
        torch.manual_seed(1)
        x, log_q = model.sample_and_log_prob(5, temperature=temperature)
        z, logdet = model.bijector(x)
        scale = model._temperature_vector(temperature)
        scale = torch.as_tensor(scale, dtype=z.dtype).expand(z.shape[1:])
        expected = torch.distributions.Normal(0.0, scale).log_prob(z).sum(1) + logdet
        torch.testing.assert_close(log_q, expected, rtol=1e-9, atol=1e-9)


def test_unsupported_temperatures_raise_one_clear_line() -> None:
    flow = Flow(Chain(MaskedAutoregressive(2, 8)), GaussianMixture(2, components=3), (2,))
    flow.sample_and_log_prob(3)  # temperature 1: fine
    with pytest.raises(ValueError, match="mixture base has no tempered density"):
        flow.sample_and_log_prob(3, temperature=0.5)
    with pytest.raises(ValueError, match="temperature 0 is a point mass"):
        NSF((2,), steps=1, hidden_channels=4).sample_and_log_prob(3, temperature=0.0)
    with pytest.raises(ValueError, match="Flow.sample_and_log_prob: n must be a positive integer"):
        MAF((2,), steps=1, hidden_channels=4).sample_and_log_prob(0)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_targets_have_the_normaliser_they_claim(name: str) -> None:
    """``log Z`` against an independent estimate: importance sampling from a wide Gaussian."""
    target = make_target(name).double()
    torch.manual_seed(0)
    proposal = torch.distributions.Normal(torch.zeros(target.dim, dtype=torch.float64), 3.0)
    x = proposal.sample((400_000 if target.dim == 2 else 4_000_000 // target.dim,))
    if name == "gaussian":  # a wide Gaussian misses a 20-D one: propose from it exactly
        x = target.mean + x / 3.0 @ target.cholesky.T
        log_q = -0.5 * (x.shape[1] * math.log(2 * math.pi)) - 0.5 * (
            torch.linalg.solve_triangular(target.cholesky, (x - target.mean).T, upper=False).pow(2).sum(0)
        ) - target.cholesky.diagonal().log().sum()
    else:
        log_q = proposal.log_prob(x).sum(1)
    _, log_z = importance_diagnostics(target.log_prob(x) - log_q)
    assert abs(log_z - target.log_normalizer) < 0.01


def test_target_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown target 'banana'; choose one of ring"):
        make_target("banana")
    with pytest.raises(ValueError, match=r"RingMixture: expected points of shape \(B, 2\)"):
        RingMixture().log_prob(torch.zeros(3, 5))


def test_objectives_and_diagnostics() -> None:
    log_w = torch.tensor([0.0, math.log(3.0)])
    ess, log_z = importance_diagnostics(log_w)
    assert ess == pytest.approx(16 / (2 * 10)) and log_z == pytest.approx(math.log(2.0))
    assert objective_loss(log_w).item() == pytest.approx(-math.log(3.0) / 2)
    assert objective_loss(log_w, "iw", group=2).item() == pytest.approx(-math.log(2.0))
    # The Renyi bound lies between the ELBO and the importance-weighted bound.
    renyi = objective_loss(log_w, "renyi", alpha=0.5, group=2).item()
    assert objective_loss(log_w, "iw", group=2).item() < renyi < objective_loss(log_w).item()
    with pytest.raises(ValueError, match="not a multiple of group"):
        VIConfig(objective="iw", batch_size=10, group=4)
    with pytest.raises(ValueError, match="group must be an integer >= 1 dividing the 2 log-weights"):
        objective_loss(log_w, "iw", group=3)
    for alpha, message in ((1.0, "alpha = 1 is the reverse KL"), (math.nan, "alpha must be a finite number")):
        with pytest.raises(ValueError, match=message):
            objective_loss(log_w, "renyi", alpha=alpha, group=2)
        with pytest.raises(ValueError, match=message):
            VIConfig(objective="renyi", alpha=alpha)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.inf, math.nan, "10", True])
def test_a_clip_that_would_stop_or_reverse_training_is_refused(clip: object) -> None:
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        VIConfig(clip=clip)


def _fit_gaussian_6d(objective: str, gradient: str = "reparam", group: int = 4) -> tuple[float, float, float]:
    """``(ESS before, ESS after, log Z error)`` of a 400-step fit to a 6-D correlated Gaussian."""
    torch.manual_seed(0)
    target = CorrelatedGaussian(6, rho=0.8)
    flow = RealNVP((6,), levels=1, steps=4, hidden_channels=32)
    config = VIConfig(
        steps=400, batch_size=128, lr=3e-3, objective=objective, group=group, gradient=gradient, eval_every=400,
        eval_samples=8192,
    )
    start_ess, _ = flows.variational.evaluate(flow, target, 8192)
    result = fit(flow, target, config)
    assert result.history["log_z_true"] == [target.log_normalizer]
    return start_ess, result.ess, result.log_z - target.log_normalizer


@pytest.mark.parametrize(
    "objective, gradient", [("reverse-kl", "reparam"), ("reverse-kl", "stl"), ("renyi", "reparam"), ("renyi", "dreg")]
)
def test_log_normaliser_estimate_converges_on_a_known_target(objective: str, gradient: str) -> None:
    """A flow fitted to a 6-D correlated Gaussian estimates ``log Z`` within 0.02 nats and
    reaches an ESS above 0.5 (the fresh flow, a standard normal, is far off: ESS < 0.1)."""
    start_ess, ess, error = _fit_gaussian_6d(objective, gradient)
    assert start_ess < 0.1
    assert ess > 0.5
    assert abs(error) < 0.02


@pytest.mark.parametrize("group, plain_below, dreg_above", [(4, 0.6, 0.6), (16, 0.1, 0.3)])
def test_doubly_reparametrised_gradient_trains_the_importance_weighted_bound(
    group: int, plain_below: float, dreg_above: float
) -> None:
    """With plain reparametrised gradients the importance-weighted bound trains ``q``
    poorly, worse as ``K`` grows (their signal-to-noise ratio falls like ``1/sqrt(K)``,
    arXiv:1802.04537; seen here: ESS 0.43 at K = 4, 0.05 at K = 16); DReG's does not
    (0.87 and 0.47, same seed and steps)."""
    _, plain_ess, _ = _fit_gaussian_6d("iw", "reparam", group)
    _, dreg_ess, dreg_error = _fit_gaussian_6d("iw", "dreg", group)
    assert plain_ess < plain_below
    assert dreg_ess > dreg_above
    assert abs(dreg_error) < 0.02


class _OwnDensity(Target):
    """A frozen copy of a flow's own density: ``q = p`` exactly (``log Z = 0``)."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.dim = flow.input_shape[0]
        self.copy = copy.deepcopy(flow).requires_grad_(False)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.copy.log_prob(x)


def _perturbed_flow() -> Flow:
    torch.manual_seed(0)
    flow = RealNVP((2,), levels=1, steps=2, hidden_channels=8).double().eval()  # eval: no ActNorm init
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def _gradient(flow: Flow, target: Target, objective: str, gradient: str, n: int, memory_saving: bool = False):
    flow.memory_saving = memory_saving
    torch.manual_seed(1)
    _, log_w = flows.variational.log_weights(flow, target, n, gradient=gradient)
    loss = objective_loss(log_w, objective, alpha=0.5, group=4, gradient=gradient)
    grads = torch.autograd.grad(loss, list(flow.parameters()))
    flow.memory_saving = False
    return loss.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("memory_saving", [False, True], ids=["plain", "memory-saving"])
@pytest.mark.parametrize("objective, gradient", [("reverse-kl", "stl"), ("iw", "dreg"), ("renyi", "dreg")])
def test_path_gradients_vanish_at_the_optimum(objective: str, gradient: str, memory_saving: bool) -> None:
    """At ``q = p`` every ``log w`` is the constant ``log Z``: STL's and DReG's path-only
    gradients are zero on every batch, the plain reparametrised one (the score term's
    noise) is not; the loss's value does not depend on the estimator."""
    flow = _perturbed_flow()
    target = _OwnDensity(flow)
    plain_loss, plain = _gradient(flow, target, objective, "reparam", 64)
    loss, path = _gradient(flow, target, objective, gradient, 64, memory_saving)
    assert loss == pytest.approx(float(plain_loss), abs=1e-10)
    assert plain.abs().max() > 1e-3
    assert path.abs().max() < 1e-10


@pytest.mark.parametrize("objective", ["iw", "renyi"])
def test_doubly_reparametrised_gradient_is_unbiased(objective: str) -> None:
    """On the same 16384 samples DReG's gradient is within 2% of the plain reparametrised
    one (both unbiased; seen: 0.6% and 0.3%), while STL's is biased for ``K > 1`` bounds
    (seen: 13% off, the same at 8x the samples)."""
    flow = _perturbed_flow()
    target = CorrelatedGaussian(2, rho=0.5)
    _, plain = _gradient(flow, target, objective, "reparam", 2**14)
    _, dreg = _gradient(flow, target, objective, "dreg", 2**14)
    _, stl = _gradient(flow, target, objective, "stl", 2**14)
    assert (dreg - plain).norm() < 0.02 * plain.norm()
    assert (stl - plain).norm() > 0.08 * plain.norm()


@pytest.mark.parametrize("objective, gradient", [("reverse-kl", "stl"), ("iw", "dreg")])
def test_path_gradients_with_memory_saving_equal_plain(objective: str, gradient: str) -> None:
    """The second, parameter-detached pass keeps its meaning under memory-saving backward
    (the engine collects only parameters that require grad when a pass runs)."""
    flow = _perturbed_flow()
    target = CorrelatedGaussian(2, rho=0.5)
    _, plain = _gradient(flow, target, objective, gradient, 64)
    _, saving = _gradient(flow, target, objective, gradient, 64, memory_saving=True)
    assert torch.allclose(saving, plain, rtol=1e-8, atol=1e-10)


def test_annealing_trains_on_the_tempered_target() -> None:
    """Step 1 of an annealed fit minimises ``E_q[log q - beta_start log p*]``; the
    diagnostics use ``p*`` itself."""
    torch.manual_seed(0)
    flow = RealNVP((2,), levels=1, steps=2, hidden_channels=8).eval()  # eval: no ActNorm init draws
    target = RingMixture()
    with torch.no_grad():
        torch.manual_seed(3)
        x, log_q = copy.deepcopy(flow).sample_and_log_prob(64)
    config = VIConfig(steps=1, batch_size=64, seed=3, anneal_steps=10, beta_start=0.5, eval_samples=64)
    history = fit(flow, target, config).history
    assert history["loss"][0] == pytest.approx(float(-(0.5 * target.log_prob(x) - log_q).mean()), rel=1e-6)
    assert [config.beta(s) for s in (1, 6, 11, 50)] == [0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"beta_start must be in \(0, 1\]"):
        VIConfig(anneal_steps=10, beta_start=0.0)


def test_fit_is_the_plain_reverse_kl_loop_on_the_same_noise() -> None:
    """Given the same random numbers, ``fit`` takes the steps of the textbook loop (normflows'
    order: loss of ``beta(step)`` from step 1, zero_grad, backward, clip, Adam, cosine
    schedule), so a gap to normflows on the same flow is the noise or the flow, not the loop."""
    target = make_target("two-moons")
    torch.manual_seed(0)
    flow = RealNVP((2,), levels=1, steps=2, hidden_channels=8, actnorm=False, direction="sampling", scale="exp")
    twin = copy.deepcopy(flow)
    # lr and clip large enough that a schedule, clip or beta off by a step shows.
    config = VIConfig(
        steps=12, batch_size=32, lr=3e-2, clip=1.0, seed=5, anneal_steps=6, eval_every=12, eval_samples=64
    )
    losses = fit(flow, target, config).history["loss"]
    torch.manual_seed(5)
    with torch.no_grad():
        twin.log_prob(twin.sample(32))  # fit's data-dependent initialisation pass draws one batch
    params = list(twin.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 12)
    expected, norms = [], []
    for step in range(1, 13):
        x, log_q = twin.sample_and_log_prob(32)
        loss = log_q.mean() - config.beta(step) * target.log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        optimizer.step()
        schedule.step()
        expected.append(float(loss.detach()))
    assert max(norms) > 1.0  # the clip acted
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-5)
    for mine, theirs in zip(flow.parameters(), params):
        torch.testing.assert_close(mine, theirs)


def test_modes_covered_reads_the_log_normaliser_error() -> None:
    assert modes_covered(make_target("two-moons"), -math.log(2)) == 1
    assert modes_covered(make_target("ring"), math.log(6 / 8) + 0.03) == 6
    assert modes_covered(make_target("ring"), 0.2) == 8  # an overestimate covers them all
    assert modes_covered(make_target("gaussian"), -5.0) == 0


def test_realnvp_without_actnorm_fits() -> None:
    flow = RealNVP((2,), levels=1, steps=2, hidden_channels=8, actnorm=False)
    assert not any(isinstance(m, ActNorm) for m in flow.modules())
    assert any(isinstance(m, ActNorm) for m in RealNVP((2,), levels=1, steps=2, hidden_channels=8).modules())
    image = RealNVP((1, 4, 4), levels=1, steps=1, hidden_channels=4, res_blocks=1, actnorm=False)
    assert not any(isinstance(m, ActNorm) for m in image.modules()) and image.sample(2).shape == (2, 1, 4, 4)
    result = fit(flow, RingMixture(), VIConfig(steps=3, batch_size=16, eval_samples=64))
    assert 0 < result.ess <= 1


@pytest.mark.parametrize("direction", ["density", "sampling"])
def test_realnvp_direction_decides_how_sampling_writes_the_affine_map(direction: str) -> None:
    """``direction="sampling"`` samples through each coupling's forward, ``z_B exp(s) + t``;
    the default solves the density-direction map, ``(z_B - t) exp(-s)``."""
    torch.manual_seed(0)
    flow = RealNVP((2,), levels=1, steps=1, hidden_channels=4, actnorm=False, direction=direction).double().eval()
    coupling = flow.bijector[0][0]
    assert isinstance(coupling, Inverse) == (direction == "sampling")
    head = next(m for m in reversed(list(flow.modules())) if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.5, 1.5], dtype=torch.float64))  # raw log-scale a, shift t
    torch.manual_seed(1)
    z = flow.base.sample(5)
    torch.manual_seed(1)
    x, log_q = flow.sample_and_log_prob(5)
    s, t = math.tanh(0.5), 1.5
    expected = z[:, 1] * math.exp(s) + t if direction == "sampling" else (z[:, 1] - t) * math.exp(-s)
    torch.testing.assert_close(x[:, 1], expected)
    torch.testing.assert_close(x[:, 0], z[:, 0])  # the conditioning half passes unchanged
    torch.testing.assert_close(log_q, flow.log_prob(x), rtol=1e-12, atol=1e-12)
    # Memory-saving backward in the sampling direction rebuilds through the wrapper too.
    deep = RealNVP((4,), levels=1, steps=4, hidden_channels=8, direction=direction).double()
    with torch.no_grad():
        deep.log_prob(deep.sample(16))
        for p in deep.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert gradient_parity(deep, objective=lambda m: vi_loss(m, None)).error < 1e-10


@pytest.mark.parametrize("scale", ["tanh", "exp"])
def test_realnvp_scale_picks_the_affine_log_scale_map(scale: str) -> None:
    """``scale="exp"`` uses the raw network output as the log-scale (unbounded), the
    default bounds it by ``tanh``; the log-density stays exact either way."""
    flow = RealNVP((2,), levels=1, steps=1, hidden_channels=4, actnorm=False, direction="sampling", scale=scale)
    flow = flow.double().eval()
    head = next(m for m in reversed(list(flow.modules())) if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        head.bias.copy_(torch.tensor([2.0, 0.0], dtype=torch.float64))
    torch.manual_seed(1)
    z = flow.base.sample(5)
    torch.manual_seed(1)
    x, log_q = flow.sample_and_log_prob(5)
    s = 2.0 if scale == "exp" else math.tanh(2.0)
    torch.testing.assert_close(x[:, 1], z[:, 1] * math.exp(s))
    torch.testing.assert_close(log_q, flow.log_prob(x), rtol=1e-12, atol=1e-12)


def test_realnvp_scale_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"scale must be one of \('tanh', 'sigmoid', 'exp'\), got 'softplus'"):
        RealNVP((2,), levels=1, steps=1, scale="softplus")
    with pytest.raises(ValueError, match="is for affine couplings; a spline coupling has no log-scale map"):
        RealNVP((2,), levels=1, steps=1, coupling="spline", scale="exp")


def test_realnvp_direction_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"direction must be one of \('density', 'sampling'\), got 'latent'"):
        RealNVP((2,), levels=1, steps=1, direction="latent")
    with pytest.raises(ValueError, match=r"is for vector inputs \(D,\), got \(1, 4, 4\); use 'density'"):
        RealNVP((1, 4, 4), levels=1, steps=1, direction="sampling")


def test_gradient_estimator_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="gradient must be one of"):
        VIConfig(gradient="score")
    with pytest.raises(ValueError, match="reverse KL's is 'stl'"):
        VIConfig(gradient="dreg")
    with pytest.raises(ValueError, match="use temperature 1"):
        VIConfig(gradient="stl", temperature=0.8)


def test_path_gradients_of_overflowing_samples_are_a_divergence() -> None:
    """STL and DReG evaluate the flow's density at its samples once more: samples that
    overflowed are the fit diverging, not bad input (``DivergedError``, as a non-finite loss)."""
    torch.manual_seed(0)
    flow = RealNVP((2,), levels=1, steps=1, hidden_channels=4, actnorm=False, direction="sampling", scale="exp")
    coupling = next(m for m in flow.modules() if isinstance(m, AffineCoupling))
    with torch.no_grad():
        coupling.conditioner[-1].bias.fill_(1e4)  # log-scale 1e4: exp overflows every sample
    for gradient in ("stl", "dreg"):
        with pytest.raises(DivergedError, match="the flow's samples are non-finite"):
            log_weights(flow, RingMixture(), 8, gradient=gradient)


def test_fit_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match=r"unconditional over \(2,\)"):
        fit(RealNVP((3,), levels=1, steps=1, hidden_channels=4), RingMixture(), VIConfig(steps=1))
    iresnet = build_model("iresnet", (2,), levels=1, blocks=1, hidden_channels=4)
    with pytest.raises(ValueError, match="samples carry no gradient"):
        fit(iresnet, RingMixture(), VIConfig(steps=1))



def test_cli_fits_a_target_and_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    argv = ["train", "--model", "realnvp", "-K", "2", "--hidden", "8", "--objective", "reverse-kl", "--gradient", "stl"]
    argv += ["--target", "double-well", "--steps", "5", "--eval-every", "5", "--no-progress", "--out", str(tmp_path)]
    argv += ["--anneal-steps", "3", "--direction", "sampling"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "realnvp on target double-well (2 D), reverse-kl" in out and "log Z estimate" in out
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["step"] == [1, 2, 3, 4, 5] and len(history["ess"]) == 1
    assert (tmp_path / "target.png").stat().st_size > 0 and (tmp_path / "model.pt").is_file()
    assert not list(tmp_path.glob(".*.tmp"))
    saved = torch.load(tmp_path / "model.pt", weights_only=False)["payload"]["config"]
    assert saved["kwargs"]["direction"] == "sampling"


def test_cli_builds_the_vi_recipe_where_the_options_leave_it_open(tmp_path: Path, capsys) -> None:
    """``--model realnvp`` with a variational objective gets ``REALNVP_RECIPE`` (one level of
    6 sampling-direction ``exp`` couplings); an option given on the command line wins."""
    from flows.cli import main
    from flows.variational import REALNVP_RECIPE

    base = ["train", "--model", "realnvp", "--hidden", "8", "--objective", "reverse-kl", "--target", "ring",
            "--steps", "2", "--eval-every", "2", "--no-progress"]
    for extra, expected in (([], REALNVP_RECIPE), (["--log-scale", "tanh", "-K", "2"], {"scale": "tanh", "steps": 2})):
        out = tmp_path / str(len(extra))
        assert main([*base, *extra, "--out", str(out)]) == 0
        kwargs = torch.load(out / "model.pt", weights_only=False)["payload"]["config"]["kwargs"]
        assert kwargs == {**REALNVP_RECIPE, "hidden_channels": 8, **expected}
        assert "direction=sampling" in capsys.readouterr().out
        model = build_model("realnvp", (2,), **kwargs)
        couplings = [m for m in model.modules() if isinstance(m, AffineCoupling)]
        assert len(couplings) == kwargs["steps"] and {c.scale for c in couplings} == {kwargs["scale"]}
    out = tmp_path / "spline"  # the recipe's log-scale is for affine couplings only
    assert main([*base, "--coupling", "spline", "--out", str(out)]) == 0
    kwargs = torch.load(out / "model.pt", weights_only=False)["payload"]["config"]["kwargs"]
    assert kwargs["coupling"] == "spline" and "scale" not in kwargs and kwargs["direction"] == "sampling"


def test_target_figure_draws_a_density_that_overflows_off_its_samples(tmp_path: Path) -> None:
    """An ``exp`` log-scale can overflow the density pass on part of the grid (``log q``
    ``-inf`` or ``nan``); the panel shows those points as zero instead of going blank."""
    flow = RealNVP((2,), levels=1, steps=1, hidden_channels=4, actnorm=False, direction="sampling", scale="exp")
    first, second, head = [m for m in flow.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer in (first, second, head):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[0, 0] = second.weight[0, 0] = 1.0
        head.weight[0, 0] = -40.0  # log-scale -40 relu(x_A): exp(-s) overflows float32 beyond x_A = 2.2
    target = make_target("two-moons")
    axis = torch.linspace(*target.bounds, 50)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_q = flow.eval().log_prob(grid)
    assert not torch.isfinite(log_q).all() and torch.isfinite(log_q).any()
    image = _density_image(log_q)
    assert torch.isfinite(image).all() and image.max() == 1 and image[~torch.isfinite(log_q)].eq(0).all()
    assert save_target_figure(flow, target, tmp_path / "t.png", n_samples=500, resolution=50).stat().st_size > 0
    with pytest.raises(ValueError, match="no finite log-density on the grid"):
        _density_image(torch.full((4,), math.nan))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--objective", "reverse-kl", "--target", "banana"], "--target 'banana' is unknown; choose one of ring"),
        (["--objective", "reverse-kl"], "--target is missing; choose one of ring"),
        (["--target", "ring"], "--target needs a variational objective"),
        (["--objective", "iw", "--target", "ring", "--batch", "10"], "not a multiple of group"),
        (["--objective", "reverse-kl", "--target", "ring", "--conditional"], "--conditional does not apply"),
        (["--gradient", "stl"], "--gradient needs a variational objective"),
        (["--objective", "reverse-kl", "--target", "ring", "--gradient", "dreg"], "reverse KL's is 'stl'"),
        (["--objective", "iw", "--target", "ring", "--anneal-steps", "-1"], "anneal_steps must be an integer >= 0"),
        (["--objective", "reverse-kl", "--target", "ring", "--group", "8"], "--group applies to --objective iw or"),
        (["--objective", "iw", "--target", "ring", "--alpha", "2"], "--alpha applies to --objective renyi, not iw"),
        (["--objective", "renyi", "--target", "ring", "--alpha", "1"], "alpha = 1 is the reverse KL"),
        (["--objective", "iw", "--target", "ring", "--group", "3"], "batch_size 256 is not a multiple of group 3"),
        (["--objective", "reverse-kl", "--target", "ring", "--model", "iresnet"], "samples carry no gradient"),
    ],
)
def test_cli_usage_errors_are_one_line(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    assert main(["train", "--steps", "1", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_help_lists_every_target() -> None:
    """``--help`` names the targets without importing torch: keep the list in step."""
    from flows.cli import _parser

    train = _parser()._subparsers._group_actions[0].choices["train"]
    option = next(a for a in train._actions if "--target" in a.option_strings)
    assert option.help.split(": ", 1)[1].split(", ") == list(TARGETS)


def test_cli_reports_a_path_gradient_fit_that_diverges_as_a_failure(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    argv = ["train", "--objective", "reverse-kl", "--gradient", "stl", "--target", "ring", "--steps", "30"]
    assert main([*argv, "--lr", "3", "--clip", "0", "--no-progress", "--out", str(tmp_path)]) == 1
    assert "the flow's samples are non-finite; lower the lr" in capsys.readouterr().err
