"""The conditional NSF's pieces: the context-gated residual conditioner, the couplings'
bin-size logit scale, and a builder that uses both only when conditional."""

from __future__ import annotations

import math

import pytest
import torch

from flows.models import NSF
from flows.models.context import GatedResidualConditioner
from flows.transforms import RationalQuadraticCoupling, channel_mask

F64 = torch.float64


def test_gated_conditioner_matches_its_formula() -> None:
    torch.manual_seed(0)
    net = GatedResidualConditioner(2, 3, out_features=5, hidden_features=8).double()
    with torch.no_grad():  # a residual branch away from its near-zero start
        net.outer.weight.normal_()
    inputs = torch.randn(6, 5, dtype=F64)
    context = inputs[:, 2:]
    h = net.stem(inputs)
    u = net.outer(torch.relu(net.inner(torch.relu(h))))
    expected = net.head(h + u * torch.sigmoid(net.gate(context)))
    torch.testing.assert_close(net(inputs), expected, rtol=0, atol=1e-12)


def test_the_gate_carries_the_context_without_the_stem() -> None:
    """With the stem blind to the context, the output still depends on it, through the gate
    on the residual branch (and only there: the kept half alone does not explain it)."""
    torch.manual_seed(0)
    net = GatedResidualConditioner(2, 3, out_features=4, hidden_features=8).double()
    with torch.no_grad():
        net.stem.weight[:, 2:] = 0
        net.outer.weight.normal_()
    kept = torch.randn(5, 2, dtype=F64)
    a = net(torch.cat([kept, torch.randn(5, 3, dtype=F64)], 1))
    b = net(torch.cat([kept, torch.randn(5, 3, dtype=F64)], 1))
    assert (a - b).abs().min() > 1e-6
    with torch.no_grad():
        net.gate.weight.zero_()
    a = net(torch.cat([kept, torch.randn(5, 3, dtype=F64)], 1))
    b = net(torch.cat([kept, torch.randn(5, 3, dtype=F64)], 1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("transform_kept", [False, True])
def test_logit_scale_multiplies_the_width_and_height_logits_only(transform_kept: bool) -> None:
    """A coupling with ``logit_scale=c`` is the plain coupling whose conditioner outputs the
    widths' and heights' logits times ``c`` and the derivatives unchanged."""
    torch.manual_seed(0)
    bins, scale = 5, 0.25  # exact in float32, as the buffer is built
    mask = channel_mask(5, 1)
    kw = dict(bins=bins, tail_bound=2.0, image=False, hidden_channels=8, identity_init=False,
              transform_kept=transform_kept)
    scaled = RationalQuadraticCoupling(mask, logit_scale=scale, **kw).double()
    plain = RationalQuadraticCoupling(mask, **kw).double()
    plain.load_state_dict(scaled.state_dict())
    changed = len(scaled.changed)
    with torch.no_grad():  # parameter-major rows: the first 2 K blocks of `changed` rows
        plain.conditioner[-1].weight[: 2 * bins * changed] *= scale
        plain.conditioner[-1].bias[: 2 * bins * changed] *= scale
    x = 2 * torch.randn(32, 5, dtype=F64)
    y, logdet = scaled(x)
    y_plain, logdet_plain = plain(x)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_plain, rtol=0, atol=1e-12)
    x_back, inverse_logdet = scaled.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=0, atol=1e-10)
    assert "logit_scale=0.25" in repr(scaled)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, "0.1"])
def test_a_bad_logit_scale_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match="logit_scale must be a positive number"):
        RationalQuadraticCoupling(channel_mask(4, 0), image=False, logit_scale=bad)


def test_nsf_takes_the_gated_conditioner_and_the_scale_only_when_conditional() -> None:
    posterior = NSF((5,), steps=2, hidden_channels=16, bins=4, context_features=3)
    plain = NSF((5,), steps=2, hidden_channels=16, bins=4)
    for coupling in posterior.bijector:
        assert isinstance(coupling.conditioner, GatedResidualConditioner)
        torch.testing.assert_close(coupling.logit_scale[: 2 * 4], torch.full((8,), 1 / 4.0))
        torch.testing.assert_close(coupling.logit_scale[2 * 4 :], torch.ones(3))
    for coupling in plain.bijector:
        assert isinstance(coupling.conditioner, torch.nn.Sequential)
        assert "logit_scale" not in dict(coupling.named_buffers())
    # The state dict does not carry the scale: it follows from the constructor.
    assert not any("logit_scale" in key for key in posterior.state_dict())
    theta, obs = torch.randn(7, 5), torch.randn(7, 3)
    assert posterior.log_prob(theta, context=obs).shape == (7,)
    assert posterior.sample(7, context=obs).shape == (7, 5)
