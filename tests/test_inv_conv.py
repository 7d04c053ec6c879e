"""The LU 1x1 convolution's packed parameter, and what older versions saved."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from flows.models import Glow
from flows.transforms import InvConv1x1


def three_parameter_form(conv: InvConv1x1) -> dict[str, torch.Tensor]:
    """``conv``'s state dict as versions with ``lower``, ``upper`` and ``log_s`` wrote it
    (``lower`` then held L with its unit diagonal)."""
    state = conv.state_dict()
    factors = state.pop("lu_factors")
    eye = torch.eye(conv.channels)
    return {**state, "lower": factors.tril(-1) + eye, "upper": factors.triu(1), "log_s": factors.diagonal().clone()}


def test_one_parameter_holds_the_three_factors() -> None:
    conv = InvConv1x1(5, lu=True)
    assert [name for name, _ in conv.named_parameters()] == ["lu_factors"]
    weight, logabsdet = conv.weight_and_logabsdet()
    torch.testing.assert_close(torch.linalg.slogdet(weight)[1], logabsdet, atol=1e-5, rtol=0)


def test_a_state_dict_of_the_three_parameter_form_loads() -> None:
    torch.manual_seed(0)
    model = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8)
    conv = next(m for m in model.modules() if isinstance(m, InvConv1x1))
    old = three_parameter_form(conv)
    fresh = InvConv1x1(conv.channels, lu=True)
    fresh.load_state_dict(old)  # strict: every entry used, none missing
    torch.testing.assert_close(fresh.weight_and_logabsdet()[0], conv.weight_and_logabsdet()[0], rtol=0, atol=0)
    # Inside a whole model, under its prefix.
    state = model.state_dict()
    prefix = next(name for name in state if name.endswith("lu_factors"))[: -len("lu_factors")]
    for key in list(state):
        if key.startswith(prefix) and key[len(prefix):] in ("lu_factors", "p", "sign_s", "lower_mask"):
            del state[key]
    state.update({prefix + key: value for key, value in old.items()})
    x = torch.rand(4, 1, 8, 8)
    clone = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.log_prob(x), model.log_prob(x), rtol=0, atol=0)


@pytest.mark.parametrize("trainable", [True, False])
def test_a_module_pickled_with_the_three_parameters_loads(trainable: bool) -> None:
    conv = InvConv1x1(4, lu=True)
    old = three_parameter_form(conv)
    del conv._parameters["lu_factors"]
    for name in ("lower", "upper", "log_s"):
        conv._parameters[name] = nn.Parameter(old[name], requires_grad=trainable)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [name for name, _ in loaded.named_parameters()] == ["lu_factors"]
    reference = InvConv1x1(4, lu=True)
    reference.load_state_dict(old)
    torch.testing.assert_close(loaded.weight_and_logabsdet()[0], reference.weight_and_logabsdet()[0], rtol=0, atol=0)
    assert pickle.loads(pickle.dumps(loaded)).lu_factors.requires_grad is trainable  # a frozen conv stays frozen


def test_an_optimiser_state_in_another_order_is_refused_not_mispaired() -> None:
    """The optimiser's parameter indices are read as the model's parameters in order; a
    state in any other layout (groups reordered) is refused rather than paired wrongly."""
    from flows.transforms.inv_conv import pack_lu_checkpoint

    model = Glow((1, 8, 8), levels=1, steps=1, hidden_channels=4)
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, InvConv1x1))
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith(name + ".")}
    state = {"model": weights | {f"{name}.{k}": v for k, v in three_parameter_form(conv).items()}}
    count = len(list(model.parameters())) + 2  # the packed parameter was three
    state["optimizer"] = {"state": {}, "param_groups": [{"params": list(reversed(range(count)))}]}
    with pytest.raises(ValueError, match="not in the model's order"):
        pack_lu_checkpoint(model, state)
    state["optimizer"]["param_groups"] = [{"params": list(range(count))}]
    pack_lu_checkpoint(model, state)
    assert state["optimizer"]["param_groups"][0]["params"] == list(range(count - 2))
