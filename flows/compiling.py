"""Regional compilation: ``torch.compile`` per block, for ordinary and memory-saving training.

Compiling a whole flow traces one large graph (minutes on a CPU for a small Glow, and the
memory-saving engine's :class:`torch.autograd.Function` breaks it into pieces anyway).
:func:`compile_regions` compiles the blocks instead: every leaf of every
:class:`~flows.transforms.Chain` (the inner block of a restricted leaf such as a
:class:`~flows.transforms.Tail`), through :meth:`torch.nn.Module.compile`. Blocks of equal
class and input shape share one compiled graph (Dynamo treats their parameters as inputs),
so a Glow compiles one ActNorm, one 1x1 convolution and one coupling per level and grad
mode, however many steps it has.

Both backward modes then run compiled blocks: ordinary autograd calls each block (and
differentiates its compiled graph), and memory-saving backward calls the same blocks
without grad in its forward pass and with grad in each rebuild that reruns a block's
forward. A fused rebuild (:meth:`~flows.transforms.Bijector.reconstruct` of a coupling,
which runs its conditioner once for the inverse and the recompute) stays eager. The
engine reads no RNG state around blocks that draw no random numbers
(:attr:`~flows.transforms.Bijector.draws_random`), so nothing there needs tracing.

The module tree, parameters and ``state_dict`` keys are unchanged (a checkpoint saved from a
compiled model loads into a plain one), unlike ``torch.compile(model)``, which wraps it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flows.transforms.base import Bijector
from flows.transforms.chain import Chain


def regions(model: nn.Module) -> list[Bijector]:
    """The blocks :func:`compile_regions` compiles: the leaves of every chain in ``model``
    (a restricted leaf's inner block), each once, in the order the chains list them.

    Example:
        >>> from flows.models import Glow
        >>> model = Glow((1, 4, 4), levels=1, steps=2, hidden_channels=4)
        >>> sorted({type(b).__name__ for b in regions(model)})
        ['ActNorm', 'AffineCoupling', 'InvConv1x1', 'Reshape', 'Tail']
    """
    blocks: dict[int, Bijector] = {}
    for chain in (m for m in model.modules() if isinstance(m, Chain)):
        for leaf in chain.leaves():
            restricted = leaf.region()
            block = leaf if restricted is None else restricted[1]
            blocks.setdefault(id(block), block)
    return list(blocks.values())


def compile_regions(model: nn.Module, **options: Any) -> nn.Module:
    """Compile every block of ``model``'s chains in place with ``torch.compile``.

    The first training step compiles (seconds per distinct block class, input shape and
    grad mode); later steps reuse the graphs. Call it after moving the model to its
    device and dtype, and again after a change of either (a recompile happens anyway).

    Args:
        model: a :class:`~flows.models.Flow` or any module holding chains.
        **options: passed to :func:`torch.compile` (e.g. ``backend="aot_eager"``,
            ``mode="max-autotune"``).

    Returns:
        ``model`` itself, with its blocks compiled.

    Raises:
        ValueError: ``model`` holds no chain, so nothing would be compiled.

    Example:
        >>> import torch
        >>> from flows.models import Glow
        >>> model = compile_regions(Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4),
        ...                         backend="eager")
        >>> model.log_prob(torch.rand(2, 1, 4, 4)).shape
        torch.Size([2])
    """
    blocks = regions(model)
    if not blocks:
        raise ValueError(
            f"compile_regions: {type(model).__name__} holds no Chain of bijectors; "
            "use torch.compile(model) for other modules"
        )
    for block in blocks:
        block.compile(**options)
    return model
