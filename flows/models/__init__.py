"""Density models: :class:`Flow`, the RealNVP, Glow, IResNet, NSF and MAF builders, and their registry.

The names are imported on first use (PEP 562), so ``flows.models.registry`` and the
``flows`` command's ``--help`` load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.models.flow import Flow
    from flows.models.glow import Glow
    from flows.models.iresnet import IResNet, logdet_mode
    from flows.models.maf import MAF
    from flows.models.multiscale import MultiScale
    from flows.models.nsf import NSF
    from flows.models.realnvp import RealNVP
    from flows.models.registry import MODELS, build_model, load_model

_WHERE = {
    "Flow": "flows.models.flow",
    "Glow": "flows.models.glow",
    "IResNet": "flows.models.iresnet",
    "logdet_mode": "flows.models.iresnet",
    "MAF": "flows.models.maf",
    "MultiScale": "flows.models.multiscale",
    "NSF": "flows.models.nsf",
    "RealNVP": "flows.models.realnvp",
    "MODELS": "flows.models.registry",
    "build_model": "flows.models.registry",
    "load_model": "flows.models.registry",
}

__all__ = [
    "MAF",
    "MODELS",
    "NSF",
    "Flow",
    "Glow",
    "IResNet",
    "MultiScale",
    "RealNVP",
    "build_model",
    "load_model",
    "logdet_mode",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'flows.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
