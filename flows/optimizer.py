"""The trainer's optimiser: AdamW with the fastest parameter update the device offers.

Adam's per-step cost is mostly the number of parameter tensors, not their size, for a
flow's many small tensors (a Glow step has ActNorm's two vectors, the 1x1 convolution's
packed LU factors and its coupling network's weights). torch's default on the CPU updates
them one at a time in Python; ``foreach`` groups the updates per operation; ``fused`` runs
the whole update of a tensor in one kernel (on the CPU from torch 2.4, on CUDA from 2.0).
On the harness's Glow (182 tensors before its LU factors were one, 160k parameters, 1
thread) one update takes 8.9 / 6.5 / 2.0 ms single / foreach / fused (docs/speed.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.torch_version import TorchVersion

_FUSED_SINCE = {"cuda": "2.0", "cpu": "2.4"}


def update_kernel(params: list[nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` where every parameter is a float tensor on one device type that
    has torch's fused Adam kernel, else ``{"foreach": True}``; keyword arguments of
    :class:`torch.optim.AdamW`, also written into a resumed optimiser's groups."""
    devices = {p.device.type for p in params}
    since = _FUSED_SINCE.get(devices.pop()) if len(devices) == 1 else None
    if since is not None and TorchVersion(torch.__version__) >= since and all(p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def adamw(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay; plain Adam at ``weight_decay=0``) over ``params``,
    with :func:`update_kernel`'s update.

    Example:
        >>> import torch
        >>> opt = adamw([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, weight_decay=0.0)
        >>> opt.param_groups[0]["fused"]
        True
    """
    params = list(params)  # frozen ones too: a checkpoint's optimiser state counts them
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **update_kernel(params))
