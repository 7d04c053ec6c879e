"""Bad input gets a clear error that names the problem."""

from __future__ import annotations

import math

import pytest
import torch

from flows.models import Glow, IResNet, RealNVP
from flows.transforms import (
    ActNorm,
    AffineCoupling,
    Chain,
    InvConv1x1,
    Logit,
    Permute,
    Reshape,
    Squeeze,
    channel_mask,
    checkerboard_mask,
)


@pytest.mark.parametrize(
    "bijector, x, message",
    [
        (Squeeze(), torch.randn(2, 1, 5, 4), "H and W must be even"),
        (Squeeze(), torch.randn(2, 1, 4, 3), "H and W must be even"),
        (Squeeze(), torch.randn(2, 4, 4), r"\(B, C, H, W\)"),
        (ActNorm(3), torch.randn(2, 4, 2, 2), "expected 3 channels"),
        (InvConv1x1(3), torch.randn(2, 2, 4, 4), "expected 3 channels"),
        (InvConv1x1(3), torch.randn(2, 3, 4), r"\(B, C\) or \(B, C, H, W\)"),
        (Permute(4), torch.randn(2, 3), "expected 4 channels"),
        (AffineCoupling(channel_mask(4, 0)), torch.randn(2, 6, 4, 4), "expected 4 channels"),
        (AffineCoupling(channel_mask(4, 0)), torch.randn(2, 4), r"\(B, C, H, W\)"),
        (AffineCoupling(channel_mask(4, 0), image=False), torch.randn(2, 5), "expected 4 features"),
        (AffineCoupling(checkerboard_mask(4, 4), channels=2), torch.randn(2, 2, 6, 6), "spatial mask"),
        (Logit(), torch.rand(2, 1, 4, 4) + 1.5, r"in \[0, 1\]"),
        (Logit(), torch.full((2, 3), float("nan")), "finite"),
        (Reshape((2, 2), (4,)), torch.randn(3, 4), "expected input of shape"),
        (Chain(ActNorm(2)), torch.randn(2, 3), "expected 2 channels"),
    ],
)
def test_bad_shapes_raise_clear_errors(bijector, x: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bijector(x)


def test_integer_input_is_rejected_by_name() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        ActNorm(2)(torch.ones(2, 2, dtype=torch.long))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: channel_mask(1, 0), "c >= 2"),
        (lambda: checkerboard_mask(4, 4, 2), "parity"),
        (lambda: AffineCoupling(torch.ones(4)), "transform others"),
        (lambda: AffineCoupling(checkerboard_mask(4, 4)), "needs `channels`"),
        (lambda: Permute(3, "sideways"), "mode"),
        (lambda: Logit(0.7), "alpha"),
        (lambda: Glow((1, 6, 6), levels=2, steps=1), "6x6 input cannot be squeezed 2 times.*pad the images to 8x8"),
        # Absurd depths: fewer levels, never a padding of 2**100000 pixels (which Python cannot print).
        (lambda: Glow((1, 8, 8), levels=100000, steps=1), r"squeezed 4 times \(level 4 of 100000.*: use levels<=3$"),
        (lambda: Glow((1, 7, 7), levels=100000, steps=1), "squeezed once.*an even size and use far fewer levels$"),
        (lambda: Glow((1, 8, 8), levels=1, steps=1, coupling="quadratic"), "coupling must be"),
        (lambda: Glow((1, 8, 8), levels=1, steps=1, permutation="swap"), "permutation must be"),
        (lambda: RealNVP((1, 8), levels=1), r"\(C, H, W\)"),
        (lambda: Chain(torch.nn.Linear(2, 2)), "must be a Bijector"),
    ],
)
def test_bad_construction_raises_clear_errors(build, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_flow_rejects_bad_data_with_clear_errors() -> None:
    model = Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, 4, 4\)"):
        model.log_prob(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="non-finite"):
        model.log_prob(torch.full((2, 1, 4, 4), float("inf")))
    with pytest.raises(TypeError, match="floating-point"):
        model.log_prob(torch.ones(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 16\)"):
        model.decode(torch.randn(2, 15))
    with pytest.raises(ValueError, match="temperatures"):
        model.sample(2, temperature=[0.5, 0.7, 1.0])
    with pytest.raises(ValueError, match="differ"):
        model.interpolate(torch.rand(1, 1, 4, 4), torch.rand(2, 1, 4, 4))


@pytest.mark.parametrize("build", [Glow, RealNVP], ids=["glow", "realnvp"])
def test_empty_batch_is_one_clear_error(build) -> None:
    model = build((1, 4, 4), levels=1, steps=1, hidden_channels=4)
    with pytest.raises(ValueError, match="empty batch"):
        model.log_prob(torch.rand(0, 1, 4, 4))


def test_dtype_and_sampling_arguments_are_checked_at_the_flow() -> None:
    model = Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4)
    with pytest.raises(TypeError, match=r"input dtype torch.float64 differs from the model's torch.float32"):
        model.log_prob(torch.rand(2, 1, 4, 4, dtype=torch.float64))
    for n in (0, -1, 2.5):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            model.sample(n)
    for temperature in (float("nan"), -1.0, [0.5, float("inf")]):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            model.sample(2, temperature=temperature)
    assert model.sample(2, temperature=0.0).shape == (2, 1, 4, 4)


