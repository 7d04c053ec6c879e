"""Memory-saving layers for ordinary networks: reversible stacks, ViTs, i-UNet, MEFT."""

from flows.nn.iunet import IUNet
from flows.nn.meft import Adapter, ReversibleStack, convert_to_reversible
from flows.nn.reversible import Reversible
from flows.nn.vit import ReversibleViT, ViT

__all__ = ["Adapter", "IUNet", "Reversible", "ReversibleStack", "ReversibleViT", "ViT", "convert_to_reversible"]
