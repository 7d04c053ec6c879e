"""A drop-in reversible layer for ordinary networks (returns ``y`` only).

:class:`Reversible` takes bijector blocks, or (as RevLib's ``ReversibleSequential``) plain
modules that it pairs into two-stream RevNet couplings itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn

from flows.transforms.base import Bijector, check_finite, check_flag, check_like_module
from flows.transforms.chain import Chain
from flows.transforms.rev_coupling import Merges, RevCoupling
from flows.transforms.switches import skipping_logdet


class _PairedCoupling(RevCoupling):
    """The :class:`RevCoupling` of arguments ``2 i`` (``F``) and ``2 i + 1`` (``G``) of a
    :class:`Reversible` built from plain modules; each must keep the shape of its half.

    The default merge ``x + F(h)`` would broadcast a module that shrinks its half (one output
    channel, say) without an error; here any change of shape is refused, naming the module.
    """

    _where = "Reversible"

    def __init__(self, f: nn.Module, g: nn.Module, pair: int, **options: object) -> None:
        super().__init__(f, g, **options)  # type: ignore[arg-type]
        self.pair = pair

    def _fn_name(self, half: int) -> str:
        return f"module {2 * self.pair + half} ({type(self.f if half == 0 else self.g).__name__})"

    def _same_shape(self, half: int, stream: Tensor, fn_out: Tensor) -> Tensor:
        if fn_out.shape != stream.shape:
            raise ValueError(
                f"Reversible: {self._fn_name(half)} maps its half of shape "
                f"{tuple(stream.shape)} to {tuple(fn_out.shape)}; each module must keep the shape of its half "
                f"(the input split in two along split_dim {self.split_dim})"
            )
        return fn_out

    def _merge(self, half: int, stream: Tensor, fn_out: Tensor) -> Tensor:
        return super()._merge(half, stream, self._same_shape(half, stream, fn_out))

    def _unmerge(self, half: int, out: Tensor, fn_out: Tensor) -> Tensor:
        return super()._unmerge(half, out, self._same_shape(half, out, fn_out))


def _blocks(
    args: Sequence[object], split_dim: int | None, coupling_forward: Merges, coupling_inverse: Merges
) -> tuple[Bijector, ...]:
    """The bijector blocks :class:`Reversible`'s arguments stand for (both forms, checked)."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = tuple(args[0])  # one list of blocks or modules, as Chain takes
    for i, arg in enumerate(args):
        if not isinstance(arg, nn.Module):
            raise TypeError(
                f"Reversible: argument {i} is a {type(arg).__name__}, not an nn.Module; pass bijector blocks "
                "(e.g. RevCoupling(f, g)) or nn.Modules, paired in order as (F, G) of RevCouplings"
            )
    plain = [i for i, arg in enumerate(args) if not isinstance(arg, Bijector)]
    if not plain:
        if split_dim is not None or coupling_forward is not None or coupling_inverse is not None:
            raise ValueError(
                "Reversible: split_dim, coupling_forward and coupling_inverse configure the pairing of plain "
                "modules; the arguments are bijector blocks, so set them on each RevCoupling instead"
            )
        return tuple(args)  # type: ignore[arg-type]
    if len(plain) < len(args):
        block = next(i for i, arg in enumerate(args) if isinstance(arg, Bijector))
        raise TypeError(
            f"Reversible: argument {block} is a bijector ({type(args[block]).__name__}) and argument {plain[0]} "
            f"a plain module ({type(args[plain[0]]).__name__}); pass either bijector blocks or plain modules, "
            "or wrap the modules pair by pair as RevCoupling(f, g)"
        )
    if len(args) % 2:
        raise ValueError(
            f"Reversible: {len(args)} modules; plain modules are paired in order as (F, G) of a RevCoupling, "
            "so give an even number of them (F1, G1, F2, G2, ...)"
        )
    options = dict(
        split_dim=1 if split_dim is None else split_dim,
        coupling_forward=coupling_forward,
        coupling_inverse=coupling_inverse,
    )
    return tuple(_PairedCoupling(f, g, i, **options) for i, (f, g) in enumerate(zip(args[::2], args[1::2])))


