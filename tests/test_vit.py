"""Ordinary and reversible vision transformers."""

from __future__ import annotations

import pytest
import torch

from flows.diagnostics import saved_bytes
from flows.nn.vit import ReversibleViT, ViT


def small(cls, depth: int = 3, **kwargs):
    return cls(8, 2, 1, 10, width=16, depth=depth, heads=2, mlp_ratio=2.0, **kwargs)


def grads(model, x, seed: int = 0):
    torch.manual_seed(seed)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), torch.arange(x.shape[0]) % 10).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", [ViT, ReversibleViT], ids=["vit", "reversible-vit"])
def test_shapes(cls):
    model = small(cls)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(ValueError, match="divisible"):
        cls(9, 2, 1, 10, width=16, depth=1, heads=2)


@pytest.mark.parametrize("cls", [ViT, ReversibleViT], ids=["vit", "reversible-vit"])
@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (4, 3, 8, 8), (1, 8, 8)], ids=["size", "channels", "unbatched"])
def test_images_of_another_shape_are_one_clear_error(cls, shape):
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\)"):
        small(cls, depth=1)(torch.randn(shape))


@pytest.mark.parametrize("cls", [ViT, ReversibleViT], ids=["vit", "reversible-vit"])
@pytest.mark.parametrize("bad", ["nan", "inf", "float64"])
def test_bad_images_are_one_clear_error(cls, bad):
    x = torch.rand(2, 1, 8, 8)
    if bad == "float64":
        error, message = TypeError, "input dtype torch.float64 differs from the model's torch.float32"
        x = x.double()
    else:
        error, message = ValueError, r"input contains non-finite values"
        x[0, 0, 3, 3] = float(bad)
    with pytest.raises(error, match=f"^{cls.__name__}: {message}"):
        small(cls, depth=1)(x)


def test_memory_saving_takes_only_a_bool():
    model = small(ReversibleViT, depth=1, memory_saving=False)
    for bad in ("off", 0, None):
        with pytest.raises(TypeError, match="ReversibleViT.memory_saving must be True or False"):
            model.memory_saving = bad
    assert model.memory_saving is False
    with pytest.raises(TypeError, match="ReversibleViT.memory_saving must be True or False, got 'off'"):
        small(ReversibleViT, depth=1, memory_saving="off")


def test_stream_stack_inverts():
    torch.manual_seed(0)
    model = small(ReversibleViT).double()
    t = torch.randn(2, 16, 32, dtype=torch.float64)
    torch.testing.assert_close(model.blocks.inverse(model.blocks(t)), t)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-9, 1e-11),
                                             (torch.float32, 1e-5, 1e-6)],
                         ids=["float64", "float32"])
def test_gradient_parity(dtype, rtol, atol):
    # float32: 3 well-conditioned blocks; drift stays within rtol 1e-5 / atol 1e-6.
    torch.manual_seed(0)
    model = small(ReversibleViT).to(dtype)
    x = torch.rand(4, 1, 8, 8, dtype=dtype)
    model.memory_saving = False
    plain = grads(model, x)
    model.memory_saving = True
    for a, b in zip(plain, grads(model, x)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_dropout_parity():
    torch.manual_seed(0)
    model = small(ReversibleViT, dropout=0.2).double().train()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    model.memory_saving = False
    plain = grads(model, x, seed=3)
    model.memory_saving = True
    for a, b in zip(plain, grads(model, x, seed=3)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_memory_does_not_grow_with_depth():
    x = torch.rand(8, 1, 8, 8)

    def kept(depth: int, saving: bool) -> int:
        model = small(ReversibleViT, depth=depth, memory_saving=saving)
        return saved_bytes(lambda: model(x).sum(), model)

    assert kept(16, True) <= 1.1 * kept(2, True)
    assert kept(16, False) > 4 * kept(2, False)
