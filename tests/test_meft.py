"""MEFT conversion: starting point, frozen weights, memory-saving gradients, memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flows.diagnostics import saved_bytes
from flows.nn.meft import Adapter, ReversibleStack, convert_to_reversible
from flows.nn.vit import ViT


class EncoderClassifier(nn.Module):
    """A token classifier around ``nn.TransformerEncoder``."""

    def __init__(self, norm_first: bool, batch_first: bool, depth: int = 3) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(16),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, 16)
        h = self.encoder(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class LoopModel(nn.Module):
    """Blocks in an nn.ModuleList, run by a Python loop."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ViT(8, 2, 1, 10, 16, depth, 2).blocks)
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.classifier(x.mean(1))


MODELS = {
    "vit": (lambda: ViT(8, 2, 1, 10, width=16, depth=3, heads=2), (1, 8, 8)),
    "encoder-postnorm-seqfirst": (lambda: EncoderClassifier(False, False), (6, 16)),
    "encoder-prenorm-batchfirst": (lambda: EncoderClassifier(True, True), (6, 16)),
    "modulelist-loop": (lambda: LoopModel(), (6, 16)),
}
FACTORS = {1: ("x1_factor",), 2: ("x2_factor",), 3: ("x1_factor", "x2_factor")}


def build(name: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = MODELS[name]
    return factory().to(dtype).eval(), torch.randn(4, *shape, dtype=dtype)


def convert(model, variant, eps=None, **kwargs):
    factors = {k: eps for k in FACTORS[variant]} if eps is not None else {}
    return convert_to_reversible(copy.deepcopy(model), variant, **factors, **kwargs)


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
@pytest.mark.parametrize("variant", [1, 2, 3], ids=["meft1", "meft2", "meft3"])
def test_starting_point(name, variant):
    model, x = build(name)
    with torch.no_grad():
        ref = model(x)

        def deviation(eps):
            return (convert(model, variant, eps)(x) - ref).abs().max().item()

        # Kept in the limit of the small factor(s): to 1e-5 at 1e-7 (float64).
        assert deviation(1e-7) < 1e-5
        # First order in the factor: halving it halves the deviation.
        assert deviation(1e-4) / deviation(5e-5) == pytest.approx(2.0, rel=0.05)
        # No variant is exact with invertible (nonzero) factors at two or more blocks.
        assert deviation(None) > 1e-4


def test_starting_point_with_random_adapters():
    model, x = build("vit")
    with torch.no_grad():
        ref = model(x)
        exact = convert(model, 1, 1e-7)(x)
        noisy = convert(model, 1, 1e-7, adapter_up_std=0.02)(x)
    assert (exact - ref).abs().max() < 1e-5
    assert 1e-6 < (noisy - ref).abs().max() < 1e-2


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_only_adapters_and_head_train(name):
    model, _ = build(name)
    converted = convert(model, 1)
    (stack,) = stacks(converted)
    dead = {id(p) for p in stack[len(stack) - 1].g.parameters()}  # variant 1: unused
    adapters = {id(p) for m in converted.modules() if isinstance(m, Adapter)
                for p in m.parameters()} - dead
    for pname, p in converted.named_parameters():
        head = pname.split(".")[0] in ("head", "classifier")
        assert p.requires_grad == (head or id(p) in adapters), pname
    assert sum(isinstance(m, ReversibleStack) for m in converted.modules()) == 1


def grads(model, x):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), torch.arange(x.shape[0]) % 10).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def stacks(model):
    return [m for m in model.modules() if isinstance(m, ReversibleStack)]


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
@pytest.mark.parametrize("variant", [1, 2, 3], ids=["meft1", "meft2", "meft3"])
def test_gradient_parity(name, variant):
    # float64; adapters start random so every adapter weight gets a gradient. Variant 3
    # divides by both small factors in the inverse, so its reconstruction is the least
    # accurate (see the module docstring).
    model, x = build(name)
    converted = convert(model, variant, adapter_up_std=0.02).train()
    (stack,) = stacks(converted)
    stack.memory_saving = False
    plain = grads(converted, x)
    stack.memory_saving = True
    tol = 1e-4 if variant == 3 else 1e-7
    for a, b in zip(plain, grads(converted, x)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2)
    assert all(g.abs().sum() > 0 for g in plain)


