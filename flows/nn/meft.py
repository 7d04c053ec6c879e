r"""MEFT: make a pre-trained transformer reversible by inserting adapters.

:func:`convert_to_reversible` replaces a stack of transformer blocks :math:`L_1..L_N`
(``h_n = L_n(h_{n-1})``) by a two-stream reversible stack of
:class:`~flows.transforms.rev_coupling.RevCoupling` blocks

.. math::
    y_1 = \lambda x_1 + F_n(x_2), \qquad y_2 = \beta x_2 + G_n(y_1)

(``lambda = x1_factor``, ``beta = x2_factor``) whose ``F``/``G`` hold the frozen
pre-trained sub-layers plus small trainable adapters (down-projection, GELU,
up-projection). Training keeps only the stack's output for backward, so activation memory
does not grow with the number of blocks. The stack input is duplicated into both streams
(:math:`x_1 = x_2 = h_0`) and the output is one stream, the *main* one.

Variants (the paper's MEFT1-3), with ``A_n(x)``/``M_n(x)`` the layer's attention and MLP
sub-blocks *including* their skip connection and norms (so ``L_n = M_n o A_n``):

1. ``F_n = L_n + adapter``, ``G_n = adapter``; default ``lambda = 0.1``, ``beta = 1``; the
   streams are swapped after each block. Main stream :math:`q_n = y_1`: with the adapters
   at zero, :math:`q_n = L_n(q_{n-1}) + \lambda m_{n-1}` where the memory stream
   :math:`m_{n-1} = \beta q_{n-2}` (:math:`m_0 = h_0`). The last block's ``G`` adapter does
   not reach the output and is left frozen.
2. ``F_n = adapter``, ``G_n = L_n + adapter``; default ``lambda = 1``, ``beta = 0.1``;
   swapped. :math:`y_1 = x_1` copies the main stream, and
   :math:`q_n = y_2 = L_n(q_{n-1}) + \beta m_{n-1}` with :math:`m_{n-1} = q_{n-2}`.
3. ``F_n = A_n + adapter``, ``G_n = M_n + adapter``; default ``lambda = beta = 0.1``; not
   swapped. :math:`p_n = y_1 = A_n(q_{n-1}) + \lambda m_{n-1}`,
   :math:`q_n = y_2 = M_n(p_n) + \beta q_{n-1}`, :math:`m_n = p_n`.

Starting point. Adapters are built with a zero up-projection (``adapter_up_std=0``), so at
conversion every adapter outputs exactly 0 and the only deviation from the original model
is the leak of the memory stream through the small factor. With :math:`K_n` a Lipschitz
constant of :math:`L_n` (of :math:`M_n` for :math:`K^M_n`) on the data, the error
:math:`e_n = q_n - h_n` obeys :math:`\|e_n\| \le K_n \|e_{n-1}\| + \delta_n`, hence

.. math::
    \|q_N - h_N\| \le \sum_{n=1}^N \Big(\prod_{k>n} K_k\Big)\,\delta_n, \qquad
    \delta_n = \lambda\|m_{n-1}\| \;(1), \quad \beta\|m_{n-1}\| \;(2), \quad
    K^M_n\lambda\|m_{n-1}\| + \beta\|q_{n-1}\| \;(3).

The deviation is linear in the small factor(s) and vanishes as they go to 0 (e.g.
``1e-7`` reproduces the original to ``1e-5`` in float64). **No variant keeps the starting
point exactly for two or more blocks**: an invertible stack must carry information about
earlier hidden states (the memory stream, needed to reconstruct inputs), and a nonzero
factor -- required for invertibility -- adds it to the main stream, after which the next
nonlinear layer cannot remove it. Variant 1 and 2 keep one factor at 1, so the stack's
inverse divides by one small factor per block; variant 3 divides by both, so its
reconstruction (hence memory-saving gradients) degrades fastest in float32. The
reconstruction error grows roughly like :math:`(K/\varepsilon)^N` in the small factor
:math:`\varepsilon`: trade the starting point against it, or opt blocks out with
``stack[i].memory_saving = False``. ``adapter_up_std > 0`` (the paper's
:math:`N(0, 0.02^2)` init) adds an :math:`O(\sigma^2)` adapter term per block.

Masks (``mask``/``src_key_padding_mask`` of ``nn.TransformerEncoder``) and stochastic
depth are not supported; dropout inside the layers recomputes identically.

References:
    Make Pre-trained Model Reversible: From Parameter to Memory Efficient Fine-Tuning
    (Liao, Tan, Monz, arXiv:2306.00477).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from flows.nn.reversible import Reversible
from flows.transforms.base import (
    Reconstruction,
    check_count,
    check_finite,
    check_flag,
    check_like_module,
    check_real,
    check_size,
    check_tensor,
)
from flows.transforms.rev_coupling import RevCoupling

_DEFAULT_FACTORS = {1: (0.1, 1.0), 2: (1.0, 0.1), 3: (0.1, 0.1)}
_LOOKED_FOR = (
    "torch.nn.TransformerEncoder, or an nn.ModuleList / nn.Sequential whose children are all "
    "torch.nn.TransformerEncoderLayer or blocks with norm1/attn/norm2/mlp attributes "
    "(e.g. flows.nn.vit.ViTBlock)"
)


def _positive_int(value: object, where: str) -> int:
    """``value`` if it is an integer >= 1, else one ``ValueError`` line naming ``where``."""
    return check_count(value, where)


class Adapter(nn.Module):
    r"""Bottleneck adapter :math:`W_{up}\,\mathrm{GELU}(W_{down} x + b_{down}) + b_{up}`.

    Args:
        width: feature width ``D`` (last dimension).
        reduction: bottleneck width is ``max(1, D // reduction)``; an integer >= 1.
        std: standard deviation of the down-projection's normal init.
        up_std: of the up-projection; 0 (default) starts the adapter at exactly 0.
    """

    def __init__(
        self, width: int, reduction: int = 4, std: float = 0.02, up_std: float = 0.0
    ) -> None:
        super().__init__()
        self.width = width
        hidden = max(1, width // _positive_int(reduction, "Adapter: reduction"))
        self.down = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, width)
        nn.init.normal_(self.down.weight, std=std)
        nn.init.zeros_(self.down.bias)
        if up_std > 0:
            nn.init.normal_(self.up.weight, std=up_std)
        else:
            nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x)))


def _is_block(module: nn.Module) -> bool:
    if isinstance(module, nn.TransformerEncoderLayer):
        return True
    return all(hasattr(module, name) for name in ("norm1", "attn", "norm2", "mlp"))


def _width(layer: nn.Module) -> int:
    if isinstance(layer, nn.TransformerEncoderLayer):
        return layer.self_attn.embed_dim
    norm = layer.norm1
    if isinstance(norm, nn.LayerNorm):
        return int(norm.normalized_shape[-1])
    raise ValueError(f"convert_to_reversible: cannot infer the width of {type(layer).__name__}")


def _attention(layer: nn.Module, x: Tensor) -> Tensor:
    """``A(x)``: the attention sub-block with its skip connection and norm."""
    if isinstance(layer, nn.TransformerEncoderLayer):
        if layer.norm_first:
            return x + layer._sa_block(layer.norm1(x), None, None)
        return layer.norm1(x + layer._sa_block(x, None, None))
    h = layer.norm1(x)
    if isinstance(layer.attn, nn.MultiheadAttention):
        a = layer.attn(h, h, h, need_weights=False)[0]
    else:
        a = layer.attn(h)
    scale = getattr(layer, "ls1", None)
    return x + (scale(a) if scale is not None else a)


def _mlp(layer: nn.Module, x: Tensor) -> Tensor:
    """``M(x)``: the MLP sub-block with its skip connection and norm."""
    if isinstance(layer, nn.TransformerEncoderLayer):
        if layer.norm_first:
            return x + layer._ff_block(layer.norm2(x))
        return layer.norm2(x + layer._ff_block(x))
    m = layer.mlp(layer.norm2(x))
    scale = getattr(layer, "ls2", None)
    return x + (scale(m) if scale is not None else m)


class Branch(nn.Module):
    """A frozen pre-trained (sub-)layer plus a parallel adapter: ``part(x) + adapter(x)``.

    Args:
        layer: the transformer block.
        part: ``"layer"`` (the whole block), ``"attention"`` or ``"mlp"`` (a sub-block with
            its skip connection and norm).
        adapter: the trainable adapter.
        own_layer: register ``layer`` as a submodule (False when another branch already
            holds it, so its weights appear once in ``state_dict``).
    """

    def __init__(
        self, layer: nn.Module, part: str, adapter: Adapter, own_layer: bool = True
    ) -> None:
        super().__init__()
        if own_layer:
            self.layer = layer
        else:
            self._shared = (layer,)
        self.part = part
        self.adapter = adapter

    def _layer(self) -> nn.Module:
        return self.layer if hasattr(self, "layer") else self._shared[0]

    def forward(self, x: Tensor) -> Tensor:
        layer = self._layer()
        if self.part == "attention":
            out = _attention(layer, x)
        elif self.part == "mlp":
            out = _mlp(layer, x)
        elif isinstance(layer, nn.TransformerEncoderLayer):
            # Through the sub-blocks: never the inference fast path, so the memory-saving
            # forward (no grad) and its recompute (grad) run the same kernels.
            out = _mlp(layer, _attention(layer, x))
        else:
            out = layer(x)
        return out + self.adapter(x)


class MEFTBlock(RevCoupling):
    """A :class:`RevCoupling` on the feature axis whose output halves may be swapped.

    Forward is ``RevCoupling`` followed by ``[y1, y2] -> [y2, y1]`` when ``swap``; the
    swap is a permutation, so the log-det is unchanged.

    Args:
        f: ``F``.
        g: ``G``.
        a: ``x1_factor``.
        b: ``x2_factor``.
        swap: swap the output halves (variants 1 and 2).
    """

    def __init__(self, f: nn.Module, g: nn.Module, a: float, b: float, swap: bool) -> None:
        super().__init__(f, g, a=a, b=b, split_dim=-1)
        self.swap = swap

    @staticmethod
    def _swapped(y: Tensor) -> Tensor:
        y1, y2 = y.chunk(2, dim=-1)
        return torch.cat([y2, y1], dim=-1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logdet = super().forward(x)
        return (self._swapped(y) if self.swap else y), logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return super().inverse(self._swapped(y) if self.swap else y)

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        """:meth:`RevCoupling.reconstruct` with the output halves swapped back and forth."""
        parts, join, y_again, logdet = super().reconstruct(self._swapped(y) if self.swap else y)
        return Reconstruction(parts, join, self._swapped(y_again) if self.swap else y_again, logdet)


class ReversibleStack(nn.Module):
    """The reversible replacement of a stack of transformer blocks.

    ``h -> [h, h] -> MEFT blocks -> main stream -> norm``. ``stack[i]`` is the i-th
    :class:`MEFTBlock`; ``stack[i].memory_saving = False`` opts it out. The input must be
    finite, on the blocks' device and dtype, with the adapters' width ``D`` as last size.

    Args:
        blocks: the MEFT blocks.
        main: which half of the last output is the model's hidden state (0 or 1).
        norm: a final norm (``nn.TransformerEncoder.norm``), or None.
        memory_saving: start with memory-saving backward on.
    """

    def __init__(
        self,
        blocks: list[MEFTBlock],
        main: int,
        norm: nn.Module | None = None,
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
        self.reversible = Reversible(*blocks)
        self.memory_saving = memory_saving
        self.main = main
        widths = {m.width for m in self.reversible.modules() if isinstance(m, Adapter)}
        self.width = widths.pop() if len(widths) == 1 else None
        self.norm = norm if norm is not None else nn.Identity()

    @property
    def memory_saving(self) -> bool:
        """Whether training keeps only the stack's output for backward."""
        return self.reversible.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self.reversible.memory_saving = check_flag(value, "ReversibleStack.memory_saving")

    def __len__(self) -> int:
        return len(self.reversible)

    def __getitem__(self, index: int) -> MEFTBlock:
        return self.reversible[index]  # type: ignore[return-value]

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        """Hidden states in the original layout (``(B, N, D)`` or ``(N, B, D)``)."""
        if mask is not None or src_key_padding_mask is not None or is_causal:
            raise ValueError("ReversibleStack: attention masks are not supported")
        check_tensor(src, "ReversibleStack", (2, 3), "(B, N, D), (N, B, D) or unbatched (N, D)")
        if self.width is not None:
            check_size(src, "ReversibleStack", -1, self.width, "hidden features")
        check_like_module(src, self, "ReversibleStack")
        check_finite(src, "ReversibleStack")
        out = self.reversible(torch.cat([src, src], dim=-1))
        return self.norm(out.chunk(2, dim=-1)[self.main])


def _make_block(
    layer: nn.Module, variant: int, a: float, b: float, reduction: int, std: float, up_std: float
) -> MEFTBlock:
    width = _width(layer)
    ref = next(layer.parameters(), None)

    def adapter() -> Adapter:
        new = Adapter(width, reduction, std, up_std)
        return new.to(ref.device, ref.dtype) if ref is not None else new

    if variant == 1:
        return MEFTBlock(Branch(layer, "layer", adapter()), adapter(), a, b, swap=True)
    if variant == 2:
        return MEFTBlock(adapter(), Branch(layer, "layer", adapter()), a, b, swap=True)
    f = Branch(layer, "attention", adapter())
    g = Branch(layer, "mlp", adapter(), own_layer=False)
    return MEFTBlock(f, g, a, b, swap=False)


def _already_reversible(module: nn.Module, prefix: str = "") -> ValueError | None:
    """The error for a module holding a :class:`ReversibleStack` (converted before), if it does."""
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, ReversibleStack):
            holds = f"holds a ReversibleStack at {name!r}" if name else "is a ReversibleStack"
            return ValueError(
                f"convert_to_reversible: the model is already reversible (it {holds}); convert the "
                "original model, or pass blocks= naming a container not converted yet"
            )
    return None


