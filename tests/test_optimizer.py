"""The trainer's optimiser: the fused AdamW update where the device has it, the same steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.torch_version import TorchVersion

from flows.optimizer import adamw, update_kernel

FUSED_ON_CPU = TorchVersion(torch.__version__) >= "2.4"


def test_cpu_float_parameters_get_the_fused_update() -> None:
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    assert update_kernel(params) == ({"fused": True} if FUSED_ON_CPU else {"foreach": True})


def test_other_devices_get_the_foreach_update() -> None:
    assert update_kernel([nn.Parameter(torch.zeros(3, device="meta"))]) == {"foreach": True}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_steps_as_the_foreach_update_does(weight_decay: float) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    twin = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    twin.load_state_dict(net.state_dict())
    ours = adamw(net.parameters(), 1e-2, weight_decay)
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=weight_decay, foreach=True)
    x = torch.randn(16, 5)
    for _ in range(5):
        for model, opt in ((net, ours), (twin, reference)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
