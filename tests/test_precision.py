"""Mixed precision: bfloat16 networks, a float32 invertible path (flows.precision)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flows.models import Glow, IResNet
from flows.parity import gradient_parity
from flows.precision import PRECISIONS, autocast_dtype, grad_scaler, gradient_agreement, mixed_precision, networks
from flows.training import initialize
from flows.transforms import ActNorm, AffineCoupling, Chain, InvConv1x1, ResidualBlock, channel_mask


def trained_glow(seed: int = 0, **options: object) -> tuple[nn.Module, torch.Tensor]:
    """A small Glow a few Adam steps away from its identity initialisation (at the
    identity every conditioner outputs zeros, which bfloat16 represents exactly)."""
    torch.manual_seed(seed)
    model = Glow((3, 8, 8), levels=2, steps=2, hidden_channels=16, **options)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    initialize(model, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        (-model.log_prob(x).mean()).backward()
        optimizer.step()
    return model, x


def test_fp32_changes_nothing() -> None:
    model, x = trained_glow()
    expected = model.log_prob(x)
    with mixed_precision(model, "fp32"):
        assert torch.equal(model.log_prob(x), expected)


def test_invertible_path_stays_float32() -> None:
    """ActNorm and the 1x1 convolution hold no network: bitwise the float32 result."""
    torch.manual_seed(0)
    chain = Chain(ActNorm(4), InvConv1x1(4))
    x = torch.randn(8, 4, 5, 5)
    chain(x)  # ActNorm's initialisation
    y, logdet = chain(x)
    assert networks(chain) == []
    with mixed_precision(chain, "bf16", "cpu"):
        y_low, logdet_low = chain(x)
    assert torch.equal(y, y_low) and torch.equal(logdet, logdet_low)


def test_networks_run_in_bfloat16_and_the_coupling_still_inverts() -> None:
    torch.manual_seed(0)
    coupling = AffineCoupling(channel_mask(4, 0), hidden_channels=16)
    nn.init.normal_(coupling.conditioner[-1].weight, std=0.1)  # not the identity
    seen: list[torch.dtype] = []
    coupling.conditioner[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    x = torch.randn(4, 4, 6, 6)
    y32, _ = coupling(x)
    with mixed_precision(coupling, "bf16", "cpu"):
        y, logdet = coupling(x)
        x_back, logdet_back = coupling.inverse(y)
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]  # the network's first conv
    assert y.dtype == logdet.dtype == torch.float32
    assert not torch.equal(y, y32)  # the network's output was rounded
    # The inverse sees the same rounded network output: exact up to float32 rounding.
    torch.testing.assert_close(x_back, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logdet_back, -logdet)


def test_bf16_gradients_agree_far_better_than_whole_loss_autocast() -> None:
    """Plain conditioners: the drift of whole-loss autocast is the invertible path's, and
    keeping that path in float32 removes most of it."""
    model, x = trained_glow(normalize=False, split_prior=False)
    networks_only = gradient_agreement(model, x, "bf16")
    whole = gradient_agreement(model, x, "bf16", whole_loss=True)
    assert 0 < networks_only.relative_error < 0.02 and networks_only.cosine > 0.999
    assert whole.relative_error > 3 * networks_only.relative_error


def test_bf16_gradients_of_the_default_glow_agree_better_than_whole_loss_autocast() -> None:
    """Glow's default conditioners carry hidden ActNorms, whose bfloat16 rounding is a larger
    share of the error (docs/speed.md): the float32 invertible path still helps."""
    model, x = trained_glow()
    networks_only = gradient_agreement(model, x, "bf16")
    whole = gradient_agreement(model, x, "bf16", whole_loss=True)
    assert 0 < networks_only.relative_error < whole.relative_error and networks_only.cosine > 0.99


@pytest.mark.parametrize("options", [{"normalize": False, "split_prior": False}, {}], ids=["plain", "default"])
def test_memory_saving_under_bf16_matches_ordinary_under_bf16(options: dict) -> None:
    """Rebuilt inputs carry float32 rounding (the 1x1 convolution's inverse, a split prior's),
    which a bfloat16 conditioner can turn into a flip of its own rounding (2**-8); on some
    CPUs (an Intel Xeon here) the plain couplings' rebuild happens to be exact, on others (an
    AMD EPYC: 1.2e-3 against bfloat16's 7.1e-3 from float32) not. Either way the rebuild
    recomputes the networks in bfloat16 as the forward pass ran them, so memory-saving
    gradients are far closer to ordinary bfloat16 ones than bfloat16's are to float32's."""
    model, x = trained_glow(**options)
    with mixed_precision(model, "bf16"):
        error = gradient_parity(model, x).error
    assert error < 5e-3 and error < 0.5 * gradient_agreement(model, x, "bf16").relative_error


def test_hooks_removed_and_autocast_left_off_even_after_an_error() -> None:
    model, x = trained_glow()
    expected = model.log_prob(x)
    with pytest.raises(ValueError, match="expected input of shape"), mixed_precision(model, "bf16"):
        model.log_prob(torch.rand(2, 3, 8))
    assert not torch.is_autocast_enabled("cpu")
    assert all(not net._forward_hooks and not net._forward_pre_hooks for net in networks(model))
    assert torch.equal(model.log_prob(x), expected)


def test_iterative_inverse_keeps_its_network_in_float32() -> None:
    model = IResNet((1, 4, 4), levels=1, blocks=1, hidden_channels=4)
    residual = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert residual and not residual[0].exact_inverse
    found = networks(model)
    assert not any(net is child for block in residual for child in block.children() for net in found)


@pytest.mark.parametrize(
    ("precision", "device", "message"),
    [("fp16", "cpu", "fp16 needs a CUDA device"), ("int8", "cpu", "expected one of fp32, bf16, fp16")],
    ids=["fp16-cpu", "unknown"],
)
def test_bad_precision_is_one_clear_error(precision: str, device: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        autocast_dtype(precision, device)
    with pytest.raises(ValueError, match=message):
        grad_scaler(precision, device)


def test_scaler_only_scales_fp16() -> None:
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert not grad_scaler("bf16", "cpu").is_enabled() and not grad_scaler("fp32", "cpu").is_enabled()
    if torch.cuda.is_available():
        assert grad_scaler("fp16", "cuda").is_enabled()


def test_the_command_line_offers_the_precisions_of_flows_precision() -> None:
    from flows import cli, precision

    assert cli.PRECISIONS == precision.PRECISIONS


def test_mixed_precision_refuses_compiled_regions() -> None:
    """A graph traced before the precision hooks existed would keep running without them
    (silently float32): the combination is refused, in the API and in TrainConfig."""
    from flows.compiling import compile_regions
    from flows.training import TrainConfig

    model = compile_regions(Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4), backend="eager")
    with pytest.raises(ValueError, match=r"^mixed_precision: the model has compiled regions"):
        with mixed_precision(model, "bf16"):
            pass
    with mixed_precision(model, "fp32"):  # float32 needs no hooks
        pass
    with pytest.raises(ValueError, match=r"^TrainConfig: compile with precision 'bf16' is not supported"):
        TrainConfig(steps=1, compile=True, precision="bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_precision_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^precision bf16: device cuda is not available here"):
        autocast_dtype("bf16", "cuda")
    assert autocast_dtype("fp32", "cuda") is None
