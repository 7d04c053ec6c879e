"""Spectral normalisation of dense and convolutional layers, i-ResNet style.

A normalised layer uses the weight

.. math::

    \\tilde W = W \\cdot \\min\\left(1, \\frac{c}{\\hat\\sigma(W)}\\right),

where ``c`` is the Lipschitz coefficient and :math:`\\hat\\sigma(W)` a power-iteration
estimate of the largest singular value of the layer's linear operator. For ``nn.Linear``
that operator is the matrix ``W``. For ``nn.Conv1d/2d/3d`` it is the convolution itself,
with the layer's padding, stride, dilation and groups, acting on inputs of the spatial
shape the layer is called with (learned on the first call). Its norm differs from the
norm of the reshaped kernel, which neither bounds nor is bounded by it tightly.

Power iteration keeps two unit vectors as buffers (``weight_u`` in the output space,
``weight_v`` in the input space), drawn from a private generator seeded once per layer at
construction (a layer's calls never draw from torch's global generator), and computes
:math:`\\hat\\sigma = u^\\top W v`, which is differentiable in ``W`` (``u`` and ``v``
are constants). Power iteration approaches the top singular value from below, so the
bound :math:`\\|\\tilde W\\|_2 \\le c` holds up to the estimate's accuracy;
:func:`converge_spectral_norm` runs it to convergence.

The vectors are updated on every call of the layer in training mode: exactly
``n_power_iterations`` steps by default, or, with ``tol``, at least that many and then
until a step moves them by at most ``tol`` (capped by ``max_power_iterations``). A fixed
step count lags behind a fast optimiser: the estimate's gradient only sees the tracked
singular pair, so training grows the other singular values past it. Measured on a small
i-ResNet after 40 Adam steps at lr 1e-2, one step per call let the true per-layer norm
reach 1.34-1.41 c; ``tol=1e-3`` held it to 1.026 c (about 40 steps per call at that
rate). The estimate converges to the weights of the current call; an optimiser step
after it moves the weights again, so before sampling or evaluating in eval mode after
training run one training-mode forward pass or :func:`converge_spectral_norm`.

The vectors never advance where :func:`flows.transforms.switches.updates_frozen` is True
(per thread): during a memory-saving recompute, so that it uses the very weights its
forward used, and inside :func:`~flows.transforms.switches.frozen_updates`, which an
iterative inverse uses to iterate with fixed weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.transforms.rng import draw_seed
from flows.transforms.switches import updates_frozen

_CONV_DIMS = ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3))
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _normalize(t: Tensor, eps: float) -> Tensor:
    return t / t.norm().clamp_min(eps)


class SpectralNorm:
    """The hook object that normalises one layer's ``weight``; see :func:`spectral_norm`.

    Kept as a plain picklable object registered as the layer's forward pre-hook, forward
    hook and state-dict pre-hook, so normalised nets survive ``deepcopy`` and ``torch.save``.
    """

    def __init__(
        self,
        module: nn.Module,
        lipschitz: float,
        n_power_iterations: int,
        init_iterations: int,
        eps: float,
        tol: float | None = None,
        max_power_iterations: int | None = None,
        seed: int = 0,
    ) -> None:
        self.lipschitz = float(lipschitz)
        self.n_power_iterations = int(n_power_iterations)
        self.eps = float(eps)
        self.init_iterations = int(init_iterations)
        self.tol = None if tol is None else float(tol)
        self.max_power_iterations = (
            self.n_power_iterations if max_power_iterations is None else int(max_power_iterations)
        )
        self.seed = int(seed)
        self.conv_dims = next(
            (d for cls, d in _CONV_DIMS if isinstance(module, cls)),
            0,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Hooks pickled before the tolerance and the private seed existed.
        state.setdefault("tol", None)
        state.setdefault("max_power_iterations", state["n_power_iterations"])
        state.setdefault("seed", 0)
        self.__dict__.update(state)

    # -- the linear operator and its adjoint ------------------------------------------

    def _apply_op(self, module: nn.Module, weight: Tensor, v: Tensor) -> Tensor:
        if self.conv_dims == 0:
            return weight @ v
        return module._conv_forward(v, weight, None)

    def _apply_adjoint(self, module: nn.Module, weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
        if self.conv_dims == 0:
            return weight.t() @ u
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            # conv_transpose is the exact adjoint of a zero-padded conv once output_padding
            # restores the input size lost to the stride's floor division.
            output_padding = tuple(
                n_in - ((n_out - 1) * s - 2 * p + d * (k - 1) + 1)
                for n_in, n_out, s, p, d, k in zip(
                    v.shape[2:],
                    u.shape[2:],
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.kernel_size,
                )
            )
            return _CONV_TRANSPOSE[self.conv_dims](
                u,
                weight,
                None,
                module.stride,
                module.padding,
                output_padding,
                module.groups,
                module.dilation,
            )
        # Reflect/replicate/circular or string padding: the adjoint of the (linear) conv
        # map is its vector-Jacobian product, the same at every point.
        with torch.enable_grad():
            point = torch.zeros_like(v, requires_grad=True)
            out = module._conv_forward(point, weight, None)
            return torch.autograd.grad(out, point, u)[0]

    # -- state ------------------------------------------------------------------------

    def ready(self, module: nn.Module) -> bool:
        """True once the power-iteration vectors exist (convs: after the first call)."""
        return module.weight_v.numel() > 0

    def init_vectors(self, module: nn.Module, spatial: tuple[int, ...]) -> None:
        """Draw fresh unit vectors; for a conv, on inputs of spatial shape ``spatial``.

        The draw comes from a private CPU generator seeded with the layer's ``seed``, never
        from torch's global one: a conv draws on its first call, inside a block whose RNG
        state a memory-saving backward replays, and a draw from the global stream there
        would shift the block's Hutchinson probes and roulette draws between the forward
        pass and the recompute. Drawn in float64 on the CPU, so a layer starts from the
        same vector in every dtype and on every device.
        """
        w = module.weight_orig.detach()
        shape = (w.shape[1],) if self.conv_dims == 0 else (1, module.in_channels, *spatial)
        generator = torch.Generator().manual_seed(self.seed)
        v = torch.randn(shape, generator=generator, dtype=torch.float64)
        v = _normalize(v.to(device=w.device, dtype=w.dtype), self.eps)
        u = _normalize(self._apply_op(module, w, v), self.eps)
        module.weight_v = v
        module.weight_u = u

    @torch.no_grad()
    def power_iteration(
        self, module: nn.Module, n: int, tol: float = 0.0, min_steps: int = 1
    ) -> int:
        """Run up to ``n`` power-iteration steps in place. Returns the number of steps run.

        With ``tol > 0``, stop after at least ``min_steps`` steps once a step moves both
        unit vectors by at most ``tol`` (``||u' - u|| <= tol`` and ``||v' - v|| <= tol``),
        as Residual Flows does. Unlike the change of the estimate, which is second order in
        the missing component, the vectors' change is first order in it: near a saddle (the
        tracked singular pair overtaken by another, as training makes them cross) the
        estimate barely moves while the vectors turn. One host synchronisation per step.
        """
        w = module.weight_orig.detach()
        u, v = module.weight_u, module.weight_v
        for step in range(1, n + 1):
            v_new = _normalize(self._apply_adjoint(module, w, u, v), self.eps)
            u_new = _normalize(self._apply_op(module, w, v_new), self.eps)
            moved = torch.maximum((u_new - u).norm(), (v_new - v).norm()) if tol > 0 else None
            u.copy_(u_new)
            v.copy_(v_new)
            if moved is not None and step >= min_steps and bool(moved <= tol):
                return step
        return n

    def update(self, module: nn.Module) -> int:
        """The per-call training update: ``n_power_iterations`` steps, then (with a
        tolerance) more until converged to ``tol``, at most ``max_power_iterations``."""
        if self.tol is None:
            return self.power_iteration(module, self.n_power_iterations)
        return self.power_iteration(
            module, self.max_power_iterations, tol=self.tol, min_steps=self.n_power_iterations
        )

    def sigma(self, module: nn.Module, weight: Tensor) -> Tensor:
        """The estimate ``u^T A(W) v``, differentiable in ``weight``. Under grad on copies of the
        vectors: the graph keeps them for backward, and a second call before that backward
        (gradient accumulation, a block used twice) advances the buffers in place. Without grad
        nothing is kept (the fixed-point inverse calls this once per iteration)."""
        u, v = module.weight_u, module.weight_v
        if torch.is_grad_enabled():
            u, v = u.clone(), v.clone()
        return (u * self._apply_op(module, weight, v)).sum()

    def compute_weight(self, module: nn.Module) -> Tensor:
        weight = module.weight_orig
        if not self.ready(module):
            return weight
        sigma = self.sigma(module, weight).clamp_min(self.eps)
        return weight * (self.lipschitz / sigma).clamp(max=1.0)

    # -- hooks ------------------------------------------------------------------------

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: learn the input shape, update the vectors, set ``weight``."""
        if self.conv_dims:
            x = args[0]
            batched = x.dim() == self.conv_dims + 2
            spatial = tuple(x.shape[2:] if batched else x.shape[1:])
            if not self.ready(module) or tuple(module.weight_v.shape[2:]) != spatial:
                # First call (or a new input size): the operator changed, so start afresh
                # and converge, as a data-dependent initialisation would.
                self.init_vectors(module, spatial)
                self.power_iteration(module, self.init_iterations, tol=_INIT_TOL)
        if module.training and not updates_frozen():
            self.update(module)
        module.weight = self.compute_weight(module)

    def after_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook: drop the weight's graph once the layer has used it.

        Keeps the module free of graph references between calls (no memory held across
        training steps, and ``copy.deepcopy`` works at any time).
        """
        module.weight = module.weight.detach()

    def load_pre_hook(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """State-dict pre-hook: size the vectors like the incoming ones (conv shapes are
        learned on the first call, so a fresh layer's buffers may be empty)."""
        for name in ("weight_u", "weight_v"):
            incoming = state_dict.get(prefix + name)
            current = getattr(module, name)
            if incoming is not None and incoming.shape != current.shape:
                setattr(module, name, current.new_empty(incoming.shape))

    def load_post_hook(self, module: nn.Module, incompatible_keys: Any) -> None:
        with torch.no_grad():
            module.weight = self.compute_weight(module).detach()


# How far a step may move the power-iteration vectors when initial power iteration stops early.
_INIT_TOL = 1e-7


def is_spectral_normalized(module: nn.Module) -> bool:
    """True when :func:`spectral_norm` was applied to ``module``."""
    return any(isinstance(h, SpectralNorm) for h in module._forward_pre_hooks.values())


def _hook(module: nn.Module) -> SpectralNorm:
    for h in module._forward_pre_hooks.values():
        if isinstance(h, SpectralNorm):
            return h
    raise ValueError(f"spectral_norm: {type(module).__name__} is not spectrally normalised")


def spectral_norm(
    module: nn.Module,
    lipschitz: float = 0.9,
    n_power_iterations: int = 1,
    init_iterations: int = 200,
    eps: float = 1e-12,
    tol: float | None = None,
    max_power_iterations: int = 50,
) -> nn.Module:
    """Spectrally normalise one ``nn.Linear`` or ``nn.Conv1d/2d/3d`` layer in place.

    The layer's ``weight`` parameter becomes ``weight_orig``; ``weight`` is recomputed on
    every call as :math:`W \\min(1, c / \\hat\\sigma)` (see the module docstring).

    Args:
        module: the layer.
        lipschitz: the coefficient ``c > 0`` bounding the layer's operator norm.
        n_power_iterations: power-iteration steps per call in training mode (the minimum
            when ``tol`` is set).
        init_iterations: power-iteration steps (stopping early on convergence) run now for
            a dense layer, and for a conv on its first call, once its input shape is known
            (and again whenever that shape changes).
        eps: floor of norms, against division by zero.
        tol: ``None``: exactly ``n_power_iterations`` steps per training call, an estimate
            that may lag behind a fast-moving optimiser. A float: keep iterating on each
            training call (at least ``n_power_iterations`` steps) until a step moves both
            unit vectors by at most ``tol`` (see :meth:`SpectralNorm.power_iteration`), so
            the estimate tracks the weights.
        max_power_iterations: cap on steps per training call when ``tol`` is set.

    Returns:
        The same module, normalised.

    Example:
        >>> import torch
        >>> layer = spectral_norm(torch.nn.Linear(4, 4), lipschitz=0.5)
        >>> converge_spectral_norm(layer)
        >>> bool(torch.linalg.matrix_norm(layer.weight, ord=2) <= 0.5 + 1e-4)
        True
    """
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(
            f"spectral_norm: expected nn.Linear or nn.Conv1d/2d/3d, got {type(module).__name__}"
        )
    if not (isinstance(lipschitz, (int, float)) and lipschitz > 0 and math.isfinite(lipschitz)):
        raise ValueError(f"spectral_norm: lipschitz must be a positive number, got {lipschitz!r}")
    if int(n_power_iterations) < 1:
        raise ValueError(
            f"spectral_norm: n_power_iterations must be >= 1, got {n_power_iterations}"
        )
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"spectral_norm: tol must be None or in (0, 1), got {tol!r}")
    if int(max_power_iterations) < int(n_power_iterations):
        raise ValueError(
            f"spectral_norm: max_power_iterations ({max_power_iterations}) must be >= "
            f"n_power_iterations ({n_power_iterations})"
        )
    if is_spectral_normalized(module):
        raise ValueError(f"spectral_norm: this {type(module).__name__} is already normalised")
    # The seed of the layer's private generator for its power-iteration start vectors,
    # drawn now (construction already consumes the global stream for the weights), so
    # torch.manual_seed makes the vectors reproducible while no later call of the layer
    # ever draws from the global stream.
    seed = draw_seed()
    hook = SpectralNorm(
        module,
        lipschitz,
        n_power_iterations,
        init_iterations,
        eps,
        tol=tol,
        max_power_iterations=max_power_iterations,
        seed=seed,
    )
    weight = module.weight
    del module._parameters["weight"]
    module.register_parameter("weight_orig", nn.Parameter(weight.data))
    empty = weight.new_empty(0)
    module.register_buffer("weight_u", empty)
    module.register_buffer("weight_v", empty.clone())
    if hook.conv_dims == 0:
        hook.init_vectors(module, ())
        hook.power_iteration(module, hook.init_iterations, tol=_INIT_TOL)
    with torch.no_grad():
        module.weight = hook.compute_weight(module).detach()
    module.register_forward_pre_hook(hook)
    module.register_forward_hook(hook.after_forward)
    module.register_load_state_dict_pre_hook(hook.load_pre_hook)
    module.register_load_state_dict_post_hook(hook.load_post_hook)
    return module


