"""Memory-saving backward for a sequence of bijectors.

One :class:`torch.autograd.Function` runs the blocks without building a graph and keeps
only the sequence's final output. Its backward walks the blocks in reverse: it rebuilds
each block's input from the block's output with ``inverse`` (no grad), recomputes the
block's forward with grad on that input, and pulls ``(grad_output, grad_logdet)`` back
through the recomputed block with one call of autograd's engine (what
:func:`torch.autograd.grad` runs, without its Python wrapper). The log-det gradient is
therefore exact for any bijector, whatever its log-det formula.

The engine talks to blocks only through the protocol declared on
:class:`~flows.transforms.Bijector` (``reconstruct``, ``leaves``, ``region``). Blocks
that draw random numbers (dropout, Hutchinson probes) have the RNG state they saw in the
forward pass replayed for their rebuild (:mod:`flows.transforms.rng`), so they recompute
identically. Only blocks that say they may draw
(:attr:`~flows.transforms.Bijector.draws_random`) are snapshotted, and the state is kept
only if they did draw: a block that draws nothing costs no RNG-state read, which
``torch.compile`` could not trace. The autocast
setting and :func:`~flows.transforms.switches.skipping_logdet` of the forward pass are
replayed too, and the rebuild runs inside :func:`~flows.transforms.switches.recomputing`
(per-step state frozen).

Buffers a block updates in its forward pass (BatchNorm's running statistics, power-
iteration vectors) are updated once per step, as under ordinary autograd: the block's
rebuild runs on stand-ins holding the values its forward pass left
(:mod:`flows.transforms.buffers`), so a second forward pass before this backward
(gradient accumulation) does not change what the rebuild sees either. Parameters modified in
place between the forward and the backward pass raise, as ordinary autograd does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flows.transforms import buffers
from flows.transforms.base import Bijector, Region, region_runs
from flows.transforms.rng import RngState, get_rng_state, replaying, rng_changed
from flows.transforms.switches import logdet_setting, logdet_wanted, recomputing


def _autocast_state(x: Tensor) -> tuple[str, bool, torch.dtype | None]:
    """The autocast setting active for ``x``'s device, replayed by the backward recompute."""
    device = x.device.type
    if device not in ("cpu", "cuda"):
        return device, False, None
    try:
        return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except TypeError:  # torch < 2.4: per-device functions
        if device == "cpu":
            return device, torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return device, torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


class _Run:
    """Consecutive blocks of a segment that act on one region of the running tensor.

    ``region is None``: the blocks act on the whole tensor. Otherwise they are the inner
    blocks of consecutive leaves with equal :meth:`~flows.transforms.Bijector.region`:
    the region is split off and joined back once per run instead of once per block.
    ``params``, ``slots`` and ``random`` list each block's trainable parameters, buffer
    slots and :attr:`~flows.transforms.Bijector.draws_random`, looked up once per step.
    """

    def __init__(self, region: Region | None) -> None:
        self.region = region
        self.blocks: list[Bijector] = []
        self.params: list[list[nn.Parameter]] = []
        self.slots: list[list[buffers.Slot]] = []
        self.random: list[bool] = []

    def add(self, block: Bijector) -> None:
        self.blocks.append(block)
        self.params.append([p for p in block.parameters() if p.requires_grad])
        self.slots.append(buffers.slots(block))
        self.random.append(block.draws_random)

    def split(self, h: Tensor) -> tuple[Tensor | None, Tensor]:
        return (None, h) if self.region is None else self.region.split(h)

    def join(self, rest: Tensor | None, part: Tensor) -> Tensor:
        return part if self.region is None else self.region.join(rest, part)


def _runs(blocks: Sequence[Bijector]) -> list[_Run]:
    runs: list[_Run] = []
    for region, inners in region_runs(blocks):
        runs.append(_Run(region))
        for inner in inners:
            runs[-1].add(inner)
    return runs


def _versions(tensors: list[Tensor]) -> list[int]:
    return [t._version for t in tensors]


_Updated = tuple[list[buffers.Slot], list[Tensor]] | None