def _containers(model: nn.Module, blocks: str | None) -> list[tuple[str, nn.Module]]:
    if blocks is not None:
        container = model.get_submodule(blocks)
        if isinstance(container, nn.TransformerEncoder) or (
            isinstance(container, (nn.ModuleList, nn.Sequential))
            and len(container) > 0
            and all(_is_block(c) for c in container)
        ):
            return [(blocks, container)]
        already = _already_reversible(container, blocks)
        if already is not None:
            raise already
        raise ValueError(
            f"convert_to_reversible: {blocks!r} is a {type(container).__name__}; expected "
            f"{_LOOKED_FOR}"
        )
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") or prefix == "" for prefix, _ in found):
            continue
        if isinstance(module, nn.TransformerEncoder):
            found.append((name, module))
        elif (
            isinstance(module, (nn.ModuleList, nn.Sequential))
            and len(module) > 0
            and all(_is_block(c) for c in module)
        ):
            found.append((name, module))
    return found


def convert_to_reversible(
    model: nn.Module,
    variant: int = 1,
    x1_factor: float | None = None,
    x2_factor: float | None = None,
    adapter_reduction: int = 4,
    blocks: str | None = None,
    adapter_std: float = 0.02,
    adapter_up_std: float = 0.0,
    trainable: Iterable[str] = ("head", "classifier"),
    memory_saving: bool = True,
) -> nn.Module:
    """Turn the transformer block stacks of ``model`` into reversible MEFT stacks, in place.

    Finds ``nn.TransformerEncoder`` modules (``norm_first`` and ``batch_first`` honoured,
    the final ``norm`` kept) and ``nn.ModuleList``/``nn.Sequential`` containers of
    ``nn.TransformerEncoderLayer`` or of pre-norm blocks with ``norm1/attn/norm2/mlp``
    (:class:`flows.nn.vit.ViTBlock`, timm-style blocks). An encoder is replaced by a
    :class:`ReversibleStack`; a list or sequential container becomes a container of the
    same type holding one :class:`ReversibleStack`, so ``for blk in blocks: x = blk(x)``
    and ``blocks(x)`` keep working. Then every parameter is frozen except the adapters
    and the parameters whose dotted name has a component in ``trainable``.

    See the module docstring for the three variants, the scaling factors and the bound on
    the deviation from the original model right after conversion.

    Args:
        model: the pre-trained model (modified in place).
        variant: 1, 2 or 3 (MEFT1-3).
        x1_factor: ``lambda``, the slope of ``x1`` in ``y1``; ``None`` for the variant's
            default (0.1, 1, 0.1).
        x2_factor: ``beta``, the slope of ``x2`` in ``y2``; default (1, 0.1, 0.1).
        adapter_reduction: adapter bottleneck is ``width // adapter_reduction``.
        blocks: dotted name of the container to convert; ``None`` converts every one found.
        adapter_std: init std of the adapters' down-projections.
        adapter_up_std: init std of the up-projections (0: adapters start at exactly 0).
        trainable: name components whose parameters stay trainable (the task head).
        memory_saving: start the stacks with memory-saving backward on.

    Returns:
        ``model`` (or the new :class:`ReversibleStack` if ``model`` itself was the block
        container).

    Raises:
        ValueError: no recognisable transformer blocks, a model already converted, an
            unknown variant, or an option out of range (checked before ``model`` changes).
        TypeError: ``memory_saving`` not a bool, or ``trainable`` a single string.

    Example:
        >>> import torch
        >>> from flows.nn.vit import ViT
        >>> model = convert_to_reversible(ViT(8, 2, 1, 10, width=16, depth=2, heads=2), variant=2)
        >>> sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
        ['blocks', 'head']
        >>> model(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """
    if variant not in _DEFAULT_FACTORS:
        raise ValueError(f"convert_to_reversible: variant must be 1, 2 or 3, got {variant!r}")
    default_a, default_b = _DEFAULT_FACTORS[variant]
    where = "convert_to_reversible: "
    a = default_a if x1_factor is None else check_real(x1_factor, where + "x1_factor", nonzero=True)
    b = default_b if x2_factor is None else check_real(x2_factor, where + "x2_factor", nonzero=True)
    _positive_int(adapter_reduction, where + "adapter_reduction")
    check_real(adapter_std, where + "adapter_std")
    check_real(adapter_up_std, where + "adapter_up_std")
    check_flag(memory_saving, where + "memory_saving")
    if isinstance(trainable, str):
        raise TypeError(f"{where}trainable takes name components, e.g. ({trainable!r},), not one string")
    found = _containers(model, blocks)
    if not found:
        already = _already_reversible(model)
        if already is not None:
            raise already
        raise ValueError(
            f"convert_to_reversible: no transformer blocks found in {type(model).__name__}; "
            f"looked for {_LOOKED_FOR}"
        )
    main = {1: 1, 2: 0, 3: 1}[variant]
    adapters: list[nn.Module] = []
    result = model
    for name, container in found:
        if isinstance(container, nn.TransformerEncoder):
            layers, norm = list(container.layers), container.norm
        else:
            layers, norm = list(container), None
        rev_blocks = [
            _make_block(layer, variant, a, b, adapter_reduction, adapter_std, adapter_up_std)
            for layer in layers
        ]
        adapters.extend(m for blk in rev_blocks for m in blk.modules() if isinstance(m, Adapter))
        stack = ReversibleStack(rev_blocks, main, norm, memory_saving)
        if isinstance(container, nn.ModuleList):
            replacement: nn.Module = nn.ModuleList([stack])
        elif isinstance(container, nn.Sequential):
            replacement = nn.Sequential(stack)
        else:
            replacement = stack
        if name == "":
            result = replacement
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, replacement)
    keep = set(trainable)
    for pname, p in result.named_parameters():
        p.requires_grad_(any(part in keep for part in pname.split(".")))
    for adapter in adapters:
        adapter.requires_grad_(True)
    if variant == 1:
        # The main stream is the last block's y1: its G adapter never reaches the output.
        for stack in (m for m in result.modules() if isinstance(m, ReversibleStack)):
            stack[len(stack) - 1].g.requires_grad_(False)
    return result
