"""Glow's invertible 1x1 convolution."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.transforms.base import Bijector, Reconstruction, check_size, check_tensor, single_part


class InvConv1x1(Bijector):
    """Invertible 1x1 convolution ``y[:, :, h, w] = W x[:, :, h, w]`` (a learned channel mix).

    Log-det ``H * W * log|det W|`` (``H * W = 1`` for vectors ``(B, C)``); the inverse
    applies ``W^{-1}`` with minus that log-det.

    - Dense (``lu=False``): ``W`` is a free matrix; ``log|det W|`` by ``slogdet``.
    - LU (``lu=True``): ``W = P L (U + diag(sign(s) exp(log|s|)))`` with a fixed
      permutation ``P``, unit lower-triangular ``L`` and strictly upper-triangular ``U``,
      so ``log|det W| = sum log|s|`` costs O(C). The three are one ``(C, C)`` parameter
      ``lu_factors``: ``L``'s strict lower triangle, ``U``'s strict upper one and ``log|s|`` on the
      diagonal (one tensor for the optimiser where three cost three updates; states and
      checkpoints of the three-parameter form load, :func:`pack_lu_entries`).

    Both start from a random rotation (QR of a Gaussian matrix), so the layer is
    invertible and volume-preserving at initialisation.

    Args:
        channels: number of channels or features.
        lu: use the LU parametrisation.

    References:
        Kingma, Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
        arXiv:1807.03039, section 3.2.

    Example:
        >>> import torch
        >>> conv = InvConv1x1(4, lu=True)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(conv.inverse(conv(x)[0])[0], x, atol=1e-5)
        True
    """

    def __init__(self, channels: int, lu: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.lu = lu
        rotation, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        if not lu:
            self.weight = nn.Parameter(rotation.float())
            return
        p, lower, upper = torch.linalg.lu(rotation)
        s = torch.diagonal(upper)
        self.register_buffer("p", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lu_factors = nn.Parameter(_packed(lower, upper, torch.log(torch.abs(s))).float())

    def weight_and_logabsdet(self) -> tuple[Tensor, Tensor]:
        """The matrix ``W`` and ``log|det W|``."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        # With L = I + L0 (L0 strictly lower): L U = L0 U + U, one addmm and no identity.
        log_s = torch.diagonal(self.lu_factors)
        lower = self.lu_factors * self.lower_mask
        upper = self.lu_factors * self.lower_mask.mT + torch.diag_embed(self.sign_s * torch.exp(log_s))
        return self.p @ torch.addmm(upper, lower, upper), log_s.sum()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if self.lu:
            pack_lu_entries(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __setstate__(self, state: dict) -> None:
        """Load a module pickled with the three LU parameters as one."""
        parameters = state.get("_parameters", {})
        trainable = parameters["lower"].requires_grad if "lower" in parameters else True
        if pack_lu_entries(parameters, ""):
            parameters[LU] = nn.Parameter(parameters[LU], requires_grad=trainable)
        super().__setstate__(state)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        weight, logabsdet = self.weight_and_logabsdet()
        return self._mix(x, weight), self._logdet(x, logabsdet)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y)
        weight, logabsdet = self.weight_and_logabsdet()
        return self._mix(y, torch.linalg.inv(weight)), -self._logdet(y, logabsdet)

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input from ``y`` and recompute the forward with one ``W`` (and
        ``log|det W|``) for both, as memory-saving backward needs (under grad)."""
        return self._fused_rebuild(y, inverse=False)

    def reconstruct_inverse(self, x: Tensor, context: Tensor | None = None) -> Reconstruction:
        """:meth:`reconstruct` in the sampling direction (an ``Inverse(InvConv1x1)``), with
        one ``W`` for both."""
        return self._fused_rebuild(x, inverse=True)

    def _fused_rebuild(self, out: Tensor, inverse: bool) -> Reconstruction:
        self._check(out)
        weight, logabsdet = self.weight_and_logabsdet()
        with torch.no_grad():
            # inv_ex: linalg.inv's singularity check would synchronise a CUDA device on
            # every block of every backward; the forward pass already used this W.
            rebuilt = self._mix(out, weight if inverse else torch.linalg.inv_ex(weight).inverse)
        rebuilt.requires_grad_(True)
        output = self._mix(rebuilt, torch.linalg.inv(weight) if inverse else weight)
        logdet = self._logdet(rebuilt, logabsdet)
        return Reconstruction([rebuilt], single_part, output, -logdet if inverse else logdet)

    @staticmethod
    def _mix(x: Tensor, weight: Tensor) -> Tensor:
        weight = weight.to(x.dtype)
        if x.dim() == 2:
            return F.linear(x, weight)
        # A batched matmul over the pixels with the weight expanded per sample: 2-9x faster
        # than conv2d with a 1x1 kernel at a flow's channel counts, forward and backward,
        # and (unlike ``weight @ x``, which folds differently when the weight needs grad)
        # bitwise the same with and without grad, as memory-saving recomputes expect.
        # Outside autocast: rounding the mixed channels to bf16/fp16 would make the layer
        # lossy, and memory-saving backward could not rebuild its input from its output.
        batch, channels = x.shape[:2]
        with torch.autocast(x.device.type, enabled=False):
            mixed = torch.bmm(weight.expand(batch, channels, channels), x.reshape(batch, channels, -1))
        return mixed.view(x.shape)

    @staticmethod
    def _logdet(x: Tensor, logabsdet: Tensor) -> Tensor:
        return (logabsdet * math.prod(x.shape[2:])).to(x.dtype).expand(x.shape[0])

    def _check(self, x: Tensor) -> None:
        check_tensor(x, "InvConv1x1", (2, 4), "(B, C) or (B, C, H, W)")
        check_size(x, "InvConv1x1", 1, self.channels, "channels")


LU = "lu_factors"
"""The name of the packed LU parameter of :class:`InvConv1x1`."""

_THREE = ("lower", "upper", "log_s")  # the LU parameters of versions before the packed one


def _packed(lower: Tensor, upper: Tensor, log_s: Tensor) -> Tensor:
    """``L``'s strict lower triangle, ``U``'s strict upper one and ``log|s|`` on the diagonal."""
    return torch.tril(lower, -1) + torch.triu(upper, 1) + torch.diag_embed(log_s)


def pack_lu_entries(entries: MutableMapping[str, Any], prefix: str) -> bool:
    """Replace an older version's ``prefix + "lower"``, ``"upper"`` and ``"log_s"`` entries
    of an LU 1x1 convolution (state-dict tensors, or Adam's per-parameter states: dicts of
    tensors) by the one packed entry ``prefix + "lu_factors"``, in place; whether there were
    such entries.

    Example:
        >>> conv = InvConv1x1(3, lu=True)
        >>> state = conv.state_dict()
        >>> old = {k: v for k, v in state.items() if k != LU}
        >>> factors = state[LU]
        >>> old |= {"lower": factors.tril(-1), "upper": factors.triu(1), "log_s": factors.diagonal()}
        >>> pack_lu_entries(old, ""), torch.equal(old[LU], state[LU])
        (True, True)
    """
    names = [prefix + name for name in _THREE]
    if not all(name in entries for name in names):
        return False
    parts = [entries.pop(name) for name in names]
    entries[prefix + LU] = _pack_entry(*parts)
    return True


def _pack_entry(lower: Any, upper: Any, log_s: Any) -> Any:
    if isinstance(lower, Tensor):
        return _packed(lower.detach(), upper.detach(), log_s.detach())
    # An optimiser's state of each part: its (C, C) / (C,) moments packed, its step shared.
    return {key: _packed(value, upper[key], log_s[key]) if isinstance(value, Tensor) and value.dim() == 2 else value
            for key, value in lower.items()}


def pack_lu_checkpoint(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Bring a training checkpoint written while ``model``'s LU 1x1 convolutions had three
    parameters to the packed one, in place: its optimiser state (Adam's moments per
    parameter, by the parameters' order) and its EMA averages. Its ``"model"`` weights load
    as they are (:meth:`InvConv1x1._load_from_state_dict` packs them). A checkpoint of the
    packed form is left as it is."""
    weights = checkpoint.get("model", {})
    prefixes = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, InvConv1x1) and module.lu and prefix + "lower" in weights:
            prefixes.append(prefix)
    if not prefixes:
        return
    if isinstance(checkpoint.get("ema"), dict):
        for prefix in prefixes:
            pack_lu_entries(checkpoint["ema"], prefix)
    if isinstance(checkpoint.get("optimizer"), dict):
        checkpoint["optimizer"] = _packed_optimizer(model, checkpoint["optimizer"], prefixes)


