"""The one gradient-parity helper (``flows.parity``): it sees correct models as rounding,
catches a wrong inverse, leaves the caller's module alone and freezes per-step state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import flows
from flows.diagnostics import check
from flows.memory import module_device
from flows.models import NSF, Glow, IResNet
from flows.nn import Reversible
from flows.parity import ParityReport, gradient_parity, pending_initialization, ramp_nll
from flows.training import initialize
from flows.transforms import ActNorm, AffineCoupling, Bijector, Chain, InvConv1x1, channel_mask
from flows.transforms.rev_coupling import RevCoupling

F64 = torch.float64


class Scale(Bijector):
    """``y = x * exp(w)``, log-det ``D * w``; its inverse is off by the factor ``slip``."""

    def __init__(self, slip: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3, dtype=F64))
        self.slip = slip

    def forward(self, x: Tensor, context=None) -> tuple[Tensor, Tensor]:
        return x * torch.exp(self.w), (self.w * x.shape[1]).expand(x.shape[0])

    def inverse(self, y: Tensor, context=None) -> tuple[Tensor, Tensor]:
        return self.slip * y * torch.exp(-self.w), (-self.w * y.shape[1]).expand(y.shape[0])


def small_glow(dtype: torch.dtype = F64) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = Glow((1, 4, 4), levels=2, steps=2, hidden_channels=8).to(dtype)
    x = torch.rand(8, 1, 4, 4, dtype=dtype)
    initialize(model, x)
    return model, x


def revnet(depth: int = 3) -> Reversible:
    torch.manual_seed(0)
    return Reversible(*[RevCoupling(nn.Linear(3, 3), nn.Linear(3, 3)) for _ in range(depth)]).double()


def test_glow_parity_is_rounding_in_float64() -> None:
    model, x = small_glow()
    report = gradient_parity(model, x)
    assert report.error < 1e-12, report
    assert report.scale > 0
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert list(report.per_tensor) == trainable
    assert max(report.per_tensor.values()) == report.error
    assert report.worst in trainable and "gradient parity" in str(report)


def test_glow_parity_in_float32_within_float32_rounding() -> None:
    model, x = small_glow(torch.float32)
    assert gradient_parity(model, x).error < 1e-5


def test_reversible_stack_compares_the_input_gradient_too() -> None:
    layer = revnet()
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    report = gradient_parity(layer, x)
    assert "input[0]" in report.per_tensor and report.error < 1e-12, report
    assert x.grad is None  # the caller's tensor gets no graph and no gradient


@pytest.mark.parametrize(("slip", "broken"), [(1.0, False), (1.01, True)], ids=["exact-inverse", "inverse-off-1pct"])
def test_a_wrong_inverse_is_caught(slip: float, broken: bool) -> None:
    """A single block runs in a one-block memory-saving chain, so its own inverse rebuilds
    the input: 1% off there is a gradient error of the same order."""
    x = torch.randn(4, 3, dtype=F64)
    for module in (Scale(slip), Chain(Scale(), Scale(slip), Scale())):
        report = gradient_parity(module, x)
        if broken:
            assert report.error > 1e-3, report
        else:
            assert report.error < 1e-12, report


def test_callers_module_switch_grads_and_random_state_untouched() -> None:
    model, x = small_glow()
    model.memory_saving = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    gradient_parity(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.memory_saving is True
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_in_place_passes_restore_every_chains_switch() -> None:
    """``copy_module=False``: :func:`flows.memory_saving` switches and restores each chain,
    also a mixed setting and also when the loss raises."""
    outer = Chain(InvConv1x1(2).double(), Chain(AffineCoupling(channel_mask(2, 0)).double()))
    outer.memory_saving, outer[1].memory_saving = True, False
    x = torch.randn(3, 2, 2, 2, dtype=F64)
    assert gradient_parity(outer, x, copy_module=False).error < 1e-12
    assert (outer.memory_saving, outer[1].memory_saving) == (True, False)

    def failing(m: nn.Module, x: Tensor) -> Tensor:
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        gradient_parity(outer, x, objective=failing, copy_module=False)
    assert (outer.memory_saving, outer[1].memory_saving) == (True, False)


@pytest.mark.parametrize("logdet", ["series", "unbiased"])
def test_iresnet_power_iteration_frozen_and_probes_replayed(logdet: str) -> None:
    """In training mode every call would advance the spectral norm's power iteration and
    draw new Hutchinson probes (and, for ``unbiased``, a new series length): both passes use
    the same weights and the same draws, even in place."""
    torch.manual_seed(0)
    model = IResNet((1, 4, 4), levels=1, blocks=2, hidden_channels=8, logdet=logdet).double().train()
    x = torch.rand(4, 1, 4, 4, dtype=F64)
    initialize(model, x)
    vectors = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("weight_u", "weight_v"))}
    assert vectors
    report = gradient_parity(model, x, copy_module=False)
    assert report.error < 1e-10, report
    assert all(torch.equal(model.state_dict()[k], v) for k, v in vectors.items())
    with torch.no_grad():
        model.log_prob(x)  # outside the helper a training-mode call does move them
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in vectors.items())


def test_uninitialised_actnorm_is_refused() -> None:
    torch.manual_seed(0)
    model = Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4)
    x = torch.rand(4, 1, 4, 4)
    assert pending_initialization(model)
    with pytest.raises(ValueError, match="not yet initialised"):
        gradient_parity(model, x)
    initialize(model, x)
    assert pending_initialization(model) == []
    assert pending_initialization(model.eval()) == []
    assert gradient_parity(model, x).error < 1e-5


def test_loss_of_the_output_and_objective() -> None:
    layer = revnet()
    head = nn.Linear(6, 3).double()
    x, labels = torch.randn(5, 6, dtype=F64), torch.tensor([0, 1, 2, 0, 1])

    def cross_entropy(y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(head(y), labels)

    by_loss = gradient_parity(layer, x, loss=cross_entropy)
    by_objective = gradient_parity(
        layer, x, labels, objective=lambda m, x, y: nn.functional.cross_entropy(head(m(x)), y)
    )
    assert by_loss.error < 1e-12 and by_objective.error < 1e-12
    assert by_loss.scale == pytest.approx(by_objective.scale)
    assert gradient_parity(layer, x, loss=lambda y: 10 * cross_entropy(y)).scale == pytest.approx(10 * by_loss.scale)
    with pytest.raises(ValueError, match="not both"):
        gradient_parity(layer, x, loss=cross_entropy, objective=lambda m, x: m(x).sum())
    with pytest.raises(ValueError, match="0-d tensor"):
        gradient_parity(layer, x, loss=lambda y: y.sum(1))
    with pytest.raises(ValueError, match="no Chain"):
        gradient_parity(nn.Linear(2, 2), torch.randn(3, 2))


def test_ramp_nll_gives_an_orthogonal_map_a_gradient() -> None:
    """Under ``0.5 |y|^2`` an orthogonal map's parameters get no gradient (the norm is
    invariant); the ramp's mean breaks that."""
    torch.manual_seed(0)
    conv = InvConv1x1(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(torch.linalg.qr(torch.randn(3, 3, dtype=F64))[0])
    centred = torch.autograd.grad(0.5 * conv(x)[0].pow(2).sum(), conv.weight)[0]
    (ramp,) = torch.autograd.grad(ramp_nll(conv(x)), conv.weight)
    skew = lambda g: g @ conv.weight.T - conv.weight @ g.T  # noqa: E731 - the rotation part
    assert skew(centred).abs().max() < 1e-12 < skew(ramp).abs().max()


def test_check_reports_the_helpers_number() -> None:
    torch.manual_seed(0)
    chain = Chain(ActNorm(2), InvConv1x1(2), AffineCoupling(channel_mask(2, 0))).double()
    x = torch.randn(4, 2, 2, 2, dtype=F64)
    report = check(chain, x)  # initialises the ActNorm first, as training would
    assert report.gradient_error == gradient_parity(chain, x).error < 1e-12
    assert check(Scale(1.01), torch.randn(4, 3, dtype=F64)).gradient_error > 1e-3


def test_check_evaluates_a_conditional_model_at_its_context() -> None:
    torch.manual_seed(0)
    glow = Glow((1, 4, 4), levels=1, steps=2, hidden_channels=8, num_classes=3).double()
    labels = torch.tensor([0, 1, 2])
    report = check(glow, torch.rand(3, 1, 4, 4, dtype=F64), context=labels)  # labels go through the embedding
    assert report.roundtrip_error < 1e-12 and report.logdet_error < 1e-10 and report.gradient_error < 1e-12
    nsf = NSF((3,), steps=2, hidden_channels=8, context_features=2).double()
    x, c = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    assert check(nsf.bijector, x, context=c).gradient_error == gradient_parity(nsf.bijector, x, c).error < 1e-12
    assert check(nsf.bijector, x, context=c).logdet_error < 1e-10
    with pytest.raises(ValueError, match="flows.check: this model is conditional; pass context="):
        check(glow, torch.rand(3, 1, 4, 4, dtype=F64))


def test_report_of_non_finite_and_zero_gradients() -> None:
    nan = ParityReport(math.nan, 1.0, {"a": math.nan, "b": 0.5})
    assert nan.worst == "a"
    zero = gradient_parity(revnet(), torch.randn(2, 6, dtype=F64), loss=lambda y: 0 * y.sum())
    assert zero.error == 0.0 and zero.scale == 0.0


def test_module_device_and_exports() -> None:
    assert module_device(revnet()) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")
    assert flows.gradient_parity is gradient_parity and flows.module_device is module_device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_glow_parity_and_random_state() -> None:
    model, x = small_glow(torch.float32)
    model, x = model.cuda(), x.cuda()
    state = torch.cuda.get_rng_state()
    assert gradient_parity(model, x).error < 1e-5
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert module_device(model).type == "cuda"
