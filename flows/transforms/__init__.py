"""Bijectors: invertible transforms returning ``(output, logdet)`` in both directions."""

from flows.transforms.base import Bijector
from flows.transforms.chain import Chain
from flows.transforms.inverse import Inverse

__all__ = ["Bijector", "Chain", "Inverse"]
