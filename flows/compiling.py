"""Regional compilation: ``torch.compile`` per step of flow (or per block), for training.

Compiling a whole flow traces one large graph (minutes on a CPU for a small Glow, and the
memory-saving engine's :class:`torch.autograd.Function` breaks it into pieces anyway).
:func:`compile_regions` compiles regions instead, through :meth:`torch.nn.Module.compile`:

* ``unit="step"`` (the default): each block with parameters of the outermost chains, the
  inner block of a restricted one such as a multi-scale :class:`~flows.transforms.Tail` (a
  Glow step, ``ActNorm -> 1x1 convolution -> coupling``, is one region, so ordinary
  autograd runs one forward and one backward graph per step; squeezes and reshapes stay
  eager);
* ``unit="block"``: every leaf of every :class:`~flows.transforms.Chain` (ActNorm, the
  1x1 convolution and the coupling of a step as three regions);
* ``unit="model"``: the outermost chains whole (a :class:`~flows.models.Flow`'s bijector:
  one forward and one backward graph for the whole flow, the fewest launches and Python
  calls, and the longest compile; the base density stays eager). Memory-saving backward's
  autograd function is not traced (Dynamo breaks the graph there and runs the engine
  eagerly), so this unit is for ordinary training.

Regions of equal class and input shape share one compiled graph (Dynamo treats their
parameters as inputs), so a Glow compiles one step per level and grad mode, however many
steps it has.

Ordinary autograd calls each region (and differentiates its compiled graph). Memory-saving
backward works leaf by leaf: with ``unit="block"`` its no-grad forward pass calls the
compiled leaves, with ``unit="step"`` it runs them eagerly; its rebuilds
(:meth:`~flows.transforms.Bijector.reconstruct`, fused per block) stay eager either way.
On the quick-start Glow the step regions make the ordinary step faster than eager and the
block regions slower (docs/speed.md, ``experiments/speed_compile.py``). The engine reads no
RNG state around blocks that draw no random numbers
(:attr:`~flows.transforms.Bijector.draws_random`), so nothing there needs tracing.

The module tree, parameters and ``state_dict`` keys are unchanged (a checkpoint saved from a
compiled model loads into a plain one), unlike ``torch.compile(model)``, which wraps it.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from flows.transforms.base import Bijector
from flows.transforms.chain import Chain

UNITS = ("step", "block", "model")
"""The units of :func:`compile_regions`, its default first."""


def regions(model: nn.Module, unit: str = "step") -> list[Bijector]:
    """The blocks :func:`compile_regions` compiles, each once, in the order the chains list
    them: with ``unit="step"`` the blocks with parameters of the outermost chains in ``model``, with
    ``unit="block"`` the leaves of every chain (either way a restricted block's inner one),
    with ``unit="model"`` the outermost chains themselves.

    Example:
        >>> from flows.models import Glow
        >>> model = Glow((1, 4, 4), levels=1, steps=2, hidden_channels=4)
        >>> sorted({type(b).__name__ for b in regions(model)})
        ['Chain']
        >>> sorted({type(b).__name__ for b in regions(model, unit="block")})
        ['ActNorm', 'AffineCoupling', 'InvConv1x1', 'Reshape', 'Tail']
        >>> [type(b).__name__ for b in regions(model, unit="model")]
        ['MultiScale']
    """
    if unit not in UNITS:
        raise ValueError(f"compile_regions: unit must be one of {UNITS}, got {unit!r}")
    chains = [m for m in model.modules() if isinstance(m, Chain)]
    if unit != "block":
        inner = {id(b) for chain in chains for b in chain.modules() if b is not chain}
        chains = [chain for chain in chains if id(chain) not in inner]
    if unit == "model":
        return list(chains)
    blocks: dict[int, Bijector] = {}
    for chain in chains:
        for leaf in chain.leaves() if unit == "block" else chain.blocks:
            restricted = leaf.region()
            block = leaf if restricted is None else restricted[1]
            # A step region without parameters (a squeeze, a reshape) has nothing to fuse:
            # compiled, its fixed cost per call would be all it adds.
            if unit == "block" or any(True for _ in block.parameters()):
                blocks.setdefault(id(block), block)
    return list(blocks.values())


def compile_regions(model: nn.Module, unit: str = "step", **options: Any) -> nn.Module:
    """Compile the steps (or every block) of ``model``'s chains in place with ``torch.compile``.

    The first training step compiles (seconds per distinct region class, input shape and
    grad mode); later steps reuse the graphs. Call it after moving the model to its
    device and dtype, and again after a change of either (a recompile happens anyway).

    Args:
        model: a :class:`~flows.models.Flow` or any module holding chains.
        unit: ``"step"`` (the blocks of the outermost chains: a Glow step is one region),
            ``"block"`` (every leaf of every chain) or ``"model"`` (the outermost chains
            whole: fastest for ordinary training, slowest to compile).
        **options: passed to :func:`torch.compile` (e.g. ``backend="aot_eager"``,
            ``mode="max-autotune"``).

    With inductor (the default backend) it also hides the deprecation warning torch 2.13's
    inductor raises about its own use of ``torch._prims_common.check``, once per graph.

    Returns:
        ``model`` itself, with its blocks compiled.

    Raises:
        ValueError: ``model`` holds no chain, so nothing would be compiled; or an unknown ``unit``.

    Example:
        >>> import torch
        >>> from flows.models import Glow
        >>> model = compile_regions(Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4),
        ...                         backend="eager")
        >>> model.log_prob(torch.rand(2, 1, 4, 4)).shape
        torch.Size([2])
    """
    blocks = regions(model, unit)
    if not blocks:
        raise ValueError(
            f"compile_regions: {type(model).__name__} holds no Chain of bijectors; "
            "use torch.compile(model) for other modules"
        )
    if options.get("backend", "inductor") == "inductor":
        # Inductor's own code calls a torch helper it deprecated (a FutureWarning per compiled
        # graph in torch 2.13): a note from torch to itself that no user can act on.
        warnings.filterwarnings(
            "ignore", r"`torch\._prims_common\.check` is deprecated", FutureWarning, r"torch\._inductor"
        )
    for block in blocks:
        block.compile(**options)
    return model
