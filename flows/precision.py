"""Mixed precision for flows: low-precision networks, a float32 invertible path.

``--precision fp32 | bf16 | fp16`` means:

* ``fp32``: everything in float32 (nothing changes).
* ``bf16`` / ``fp16``: the *networks* inside bijectors (a coupling's conditioner, a
  context projection, RevNet's ``F`` and ``G``) run under :func:`torch.autocast` in that
  dtype, and their outputs are cast back to the model's dtype before the bijector uses
  them. Everything the bijector computes itself stays in float32: the affine map and its
  inverse, ActNorm, the 1x1 convolution with its weight, inverse and log-determinant, the
  log-det sums and the base density.
* ``fp16`` needs CUDA and a loss scaler (:func:`grad_scaler`): float16's range is too
  small for unscaled gradients. On the CPU use ``bf16``.

Why not autocast the whole loss: autocast runs every convolution in the low dtype,
including the 1x1 convolution of Glow, and a coupling's ``log_scale = tanh(a)`` then
stays in bfloat16, so each coupling's log-det is a bfloat16 sum (8 bits of mantissa). The
gradient of a 1x1 convolution's ``log_s`` (and of ActNorm's log-scale) is a difference of
two nearly equal terms, ``H W`` from the log-det and the data term through the
convolution, which cancel at a well-fitted model: a relative error of ``2**-8`` in the
data term is then amplified into a large one of the difference (25 % of the gradient's
norm at ``3x32x32`` in issue 20's measurement). With the invertible path in float32 only
the networks' rounding remains (``docs/speed.md`` has the measured agreement).

Blocks whose inverse iterates (``exact_inverse = False``, i-ResNet's fixed point) keep
their networks in float32: a fixed-point iteration on a bfloat16-rounded map stalls at the
rounding error, far above float32's tolerance.

What a training loop calls, per the ``flows train`` wiring::

    scaler = grad_scaler(precision, device)           # once, beside the optimizer
    with mixed_precision(model, precision):           # around the training loop
        loss = -model.log_prob(x).mean()
        scaler.scale(loss).backward()                 # a no-op scale unless fp16
        scaler.step(optimizer)
        scaler.update()
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flows.transforms.base import Bijector
from flows.transforms.switches import frozen_updates

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``None`` for fp32).

    Raises:
        ValueError: an unknown precision, or fp16 off CUDA.

    Example:
        >>> autocast_dtype("bf16", "cpu")
        torch.bfloat16
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision != "fp32" and device.type == "cuda" and not torch.cuda.is_available():
        # torch's autocast would only warn and run in float32.
        raise ValueError(f"precision {precision}: device {device} is not available here (no CUDA); use the cpu")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision fp16 needs a CUDA device (float16 training needs loss scaling and CUDA "
            f"kernels); on {device.type} use bf16"
        )
    return _DTYPES.get(precision)


def networks(model: nn.Module) -> list[nn.Module]:
    """The networks :func:`mixed_precision` runs in low precision: each child module with
    parameters of a bijector with an exact inverse that is not a bijector itself.

    Example:
        >>> from flows.transforms import ActNorm, AffineCoupling, Chain, channel_mask
        >>> chain = Chain(ActNorm(4), AffineCoupling(channel_mask(4, 0), hidden_channels=8))
        >>> [type(net).__name__ for net in networks(chain)]
        ['Sequential']
    """
    found: dict[int, nn.Module] = {}
    for block in model.modules():
        if not isinstance(block, Bijector) or not block.exact_inverse:
            continue
        for child in block.children():
            has_params = next(child.parameters(), None) is not None
            if not isinstance(child, Bijector) and has_params and not _holds_bijector(child):
                found.setdefault(id(child), child)
    return list(found.values())


def _holds_bijector(module: nn.Module) -> bool:
    """A container of bijectors (a chain's ``ModuleList``) is no network; a network may use
    a bijector as a layer deeper down (a conditioner's hidden ActNorm)."""
    return any(isinstance(m, Bijector) for m in module.children())


@contextmanager
def mixed_precision(model: nn.Module, precision: str, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Run ``model``'s :func:`networks` under autocast in ``precision`` for the body.

    Each network's call is wrapped by forward hooks: autocast on entry, off on exit (also
    when it raises), its floating outputs cast back to the dtype of its first floating
    input. The hooks are removed on exit; the model's parameters, ``state_dict`` and the
    ambient autocast state are untouched. Memory-saving backward's rebuild runs the same
    hooks: on a bit-exact rebuilt input it recomputes exactly what the forward pass
    computed; an input rebuilt with float32 rounding can flip a bfloat16 rounding of a
    network's output, so the gradients then agree to about 1e-4 to 1e-3 of the largest one.

    Args:
        model: the model (a :class:`~flows.models.Flow` or any module holding bijectors).
        precision: ``"fp32"`` (nothing happens), ``"bf16"`` or ``"fp16"`` (CUDA only).
        device: the device the model runs on (default: that of its first parameter).

    Yields:
        ``model`` itself.

    Example:
        >>> import torch
        >>> from flows.models import Glow
        >>> model = Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4)
        >>> with mixed_precision(model, "bf16"):
        ...     model.log_prob(torch.rand(2, 1, 4, 4)).dtype
        torch.float32
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        yield model
        return
    # nn.Module.compile() stores the compiled call there: a graph traced before these hooks
    # existed keeps running without them (Dynamo does not guard on submodules' hooks).
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        raise ValueError(
            f"mixed_precision: the model has compiled regions (flows.compile_regions), whose graphs would keep "
            f"the precision they were traced in; run {precision} on a model that is not compiled, or compile in fp32"
        )
    handles = []
    for net in networks(model):
        pre, post = _autocast_hooks(device.type, dtype)
        handles.append(net.register_forward_pre_hook(pre))
        handles.append(net.register_forward_hook(post, always_call=True))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _autocast_hooks(device_type: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """A pre-hook entering autocast and a post-hook leaving it and casting the output back.

    The entered contexts and input dtypes sit on a per-thread stack: a network may be
    called on the autograd thread (a memory-saving rebuild on CUDA) while another call is
    running on the training thread.
    """
    local = threading.local()

    def stack() -> list[tuple[torch.autocast, torch.dtype | None]]:
        if not hasattr(local, "stack"):
            local.stack = []
        return local.stack

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        context = torch.autocast(device_type, dtype=dtype)
        context.__enter__()
        floating = next((a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
        stack().append((context, floating))

    def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        context, floating = stack().pop()
        context.__exit__(None, None, None)
        if floating is None:
            return output
        return _cast(output, floating)

    return pre, post


def _cast(output: Any, dtype: torch.dtype) -> Any:
    if isinstance(output, Tensor):
        return output.to(dtype) if output.is_floating_point() else output
    if isinstance(output, (tuple, list)):
        return type(output)(_cast(o, dtype) for o in output)
    return output


@dataclass
class Agreement:
    """How far low-precision gradients are from float32 ones (all parameters flattened).

    Attributes:
        relative_error: ``||g_low - g_32|| / ||g_32||``.
        cosine: ``<g_low, g_32> / (||g_low|| ||g_32||)``.
        worst: the parameter whose own relative error is the largest.
    """

    relative_error: float
    cosine: float
    worst: str


def gradient_agreement(model: nn.Module, x: Tensor, precision: str, whole_loss: bool = False) -> Agreement:
    """Gradients of ``-log_prob(x).mean()`` under ``precision`` against float32 ones.

    Both passes run on deep copies of ``model`` from the same random state, with per-step
    state frozen (:func:`~flows.transforms.switches.frozen_updates`), so they differ by
    the arithmetic only. ``whole_loss=True`` autocasts the whole loss instead of the
    networks alone (the scheme this module avoids; for comparison).

    Args:
        model: an initialised :class:`~flows.models.Flow` in float32.
        x: a batch on the model's device.
        precision: ``"bf16"`` or ``"fp16"`` (``"fp32"`` agrees exactly).
        whole_loss: autocast the whole loss.

    Returns:
        The :class:`Agreement`.
    """
    device = x.device
    dtype = autocast_dtype(precision, device)
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def gradients(low: bool) -> list[Tensor]:
        copy_ = copy.deepcopy(model)
        params = [p for p in copy_.parameters() if p.requires_grad]
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            stack.enter_context(frozen_updates())
            if low and whole_loss:
                stack.enter_context(torch.autocast(device.type, dtype=dtype, enabled=dtype is not None))
            elif low:
                stack.enter_context(mixed_precision(copy_, precision, device))
            loss = -copy_.log_prob(x).mean()
            grads = torch.autograd.grad(loss.float(), params, allow_unused=True)
        return [torch.zeros_like(p, dtype=torch.float64) if g is None else g.double() for p, g in zip(params, grads)]

    reference, low = gradients(False), gradients(True)
    ref_flat, low_flat = torch.cat([g.flatten() for g in reference]), torch.cat([g.flatten() for g in low])
    per_tensor = [((b - a).norm() / a.norm().clamp_min(1e-30)).item() for a, b in zip(reference, low)]
    norm = ref_flat.norm().clamp_min(1e-30)
    return Agreement(
        relative_error=((low_flat - ref_flat).norm() / norm).item(),
        cosine=torch.nn.functional.cosine_similarity(low_flat, ref_flat, dim=0).item(),
        worst=names[max(range(len(names)), key=per_tensor.__getitem__)] if names else "",
    )


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """The loss scaler for ``precision`` on ``device``: active for fp16, a pass-through
    (``enabled=False``: ``scale`` returns the loss, ``step`` calls the optimizer) otherwise.

    Raises:
        ValueError: as :func:`autocast_dtype`.

    Example:
        >>> grad_scaler("bf16", "cpu").is_enabled()
        False
    """
    autocast_dtype(precision, device)
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
