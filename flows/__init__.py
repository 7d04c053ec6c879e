"""flows: normalizing flows and invertible networks with memory-saving backward."""

from flows import data, distributions, models, nn, transforms
from flows.diagnostics import check, saved_bytes
from flows.memory import memory_saving
from flows.training import evaluate, train

__all__ = [
    "check",
    "data",
    "distributions",
    "evaluate",
    "memory_saving",
    "models",
    "nn",
    "saved_bytes",
    "train",
    "transforms",
]
__version__ = "0.1.0"