class Reversible(nn.Module):
    r"""Memory-saving stack of bijector blocks for ordinary (non-density) networks.

    Computes :math:`y = f_n \circ \dots \circ f_1(x)` like a :class:`~flows.transforms.Chain`
    but returns only ``y`` (the log-det is dropped), so it replaces an ``nn.Sequential`` of
    residual blocks. With ``memory_saving = True`` (the default) training keeps only the
    stack's output: the backward pass rebuilds each block's input with ``inverse`` and
    recomputes the block (the engine of :mod:`flows.transforms.invertible_backward`), so
    activation memory does not grow with depth. A block opts out with
    ``reversible[i].memory_saving = False``. The blocks run inside
    :func:`~flows.transforms.switches.skipping_logdet`: those with costly log-dets
    (i-ResNet's :class:`~flows.transforms.ResidualBlock`) skip computing them.

    Two forms. ``Reversible(block_1, ..., block_n)`` takes bijectors. ``Reversible(f_1, g_1,
    ..., f_n, g_n)`` takes plain modules (no bijector among them; RevLib's
    ``ReversibleSequential`` form) and pairs them in order into RevNet couplings
    ``RevCoupling(f_k, g_k, split_dim=...)``: with the input split into halves
    :math:`[x_1, x_2]` along ``split_dim``, block ``k`` computes

    .. math::
        y_1 = x_1 + f_k(x_2), \qquad y_2 = x_2 + g_k(y_1),

    and the inverse :math:`x_2 = y_2 - g_k(y_1)`, :math:`x_1 = y_1 - f_k(x_2)`. Each
    module maps a half to a tensor of that half's shape (checked on every call). The same
    modules wrapped by hand, ``Reversible(RevCoupling(f_1, g_1), ...)``, give the same
    outputs, gradients and ``state_dict`` keys.

    Args:
        *blocks: bijectors (e.g. :class:`~flows.transforms.rev_coupling.RevCoupling`), or an
            even number of plain ``nn.Module`` s ``f_1, g_1, f_2, g_2, ...``, in application
            order (or one list of either).
        split_dim: plain modules only: the dimension split into the two halves (default
            ``1``, the channels of ``(B, C, H, W)``; ``-1`` for ``(B, N, D)`` tokens).
        coupling_forward: plain modules only: custom merges ``(stream, fn_out) -> output``,
            one callable for both halves or a pair ``(for y_1, for y_2)``, as in
            :class:`~flows.transforms.rev_coupling.RevCoupling` (e.g. MomentumNet's).
        coupling_inverse: plain modules only: their inverses ``(output, fn_out) -> stream``.

    Raises:
        TypeError: an argument that is no ``nn.Module``; bijectors mixed with plain modules;
            a ``memory_saving`` that is no bool; an input of another dtype than the layer's.
        ValueError: an odd number of plain modules; pairing options with bijector blocks; a
            ``coupling_inverse`` that does not invert ``coupling_forward`` (checked at
            construction); a module that changes the shape of its half (on the call that
            does); an input that is empty, on another device, non-finite (on the CPU) or
            whose ``split_dim`` is not twice what the first layer of ``f_1`` takes.

    References:
        The Reversible Residual Network: Backpropagation Without Storing Activations
        (Gomez et al., arXiv:1707.04585).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from flows.transforms.rev_coupling import RevCoupling
        >>> layer = Reversible(*[RevCoupling(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(3)])
        >>> x = torch.randn(2, 8)
        >>> y = layer(x)
        >>> torch.allclose(layer.inverse(y), x, atol=1e-5)
        True

        Plain modules, paired as ``(f_1, g_1), (f_2, g_2)``, each acting on 4 of 8 channels:

        >>> stack = Reversible(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(4)])
        >>> len(stack), stack(torch.randn(2, 8, 5, 5)).shape
        (2, torch.Size([2, 8, 5, 5]))
    """

    def __init__(
        self,
        *blocks: Bijector | nn.Module,
        split_dim: int | None = None,
        coupling_forward: Merges = None,
        coupling_inverse: Merges = None,
    ) -> None:
        super().__init__()
        self.chain = Chain(*_blocks(blocks, split_dim, coupling_forward, coupling_inverse))
        self.chain.memory_saving = True

    @property
    def memory_saving(self) -> bool:
        """Whether training keeps only the output (settable between steps)."""
        return self.chain.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self.chain.memory_saving = check_flag(value, "Reversible.memory_saving")

    def __len__(self) -> int:
        return len(self.chain)

    def __getitem__(self, index: int) -> Bijector:
        return self.chain[index]

    def __iter__(self) -> Iterator[Bijector]:
        return iter(self.chain)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the blocks; ``x`` is ``(B, ...)`` as the blocks expect."""
        return self._run(self.chain.forward, x)

    def inverse(self, y: Tensor) -> Tensor:
        """Rebuild the input from the output."""
        return self._run(self.chain.inverse, y)

    def _run(self, direction: Callable[[Tensor], tuple[Tensor, Tensor]], t: Tensor) -> Tensor:
        """``direction`` of the chain on the checked ``t``, its log-det skipped and dropped."""
        if not isinstance(t, Tensor):
            raise TypeError(f"Reversible: expected a torch.Tensor, got {type(t).__name__}")
        check_like_module(t, self, "Reversible")
        check_finite(t, "Reversible")
        with skipping_logdet():
            return direction(t)[0]
