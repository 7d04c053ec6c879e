"""Density models: :class:`Flow` and the RealNVP, Glow and IResNet builders."""

from flows.models.flow import Flow
from flows.models.glow import Glow
from flows.models.iresnet import IResNet, logdet_mode
from flows.models.multiscale import MultiScale
from flows.models.realnvp import RealNVP

__all__ = ["Flow", "Glow", "IResNet", "MultiScale", "RealNVP", "logdet_mode"]
