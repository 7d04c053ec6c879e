"""Small vision transformers: an ordinary one and a reversible (RevViT-style) one.

Both are built from the same parts (:class:`PatchEmbed`, :class:`Attention`, :class:`MLP`),
so a pre-trained ordinary :class:`ViT` can be converted with
:func:`flows.nn.meft.convert_to_reversible` and compared with a :class:`ReversibleViT`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flows.nn.reversible import Reversible
from flows.transforms.base import check_finite, check_flag, check_like_module
from flows.transforms.rev_coupling import RevCoupling


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a strided convolution plus learned positions.

    Args:
        image_size: ``H`` or ``(H, W)``, divisible by the patch size.
        patch_size: ``p`` or ``(p_h, p_w)``.
        in_channels: ``C`` of the ``(B, C, H, W)`` input.
        width: token width ``D``; the output is ``(B, N, D)`` with ``N = HW / (p_h p_w)``.
        name: the model named in the errors on bad images (shape, dtype, device, NaN/inf).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        in_channels: int,
        width: int,
        name: str = "PatchEmbed",
    ) -> None:
        super().__init__()
        (h, w), (ph, pw) = _pair(image_size), _pair(patch_size)
        if h % ph or w % pw:
            raise ValueError(f"{name}: image size {(h, w)} not divisible by patch {(ph, pw)}")
        self.name = name
        self.image_shape = (in_channels, h, w)
        self.num_tokens = (h // ph) * (w // pw)
        self.proj = nn.Conv2d(in_channels, width, (ph, pw), stride=(ph, pw))
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        # The learned positions fix the number of patches: a clear error here, not a broadcast one.
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            raise ValueError(
                f"{self.name}: expected images of shape (B, {c}, {h}, {w}) (the model's in_channels and "
                f"image_size), got {tuple(x.shape)}; resize the images or build the model for them"
            )
        check_like_module(x, self, self.name)
        # One NaN pixel reaches every token through attention: refuse it here, by name.
        check_finite(x, self.name)
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class Attention(nn.Module):
    r"""Multi-head self-attention :math:`\mathrm{softmax}(QK^T/\sqrt{d})V` on ``(B, N, D)``.

    Args:
        width: ``D``, divisible by ``heads``.
        heads: number of heads.
        dropout: dropout on the attention weights and on the output projection.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"Attention: width {width} not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        weights = self.attn_drop(weights.softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    """Two-layer GELU perceptron ``D -> hidden -> D`` with optional dropout."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PreNorm(nn.Module):
    """``fn(LayerNorm(x))``: a pre-norm residual branch without its skip connection."""

    def __init__(self, width: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class ViTBlock(nn.Module):
    r"""Ordinary pre-norm transformer block.

    .. math::
        x \leftarrow x + \mathrm{attn}(\mathrm{norm_1}(x)), \qquad
        x \leftarrow x + \mathrm{mlp}(\mathrm{norm_2}(x)).

    Args:
        width: token width ``D``.
        heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``D``.
        dropout: dropout rate in attention and MLP.
    """

    def __init__(
        self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Ordinary vision transformer classifier: patch tokens, ``depth`` blocks, mean pool.

    Args:
        image_size: ``H`` or ``(H, W)``.
        patch_size: patch side(s).
        in_channels: input channels.
        num_classes: logits per image.
        width: token width.
        depth: number of :class:`ViTBlock` (held in ``self.blocks``, an ``nn.Sequential``).
        heads: attention heads.
        mlp_ratio: MLP hidden width over ``width``.
        dropout: dropout rate (0 by default).

    References:
        An Image is Worth 16x16 Words (Dosovitskiy et al., arXiv:2010.11929).

    Example:
        >>> import torch
        >>> model = ViT(8, 2, 1, 10, width=16, depth=2, heads=2)
        >>> model(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        in_channels: int,
        num_classes: int,
        width: int = 64,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, width, type(self).__name__)
        self.blocks = nn.Sequential(
            *[ViTBlock(width, heads, mlp_ratio, dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` images -> ``(B, num_classes)`` logits."""
        h = self.blocks(self.patch_embed(x))
        return self.head(self.norm(h).mean(dim=1))


class ReversibleViT(nn.Module):
    r"""Reversible vision transformer (RevViT): two token streams coupled by RevNet blocks.

    The patch tokens ``t`` are duplicated into two streams ``x1 = x2 = t`` (concatenated on
    the feature axis, ``(B, N, 2D)``); each block is a
    :class:`~flows.transforms.rev_coupling.RevCoupling` with ``split_dim=-1``,

    .. math::
        y_1 = x_1 + \mathrm{attn}(\mathrm{norm}(x_2)), \qquad
        y_2 = x_2 + \mathrm{mlp}(\mathrm{norm}(y_1)),

    and the head reads the stream average :math:`(y_1 + y_2)/2`, layer-norms it and
    mean-pools the tokens. With ``memory_saving = True`` the block stack keeps only its
    output for backward, so activation memory does not grow with ``depth``; dropout, when
    enabled, recomputes identically (RNG replay).

    Args:
        image_size: ``H`` or ``(H, W)``.
        patch_size: patch side(s).
        in_channels: input channels.
        num_classes: logits per image.
        width: token width ``D`` of each stream.
        depth: number of reversible blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width over ``width``.
        memory_saving: start with memory-saving backward on.
        dropout: dropout rate (0 by default).

    References:
        Reversible Vision Transformers (Mangalam et al., arXiv:2302.04869).

    Example:
        >>> import torch
        >>> model = ReversibleViT(8, 2, 1, 10, width=16, depth=2, heads=2)
        >>> model(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        in_channels: int,
        num_classes: int,
        width: int = 64,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        memory_saving: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, width, type(self).__name__)
        hidden = int(width * mlp_ratio)
        self.blocks = Reversible(
            *[
                RevCoupling(
                    PreNorm(width, Attention(width, heads, dropout)),
                    PreNorm(width, MLP(width, hidden, dropout)),
                    split_dim=-1,
                )
                for _ in range(depth)
            ]
        )
        self.memory_saving = memory_saving
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    @property
    def memory_saving(self) -> bool:
        """Whether the block stack keeps only its output for backward."""
        return self.blocks.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self.blocks.memory_saving = check_flag(value, "ReversibleViT.memory_saving")

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` images -> ``(B, num_classes)`` logits."""
        t = self.patch_embed(x)
        y1, y2 = self.blocks(torch.cat([t, t], dim=-1)).chunk(2, dim=-1)
        return self.head(self.norm(0.5 * (y1 + y2)).mean(dim=1))
