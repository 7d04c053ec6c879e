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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_RECOMPUTING = [0]


def is_recomputing() -> bool:
    """True while a memory-saving backward rebuilds or recomputes a block.

    Blocks with state updated in the forward pass (power-iteration vectors, data-dependent
    initialisation) read it so the update happens once per training step, never again
    during the backward reconstruction.
    """
    return _RECOMPUTING[0] > 0


@contextmanager
def recomputing() -> Iterator[None]:
    """Mark the enclosed code as a recompute: per-step state updates are skipped."""
    _RECOMPUTING[0] += 1
    try:
        yield
    finally:
        _RECOMPUTING[0] -= 1


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


class _InvertibleBackward(torch.autograd.Function):
    """Autograd node of a memory-saving segment: keeps its output, not its activations."""

    @staticmethod
    def forward(ctx, blocks: Sequence[nn.Module], params: list[Tensor], x: Tensor, *flat_params: Tensor):  # type: ignore[override]
        rng_states: list[tuple[Tensor, Tensor | None] | None] = []
        logdet = x.new_zeros(x.shape[0])
        with torch.no_grad():
            h = x
            for block in blocks:
                before = get_rng_state(h)
                h, block_logdet = block(h)
                # A block may build a graph internally (i-ResNet's log-det VJPs run under
                # enable_grad): detach, or the kept output would keep that graph alive.
                h, block_logdet = h.detach(), block_logdet.detach()
                logdet = logdet + block_logdet
                rng_states.append(before if _rng_changed(h, before) else None)
        ctx.blocks = blocks
        ctx.params = params
        ctx.rng_states = rng_states
        ctx.autocast = _autocast_state(x)
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
        device, autocast_enabled, autocast_dtype = ctx.autocast
        with recomputing(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast_enabled):
            grad_x = _walk_back(ctx, y.detach(), grad_y, grad_logdet, grads)
        return (None, None, grad_x, *(grads.get(id(p)) for p in ctx.params))


def _rebuild(
    block: nn.Module, h: Tensor, replay: Callable[[], None]
) -> tuple[list[Tensor], Callable[[list[Tensor]], Tensor], Tensor, Tensor]:
    """The block's input as grad-requiring parts, and its output and log-det recomputed on them.

    A block may provide ``reconstruct(y) -> (parts, join, y, logdet)`` that fuses its inverse
    with the recompute (a coupling then runs a sub-network once instead of twice); otherwise
    the input is rebuilt by ``inverse`` under no_grad and the block's forward is rerun.
    ``replay`` restores the RNG state the block saw in the forward pass, before each run.
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
    return [x_block], _single, y_block, logdet_block


def _single(parts: list[Tensor]) -> Tensor:
    return parts[0]


def _walk_back(ctx, h: Tensor, grad_y: Tensor, grad_logdet: Tensor, grads: dict[int, Tensor]) -> Tensor:
    for block, rng_state in zip(reversed(ctx.blocks), reversed(ctx.rng_states)):
        block_params = _trainable_parameters(block)
        with torch.random.fork_rng(devices=_rng_devices(h), enabled=rng_state is not None):

            def replay(state=rng_state, like=h) -> None:
                if state is not None:
                    set_rng_state(like, state)

            replay()
            parts, join, y_block, logdet_block = _rebuild(block, h, replay)
            with torch.enable_grad():
                pairs = [
                    (out, grad)
                    for out, grad in ((y_block, grad_y), (logdet_block, grad_logdet))
                    if out.requires_grad
                ]
                block_grads = torch.autograd.grad(
                    [out for out, _ in pairs],
                    (*parts, *block_params),
                    [grad for _, grad in pairs],
                    allow_unused=True,
                )
        n = len(parts)
        grad_y = join([g if g is not None else torch.zeros_like(p) for g, p in zip(block_grads[:n], parts)])
        for p, g in zip(block_params, block_grads[n:]):
            if g is not None:
                grads[id(p)] = grads[id(p)] + g if id(p) in grads else g
        h = join([p.detach() for p in parts])
    return grad_y


def run_invertible_backward(blocks: Sequence[nn.Module], x: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``blocks`` in order on ``x`` with memory-saving backward.

    Args:
        blocks: bijectors, each returning ``(y, logdet)``.
        x: the input, ``(B, ...)``.

    Returns:
        ``(y, logdet)`` as a plain loop would, but autograd keeps only ``y`` (plus, for
        blocks that drew random numbers, the RNG state they saw).
    """
    params: list[Tensor] = []
    seen: set[int] = set()
    for block in blocks:
        for p in _trainable_parameters(block):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return _InvertibleBackward.apply(blocks, params, x, *params)
