"""Reversible built from plain modules (RevLib's ``ReversibleSequential`` form): pairing,
equality with hand-built RevCouplings, memory-saving gradients, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from flows.diagnostics import saved_bytes
from flows.nn import Reversible
from flows.parity import gradient_parity, ramp_nll
from flows.transforms import ActNorm
from flows.transforms.rev_coupling import RevCoupling
from flows.transforms.switches import logdet_wanted

F64 = torch.float64
GAMMA = 0.8


def momentum_forward(v: Tensor, fx: Tensor) -> Tensor:
    return GAMMA * v + (1 - GAMMA) * fx


def momentum_inverse(v_new: Tensor, fx: Tensor) -> Tensor:
    return (v_new - (1 - GAMMA) * fx) / GAMMA


def conv(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh(), nn.Conv2d(channels, channels, 1))


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width))


# id: (modules, options, input shape). Each module acts on one half of the input.
FORMS = {
    "conv": (lambda: [conv(2) for _ in range(6)], {}, (3, 4, 5, 5)),
    "tokens": (lambda: [mlp(3) for _ in range(4)], {"split_dim": -1}, (3, 5, 6)),
    "momentum": (
        lambda: [nn.Conv2d(2, 2, 3, padding=1) for _ in range(4)],
        {"coupling_forward": momentum_forward, "coupling_inverse": momentum_inverse},
        (3, 4, 5, 5),
    ),
}


def build(form: str, seed: int = 0) -> tuple[list[nn.Module], dict, tuple[int, ...]]:
    make, options, shape = FORMS[form]
    torch.manual_seed(seed)
    return [m.double() for m in make()], options, shape


def explicit(modules: list[nn.Module], options: dict) -> Reversible:
    """The same stack wrapped by hand: one RevCoupling per (F, G) pair."""
    return Reversible(*[RevCoupling(f, g, **options) for f, g in zip(modules[::2], modules[1::2])])


def input_grad(layer: Reversible, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    x = x.clone().requires_grad_(True)
    ramp_nll(layer(x)).backward()
    return x.grad, [p.grad for p in layer.parameters()]


def revlib_half_steps(modules: list[nn.Module], x: Tensor, split_dim: int) -> Tensor:
    """RevLib's recurrence, written out: module ``m`` maps the streams ``(a, b)`` to
    ``(b, a + m(b))``; the output joins the two streams after the last module."""
    a, b = x.chunk(2, split_dim)
    for m in modules:
        a, b = b, a + m(b)
    return torch.cat([a, b], split_dim)


@pytest.mark.parametrize("form", list(FORMS), ids=list(FORMS))
def test_plain_modules_equal_the_explicit_form(form: str) -> None:
    modules, options, shape = build(form)
    paired = Reversible(*modules, **options)
    by_hand = explicit(copy.deepcopy(modules), options)
    assert len(paired) == len(modules) // 2 and all(isinstance(b, RevCoupling) for b in paired)
    assert list(paired.state_dict()) == list(by_hand.state_dict())
    x = torch.randn(*shape, dtype=F64)
    y = paired(x)
    assert torch.equal(y, by_hand(x))
    assert torch.equal(paired.inverse(y), by_hand.inverse(y))
    torch.testing.assert_close(paired.inverse(y), x, rtol=0, atol=1e-12)
    # Memory-saving backward (the default) of both: the same gradients, bit for bit.
    grad_x, grads = input_grad(paired, x)
    grad_x_hand, grads_hand = input_grad(by_hand, x)
    assert torch.equal(grad_x, grad_x_hand)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_hand, strict=True))


def test_weights_load_across_the_forms() -> None:
    modules, options, shape = build("conv")
    paired = Reversible(*modules)
    other, _, _ = build("conv", seed=1)
    by_hand = explicit(other, options)
    by_hand.load_state_dict(paired.state_dict())
    x = torch.randn(*shape, dtype=F64)
    assert torch.equal(by_hand(x), paired(x))


@pytest.mark.parametrize("form", ["conv", "tokens"], ids=["conv", "tokens"])
def test_pairing_is_revlibs_half_step_recurrence(form: str) -> None:
    modules, options, shape = build(form)
    x = torch.randn(*shape, dtype=F64)
    expected = revlib_half_steps(modules, x, options.get("split_dim", 1))
    torch.testing.assert_close(Reversible(*modules, **options)(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", list(FORMS), ids=list(FORMS))
def test_memory_saving_gradients_equal_ordinary_float64(form: str) -> None:
    modules, options, shape = build(form)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    report = gradient_parity(Reversible(*modules, **options), x)
    assert "input[0]" in report.per_tensor and report.error < 1e-12, report


def test_memory_saving_gradients_equal_ordinary_float32() -> None:
    # float32 reconstruction drift grows with depth; 3 well-conditioned pairs stay far below 1e-5.
    torch.manual_seed(0)
    layer = Reversible(*[conv(2) for _ in range(6)])
    assert gradient_parity(layer, torch.randn(3, 4, 5, 5, requires_grad=True)).error < 1e-5


def test_kept_memory_does_not_grow_with_depth() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    kept, ordinary = {}, {}
    for depth in (2, 8):
        layer = Reversible(*[conv(2) for _ in range(2 * depth)])
        kept[depth] = saved_bytes(lambda layer=layer: ramp_nll(layer(x)), exclude=layer)
        layer.memory_saving = False
        ordinary[depth] = saved_bytes(lambda layer=layer: ramp_nll(layer(x)), exclude=layer)
    assert kept[2] == kept[8] < ordinary[2]
    assert ordinary[8] > 3 * ordinary[2]


def test_one_list_of_modules_or_blocks() -> None:
    modules, _, shape = build("conv")
    x = torch.randn(*shape, dtype=F64)
    from_list = Reversible(list(modules))
    assert torch.equal(from_list(x), Reversible(*modules)(x))
    blocks = list(explicit(modules, {}))
    assert torch.equal(Reversible(blocks)(x), from_list(x))


def test_odd_number_of_modules() -> None:
    with pytest.raises(ValueError, match=r"Reversible: 3 modules; .*even number"):
        Reversible(conv(2), conv(2), conv(2))


@pytest.mark.parametrize(
    "odd_one", [lambda h: h, torch.zeros(2), "conv"], ids=["function", "tensor", "string"]
)
def test_non_modules(odd_one: object) -> None:
    with pytest.raises(TypeError, match=rf"argument 1 is a {type(odd_one).__name__}, not an nn.Module"):
        Reversible(conv(2), odd_one)


def test_bijectors_mixed_with_plain_modules() -> None:
    with pytest.raises(TypeError, match=r"argument 0 is a bijector \(RevCoupling\) and argument 1 a plain module"):
        Reversible(RevCoupling(conv(2), conv(2)), conv(2), conv(2))


def test_pairing_options_with_bijector_blocks() -> None:
    with pytest.raises(ValueError, match="set them on each RevCoupling"):
        Reversible(RevCoupling(conv(2), conv(2)), ActNorm(4), split_dim=-1)


@pytest.mark.parametrize("out_channels", [1, 4], ids=["shrinks", "grows"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_module_that_changes_the_shape_of_its_half(out_channels: int, direction: str) -> None:
    # One output channel would broadcast in x1 + F(x2) without the check.
    layer = Reversible(conv(2), conv(2), conv(2), nn.Conv2d(2, out_channels, 1))
    x = torch.randn(2, 4, 3, 3)
    message = rf"module 3 \(Conv2d\) maps its half of shape \(2, 2, 3, 3\) to \(2, {out_channels}, 3, 3\)"
    with pytest.raises(ValueError, match=message):
        layer(x) if direction == "forward" else layer.inverse(x)


class _LogdetSpy(RevCoupling):
    """A coupling that records, per call, whether a log-det is wanted (the switch blocks read)."""

    def __init__(self, seen: list[tuple[str, bool]]) -> None:
        super().__init__(nn.Linear(2, 2), nn.Linear(2, 2))
        self.seen = seen

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.seen.append(("forward", logdet_wanted()))
        return super().forward(x, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.seen.append(("inverse", logdet_wanted()))
        return super().inverse(y, context)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_inverse_skips_logdets_as_forward_does(grad: bool) -> None:
    # i-ResNet blocks would otherwise estimate a log-det in every inverse and discard it.
    seen: list[tuple[str, bool]] = []
    layer = Reversible(_LogdetSpy(seen), _LogdetSpy(seen))
    with torch.set_grad_enabled(grad):
        layer.inverse(layer(torch.randn(3, 4)))
    assert {direction for direction, _ in seen} == {"forward", "inverse"}
    assert not any(wanted for _, wanted in seen), seen


@pytest.mark.parametrize("value", ["off", 0, None], ids=["string", "int", "none"])
def test_memory_saving_must_be_a_bool(value: object) -> None:
    layer = Reversible(conv(2), conv(2))
    with pytest.raises(TypeError, match=r"^Reversible.memory_saving must be True or False, got "):
        layer.memory_saving = value
    assert layer.memory_saving is True


@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input(direction: str, bad: float) -> None:
    layer = Reversible(conv(2), conv(2))
    x = torch.randn(2, 4, 3, 3)
    x[1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match=r"^Reversible: input contains non-finite values"):
        layer(x) if direction == "forward" else layer.inverse(x)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_input_of_another_dtype(direction: str) -> None:
    layer = Reversible(conv(2), conv(2))
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    message = r"^Reversible: input dtype torch.float64 differs from the model's torch.float32"
    with pytest.raises(TypeError, match=message):
        layer(x) if direction == "forward" else layer.inverse(x)


def test_input_that_is_no_tensor() -> None:
    with pytest.raises(TypeError, match=r"^Reversible: expected a torch.Tensor, got list"):
        Reversible(conv(2), conv(2))([[1.0]])


@pytest.mark.parametrize("channels", [6, 5, 2], ids=["more", "odd", "fewer"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_wrong_channel_count(channels: int, direction: str) -> None:
    layer = Reversible(conv(2), conv(2), conv(2), conv(2))
    x = torch.randn(2, channels, 3, 3)
    first = 0 if direction == "forward" else 2  # the inverse runs the last pair first
    message = (
        rf"^Reversible: expected 4 along split_dim 1 \(two halves of the 2 that the Conv2d starting "
        rf"module {first} \(Sequential\) takes\), got {channels} in input of shape \(2, {channels}, 3, 3\)$"
    )
    with pytest.raises(ValueError, match=message):
        layer(x) if direction == "forward" else layer.inverse(x)


def test_custom_merge_that_its_inverse_does_not_undo() -> None:
    # Without the check this runs: its inverse is off by order one and memory-saving
    # gradients differ from ordinary ones.
    with pytest.raises(
        ValueError, match=r"^Reversible: coupling_inverse \(<lambda>\) does not invert coupling_forward \(<lambda>\)"
    ):
        Reversible(conv(2), conv(2), coupling_forward=lambda v, fx: v * fx + v, coupling_inverse=lambda o, fx: o - fx)
