"""Invertible residual blocks (i-ResNet) with power-series or Russian-roulette log-dets."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.transforms.base import Bijector, check_context
from flows.transforms.spectral_norm import apply_spectral_norm, spectral_norm_layers
from flows.transforms.switches import frozen_updates, logdet_wanted

__all__ = ["LipSwish", "ResidualBlock"]

_LOGDET_MODES = ("series", "exact", "unbiased")
_PROBES = ("rademacher", "gaussian")
_ACTIVATIONS = ("lipswish", "elu")


class LipSwish(nn.Module):
    """The 1-Lipschitz Swish activation of Residual Flows.

    .. math::

        \\mathrm{LipSwish}(x) = \\frac{x \\, \\sigma(\\beta x)}{1.1}, \\qquad
        \\beta = \\mathrm{softplus}(\\rho) > 0 \\text{ learnable (initially 1)}.

    With ``t = beta x`` the derivative is ``(sigma(t) + t sigma(t)(1 - sigma(t))) / 1.1``,
    a function of ``t`` alone whose absolute value never exceeds ``1.0998 / 1.1 < 1``, so
    the activation is 1-Lipschitz for every ``beta``.

    References:
        Chen et al., "Residual Flows for Invertible Generative Modeling", arXiv:1906.02735.

    Example:
        >>> import torch
        >>> LipSwish()(torch.zeros(3))
        tensor([0., 0., 0.], grad_fn=<DivBackward0>)
    """

    def __init__(self) -> None:
        super().__init__()
        # softplus(rho) = 1 at rho = log(e - 1).
        self.rho = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.rho)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta * x) / 1.1


def _activation(name: str) -> nn.Module:
    if name == "lipswish":
        return LipSwish()
    if name == "elu":
        return nn.ELU()
    raise ValueError(f"ResidualBlock: activation must be one of {_ACTIVATIONS}, got {name!r}")


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two ``(B, ...)`` tensors."""
    return (a * b).flatten(1).sum(1)


