"""MAF's affine scale maps: the formulas, invertibility at their extremes, and clear errors."""

from __future__ import annotations

import pytest
import torch

from flows.models import MAF
from flows.transforms import MaskedAutoregressive
from flows.transforms.autoregressive import MADE, MIN_SCALE, SCALES, SOFTPLUS_SHIFT


def _block(scale: str) -> MaskedAutoregressive:
    torch.manual_seed(0)
    return MaskedAutoregressive(3, 16, scale=scale).double()


@pytest.mark.parametrize("scale", SCALES)
def test_affine_block_matches_its_formula(scale: str) -> None:
    block = _block(scale)
    x = torch.randn(5, 3, dtype=torch.float64)
    raw, shift = block.made(x).view(5, 2, 3).unbind(1)
    s = torch.nn.functional.softplus(raw) + MIN_SCALE if scale == "softplus" else torch.exp(torch.tanh(raw))
    z, logdet = block(x)
    torch.testing.assert_close(z, s * x + shift)
    torch.testing.assert_close(logdet, torch.log(s).sum(1))


@pytest.mark.parametrize("scale", SCALES)
def test_affine_block_inverts_and_its_logdet_is_the_jacobians(scale: str) -> None:
    block = _block(scale)
    x = torch.randn(4, 3, dtype=torch.float64)
    z, logdet = block(x)
    back, inv_logdet = block.inverse(z)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(inv_logdet, -logdet)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda r: block(r[None])[0][0], x[i])
        assert torch.all(jac.triu(1) == 0)  # autoregressive in the feature order
        torch.testing.assert_close(torch.linalg.slogdet(jac)[1], logdet[i])


def test_softplus_scale_reaches_its_floor_and_still_inverts() -> None:
    block = _block("softplus")
    with torch.no_grad():  # raw scales of -40: softplus underflows to ~4e-18, the floor holds
        block.made.output.bias[:3] = -40.0
        block.made.output.weight[:3] = 0.0
    x = torch.randn(6, 3, dtype=torch.float64)
    z, logdet = block(x)
    torch.testing.assert_close(logdet, torch.full((6,), 3 * torch.log(torch.tensor(MIN_SCALE)).item()).double())
    torch.testing.assert_close(block.inverse(z)[0], x)


def _scales(model: torch.nn.Module) -> list[str]:
    return [m.scale for m in model.modules() if isinstance(m, MaskedAutoregressive)]


def test_maf_builder_passes_the_scale_to_every_block() -> None:
    assert _scales(MAF((3,), steps=3, hidden_channels=8, scale="tanh")) == ["tanh"] * 3
    assert _scales(MAF((3,), steps=2, hidden_channels=8)) == ["softplus"] * 2


@pytest.mark.parametrize("bad", ["exp", None, "Softplus"])
def test_a_bad_scale_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match="scale must be one of"):
        MaskedAutoregressive(3, 8, scale=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bound", [0.0, -2.0, float("nan")])
def test_a_bad_spline_tail_bound_is_a_clear_error(bound: float) -> None:
    """Was unchecked: NaN log-densities, or (negative) an inverse that returned its input with a
    log-det of 0.13."""
    with pytest.raises(ValueError, match="tail_bound must be a positive number"):
        MaskedAutoregressive(3, 8, transform="spline", tail_bound=bound)
    with pytest.raises(ValueError, match="tail_bound must be a positive number"):
        MAF((3,), steps=1, hidden_channels=8, transform="spline", tail_bound=bound)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_layers": 0}, "hidden_layers must be an integer >= 1"),
        ({"hidden_features": 0}, "hidden_features must be an integer >= 1"),
        ({"features": 2.0}, "features must be an integer >= 2"),
        ({"features": 1}, "features must be an integer >= 2"),
    ],
)
def test_bad_made_sizes_are_clear_errors(kwargs: dict, message: str) -> None:
    """``hidden_features=0`` built a block that ignored its input; the others failed deep in torch."""
    with pytest.raises(ValueError, match=message):
        MADE(**{"features": 3, "hidden_features": 8, "params": 2, **kwargs})


def test_softplus_blocks_start_at_scale_one() -> None:
    # The same draws as a tanh block, with the raw scales' bias shifted so that s(0) = 1.
    torch.manual_seed(1)
    softplus = MaskedAutoregressive(3, 16, scale="softplus")
    torch.manual_seed(1)
    tanh = MaskedAutoregressive(3, 16, scale="tanh")
    bias, reference = softplus.made.output.bias.detach(), tanh.made.output.bias.detach()
    torch.testing.assert_close(bias[:3], reference[:3] + SOFTPLUS_SHIFT)
    torch.testing.assert_close(bias[3:], reference[3:])
    with torch.no_grad():
        softplus.made.output.weight.zero_()
        softplus.made.output.bias[:3] = SOFTPLUS_SHIFT
    torch.testing.assert_close(softplus(torch.randn(4, 3))[1], torch.zeros(4))
