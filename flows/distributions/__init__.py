"""Base distributions of flows."""

from flows.distributions.conditional import ConditionalDiagonalGaussian
from flows.distributions.mixture import GaussianMixture
from flows.distributions.normal import DiagonalGaussian, StandardNormal

__all__ = ["ConditionalDiagonalGaussian", "DiagonalGaussian", "GaussianMixture", "StandardNormal"]
