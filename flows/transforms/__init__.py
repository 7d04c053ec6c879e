"""Bijectors: invertible transforms returning ``(output, logdet)`` in both directions."""

from flows.transforms.actnorm import ActNorm
from flows.transforms.additive_coupling import AdditiveCoupling
from flows.transforms.affine_coupling import AffineCoupling
from flows.transforms.autoregressive import MADE, MaskedAutoregressive
from flows.transforms.base import Bijector
from flows.transforms.chain import Chain
from flows.transforms.coupling import MaskedCoupling
from flows.transforms.downsampling import InvertibleDownsampling, InvertibleUpsampling, haar_matrix
from flows.transforms.inv_conv import InvConv1x1
from flows.transforms.inverse import Inverse
from flows.transforms.logit import Logit
from flows.transforms.masks import channel_mask, checkerboard_mask
from flows.transforms.permute import Permute
from flows.transforms.reshape import Reshape
from flows.transforms.residual import LipSwish, ResidualBlock
from flows.transforms.rev_coupling import RevCoupling
from flows.transforms.spline import RationalQuadraticCoupling, rational_quadratic_spline
from flows.transforms.squeeze import Squeeze
from flows.transforms.switches import logdet_wanted, skipping_logdet
from flows.transforms.tail import Tail

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Bijector",
    "Chain",
    "InvConv1x1",
    "InvertibleDownsampling",
    "InvertibleUpsampling",
    "Inverse",
    "LipSwish",
    "MADE",
    "Logit",
    "MaskedAutoregressive",
    "MaskedCoupling",
    "Permute",
    "RationalQuadraticCoupling",
    "Reshape",
    "ResidualBlock",
    "RevCoupling",
    "Squeeze",
    "Tail",
    "channel_mask",
    "checkerboard_mask",
    "haar_matrix",
    "rational_quadratic_spline",
    "logdet_wanted",
    "skipping_logdet",
]
