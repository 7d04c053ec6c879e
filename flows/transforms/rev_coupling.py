"""Two-stream reversible (RevNet) coupling with user-supplied coupling functions."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flows.transforms.base import Bijector, Reconstruction, check_real
from flows.transforms.rng import draw_seed, module_draws_random, substream

Merge = Callable[[Tensor, Tensor], Tensor]
Merges = Merge | tuple[Merge | None, Merge | None] | None


def _pair(value: Merges) -> tuple[Merge | None, Merge | None]:
    if value is None or callable(value):
        return value, value  # type: ignore[return-value]
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise TypeError("RevCoupling: a coupling function must be a callable, a pair or None")


def _first_layer(fn: object, ndim: int, dim: int) -> tuple[nn.Module, int] | None:
    """The layer ``fn`` applies first and the size it takes along ``dim`` of an ``ndim``-dim
    input, where that is knowable without running ``fn``: ``fn`` is (or a chain of
    ``nn.Sequential`` starts with) a ``Linear`` whose features, or a ``ConvNd`` whose
    channels, are ``dim``. Anything else (a custom module, a lazy layer) gives None."""
    while isinstance(fn, nn.Sequential) and len(fn):
        fn = fn[0]
    if isinstance(fn, nn.modules.lazy.LazyModuleMixin):
        return None
    if isinstance(fn, nn.Linear) and dim == ndim - 1:
        return fn, fn.in_features
    if isinstance(fn, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and ndim == len(fn.kernel_size) + 2 and dim == 1:
        return fn, fn.in_channels
    return None


# Probe points of the merge round trip: 0-d, so that merges broadcasting against tensors they
# captured still run; three, so that a wrong inverse cannot pass by coincidence at one point.
_PROBES = ((0.7, -1.3), (-2.1, 0.4), (1.6, 2.3))


def _check_inverts(merge: Merge, unmerge: Merge, half: int, where: str) -> None:
    """Refuse, with one line, a ``coupling_inverse`` that does not undo ``coupling_forward``
    (checked once, at construction: the inverse and memory-saving gradients would be wrong)."""
    for v, fx in _PROBES:
        stream, fn_out = torch.tensor(v, dtype=torch.float64), torch.tensor(fx, dtype=torch.float64)
        with torch.no_grad():
            back = torch.as_tensor(unmerge(merge(stream, fn_out), fn_out))
        # Loose tolerances: a merge may compute in a float32 tensor it captured; a wrong
        # inverse is off by order one.
        if not torch.isclose(back, stream.to(back.dtype), rtol=1e-4, atol=1e-4).all():
            error = (back - stream).abs().max().item()
            raise ValueError(
                f"{where}: coupling_inverse ({_name(unmerge)}) does not invert coupling_forward "
                f"({_name(merge)}) for half {half}: coupling_inverse(coupling_forward(v, fx), fx) is off by "
                f"{error:.3g} at v = {v}, fx = {fx}; pass as coupling_inverse(output, fx) the v that solves "
                "output = coupling_forward(v, fx)"
            )


def _name(fn: object) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class _Reuse(torch.autograd.Function):
    """``G(y1)`` already computed on a leaf ``y1``, attached to a recomputed ``y1'`` of equal value.

    Forward returns the stored output; backward pulls its gradient through the stored graph
    to ``y1`` (handed to ``y1'``) and to ``G``'s parameters, so ``G`` is not run again.
    """

    @staticmethod
    def forward(ctx, graph: tuple[Tensor, Tensor], y1_again: Tensor, *g_params: Tensor) -> Tensor:  # type: ignore[override]
        # ``graph`` is a tuple, so autograd does not treat the stored graph as an input.
        ctx.graph = graph
        ctx.g_params = g_params
        return graph[1].detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y1_leaf, g_out = ctx.graph
        grads = torch.autograd.grad(g_out, (y1_leaf, *ctx.g_params), grad, allow_unused=True)
        return (None, grads[0], *grads[1:])


class RevCoupling(Bijector):
    r"""Two-stream reversible coupling (RevNet): the input is split in halves ``x1, x2``.

    Forward, with the default coupling functions:

    .. math::
        y_1 = a\,x_1 + F(x_2), \qquad y_2 = b\,x_2 + G(y_1), \qquad y = [y_1, y_2].

    Inverse: :math:`x_2 = (y_2 - G(y_1)) / b`, then :math:`x_1 = (y_1 - F(x_2)) / a`.
    ``F`` and ``G`` are arbitrary (not necessarily invertible) functions mapping a half to
    a tensor of the same shape. The Jacobian is block triangular with diagonal blocks
    :math:`a I` and :math:`b I`, so with ``n`` elements per half and sample

    .. math::
        \log|\det J| = n\,(\log|a| + \log|b|)

    (and minus that for the inverse), a constant ``(batch,)`` tensor that carries no
    gradient.

    ``coupling_forward`` / ``coupling_inverse`` replace the merge ``a * x + f`` and its
    inverse ``(y - f) / a`` by user functions ``merge(stream, fn_out)`` and
    ``unmerge(output, fn_out)`` -- one callable for both halves, or a pair
    ``(for y1, for y2)`` where ``None`` keeps the default for that half. The merge must be
    elementwise affine in the stream with slope ``a`` (first half) and ``b`` (second half):
    ``a`` and ``b`` then enter only the log-det. Each custom pair is checked once, at
    construction, to invert each other (``unmerge(merge(v, f), f) = v`` at a few points).

    Blocks that draw random numbers (dropout in ``F`` or ``G``) run ``F`` and ``G`` on two
    RNG streams derived from one seed drawn from the global generator
    (:func:`flows.transforms.rng.substream`). The inverse
    evaluates ``G`` before ``F`` (the forward evaluates ``F`` first), so sharing one stream
    would hand ``G`` the dropout mask ``F`` saw; with the derived streams a replayed global
    RNG state (as memory-saving backward does) reproduces both masks exactly. Detection
    looks for dropout modules in training mode; set ``stochastic = True`` for functions
    drawing random numbers otherwise (e.g. ``torch.nn.functional.dropout`` in a lambda).

    Args:
        f: ``F``, maps ``x2`` to the shape of ``x1``; an ``nn.Module`` or a callable.
        g: ``G``, maps ``y1`` to the shape of ``x2``.
        a: slope of the first merge (finite, nonzero).
        b: slope of the second merge (finite, nonzero).
        coupling_forward: custom merge(s) ``(stream, fn_out) -> output``.
        coupling_inverse: their inverses ``(output, fn_out) -> stream``.
        split_dim: the dimension split in two equal halves, e.g. ``1`` for the channels of
            ``(B, C, H, W)``, ``-1`` for the features of ``(B, N, D)`` tokens. Not 0.

    References:
        The Reversible Residual Network: Backpropagation Without Storing Activations
        (Gomez et al., arXiv:1707.04585). Momentum Residual Neural Networks
        (Sander et al., arXiv:2102.07870).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> block = RevCoupling(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
        >>> x = torch.randn(3, 4, 5, 5)
        >>> y, logdet = block(x)
        >>> torch.allclose(block.inverse(y)[0], x, atol=1e-5), logdet.shape
        (True, torch.Size([3]))

        MomentumNet (``v' = gamma v + (1 - gamma) f(x)``, ``x' = x + v'``) is a coupling of
        the pair ``(v, x)`` with a custom first merge and ``G`` the identity:

        >>> gamma = 0.9
        >>> momentum = RevCoupling(
        ...     nn.Conv2d(2, 2, 3, padding=1), nn.Identity(), a=gamma,
        ...     coupling_forward=(lambda v, fx: gamma * v + (1 - gamma) * fx, None),
        ...     coupling_inverse=(lambda v_new, fx: (v_new - (1 - gamma) * fx) / gamma, None))
        >>> vx = torch.cat([torch.zeros(3, 2, 5, 5), torch.randn(3, 2, 5, 5)], dim=1)
        >>> torch.allclose(momentum.inverse(momentum(vx)[0])[0], vx, atol=1e-5)
        True
    """

    #: The layer errors name (a subclass built by another layer names that layer).
    _where = "RevCoupling"

    def __init__(
        self,
        f: Callable[[Tensor], Tensor],
        g: Callable[[Tensor], Tensor],
        a: float = 1.0,
        b: float = 1.0,
        coupling_forward: Merge | tuple[Merge | None, Merge | None] | None = None,
        coupling_inverse: Merge | tuple[Merge | None, Merge | None] | None = None,
        split_dim: int = 1,
    ) -> None:
        super().__init__()
        if not callable(f) or not callable(g):
            raise TypeError("RevCoupling: f and g must be callables (e.g. nn.Module)")
        self.f = f
        self.g = g
        self.a = check_real(a, "RevCoupling: a", nonzero=True)
        self.b = check_real(b, "RevCoupling: b", nonzero=True)
        self._merges = _pair(coupling_forward)
        self._unmerges = _pair(coupling_inverse)
        for half, (m, u) in enumerate(zip(self._merges, self._unmerges), start=1):
            if (m is None) != (u is None):
                raise ValueError(
                    f"RevCoupling: half {half} has a custom coupling_forward without "
                    "coupling_inverse (or the reverse); give both"
                )
            if m is not None:
                _check_inverts(m, u, half, self._where)  # type: ignore[arg-type]
        if split_dim == 0:
            raise ValueError("RevCoupling: split_dim 0 is the batch dimension")
        self.split_dim = split_dim
        self.stochastic: bool | None = None

    def _fn_name(self, half: int) -> str:
        """How errors name the function of ``half`` (0: ``F``, 1: ``G``)."""
        return "F" if half == 0 else "G"

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, split_dim={self.split_dim}"

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError(
                f"RevCoupling: expected a tensor of shape (B, ...) with at least 2 dims, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        if not -x.dim() <= self.split_dim < x.dim():
            raise ValueError(
                f"RevCoupling: split_dim {self.split_dim} is not a dimension of the input of shape "
                f"{tuple(x.shape)}; give one of 1..{x.dim() - 1} (or -1..-{x.dim() - 1})"
            )
        dim = self.split_dim % x.dim()
        if dim == 0:
            raise ValueError(f"RevCoupling: split_dim {self.split_dim} is the batch dimension")
        size = x.shape[dim]
        self._check_split_size(x, dim)
        if size % 2:
            raise ValueError(
                f"RevCoupling: split_dim {self.split_dim} has odd size {size} in input of "
                f"shape {tuple(x.shape)}; it must split into two equal halves"
            )
        x1, x2 = x.split(size // 2, dim=dim)
        return x1, x2

    def _check_split_size(self, x: Tensor, dim: int) -> None:
        """Refuse an input whose ``split_dim`` is not twice what ``F`` (or else ``G``) takes,
        where their first layer tells (:func:`_first_layer`); otherwise ``F`` raises itself."""
        for half, fn in enumerate((self.f, self.g)):
            found = _first_layer(fn, x.dim(), dim)
            if found is None:
                continue
            layer, takes = found
            if x.shape[dim] != 2 * takes:
                raise ValueError(
                    f"{self._where}: expected {2 * takes} along split_dim {self.split_dim} (two halves of the "
                    f"{takes} that the {type(layer).__name__} starting {self._fn_name(half)} takes), got "
                    f"{x.shape[dim]} in input of shape {tuple(x.shape)}"
                )
            return

    def _logdet(self, x: Tensor, sign: float) -> Tensor:
        per_half = x[0].numel() // 2 if x.shape[0] else 0
        value = sign * per_half * (math.log(abs(self.a)) + math.log(abs(self.b)))
        return x.new_full((x.shape[0],), value)

    @property
    def draws_random(self) -> bool:  # type: ignore[override]
        # F and G run on substreams of a seed drawn from the global RNG when stochastic:
        # the engine must snapshot that draw, whether F and G are modules or functions.
        return self._is_stochastic()

    def _is_stochastic(self) -> bool:
        if self.stochastic is not None:
            return self.stochastic and self.training
        return any(
            module_draws_random(m)
            for fn in (self.f, self.g)
            if isinstance(fn, nn.Module)
            for m in fn.modules()
        )

    def _merge(self, half: int, stream: Tensor, fn_out: Tensor) -> Tensor:
        merge = self._merges[half]
        if merge is None:
            scale = self.a if half == 0 else self.b
            return fn_out + stream if scale == 1.0 else fn_out + scale * stream
        return merge(stream, fn_out)

    def _unmerge(self, half: int, out: Tensor, fn_out: Tensor) -> Tensor:
        unmerge = self._unmerges[half]
        if unmerge is None:
            scale = self.a if half == 0 else self.b
            return out - fn_out if scale == 1.0 else (out - fn_out) / scale
        return unmerge(out, fn_out)

    def _streams(self, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """``F`` and ``G``, each on its own RNG stream when the block draws random numbers."""
        if not self._is_stochastic():
            return self.f, self.g
        # One draw from the global generator: replaying the global state replays both.
        seed = draw_seed()

        def on_stream(fn: Callable[[Tensor], Tensor], k: int) -> Callable[[Tensor], Tensor]:
            def run(h: Tensor) -> Tensor:
                with substream(seed, k, x.device):
                    return fn(h)

            return run

        return on_stream(self.f, 0), on_stream(self.g, 1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = self._split(x)
        f, g = self._streams(x)
        y1 = self._merge(0, x1, f(x2))
        y2 = self._merge(1, x2, g(y1))
        return torch.cat([y1, y2], dim=self.split_dim), self._logdet(x, 1.0)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y1, y2 = self._split(y)
        f, g = self._streams(y)
        x2 = self._unmerge(1, y2, g(y1))
        x1 = self._unmerge(0, y1, f(x2))
        return torch.cat([x1, x2], dim=self.split_dim), self._logdet(y, -1.0)

    def reconstruct(self, y: Tensor, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input from ``y`` and recompute the forward on it, each of ``F`` and
        ``G`` running once (the RevNet backward, Gomez et al. 2017).

        Used by memory-saving backward (under grad). ``G(y1)`` runs with grad on ``y1`` as a
        leaf and gives ``x2``; ``F(x2)`` runs with grad on ``x2`` as a leaf and gives ``x1``.
        The recomputed output reuses both results: ``y1' = merge(x1, F(x2))`` and
        ``y2' = merge(x2, G(y1))``, where ``G(y1)`` enters through :class:`_Reuse`, whose
        backward pulls the gradient through the stored ``G`` graph to ``y1'`` and to ``G``'s
        parameters. Returns ``([x1, x2], join, y', logdet)``.
        """
        y1, y2 = self._split(y.detach())
        f, g = self._streams(y)
        y1 = y1.requires_grad_(True)
        g_out = g(y1)
        x2 = self._unmerge(1, y2, g_out.detach()).requires_grad_(True)
        f_out = f(x2)
        x1 = self._unmerge(0, y1.detach(), f_out.detach()).requires_grad_(True)
        y1_again = self._merge(0, x1, f_out)
        if g_out.requires_grad:
            # Every trainable parameter of the block, not only those registered under G: a G
            # may use ones registered elsewhere (MEFT's variant 3 shares F's layer; a bound
            # method as G). Those G's graph does not reach get no gradient from it.
            g_params = [p for p in self.parameters() if p.requires_grad]
            g_again = _Reuse.apply((y1, g_out), y1_again, *g_params)
        else:  # G ignores its input and has nothing to train: a constant
            g_again = g_out
        y_again = torch.cat([y1_again, self._merge(1, x2, g_again)], dim=self.split_dim)
        return Reconstruction([x1, x2], self._join, y_again, self._logdet(y, 1.0))

    def _join(self, halves: list[Tensor]) -> Tensor:
        return torch.cat(halves, dim=self.split_dim)
