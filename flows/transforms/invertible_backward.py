"""Memory-saving backward for a sequence of bijectors.

One :class:`torch.autograd.Function` runs the blocks without building a graph and keeps
only the sequence's final output. Its backward walks the blocks in reverse: it rebuilds
each block's input from the block's output with ``inverse`` (no grad), recomputes the
block's forward with grad on that input, and pulls ``(grad_output, grad_logdet)`` back
through the recomputed block with :func:`torch.autograd.grad`. The log-det gradient is
therefore exact for any bijector, whatever its log-det formula.

Blocks that draw random numbers (dropout, Hutchinson probes) have the RNG state they saw
in the forward pass replayed for both the inverse and the recompute, so they recompute
identically. The state is kept only for blocks that actually consumed random numbers.
The autocast setting and :func:`~flows.transforms.logdet_context.skipping_logdet` of the
forward pass are replayed too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from flows.transforms.base import single_part
from flows.transforms.logdet_context import logdet_setting, logdet_wanted
from flows.transforms.tail import Tail

# Per thread, like the log-det switch: a recompute on one thread (CUDA runs backward on
# its own) must not freeze per-step state updates of a forward pass on another.
_STATE = threading.local()


def is_recomputing() -> bool:
    """True while a memory-saving backward rebuilds or recomputes a block.

    Blocks with state updated in the forward pass (power-iteration vectors, data-dependent
    initialisation) read it so the update happens once per training step, never again
    during the backward reconstruction.
    """
    return getattr(_STATE, "recomputing", 0) > 0


@contextmanager
def recomputing() -> Iterator[None]:
    """Mark the enclosed code as a recompute: per-step state updates are skipped."""
    _STATE.recomputing = getattr(_STATE, "recomputing", 0) + 1
    try:
        yield
    finally:
        _STATE.recomputing -= 1


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


def _rng_devices(x: Tensor) -> list[int]:
    return [x.device.index or 0] if x.is_cuda else []


def get_rng_state(x: Tensor) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    return torch.get_rng_state(), cuda


def set_rng_state(x: Tensor, state: tuple[Tensor, Tensor | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, x.device)


def _rng_changed(x: Tensor, before: tuple[Tensor, Tensor | None]) -> bool:
    after = get_rng_state(x)
    if not torch.equal(before[0], after[0]):
        return True
    return before[1] is not None and not torch.equal(before[1], after[1])


def _trainable_parameters(block: nn.Module) -> list[nn.Parameter]:
    return [p for p in block.parameters() if p.requires_grad]


class _Run:
    """Consecutive blocks of a segment that act on one view of the running tensor.

    ``tail is None``: the blocks act on the whole tensor. Otherwise they are the wrapped
    blocks of consecutive :class:`~flows.transforms.Tail` leaves with one offset and one
    (kept) shape: they act on the tail of the flat latent, which is split off and joined
    back once per run instead of once per block. ``params`` lists each block's trainable
    parameters, looked up once per step.
    """

    def __init__(self, tail: Tail | None, block: nn.Module) -> None:
        self.tail = tail
        self.blocks = [block]
        self.params = [_trainable_parameters(block)]

    def takes(self, tail: Tail | None) -> bool:
        if tail is None or self.tail is None:
            return tail is None and self.tail is None
        return tail.offset == self.tail.offset and tail.in_shape == self.tail.in_shape

    def split(self, h: Tensor) -> tuple[Tensor | None, Tensor]:
        return (None, h) if self.tail is None else self.tail.split(h)

    def join(self, head: Tensor | None, inner: Tensor) -> Tensor:
        return inner if self.tail is None else self.tail.join(head, inner)


def _runs(blocks: Sequence[nn.Module]) -> list[_Run]:
    runs: list[_Run] = []
    for block in blocks:
        tail = block if isinstance(block, Tail) and block.in_shape == block.out_shape else None
        inner = block.bijector if tail is not None else block
        if runs and runs[-1].takes(tail):
            runs[-1].blocks.append(inner)
            runs[-1].params.append(_trainable_parameters(inner))
        else:
            runs.append(_Run(tail, inner))
    return runs


class _InvertibleBackward(torch.autograd.Function):
    """Autograd node of a memory-saving segment: keeps its output, not its activations."""

    @staticmethod
    def forward(ctx, runs: list[_Run], params: list[Tensor], x: Tensor, *flat_params: Tensor):  # type: ignore[override]
        rng_states: list[tuple[Tensor, Tensor | None] | None] = []
        logdet = x.new_zeros(x.shape[0])
        with torch.no_grad():
            h = x
            for run in runs:
                head, inner = run.split(h)
                for block in run.blocks:
                    before = get_rng_state(inner)
                    inner, block_logdet = block(inner)
                    # A block may build a graph internally (i-ResNet's log-det VJPs run
                    # under enable_grad): detach, or the kept output would keep it alive.
                    inner, block_logdet = inner.detach(), block_logdet.detach()
                    logdet = logdet + block_logdet
                    rng_states.append(before if _rng_changed(inner, before) else None)
                h = run.join(head, inner)
        ctx.runs = runs
        ctx.params = params
        ctx.rng_states = rng_states
        ctx.autocast = _autocast_state(x)
        ctx.logdet_wanted = logdet_wanted()
        ctx.save_for_backward(h)
        return h, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0])
        grads: dict[int, Tensor] = {}
        states = reversed(ctx.rng_states)
        device, autocast_enabled, autocast_dtype = ctx.autocast
        with (
            recomputing(),
            torch.autocast(device, dtype=autocast_dtype, enabled=autocast_enabled),
            logdet_setting(ctx.logdet_wanted),
        ):
            h = y.detach()
            for run in reversed(ctx.runs):
                head, inner = run.split(h)
                grad_head, grad_inner = run.split(grad_y)
                for block, block_params in zip(reversed(run.blocks), reversed(run.params)):
                    inner, grad_inner = _block_backward(
                        block, block_params, next(states), inner, grad_inner, grad_logdet, grads
                    )
                h, grad_y = run.join(head, inner), run.join(grad_head, grad_inner)
        return (None, None, grad_y, *(grads.get(id(p)) for p in ctx.params))


class _SeededRoot(torch.autograd.Function):
    """A scalar root over ``outputs`` whose backward hands each output its given gradient.

    ``autograd.grad(root, inputs)`` then equals ``autograd.grad(outputs, inputs, grads)``
    exactly, without the lazy import of torch's symbolic-shapes module (sympy: about
    0.5 s and 35 MiB of resident memory in a fresh process) that torch performs the first
    time it checks explicit output gradients. (An optimizer step imports it too; a
    gradient computation without one, such as :func:`flows.check`, or a first-step memory
    measurement, need not pay for it.)
    """

    @staticmethod
    def forward(ctx, grads: list[Tensor], *outputs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, _: Tensor):  # type: ignore[override]
        return (None, *ctx.grads)


def _rebuild(
    block: nn.Module, h: Tensor, replay: Callable[[], None]
) -> tuple[list[Tensor], Callable[[list[Tensor]], Tensor], Tensor, Tensor]:
    """The block's input as grad-requiring parts, and its output and log-det recomputed on them.

    A block may provide ``reconstruct(y) -> (parts, join, y, logdet)`` that fuses its inverse
    with the recompute (a coupling then runs a sub-network once instead of twice); otherwise
    the input is rebuilt by ``inverse`` under no_grad and the block's forward is rerun.
    ``replay`` restores the RNG state the block saw in the forward pass; the caller replays
    it before this call (for the inverse or ``reconstruct``), and it is replayed again here
    before the rerun of the forward.
    """
    reconstruct = getattr(block, "reconstruct", None)
    if reconstruct is not None:
        with torch.enable_grad():
            return reconstruct(h)
    with torch.no_grad():
        x_block, _ = block.inverse(h)
    x_block = x_block.detach().requires_grad_(True)
    replay()
    with torch.enable_grad():
        y_block, logdet_block = block(x_block)
    return [x_block], single_part, y_block, logdet_block


def _block_backward(
    block: nn.Module,
    block_params: list[nn.Parameter],
    rng_state: tuple[Tensor, Tensor | None] | None,
    h: Tensor,
    grad_y: Tensor,
    grad_logdet: Tensor,
    grads: dict[int, Tensor],
) -> tuple[Tensor, Tensor]:
    """The block's input rebuilt from its output ``h``, and the gradient at that input;
    the block's parameter gradients are accumulated into ``grads``."""
    if rng_state is None:
        parts, join, y_block, logdet_block = _rebuild(block, h, _no_replay)
    else:
        with torch.random.fork_rng(devices=_rng_devices(h)):

            def replay() -> None:
                set_rng_state(h, rng_state)

            replay()
            parts, join, y_block, logdet_block = _rebuild(block, h, replay)
    outputs, output_grads = [y_block], [grad_y]
    if logdet_block.requires_grad:
        outputs.append(logdet_block)
        output_grads.append(grad_logdet)
    with torch.enable_grad():
        root = _SeededRoot.apply(output_grads, *outputs)
        block_grads = torch.autograd.grad(root, (*parts, *block_params), allow_unused=True)
    n = len(parts)
    grad_x = join([g if g is not None else torch.zeros_like(p) for g, p in zip(block_grads[:n], parts)])
    for p, g in zip(block_params, block_grads[n:]):
        if g is not None:
            grads[id(p)] = grads[id(p)] + g if id(p) in grads else g
    return join([p.detach() for p in parts]), grad_x


def _no_replay() -> None:
    """The ``replay`` of a block that drew no random numbers."""


def run_invertible_backward(blocks: Sequence[nn.Module], x: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``blocks`` in order on ``x`` with memory-saving backward.

    Args:
        blocks: bijectors, each returning ``(y, logdet)``.
        x: the input, ``(B, ...)``.

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
    return _InvertibleBackward.apply(runs, params, x, *params)