class ResidualBlock(Bijector):
    """Invertible residual block ``y = x + g(x)`` with ``Lip(g) < 1`` (i-ResNet).

    Every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` of ``net`` is spectrally normalised in place
    (:mod:`flows.transforms.spectral_norm`) with coefficient ``lipschitz``, so with
    1-Lipschitz activations (:class:`LipSwish`, ELU, ReLU) ``Lip(g) <= lipschitz ** L``
    for ``L`` layers in sequence.

    .. math::

        y = x + g(x), \\qquad
        \\log|\\det J_f(x)| = \\log\\det(I + J_g(x))
        = \\sum_{k=1}^{\\infty} \\frac{(-1)^{k+1}}{k} \\operatorname{tr}(J_g(x)^k).

    The series converges because ``||J_g|| < 1`` (and ``det(I + J_g) > 0``). Inverse by the
    fixed-point iteration ``x_{k+1} = y - g(x_k)``, a contraction with rate ``Lip(g)``, from
    ``x_0 = y``; inverse log-det ``-log det(I + J_g(x))`` at the reconstructed ``x``,
    computed with the same estimator.

    Log-det modes (``J = J_g(x)``, ``v`` a Hutchinson probe with ``E[v v^T] = I``):

    * ``"exact"``: ``slogdet(I + J)`` of the autograd Jacobian per sample (``D`` vector-
      Jacobian products for ``D`` elements per sample). No bias, no variance; for small
      inputs and tests. Differentiable (the VJPs use ``create_graph`` under grad).
    * ``"series"`` (i-ResNet): ``sum_{k<=n} (-1)^{k+1} v^T J^k v / k`` with ``n = n_terms``,
      averaged over ``n_probes`` probes. Each probe term is unbiased for its trace, but the
      truncation biases the estimate by the tail, ``|bias| <= sum_{k>n} D Lip(g)^k / k
      <= D Lip(g)^{n+1} / ((n+1)(1 - Lip(g)))``, which is large for ``Lip(g)`` near 1 and
      few terms. The variance, ``O(||J||_F^2 / n_probes)`` from the first term, is smaller
      for Rademacher than Gaussian probes (no diagonal contribution).
    * ``"unbiased"`` (Residual Flows): Russian-roulette truncation. The first
      ``n_exact_terms`` terms are always computed; then ``N ~ Geometric(roulette_p)``
      further terms, each term ``k`` weighted by ``1 / P(N >= k - n_exact_terms)``. Unbiased
      for any ``Lip(g) < 1``; the variance is finite when ``Lip(g)^2 < 1 - roulette_p``
      (sufficient condition), hence the default ``roulette_p = min(0.5,
      (1 - lipschitz^2) / 2)``; the expected number of terms is ``n_exact_terms +
      (1 - p) / p``. Also differentiable: the gradient of the estimate is unbiased for the
      gradient of the log-det.

    Probes come from torch's global RNG on the input's device, so a memory-saving
    :class:`~flows.transforms.Chain` replays them exactly (spectral norm never draws from
    it: its power-iteration vectors come from a private generator per layer).
    Power-iteration vectors are updated on every forward call in training mode, by
    default until they move by at most ``power_iteration_tol`` per step, so the bound
    tracks the optimiser (one step per call let per-layer norms reach 1.3-1.4 ``c`` after
    40 Adam steps at lr 1e-2; the default held them within 3%, see
    :mod:`flows.transforms.spectral_norm`). They are never updated by the inverse (it uses
    the weights of the last forward, so the round trip is exact in training mode too) nor
    during a memory-saving recompute.

    The inverse carries no autograd graph (it is the sampling direction); gradients flow
    through ``forward``. ``g`` must act on samples independently (no batch statistics).

    Args:
        net: the residual function ``g``, mapping ``(B, ...)`` to the same shape, e.g.
            ``(B, D)`` or ``(B, C, H, W)``. Normalised in place.
        lipschitz: spectral-norm coefficient of each layer, in ``(0, 1)``.
        logdet: ``"series"``, ``"exact"`` or ``"unbiased"``.
        n_terms: number of series terms (``"series"``).
        n_probes: Hutchinson probes per sample (``"series"``, ``"unbiased"``).
        probe: ``"rademacher"`` or ``"gaussian"``.
        n_exact_terms: terms always computed by ``"unbiased"``.
        roulette_p: success probability of the geometric roulette (``"unbiased"``);
            ``None`` picks the finite-variance default above.
        inverse_tol: the fixed point stops when ``max|x_{k+1} - x_k| <= inverse_tol *
            max(1, max|y|)`` (a mixed absolute/relative test). ``None`` picks a tolerance
            reachable in the input's dtype: ``1e-6`` for float32 and lower precisions (a
            reconstruction error below ``1e-6 * Lip / (1 - Lip)``, under ``1e-5`` at
            ``lipschitz = 0.9``), ``1e-12`` for float64.
        max_iter: cap on fixed-point iterations.
        on_no_convergence: ``"warn"`` (RuntimeWarning) or ``"raise"`` (RuntimeError) when
            the cap is reached; the message reports the residual ``max|x + g(x) - y|``, a
            bound on the error ``max|x - x*|`` from the observed contraction rate, and the
            last step.
        n_power_iterations: power-iteration steps per training call of each layer (the
            minimum when ``power_iteration_tol`` is set).
        power_iteration_tol: keep iterating on each training call until a step moves the
            power-iteration vectors by at most this (unit vectors, so a relative change);
            ``None``: exactly ``n_power_iterations`` steps, cheaper but the bound then lags
            behind the optimiser. The fixed-point inverse relies on the bound, hence the
            default. Applies to layers this block normalises (a ``net`` normalised
            beforehand keeps its own settings).
        max_power_iterations: cap on power-iteration steps per training call.
        context_features: size ``C`` of a context vector ``(B, C)`` the block is
            conditioned on (``None``: unconditional; a context passed is ignored). The
            context shifts the input of ``g``: ``y = x + g(x + s(c))`` with ``s`` a learned
            (zero-initialised) linear map broadcast over spatial axes, so ``Lip`` in ``x``
            stays below 1 for every context and the inverse and log-det are those of a
            fixed ``c``.

    References:
        Behrmann et al., "Invertible Residual Networks", arXiv:1811.00995.
        Chen et al., "Residual Flows for Invertible Generative Modeling", arXiv:1906.02735.

    Example:
        >>> import torch
        >>> block = ResidualBlock.mlp(2, 16, logdet="exact").double().eval()
        >>> x = torch.randn(5, 2, dtype=torch.float64)
        >>> y, logdet = block(x)
        >>> x_rec, inv_logdet = block.inverse(y)
        >>> bool(torch.allclose(x_rec, x, atol=1e-5)), bool(torch.allclose(inv_logdet, -logdet))
        (True, True)
    """

    exact_inverse = False

    def __init__(
        self,
        net: nn.Module,
        lipschitz: float = 0.9,
        logdet: str = "series",
        n_terms: int = 5,
        n_probes: int = 1,
        probe: str = "rademacher",
        n_exact_terms: int = 2,
        roulette_p: float | None = None,
        inverse_tol: float | None = None,
        max_iter: int = 200,
        on_no_convergence: str = "warn",
        n_power_iterations: int = 1,
        power_iteration_tol: float | None = 1e-3,
        max_power_iterations: int = 50,
        context_features: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"ResidualBlock: net must be an nn.Module, got {type(net).__name__}")
        if not (isinstance(lipschitz, (int, float)) and 0 < lipschitz < 1):
            raise ValueError(f"ResidualBlock: lipschitz must be in (0, 1), got {lipschitz!r}")
        if logdet not in _LOGDET_MODES:
            raise ValueError(
                f"ResidualBlock: logdet must be one of {_LOGDET_MODES}, got {logdet!r}"
            )
        if probe not in _PROBES:
            raise ValueError(f"ResidualBlock: probe must be one of {_PROBES}, got {probe!r}")
        if on_no_convergence not in ("warn", "raise"):
            raise ValueError(
                "ResidualBlock: on_no_convergence must be 'warn' or 'raise', "
                f"got {on_no_convergence!r}"
            )
        for name, value in (
            ("n_terms", n_terms),
            ("n_probes", n_probes),
            ("max_iter", max_iter),
            ("n_power_iterations", n_power_iterations),
            ("max_power_iterations", max_power_iterations),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ResidualBlock: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(n_exact_terms, int) or n_exact_terms < 0:
            raise ValueError(
                f"ResidualBlock: n_exact_terms must be an integer >= 0, got {n_exact_terms!r}"
            )
        if roulette_p is None:
            roulette_p = min(0.5, (1.0 - lipschitz**2) / 2.0)
        if not 0 < roulette_p < 1:
            raise ValueError(f"ResidualBlock: roulette_p must be in (0, 1), got {roulette_p!r}")
        if power_iteration_tol is not None and not (
            isinstance(power_iteration_tol, (int, float)) and 0 < power_iteration_tol < 1
        ):
            raise ValueError(
                "ResidualBlock: power_iteration_tol must be None or in (0, 1), "
                f"got {power_iteration_tol!r}"
            )
        if max_power_iterations < n_power_iterations:
            raise ValueError(
                f"ResidualBlock: max_power_iterations ({max_power_iterations}) must be >= "
                f"n_power_iterations ({n_power_iterations})"
            )
        if inverse_tol is not None and not inverse_tol > 0:
            raise ValueError(f"ResidualBlock: inverse_tol must be positive, got {inverse_tol!r}")
        for m in net.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvTransposeNd)):
                raise TypeError(
                    f"ResidualBlock: net contains {type(m).__name__}, whose Lipschitz constant "
                    "is not controlled (and BatchNorm breaks memory-saving recompute)"
                )
        if not spectral_norm_layers(net):
            apply_spectral_norm(
                net,
                lipschitz,
                n_power_iterations=n_power_iterations,
                tol=power_iteration_tol,
                max_power_iterations=max_power_iterations,
            )
        if not spectral_norm_layers(net):
            raise ValueError(
                "ResidualBlock: net has no nn.Linear/nn.Conv1d/2d/3d layer to normalise, so "
                "Lip(g) < 1 cannot be enforced"
            )
        self.net = net
        self.context_shift: nn.Linear | None = None
        if context_features is not None:
            first = next(m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)))
            width = first.in_features if isinstance(first, nn.Linear) else first.in_channels
            self.context_shift = nn.Linear(context_features, width)
            nn.init.zeros_(self.context_shift.weight)
            nn.init.zeros_(self.context_shift.bias)
        self.lipschitz = float(lipschitz)
        self.logdet_mode = logdet
        self.n_terms = n_terms
        self.n_probes = n_probes
        self.probe = probe
        self.n_exact_terms = n_exact_terms
        self.roulette_p = float(roulette_p)
        self.inverse_tol = None if inverse_tol is None else float(inverse_tol)
        self.max_iter = max_iter
        self.on_no_convergence = on_no_convergence

    @property
    def exact_logdet(self) -> bool:  # type: ignore[override]
        return self.logdet_mode == "exact"

    @property
    def draws_random(self) -> bool:  # type: ignore[override]
        """The stochastic estimators draw Hutchinson probes (and the roulette's length)
        from the global RNG; the exact log-det draws nothing itself."""
        return not self.exact_logdet or super().draws_random

    def set_logdet(self, mode: str, n_terms: int | None = None, n_probes: int | None = None) -> None:
        """Switch the log-det estimator, e.g. to ``"exact"`` for evaluation.

        Args:
            mode: ``"series"``, ``"exact"`` or ``"unbiased"``.
            n_terms: new number of series terms (``None`` keeps it).
            n_probes: new number of Hutchinson probes (``None`` keeps it).
        """
        if mode not in _LOGDET_MODES:
            raise ValueError(f"ResidualBlock: logdet must be one of {_LOGDET_MODES}, got {mode!r}")
        for name, value in (("n_terms", n_terms), ("n_probes", n_probes)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ResidualBlock: {name} must be an integer >= 1, got {value!r}")
        self.logdet_mode = mode
        self.n_terms = self.n_terms if n_terms is None else n_terms
        self.n_probes = self.n_probes if n_probes is None else n_probes

    # -- convenience constructors -------------------------------------------------------

    @classmethod
    def mlp(
        cls,
        features: int,
        hidden: int,
        n_hidden_layers: int = 2,
        activation: str = "lipswish",
        **kwargs: object,
    ) -> ResidualBlock:
        """A block on ``(B, features)`` with ``g`` an MLP.

        ``g = Linear -> act -> (Linear -> act) * (n_hidden_layers - 1) -> Linear``.

        Args:
            features: ``D``.
            hidden: hidden width.
            n_hidden_layers: number of hidden layers (>= 1).
            activation: ``"lipswish"`` or ``"elu"``.
            **kwargs: passed to :class:`ResidualBlock`.
        """
        if n_hidden_layers < 1:
            raise ValueError(
                f"ResidualBlock.mlp: n_hidden_layers must be >= 1, got {n_hidden_layers}"
            )
        layers: list[nn.Module] = [nn.Linear(features, hidden), _activation(activation)]
        for _ in range(n_hidden_layers - 1):
            layers += [nn.Linear(hidden, hidden), _activation(activation)]
        layers.append(nn.Linear(hidden, features))
        return cls(nn.Sequential(*layers), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def conv(
        cls,
        channels: int,
        hidden: int,
        kernel_size: int = 3,
        activation: str = "lipswish",
        **kwargs: object,
    ) -> ResidualBlock:
        """A block on ``(B, channels, H, W)`` with the i-ResNet ``g``.

        ``g = k x k conv -> act -> 1x1 conv -> act -> k x k conv`` ("same" zero padding).

        Args:
            channels: ``C``.
            hidden: hidden channels.
            kernel_size: odd size of the outer convolutions.
            activation: ``"lipswish"`` or ``"elu"``.
            **kwargs: passed to :class:`ResidualBlock`.
        """
        if kernel_size % 2 != 1:
            raise ValueError(f"ResidualBlock.conv: kernel_size must be odd, got {kernel_size}")
        pad = kernel_size // 2
        net = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size, padding=pad),
            _activation(activation),
            nn.Conv2d(hidden, hidden, 1),
            _activation(activation),
            nn.Conv2d(hidden, channels, kernel_size, padding=pad),
        )
        return cls(net, **kwargs)  # type: ignore[arg-type]

    # -- bijector -----------------------------------------------------------------------

    def _check(self, x: Tensor, what: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"ResidualBlock: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"ResidualBlock: expected a batched {what} of shape (B, ...), "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"ResidualBlock: expected a floating-point tensor, got {x.dtype}")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "ResidualBlock: the log-det needs autograd (vector-Jacobian products), which "
                "torch.inference_mode() disables; use torch.no_grad() instead"
            )

    def _shift(self, x: Tensor, context: Tensor | None) -> Tensor | None:
        """The context's shift ``s(c)`` of ``g``'s input, broadcast over ``x``'s spatial
        axes (``None`` for an unconditional block); computed once per call, not per
        evaluation of ``g`` (the fixed-point inverse evaluates it many times)."""
        if self.context_shift is None:
            return None
        check_context(context, x, "ResidualBlock", self.context_shift.in_features)
        shift = self.context_shift(context.to(x.dtype))
        return shift.view(*shift.shape, *(1,) * (x.dim() - 2))

    def _g(self, x: Tensor, shift: Tensor | None) -> Tensor:
        gx = self.net(x if shift is None else x + shift)
        if not isinstance(gx, Tensor) or gx.shape != x.shape:
            got = tuple(gx.shape) if isinstance(gx, Tensor) else type(gx).__name__
            raise ValueError(
                f"ResidualBlock: net must map its input to the same shape; input "
                f"{tuple(x.shape)} gave {got}"
            )
        return gx

    def _forward_with_logdet(self, x: Tensor, shift: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x + g(x), log det(I + J_g(x)))``, with a graph only when grad is enabled;
        a zero log-det without any vector-Jacobian product inside :func:`skipping_logdet`."""
        if not logdet_wanted():
            return x + self._g(x, shift), x.new_zeros(x.shape[0])
        grad_mode = torch.is_grad_enabled()
        with torch.enable_grad():
            # The log-det needs VJPs w.r.t. the input even under no_grad (inverse,
            # memory-saving forward); then the graph is local and dropped on return.
            x_in = x if (grad_mode and x.requires_grad) else x.detach().requires_grad_(True)
            gx = self._g(x_in, shift)
            logdet = self._logdet(gx, x_in, create_graph=grad_mode)
            y = x + gx
        if not grad_mode:
            y, logdet = y.detach(), logdet.detach()
        return y, logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``y = x + g(x)`` and ``log|det(I + J_g(x))|`` of shape ``(B,)``."""
        self._check(x, "input")
        return self._forward_with_logdet(x, self._shift(x, context))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Fixed-point inverse ``x <- y - g(x)`` and ``-log|det(I + J_g(x))|``.

        Raises:
            RuntimeError: when the iteration does not converge within ``max_iter`` and
                ``on_no_convergence == "raise"``.
        """
        self._check(y, "input")
        with torch.no_grad():
            y = y.detach()
            # The inverse uses the weights of the last forward pass: it never advances the
            # power iteration, so inverse(forward(x)) == x in training mode too.
            tol = self._inverse_tol(y.dtype) * max(1.0, y.abs().max().item())
            step = previous = math.inf
            shift = self._shift(y, context)
            with frozen_updates():
                x = y - self._g(y, shift)
                for _ in range(self.max_iter):
                    x_new = y - self._g(x, shift)
                    previous, step = step, (x_new - x).abs().max().item()
                    x = x_new
                    if step <= tol:
                        break
                else:
                    # One more g call, only on this path: the residual of the equation.
                    residual = (x + self._g(x, shift) - y).abs().max().item()
                    self._not_converged(step, previous, residual, tol)
                _, logdet = self._forward_with_logdet(x, shift)
        return x, -logdet

    def _inverse_tol(self, dtype: torch.dtype) -> float:
        if self.inverse_tol is not None:
            return self.inverse_tol
        return 1e-12 if dtype == torch.float64 else 1e-6

    def _not_converged(self, step: float, previous: float, residual: float, tol: float) -> None:
        # The last step is not the error: for a contraction of rate q the distance to the
        # fixed point is at most step * q / (1 - q) (Banach's a-posteriori bound, tight when
        # the iterates approach monotonically), with q read from the last two steps. Lip(g)
        # near 1 makes it far larger than the step; q >= 1 means no contraction at all.
        if not (previous > 0 and math.isfinite(previous)):
            estimate = "error max|x - x*| unknown (one step, no contraction rate yet)"
        elif step / previous < 1:
            rate = step / previous
            estimate = (
                f"error max|x - x*| <= {step * rate / (1 - rate):.3e} at the observed "
                f"contraction rate {rate:.4f}"
            )
        else:
            estimate = (
                "the iteration is not contracting "
                f"(last step / previous step = {step / previous:.3g})"
            )
        message = (
            f"ResidualBlock.inverse: fixed-point iteration did not converge in {self.max_iter} "
            f"iterations: residual max|x + g(x) - y| = {residual:.3e}; {estimate}; "
            f"last step max|x_k - x_(k-1)| = {step:.3e} > inverse_tol * max(1, max|y|) = "
            f"{tol:.3e} (lipschitz {self.lipschitz}); raise max_iter, "
            "loosen inverse_tol or lower lipschitz"
        )
        if self.on_no_convergence == "raise":
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # -- log-det estimators ---------------------------------------------------------------

    def _logdet(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        def vjp(w: Tensor) -> Tensor:
            # w^T J_g, through the graph of gx (kept for the next term and for backward).
            return torch.autograd.grad(gx, x, w, create_graph=create_graph, retain_graph=True)[0]

        if self.logdet_mode == "exact":
            return self._exact(gx, x, vjp, create_graph)
        if self.logdet_mode == "series":
            weights = [1.0] * self.n_terms
        else:
            # N ~ Geometric(p) on {0, 1, ...}: P(N >= m) = (1 - p)^m. Drawn from the global
            # RNG (as a uniform on the input's device) so memory-saving replay reproduces it.
            p = self.roulette_p
            u = torch.rand((), device=x.device, dtype=torch.float64).item()
            n_extra = math.floor(math.log1p(-u) / math.log1p(-p))
            weights = [1.0] * self.n_exact_terms + [(1.0 - p) ** -m for m in range(1, n_extra + 1)]
        total = x.new_zeros(x.shape[0])
        for _ in range(self.n_probes):
            v = self._draw_probe(x)
            w = v
            for k, weight in enumerate(weights, start=1):
                w = vjp(w)
                sign = 1.0 if k % 2 == 1 else -1.0
                total = total + (sign * weight / k) * _inner(w, v)
        return total / self.n_probes

    def _draw_probe(self, x: Tensor) -> Tensor:
        if self.probe == "gaussian":
            return torch.randn(x.shape, device=x.device, dtype=x.dtype)
        return torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1

    def _exact(
        self, gx: Tensor, x: Tensor, vjp: Callable[[Tensor], Tensor], create_graph: bool
    ) -> Tensor:
        batch, dim = x.shape[0], x[0].numel()
        eye = torch.eye(dim, device=x.device, dtype=x.dtype)
        # Row i of every sample's Jacobian comes from one VJP with e_i in every sample
        # (samples are independent); all D rows at once through a vmapped backward.
        basis = eye.reshape(dim, 1, *x.shape[1:]).expand(dim, *x.shape)
        try:
            (rows,) = torch.autograd.grad(
                gx, x, basis, create_graph=create_graph, retain_graph=True, is_grads_batched=True
            )
        except RuntimeError:
            # An op of the user's net without a batching rule: one VJP per row.
            rows = torch.stack([vjp(e) for e in basis])
        jac = rows.reshape(dim, batch, dim).transpose(0, 1)
        return torch.linalg.slogdet(eye + jac).logabsdet

    def extra_repr(self) -> str:
        return (
            f"lipschitz={self.lipschitz}, logdet={self.logdet_mode!r}, n_terms={self.n_terms}, "
            f"n_probes={self.n_probes}, inverse_tol={self.inverse_tol}, max_iter={self.max_iter}"
        )
