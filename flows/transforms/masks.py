"""Masks that select the conditioning half of a coupling layer."""

from __future__ import annotations

import torch
from torch import Tensor


def checkerboard_mask(h: int, w: int, parity: int = 0) -> Tensor:
    """Spatial checkerboard mask of shape ``(h, w)``: 1 where ``(i + j) % 2 == parity``.

    Ones mark the pixels (all channels) that condition the coupling; zeros mark the
    pixels it transforms (RealNVP, arXiv:1605.08803, figure 3).

    Example:
        >>> checkerboard_mask(2, 2, 0)
        tensor([[1., 0.],
                [0., 1.]])
    """
    if h < 1 or w < 1 or parity not in (0, 1):
        raise ValueError(f"checkerboard_mask: need h, w >= 1 and parity 0 or 1, got {h}, {w}, {parity}")
    i = torch.arange(h).view(-1, 1)
    j = torch.arange(w).view(1, -1)
    return ((i + j) % 2 == parity).float()


def channel_mask(c: int, parity: int = 0) -> Tensor:
    """Channel (or feature) mask of shape ``(c,)``: parity 0 marks the first half with 1.

    Ones mark the channels (images) or features (vectors) that condition the coupling.
    For odd ``c`` the conditioning half is the smaller one for parity 0.

    Example:
        >>> channel_mask(4, 1)
        tensor([0., 0., 1., 1.])
    """
    if c < 2 or parity not in (0, 1):
        raise ValueError(f"channel_mask: need c >= 2 and parity 0 or 1, got c={c}, parity={parity}")
    mask = torch.zeros(c)
    half = c // 2
    if parity == 0:
        mask[:half] = 1.0
    else:
        mask[half:] = 1.0
    return mask