def test_gradient_parity_float32_well_conditioned():
    # With unit factors the float32 reconstruction is as good as any RevNet's.
    model, x = build("vit", torch.float32)
    converted = convert(model, 1, 1.0, adapter_up_std=0.02).train()
    (stack,) = stacks(converted)
    stack.memory_saving = False
    plain = grads(converted, x)
    stack.memory_saving = True
    for a, b in zip(plain, grads(converted, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_opt_out_block():
    model, x = build("vit")
    converted = convert(model, 2, adapter_up_std=0.02).train()
    (stack,) = stacks(converted)
    stack.memory_saving = False
    plain = grads(converted, x)
    stack.memory_saving = True
    stack[1].memory_saving = False
    kept_opt_out = saved_bytes(lambda: converted(x).sum(), converted)
    for a, b in zip(plain, grads(converted, x)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    stack[1].memory_saving = True
    assert saved_bytes(lambda: converted(x).sum(), converted) < kept_opt_out


def test_memory_does_not_grow_with_blocks():
    x = torch.rand(8, 1, 8, 8)

    def kept(depth: int, saving: bool) -> int:
        torch.manual_seed(0)
        converted = convert_to_reversible(ViT(8, 2, 1, 10, 16, depth, 2), 1,
                                          memory_saving=saving)
        return saved_bytes(lambda: converted(x).sum(), converted)

    assert kept(16, True) <= 1.1 * kept(2, True)
    assert kept(16, False) > 4 * kept(2, False)


def test_dropout_recomputes_identically():
    torch.manual_seed(0)
    converted = convert_to_reversible(ViT(8, 2, 1, 10, 16, 3, 2, dropout=0.2).double(), 1,
                                      adapter_up_std=0.02).train()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    (stack,) = stacks(converted)
    results = []
    for saving in (False, True):
        stack.memory_saving = saving
        torch.manual_seed(5)
        results.append(grads(converted, x))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_clear_errors():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="TransformerEncoder.*norm1/attn/norm2/mlp"):
        convert_to_reversible(mlp)
    with pytest.raises(ValueError, match="variant"):
        convert_to_reversible(ViT(8, 2, 1, 10, 16, 1, 2), variant=4)
    with pytest.raises(ValueError, match="expected"):
        convert_to_reversible(ViT(8, 2, 1, 10, 16, 1, 2), blocks="head")


def plain_vit():
    torch.manual_seed(0)
    return ViT(8, 2, 1, 10, 16, 2, 2)


@pytest.mark.parametrize("option,value,message", [
    ("adapter_reduction", 0, "adapter_reduction must be an integer >= 1, got 0"),
    ("adapter_reduction", 2.5, "adapter_reduction must be an integer >= 1, got 2.5"),
    ("x1_factor", 0.0, "x1_factor must be a finite nonzero number"),
    ("x2_factor", float("inf"), "x2_factor must be a finite nonzero number"),
    ("adapter_std", -0.1, "adapter_std must be a finite number >= 0"),
    ("adapter_up_std", float("nan"), "adapter_up_std must be a finite number >= 0"),
    ("memory_saving", "off", "memory_saving must be True or False, got 'off'"),
    ("trainable", "head", r"trainable takes name components, e\.g\. \('head',\), not one string"),
], ids=["reduction-0", "reduction-float", "x1-zero", "x2-inf", "std-negative", "up-std-nan",
        "memory-saving-str", "trainable-str"])
def test_bad_options_name_the_option_and_leave_the_model_alone(option, value, message):
    model = plain_vit()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=f"^convert_to_reversible: {message}"):
        convert_to_reversible(model, 1, **{option: value})
    assert not stacks(model)
    assert all(p.requires_grad for p in model.parameters())
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[key])


def test_adapter_reduction_must_be_positive():
    with pytest.raises(ValueError, match="Adapter: reduction must be an integer >= 1, got 0"):
        Adapter(16, reduction=0)


@pytest.mark.parametrize("blocks", [None, "blocks"], ids=["found", "named"])
def test_converting_twice_says_already_reversible(blocks):
    converted = convert_to_reversible(plain_vit())
    with pytest.raises(ValueError, match=r"already reversible \(it holds a ReversibleStack at 'blocks\.0'\)"):
        convert_to_reversible(converted, blocks=blocks)
    (stack,) = stacks(converted)
    with pytest.raises(ValueError, match=r"already reversible \(it is a ReversibleStack\)"):
        convert_to_reversible(stack)


def test_memory_saving_takes_only_a_bool():
    (stack,) = stacks(convert_to_reversible(plain_vit()))
    with pytest.raises(TypeError, match="ReversibleStack.memory_saving must be True or False, got 'off'"):
        stack.memory_saving = "off"
    with pytest.raises(TypeError, match="MEFTBlock.memory_saving must be True or False, got 'off'"):
        stack[0].memory_saving = "off"
    assert stack.memory_saving is True and stack[0].memory_saving is True
    stack[0].memory_saving = False
    assert stack[0].memory_saving is False


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
@pytest.mark.parametrize("bad", ["nan", "inf", "float64", "width", "int64", "empty"])
def test_bad_hidden_states_are_one_clear_error(name, bad):
    model, _ = build(name, torch.float32)
    (stack,) = stacks(convert(model, 1))
    h = torch.randn(4, 6, 16)
    error, message = ValueError, "input contains non-finite values"
    if bad in ("nan", "inf"):
        h[1, 2, 3] = float(bad)
    elif bad == "float64":
        error, message, h = TypeError, "input dtype torch.float64 differs from the model's torch.float32", h.double()
    elif bad == "width":
        message, h = r"expected 16 hidden features \(dim -1\), got 8", h[..., :8]
    elif bad == "int64":
        error, message, h = TypeError, "expected a floating-point tensor", h.long()
    else:
        message, h = "empty batch", h[:0]
    with pytest.raises(error, match=f"^ReversibleStack: {message}"):
        stack(h)


def test_encoder_itself_is_replaced():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = encoder(x)
        stack = convert_to_reversible(encoder, 1, x1_factor=1e-7)
        assert isinstance(stack, ReversibleStack)
        torch.testing.assert_close(stack(x), ref, rtol=0, atol=1e-5)


def test_variant_3_trains_its_unfrozen_shared_layers_under_memory_saving() -> None:
    """Variant 3 registers the shared transformer layer under F only; its MLP, unfrozen,
    got no gradient from G's use of it under memory-saving backward."""
    torch.manual_seed(0)
    model = convert_to_reversible(ViT(4, 2, 1, 3, width=8, depth=2, heads=2).double(), variant=3,
                                  trainable=("head", "mlp"))
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)

    def gradients(memory_saving: bool) -> dict[str, torch.Tensor | None]:
        model.blocks[0].memory_saving = memory_saving
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, saving = gradients(False), gradients(True)
    assert any("mlp" in name for name in plain)
    for name, grad in plain.items():
        assert saving[name] is not None, name
        torch.testing.assert_close(saving[name], grad, rtol=1e-9, atol=1e-11, msg=name)