def spectral_norm_layers(net: nn.Module) -> list[nn.Module]:
    """The spectrally normalised layers of ``net`` (``net`` included), in module order."""
    return [m for m in net.modules() if is_spectral_normalized(m)]


def apply_spectral_norm(net: nn.Module, lipschitz: float = 0.9, **kwargs: Any) -> nn.Module:
    """Spectrally normalise every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` in ``net`` in place.

    Args:
        net: the network (it may itself be a single layer).
        lipschitz: coefficient of every layer (``Lip(net) <= lipschitz ** depth`` when its
            other layers are 1-Lipschitz).
        **kwargs: passed to :func:`spectral_norm`.

    Returns:
        ``net``.
    """
    for m in list(net.modules()):
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spectral_norm(m, lipschitz, **kwargs)
    return net


def converge_spectral_norm(net: nn.Module, max_iter: int = 2000, tol: float = 1e-9) -> None:
    """Run power iteration to convergence on every normalised layer of ``net``.

    Use it after initialisation, after loading foreign weights, or in tests, so the
    estimate (a lower bound) is tight. Conv layers must have been called once (their
    input shape is learned from the first call).

    Args:
        net: a network with normalised layers (or one normalised layer).
        max_iter: cap on steps per layer.
        tol: stop when a step moves both power-iteration vectors by at most this (norm of the change).

    Raises:
        ValueError: when a conv layer has not seen an input yet.
    """
    for m in spectral_norm_layers(net):
        hook = _hook(m)
        if not hook.ready(m):
            raise ValueError(
                f"converge_spectral_norm: {type(m).__name__} has not been called yet; its "
                "input shape (needed for the conv operator) is learned from the first call"
            )
        hook.power_iteration(m, max_iter, tol=tol)
        with torch.no_grad():
            m.weight = hook.compute_weight(m).detach()


def spectral_norm_estimate(module: nn.Module) -> Tensor:
    """The current power-iteration estimate of the un-normalised operator norm of a layer."""
    hook = _hook(module)
    if not hook.ready(module):
        raise ValueError("spectral_norm_estimate: the conv layer has not been called yet")
    with torch.no_grad():
        return hook.sigma(module, module.weight_orig)
