"""flows: normalizing flows and invertible networks with memory-saving backward.

Subpackages and functions are imported on first use (PEP 562), so the ``flows`` command
answers ``--help`` and ``--version`` without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows import data, distributions, models, nn, targets, transforms, variational
    from flows.compiling import compile_regions
    from flows.diagnostics import check, saved_bytes
    from flows.memory import memory_saving, module_device
    from flows.parity import gradient_parity
    from flows.precision import mixed_precision
    from flows.training import TrainConfig, evaluate, train

_SUBPACKAGES = (
    "benchmark", "compiling", "data", "diagnostics", "distributions", "models", "nn", "parity", "precision", "targets",
    "training", "transforms", "variational",
)
_WHERE = {
    "compile_regions": "flows.compiling",
    "mixed_precision": "flows.precision",
    "check": "flows.diagnostics",
    "saved_bytes": "flows.diagnostics",
    "memory_saving": "flows.memory",
    "module_device": "flows.memory",
    "gradient_parity": "flows.parity",
    "TrainConfig": "flows.training",
    "evaluate": "flows.training",
    "train": "flows.training",
}

__all__ = [
    "TrainConfig",
    "check",
    "compile_regions",
    "data",
    "distributions",
    "evaluate",
    "gradient_parity",
    "memory_saving",
    "mixed_precision",
    "models",
    "module_device",
    "nn",
    "saved_bytes",
    "targets",
    "train",
    "transforms",
    "variational",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"flows.{name}")
    if name not in _WHERE:
        raise AttributeError(f"module 'flows' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