class _InvertibleBackward(torch.autograd.Function):
    """Autograd node of a memory-saving segment: keeps its output, not its activations."""

    @staticmethod
    def forward(ctx, runs: list[_Run], params: list[Tensor], x: Tensor, context: Tensor | None, *flat_params: Tensor):  # type: ignore[override]
        rng_states: list[RngState | None] = []
        updated: list[_Updated] = []
        logdet = x.new_zeros(x.shape[0])
        with torch.no_grad():
            h = x
            for run in runs:
                rest, part = run.split(h)
                for block, slots, random in zip(run.blocks, run.slots, run.random):
                    before = get_rng_state(part) if random else None
                    buffer_versions = buffers.versions(slots)
                    part, block_logdet = block(part, context)
                    # A block may build a graph internally (i-ResNet's log-det VJPs run
                    # under enable_grad): detach such an output, or the kept output would
                    # keep it alive (the log-det's graph dies with it: the sum below is
                    # taken without grad). Only a tensor that requires grad has a graph.
                    if part.requires_grad:
                        part = part.detach()
                    logdet = logdet + block_logdet
                    rng_states.append(before if before is not None and rng_changed(part, before) else None)
                    changed = buffers.changed_modules(slots, buffer_versions)
                    updated.append((changed, buffers.values(changed)) if changed else None)
                h = run.join(rest, part)
        ctx.runs = runs
        ctx.params = params
        ctx.param_versions = _versions(params)
        ctx.rng_states = rng_states
        ctx.updated = updated
        ctx.autocast = _autocast_state(x)
        ctx.logdet_wanted = logdet_wanted()
        ctx.context = context
        ctx.save_for_backward(h)
        return h, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        _check_unmodified(ctx.params, ctx.param_versions)
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0])
        grads: dict[int, Tensor] = {}
        # The context is an input of every block, used as is (never rebuilt): a leaf
        # whose gradient sums over the blocks.
        context = ctx.context
        if context is not None:
            context = context.detach().requires_grad_(context.requires_grad)
        states = reversed(ctx.rng_states)
        updates = reversed(ctx.updated)
        device, autocast_enabled, autocast_dtype = ctx.autocast
        with (
            recomputing(),
            torch.autocast(device, dtype=autocast_dtype, enabled=autocast_enabled),
            logdet_setting(ctx.logdet_wanted),
        ):
            h = y.detach()
            for run in reversed(ctx.runs):
                rest, part = run.split(h)
                grad_rest, grad_part = run.split(grad_y)
                for block, block_params in zip(reversed(run.blocks), reversed(run.params)):
                    changed, forward_values = next(updates) or ([], [])
                    with replaying(part, next(states)), buffers.standing_in(changed, forward_values):
                        part, grad_part = _block_backward(
                            block, block_params, part, context, grad_part, grad_logdet, grads
                        )
                h, grad_y = run.join(rest, part), run.join(grad_rest, grad_part)
        grad_context = grads.get(id(context)) if context is not None else None
        return (None, None, grad_y, grad_context, *(grads.get(id(p)) for p in ctx.params))


def _check_unmodified(params: list[Tensor], versions: list[int]) -> None:
    """Raise, as ordinary autograd does, when a parameter changed in place since the
    forward pass (the rebuild would silently use the new values)."""
    for p, version in zip(params, versions):
        if p._version != version:
            shape = "x".join(map(str, p.shape)) or "scalar"
            raise RuntimeError(
                f"memory-saving backward: a parameter of shape [{shape}] was modified in place "
                f"between the forward and the backward pass (version {version} -> {p._version}); "
                "run optimizer.step() only after backward(), or compute the loss again"
            )


# The C++ engine entry that ``torch.autograd.grad`` wraps. The Python wrapper costs more
# than the engine call itself on a block of this size (its argument normalisation, its
# output-gradient checks, which also import torch's symbolic-shapes module, sympy: 0.5 s
# and 35 MiB in a fresh process, the first time they run), and the engine pays it once
# per block per backward. ``_pull_back`` calls the entry as ``grad`` does.
_ENGINE = torch.autograd.Variable._execution_engine


def _pull_back(outputs: list[Tensor], output_grads: list[Tensor], inputs: list[Tensor]) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, output_grads, allow_unused=True)``: the
    gradients at ``inputs`` (``None`` where one does not reach an output), no graph kept.
    The caller guarantees what ``grad`` would check: each output needs grad and each
    output gradient has its output's shape."""
    return _ENGINE.run_backward(tuple(outputs), tuple(output_grads), False, False, tuple(inputs), True, False)


def _block_backward(
    block: Bijector,
    block_params: list[nn.Parameter],
    h: Tensor,
    context: Tensor | None,
    grad_y: Tensor,
    grad_logdet: Tensor,
    grads: dict[int, Tensor],
) -> tuple[Tensor, Tensor]:
    """The block's input rebuilt from its output ``h``, and the gradient at that input;
    the gradients of the block's parameters (and of a grad-requiring context) are
    accumulated into ``grads``."""
    wrt = block_params if context is None or not context.requires_grad else [*block_params, context]
    with torch.enable_grad():
        parts, join, y_block, logdet_block = block.reconstruct(h, context)
        outputs, output_grads = [y_block], [grad_y]
        if logdet_block.requires_grad:
            outputs.append(logdet_block)
            output_grads.append(grad_logdet)
        block_grads = _pull_back(outputs, output_grads, [*parts, *wrt])
    n = len(parts)
    grad_x = join([g if g is not None else torch.zeros_like(p) for g, p in zip(block_grads[:n], parts)])
    for p, g in zip(wrt, block_grads[n:]):
        if g is not None:
            grads[id(p)] = grads[id(p)] + g if id(p) in grads else g
    return join([p.detach() for p in parts]), grad_x


def run_invertible_backward(
    blocks: Sequence[Bijector], x: Tensor, context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run ``blocks`` in order on ``x`` with memory-saving backward.

    Args:
        blocks: bijectors, each returning ``(y, logdet)``.
        x: the input, ``(B, ...)``.
        context: passed to every block (``None``: unconditional); an input of the
            autograd node, so its gradient flows (to an embedding network upstream).

    Returns:
        ``(y, logdet)`` as a plain loop would, but autograd keeps only ``y`` (plus, for
        blocks that drew random numbers, the RNG state they saw).
    """
    runs = _runs(blocks)
    params: list[Tensor] = []
    seen: set[int] = set()
    for run in runs:
        for block_params in run.params:
            for p in block_params:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return _InvertibleBackward.apply(runs, params, x, context, *params)
