"""flows: normalizing flows and invertible networks with memory-saving backward."""

from flows import distributions, models, transforms
from flows.diagnostics import check, saved_bytes
from flows.memory import memory_saving

__all__ = ["check", "distributions", "memory_saving", "models", "saved_bytes", "transforms"]
__version__ = "0.1.0"