def test_validation_can_be_switched_off() -> None:
    model = Glow((2,), levels=1, steps=1, hidden_channels=4)
    model.validate_args = False
    assert torch.isnan(model.log_prob(torch.full((2, 2), float("nan")))).all()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Glow((1, 8, 8), levels=1, steps=1, hidden_channels=0), "hidden_channels must be an integer >= 1"),
        (lambda: Glow((1, 8, 8), levels=0), "levels must be an integer >= 1"),
        (lambda: RealNVP((1, 8, 8), steps=0), "steps must be an integer >= 1"),
        (lambda: RealNVP((2,), res_blocks=0), "res_blocks must be an integer >= 1"),
        (lambda: IResNet((1, 8, 8), blocks=0), "blocks must be an integer >= 1"),
        (lambda: IResNet((2,), hidden_channels=0), "hidden_channels must be an integer >= 1"),
        (lambda: Glow((0, 8, 8)), "input_shape must be"),
    ],
)
def test_builders_reject_empty_sizes(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["interpolate"], ["bench"]])
def test_every_command_prints_its_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` formats every option (argparse refuses an empty mutually exclusive group there)."""
    from flows.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([*command, "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith("usage: flows")


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: Glow((1, 8, 8), lu="yes"), TypeError, r"^Glow: lu must be True or False, got 'yes'"),
        (lambda: Glow((1, 8, 8), split_prior="no"), TypeError, r"^Glow: split_prior must be True or False"),
        (lambda: RealNVP((1, 8, 8), actnorm="off"), TypeError, r"^RealNVP: actnorm must be True or False"),
        (lambda: IResNet((1, 8, 8), split_prior=1), TypeError, r"^IResNet: split_prior must be True or False"),
        (lambda: Glow((1, 8, 8), downsampling="pool"), ValueError, r"^Glow: downsampling must be one of \('squeeze'"),
        (lambda: RealNVP((1, 8, 8), downsampling="pool"), ValueError, r"^RealNVP: downsampling must be one of"),
        (lambda: Glow((1, 8, 8), n_levels=1), ValueError, r"^Flow: n_levels must be an integer >= 2"),
        (lambda: Glow((1, 8, 8), n_levels=2.5), ValueError, r"^Flow: n_levels must be an integer >= 2"),
        (lambda: RealNVP(2, levels=1), ValueError, r"^RealNVP: input_shape must be a tuple such as \(C, H, W\)"),
    ],
)
def test_builder_options_of_the_wrong_kind_are_one_line(build, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        build()


def test_interpolate_and_decode_refuse_what_they_cannot_use() -> None:
    torch.manual_seed(0)
    model = Glow((1, 8, 8), levels=1, steps=1, hidden_channels=4)
    x = torch.rand(2, 1, 8, 8)
    model.log_prob(x)
    with pytest.raises(ValueError, match=r"^Flow.interpolate: steps must be an integer >= 2, got 2.5"):
        model.interpolate(x, x, steps=2.5)
    with pytest.raises(TypeError, match=r"^Flow.interpolate: x0 and x1 must be tensors, got list and Tensor"):
        model.interpolate(x.tolist(), x)
    with pytest.raises(ValueError, match=r"^Flow.decode: latent contains non-finite values"):
        model.decode(torch.full((2, 64), math.nan))
    with pytest.raises(TypeError, match=r"^Flow.decode: expected floating-point input, got dtype torch.int64"):
        model.decode(torch.zeros(2, 64, dtype=torch.long))


def test_a_missing_data_path_is_named_before_its_options(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    missing = tmp_path / "nowhere"
    assert main(["train", "--data", str(missing), "--workers", "0", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"{missing}: no such file or folder" in err and "--workers applies" not in err
