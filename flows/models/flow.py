"""A normalizing flow: a bijector onto a base distribution."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from flows.distributions.mixture import GaussianMixture
from flows.memory import module_device
from flows.transforms.base import Bijector, check_finite, check_flag, check_like_module
from flows.transforms.chain import Chain
from flows.transforms.rng import get_rng_state, set_rng_state

Temperature = float | Tensor | Sequence[float]
"""A sampling temperature: a real number (Python, NumPy or a 0-d tensor), or one per latent level."""


class Flow(nn.Module):
    """Density model ``p(x) = p_Z(f(x)) |det df/dx|`` for a bijector ``f`` and a base ``p_Z``.

    - ``log_prob(x) = log p_Z(z) + log|det J_f(x)|`` with ``z, logdet = f(x)``.
    - ``bits_per_dim(x)`` for data dequantized from ``n_levels`` grey levels and scaled
      to ``[0, 1]``: ``(-log_prob(x) + D log(n_levels)) / (D log 2)``. The term
      ``D log(n_levels)`` converts the density on ``[0, 1]^D`` into one on the integer
      grid, as RealNVP and Glow report; any preprocessing (``Logit``) is part of ``f``
      and so its log-det is included.
    - ``sample(n, temperature)``; ``sample_and_log_prob`` adds the samples' log-density
      from the same inverse pass (for variational inference); ``encode`` (``x -> z`` flat
      ``(B, D)``), ``decode`` and ``interpolate`` in latent space.
    - Conditional: every method takes ``context`` (``p(x | c) = p_Z(f(x; c) | c)
      |det df/dx|``). ``embedding`` (a :class:`~flows.models.context.ClassEmbedding` for
      ``num_classes=K``, or any network, e.g. a small CNN over an observation) maps the
      context given to the vector ``e(c)`` the bijector and the base see, and trains with
      the flow; without one the context goes to them as is. ``model(x, context)`` is
      ``log_prob``, so ``DistributedDataParallel`` and ``torch.compile`` can wrap a model.

    Inputs are validated as ``torch.distributions`` does with ``validate_args``: on by
    default, off with ``validate_args=False`` (per model, or for all on the class). The
    checks read only shapes, dtypes and devices, plus the finiteness of CPU inputs and
    float contexts: on an accelerator that would cost a device synchronisation per call,
    and under ``torch.compile`` a graph break, so there a non-finite input shows as a
    non-finite log-density instead (which :func:`flows.train` reports).

    Args:
        bijector: data -> latent transform.
        base: distribution with ``log_prob(z)`` and ``sample(n, temperature)`` over the
            bijector's output shape.
        input_shape: event shape of ``x``, e.g. ``(C, H, W)``.
        n_levels: number of discrete levels of the data (256 for 8-bit images, 17 for
            scikit-learn's digits); used only by ``bits_per_dim``.
        validate_args: check inputs (``None``: the class default :attr:`validate_args`).
        conditional: whether the model needs a context (``None``: when it has an
            ``embedding``).
        embedding: maps the context to the bijector's and base's context vectors.

    Example:
        >>> import torch
        >>> from flows.distributions import StandardNormal
        >>> from flows.transforms import ActNorm
        >>> flow = Flow(ActNorm(2), StandardNormal(2), input_shape=(2,))
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    validate_args: bool = True
    """Class default of input validation; an instance attribute overrides it."""

    def __init__(
        self,
        bijector: Bijector,
        base: nn.Module,
        input_shape: Sequence[int],
        n_levels: int = 256,
        validate_args: bool | None = None,
        conditional: bool | None = None,
        embedding: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.bijector = bijector
        self.base = base
        self.embedding = embedding
        self.conditional = embedding is not None if conditional is None else bool(conditional)
        self.input_shape = tuple(input_shape)
        if isinstance(n_levels, bool) or not isinstance(n_levels, numbers.Integral) or n_levels < 2:
            raise ValueError(
                "Flow: n_levels must be an integer >= 2 (the data's grey levels: 256 for 8-bit images), "
                f"got {n_levels!r}"
            )
        self.n_levels = n_levels
        if validate_args is not None:
            self.validate_args = validate_args

    @property
    def dim(self) -> int:
        """Number of elements of one sample."""
        return math.prod(self.input_shape)

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Per-level shapes of the flat latent, in order (one entry for single-scale flows)."""
        return list(getattr(self.bijector, "latent_shapes", [(self.dim,)]))

    @property
    def memory_saving(self) -> bool:
        """Whether training uses memory-saving backward (every chain inside switches)."""
        return any(m.memory_saving for m in self.modules() if isinstance(m, Chain))

    @memory_saving.setter
    def memory_saving(self, enabled: bool) -> None:
        enabled = check_flag(enabled, "Flow.memory_saving")
        chains = [m for m in self.modules() if isinstance(m, Chain)]
        if enabled and not chains:
            raise ValueError("Flow: this model's bijector contains no Chain to run memory-saving")
        for chain in chains:
            chain.memory_saving = enabled

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """:meth:`log_prob`: a module call, so wrappers (DDP, ``torch.compile``) see it."""
        return self.log_prob(x, context)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Natural-log density of each sample, ``(B,)`` (given ``context``, ``(B, ...)``)."""
        self._check_input(x)
        c = self._embed(context, x.shape[0], "Flow.log_prob")
        z, logdet = self.bijector(x, c)
        return self._base_log_prob(z, c) + logdet

    def bits_per_dim(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Bits per dimension of each sample, ``(B,)``, for data dequantized to ``[0, 1]``."""
        nll = -self.log_prob(x, context) + self.dim * math.log(self.n_levels)
        return nll / (self.dim * math.log(2))

    def encode(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Latent code ``z = f(x)``, flattened to ``(B, D)``."""
        self._check_input(x)
        return self.bijector(x, self._embed(context, x.shape[0], "Flow.encode"))[0].flatten(1)

    def decode(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Data ``x = f^{-1}(z)`` from a flat ``(B, D)`` (or base-shaped) latent."""
        if not torch.is_tensor(z) or z.dim() < 2 or math.prod(z.shape[1:]) != self.dim:
            shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(f"Flow.decode: expected latents of shape (B, {self.dim}), got {shape}")
        if self.validate_args:
            check_like_module(z, self, "Flow.decode")
            check_finite(z, "Flow.decode", "latent")
        c = self._embed(context, z.shape[0], "Flow.decode")
        z = z.reshape(z.shape[0], *self.base.shape)
        return self.bijector.inverse(z, c)[0]

    def sample(
        self, n: int, context: Tensor | None = None, temperature: Temperature = 1.0
    ) -> Tensor:
        """Draw ``n`` samples; ``temperature`` scales the base's noise, per level if a list.

        A conditional model draws one sample per row of ``context`` (``n`` rows).

        Args:
            n: number of samples (rows of ``context`` for a conditional model).
            context: ``(n, ...)`` for a conditional model, else ``None``.
            temperature: a real number (a Python or NumPy scalar, or a 0-d tensor), or a
                list (or 1-d tensor) of one per entry of :attr:`latent_shapes` (Glow's
                per-level temperature), from the first factored-out level to the last.
                Temperatures are finite and ``>= 0`` (0 gives the base's mode).

        Returns:
            Samples ``(n, *input_shape)``.
        """
        c, scale = self._sampling_inputs(n, context, temperature, "Flow.sample")
        return self.bijector.inverse(self._draw(n, scale, c), c)[0]

    def sample_and_log_prob(
        self, n: int, context: Tensor | None = None, temperature: Temperature = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples and their log-density in one pass through the inverse.

        ``z ~ p_Z``, ``x, logdet = f^{-1}(z)`` and ``log q(x) = log p_Z(z) - logdet``: the
        inverse's log-det is ``log|det J_{f^{-1}}(z)| = -log|det J_f(x)|``, so this is
        :meth:`log_prob`'s ``log p_Z(f(x)) + log|det J_f(x)|`` without a forward pass.
        Both outputs are reparametrised (differentiable in the parameters through
        ``z = mu + sigma eps``), which variational inference needs
        (:mod:`flows.variational`); with ``memory_saving`` on, the inverse pass keeps only
        its output (:class:`~flows.transforms.Chain`). An i-ResNet's fixed-point inverse
        has no graph: its values are right, its gradients are missing.

        With ``temperature`` ``T != 1`` (a number or one per level, as in :meth:`sample`)
        the density returned is that of the tempered base, ``z ~ N(mu, T^2 sigma^2)``:
        ``log p_{Z,T}(z) = log p_Z(mu + (z - mu) / T) - sum log T``, evaluated at the
        untempered draw with the same noise. That is the density of the samples returned,
        not the model's density (:meth:`log_prob`) at them. A mixture base has no such
        form (the component drawn is not known from the sample) and ``T = 0`` is a point
        mass: both are refused.

        Args:
            n: number of samples (rows of ``context`` for a conditional model).
            context: ``(n, ...)`` for a conditional model, else ``None``.
            temperature: the base's noise scale, a number or one per latent level.

        Returns:
            ``(x, log_q)``: samples ``(n, *input_shape)`` and their log-density ``(n,)``.

        Example:
            >>> import torch
            >>> from flows.models import RealNVP
            >>> flow = RealNVP((2,), levels=1, steps=2, hidden_channels=8).eval()  # no ActNorm init
            >>> x, log_q = flow.sample_and_log_prob(4)
            >>> torch.allclose(log_q, flow.log_prob(x), atol=1e-5)
            True
        """
        where = "Flow.sample_and_log_prob"
        c, scale = self._sampling_inputs(n, context, temperature, where)
        tempered = isinstance(scale, Tensor) or scale != 1.0
        if tempered:
            if isinstance(self.base, GaussianMixture):
                raise ValueError(f"{where}: a mixture base has no tempered density; use temperature=1.0")
            if (torch.as_tensor(scale) == 0).any():
                raise ValueError(f"{where}: temperature 0 is a point mass with no density; use a temperature > 0")
            anchor = torch.empty(0, device=module_device(self))
            state = get_rng_state(anchor)
            z_unit = self._draw(n, 1.0, c)
            set_rng_state(anchor, state)  # the same noise again, scaled by the temperature
        z = self._draw(n, scale, c)
        x, logdet = self.bijector.inverse(z, c)
        log_base = self._base_log_prob(z_unit if tempered else z, c)
        if tempered:
            log_base = log_base - torch.log(torch.as_tensor(scale, dtype=z.dtype, device=z.device)).expand(
                self.base.shape
            ).sum()
        return x, log_base - logdet

    def _sampling_inputs(
        self, n: int, context: Tensor | None, temperature: Temperature, where: str
    ) -> tuple[Tensor | None, Tensor | float]:
        """Validate the arguments of a sampling method: the embedded context and the
        base's noise scale (a number, or a tensor of the base's shape for per-level ones)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{where}: n must be a positive integer, got {n!r}")
        if isinstance(context, numbers.Number):
            raise TypeError(
                f"{where}: context must be a tensor or None, got {context!r}; "
                "pass the temperature by name (temperature=...)"
            )
        c = self._embed(context, n, where)
        scale = self._temperature_vector(self._checked_temperature(temperature, where))
        if isinstance(scale, Tensor):
            scale = scale.view(self.base.shape)
        return c, scale

    def _checked_temperature(self, temperature: Temperature, where: str) -> float | list[float]:
        """``temperature`` as one float, or a list of one per latent level; each finite, ``>= 0``."""
        value = _real(temperature)
        listed = isinstance(temperature, (Sequence, Tensor, np.ndarray)) and not isinstance(temperature, str)
        values = [value] if value is not None else [_real(t) for t in temperature] if listed else [None]
        levels = len(self.latent_shapes)
        if None in values:
            got = repr(temperature) if listed else type(temperature).__name__
            raise TypeError(
                f"{where}: temperature must be a real number or a list of {levels} (one per latent level), got {got}"
            )
        if not all(math.isfinite(t) and t >= 0 for t in values):
            raise ValueError(f"{where}: temperature must be a finite number >= 0, got {temperature!r}")
        if value is None and len(values) != levels:
            raise ValueError(f"{where}: got {len(values)} temperatures for {levels} latent levels")
        return values if value is None else value

    def _draw(self, n: int, scale: Tensor | float, c: Tensor | None) -> Tensor:
        return self.base.sample(n, scale) if c is None else self.base.sample(n, scale, c)

    def _base_log_prob(self, z: Tensor, c: Tensor | None) -> Tensor:
        # An unconditional model calls the base without a context: a user's base may not take one.
        return self.base.log_prob(z) if c is None else self.base.log_prob(z, c)

    def interpolate(self, x0: Tensor, x1: Tensor, steps: int = 8, context: Tensor | None = None) -> Tensor:
        """Decode ``(1 - t) f(x0) + t f(x1)`` for ``steps`` values of ``t`` in ``[0, 1]``.

        ``x0`` and ``x1`` are batches of the same shape ``(B, *input_shape)``; the result
        has shape ``(steps, B, *input_shape)``.
        """
        if not (torch.is_tensor(x0) and torch.is_tensor(x1)):
            got = f"{type(x0).__name__} and {type(x1).__name__}"
            raise TypeError(f"Flow.interpolate: x0 and x1 must be tensors, got {got}")
        if x0.shape != x1.shape:
            raise ValueError(f"Flow.interpolate: x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)} differ")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
            raise ValueError(f"Flow.interpolate: steps must be an integer >= 2, got {steps!r}")
        z0, z1 = self.encode(x0, context), self.encode(x1, context)
        t = torch.linspace(0, 1, steps, device=z0.device, dtype=z0.dtype).view(-1, 1, 1)
        z = (1 - t) * z0 + t * z1
        repeated = None if context is None else context.repeat(steps, *(1,) * (context.dim() - 1))
        return self.decode(z.flatten(0, 1), repeated).view(steps, *x0.shape)

    def _embed(self, context: Tensor | None, batch: int, where: str) -> Tensor | None:
        """The context vectors the bijector and base see (``None`` for an unconditional model)."""
        if not self.conditional:
            return None
        if context is None:
            raise ValueError(f"{where}: this model is conditional; pass context= (one row per example)")
        if not torch.is_tensor(context) or context.dim() == 0 or context.shape[0] != batch:
            shape = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
            raise ValueError(f"{where}: expected a context with one row per example ({batch}), got {shape}")
        if self.validate_args and context.is_floating_point():
            check_finite(context, where, "context")
        return context if self.embedding is None else self.embedding(context)

    def _temperature_vector(self, temperature: float | Sequence[float]) -> Tensor | float:
        """The base's noise scale for a checked temperature: a float, or per level a ``(D,)`` tensor."""
        if isinstance(temperature, (int, float)):
            return float(temperature)
        reference = next(self.parameters(), None)
        z = torch.zeros(()) if reference is None else reference.detach()
        sizes = [math.prod(s) for s in self.latent_shapes]
        parts = [torch.full((s,), float(t), device=z.device, dtype=z.dtype) for s, t in zip(sizes, temperature)]
        return torch.cat(parts)

    def _check_input(self, x: Tensor) -> None:
        if not self.validate_args:
            return
        if not torch.is_tensor(x):
            raise TypeError(f"Flow: expected a tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            raise ValueError(
                f"Flow: expected input of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"Flow: expected floating-point data, got dtype {x.dtype}")
        check_like_module(x, self, "Flow")
        check_finite(x, "Flow", "input")


def _real(value: object) -> float | None:
    """``value`` as a float if it is one real number (Python, NumPy, or a 0-d tensor or array)."""
    if isinstance(value, (Tensor, np.ndarray, np.generic)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def check_sizes(
    builder: str,
    input_shape: Sequence[int],
    vector_only: bool = False,
    splits_features: bool = True,
    switches: Mapping[str, object] | None = None,
    choices: Mapping[str, tuple[object, Sequence[object]]] | None = None,
    **sizes: int,
) -> tuple[int, ...]:
    """Validate a builder's arguments: a shape of positive ints and ``sizes`` each ``>= 1``;
    with ``splits_features`` (couplings, autoregressive flows) a vector shape ``(D,)`` needs
    ``D >= 2``; with ``vector_only`` the shape must be ``(D,)``; each of ``switches`` a
    bool; each ``name: (value, allowed)`` of ``choices`` one of ``allowed``.

    Returns:
        ``input_shape`` as a tuple.

    Raises:
        ValueError: naming the builder, the argument and its value (TypeError for a switch
            that is not a bool).
    """

    def positive(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1

    for name, value in (switches or {}).items():
        check_flag(value, f"{builder}: {name}")
    for name, (value, allowed) in (choices or {}).items():
        if value not in allowed:
            raise ValueError(f"{builder}: {name} must be one of {tuple(allowed)}, got {value!r}")
    if not isinstance(input_shape, Sequence) and not torch.is_tensor(input_shape):
        raise ValueError(f"{builder}: input_shape must be a tuple such as (C, H, W) or (D,), got {input_shape!r}")
    shape = tuple(input_shape)
    if not shape or not all(positive(s) for s in shape):
        raise ValueError(f"{builder}: input_shape must be (C, H, W) or (D,) of positive integers, got {shape}")
    if (vector_only and len(shape) != 1) or (splits_features and len(shape) == 1 and shape[0] < 2):
        raise ValueError(f"{builder}: input_shape must be (D,) with D >= 2 features (it splits them), got {shape}")
    for name, value in sizes.items():
        if not positive(value):
            raise ValueError(f"{builder}: {name} must be an integer >= 1, got {value!r}")
    return shape
