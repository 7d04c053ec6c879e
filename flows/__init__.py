"""flows: normalizing flows and invertible networks with memory-saving backward."""

from flows import distributions, models, transforms
from flows.memory import memory_saving

__all__ = ["distributions", "memory_saving", "models", "transforms"]
__version__ = "0.1.0"
