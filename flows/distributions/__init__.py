"""Base distributions of flows."""

from flows.distributions.normal import DiagonalGaussian, StandardNormal

__all__ = ["DiagonalGaussian", "StandardNormal"]