def _packed_optimizer(model: nn.Module, state: dict[str, Any], prefixes: list[str]) -> dict[str, Any]:
    """An optimiser state by parameter index, from the three-parameter order to the packed one.
    The state's indices must be the model's parameters in order (one optimiser over
    ``model.parameters()``, as :func:`flows.train` builds it); another layout is refused."""
    names = [name for name, _ in model.named_parameters()]
    packed = {prefix + LU: prefix for prefix in prefixes}
    old_names = [part for name in names for part in ([packed[name] + n for n in _THREE] if name in packed else [name])]
    indices = [k for group in state["param_groups"] for k in group["params"]]
    if indices != list(range(len(old_names))):
        raise ValueError(
            f"pack_lu_checkpoint: the optimiser state lists {len(indices)} parameters where the model had "
            f"{len(old_names)} in the three-parameter form, or not in the model's order; only an optimiser "
            "over model.parameters() (as flows.train builds it) can be converted"
        )
    by_name = {old_names[index]: entry for index, entry in state["state"].items()}
    for prefix in prefixes:
        pack_lu_entries(by_name, prefix)
    index = {name: k for k, name in enumerate(names)}
    groups = []
    for group in state["param_groups"]:
        members = [old_names[k] for k in group["params"]]
        for prefix in prefixes:
            dropped = (prefix + "upper", prefix + "log_s")
            members = [prefix + LU if m == prefix + "lower" else m for m in members if m not in dropped]
        groups.append({**group, "params": [index[m] for m in members]})
    return {"state": {index[name]: entry for name, entry in by_name.items()}, "param_groups": groups}
