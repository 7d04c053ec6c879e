r"""Variational inference with a flow: fit ``q`` to an unnormalised target ``p*``.

The flow draws reparametrised samples and their log-density in one inverse pass
(:meth:`flows.models.Flow.sample_and_log_prob`); with ``w = p*(x) / q(x)`` the
log-weights are ``log w = log p*(x) - log q(x)`` and ``p = p* / Z``. Objectives (each a
loss to minimise, estimated on a batch of ``B`` samples):

- ``"reverse-kl"``: ``E_q[log q - log p*] = KL(q || p) - log Z`` (mode-seeking).
- ``"iw"``: minus the importance-weighted bound ``E[log (1/K) sum_k w_k] <= log Z`` over
  groups of ``K`` samples (Burda et al., arXiv:1509.00519): tighter than the ELBO, and
  pulls ``q`` to cover more of ``p``. As a training signal for ``q`` it weakens as ``K``
  grows (the reparametrised gradient's signal-to-noise ratio falls like ``1/sqrt(K)``,
  Rainforth et al., arXiv:1802.04537), hence the small default ``K = 4``.
- ``"renyi"``: minus the variational Renyi bound of order ``alpha``,
  ``1/(1 - alpha) log (1/K) sum_k w_k^{1 - alpha}`` (Li & Turner, arXiv:1602.02311):
  ``alpha -> 1`` is the ELBO, ``alpha = 0`` the importance-weighted bound.

Gradient estimators (``VIConfig.gradient``). Every loss above has the gradient
``-sum_k c_k d log w_k / d phi`` with weights ``c_k`` (``1/B`` for reverse KL; the
self-normalised ``w~_k = w_k / sum_j w_j`` of a group for ``iw``, of ``w^(1 - alpha)`` for
``renyi``), and the total derivative of ``log w_k = log p*(x_k) - log q_phi(x_k)`` at
``x_k = T_phi(eps_k)`` is a path term (through ``x_k``) plus the score term
``-d log q_phi(x) / d phi`` at fixed ``x``, whose mean is zero but whose noise does not
vanish as ``q -> p``:

- ``"reparam"``: both terms (the plain reparametrised gradient).
- ``"stl"``: sticking the landing (Roeder et al., arXiv:1703.09194): the score term dropped,
  by evaluating ``log q`` at the samples a second time, in the density direction, with the
  parameters detached (one more pass through the flow). Unbiased for reverse KL, with zero
  variance at ``q = p``; biased for ``K > 1`` bounds.
- ``"dreg"``: the doubly-reparametrised gradient (Tucker et al., arXiv:1810.04152): the
  score term rewritten by ``E[g(x) d log q / d phi] = E[dg/dx dx/d phi]`` as a path term,
  which leaves the path terms with the weights ``c_k = w~_k^2`` (``iw``) or
  ``alpha w~_k + (1 - alpha) w~_k^2`` (``renyi``); unbiased, and its signal-to-noise
  ratio does not fall with ``K``. For reverse KL it is ``"stl"``.

Diagnostics on ``n`` fresh samples: the normalised effective sample size
``ESS = (sum w)^2 / (n sum w^2)`` in ``(0, 1]`` (1 when ``q = p``) and the
log-normaliser estimate ``log Z ~ logsumexp(log w) - log n``, consistent as ``n`` grows
(unbiased for ``Z`` itself; biased low in ``log Z`` by about ``Var(w) / (2 n Z^2)``).

Example:
    >>> import torch
    >>> from flows.models import RealNVP
    >>> from flows.targets import CorrelatedGaussian
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> flow = RealNVP((4,), levels=1, steps=2, hidden_channels=16)
    >>> result = fit(flow, CorrelatedGaussian(4), VIConfig(steps=100, batch_size=64, eval_samples=512))
    >>> 0 < result.ess <= 1
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flows.io import atomic_path
from flows.models.flow import Flow
from flows.targets import Target

OBJECTIVES = ("reverse-kl", "iw", "renyi")
GRADIENTS = ("reparam", "stl", "dreg")

REALNVP_RECIPE = {"levels": 1, "steps": 6, "direction": "sampling", "scale": "exp"}
"""Builder keywords of the vector RealNVP recommended for reverse KL
(:class:`~flows.models.RealNVP` ``((D,), **REALNVP_RECIPE)``): one level of 6 couplings, each
after an ActNorm, written in the sampling direction (``x_B = z_B exp(s) + t``) with an
unbounded log-scale. Chosen on seeds 10-29 of the ring, two-moons (annealed) and the double
well among ActNorm on/off, ``tanh``/``exp`` log-scales and the plain/STL gradient: the fewest
runs losing a mode or diverging (docs/variational.md). ``flows train --objective ...
--model realnvp`` builds it unless told otherwise."""


class DivergedError(RuntimeError):
    """The variational loss became NaN or infinite; the step was not applied."""


_DIVERGED_FIX = "lower the lr or clip the gradient norm harder (a lower clip)"


@dataclass
class VIConfig:
    """Settings of :func:`fit`.

    Attributes:
        steps: optimisation steps.
        batch_size: samples per step.
        lr: Adam learning rate (cosine-annealed to zero over ``steps``).
        objective: ``"reverse-kl"``, ``"iw"`` or ``"renyi"`` (see the module docstring).
        alpha: order of the Renyi bound, ``alpha != 1``.
        group: ``K``, samples per importance-weighted / Renyi bound; divides ``batch_size``.
        clip: gradient-norm clip (``None``: off). Reverse KL's gradient has heavy tails
            early on, when ``q`` puts samples where ``p*`` is tiny.
        seed: seed of the samples.
        eval_every: steps between diagnostics (ESS and ``log Z``) on fresh samples.
        eval_samples: samples of each diagnostic.
        temperature: base temperature of the training samples (1: the flow itself).
        gradient: the gradient estimator, ``"reparam"``, ``"stl"`` or ``"dreg"`` (see the
            module docstring; ``"dreg"`` for the ``iw`` and ``renyi`` objectives).
        anneal_steps: steps over which the training target is ``p*^beta`` with ``beta``
            rising linearly from ``beta_start`` to 1 (0: off). A flattened target joins
            the modes that a mode-seeking fit would otherwise choose between in its first
            steps (Rezende & Mohamed, arXiv:1505.05770); diagnostics always use ``p*``.
        beta_start: ``beta`` at step 1 of the annealing, in ``(0, 1]``.
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    objective: str = "reverse-kl"
    alpha: float = 0.5
    group: int = 4
    clip: float | None = 10.0
    seed: int = 0
    eval_every: int = 250
    eval_samples: int = 4096
    temperature: float = 1.0
    gradient: str = "reparam"
    anneal_steps: int = 0
    beta_start: float = 0.1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"VIConfig: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"VIConfig: gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        if self.gradient == "dreg" and self.objective == "reverse-kl":
            raise ValueError("VIConfig: gradient 'dreg' is for the iw and renyi objectives; reverse KL's is 'stl'")
        if self.gradient != "reparam" and self.temperature != 1:
            raise ValueError(
                f"VIConfig: gradient {self.gradient!r} re-evaluates the flow's own density; use temperature 1"
            )
        for name in ("steps", "batch_size", "group", "eval_every", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VIConfig: {name} must be an integer >= 1, got {value!r}")
        if self.objective != "reverse-kl" and self.batch_size % self.group:
            raise ValueError(
                f"VIConfig: batch_size {self.batch_size} is not a multiple of group {self.group}; "
                "change one of them"
            )
        if self.objective == "renyi":
            _check_alpha(self.alpha, "VIConfig")
        clip = self.clip
        number = isinstance(clip, (int, float)) and not isinstance(clip, bool)
        if clip is not None and not (number and 0 < clip < math.inf):
            raise ValueError(f"VIConfig: clip must be a finite number > 0 (None: no clipping), got {self.clip!r}")
        if isinstance(self.anneal_steps, bool) or not isinstance(self.anneal_steps, int) or self.anneal_steps < 0:
            raise ValueError(f"VIConfig: anneal_steps must be an integer >= 0, got {self.anneal_steps!r}")
        if not 0 < self.beta_start <= 1:
            raise ValueError(f"VIConfig: beta_start must be in (0, 1], got {self.beta_start!r}")
        if not self.lr > 0:
            raise ValueError(f"VIConfig: lr must be > 0, got {self.lr!r}")

    def beta(self, step: int) -> float:
        """The training target's inverse temperature at ``step`` (from 1): ``beta_start``
        rising linearly to 1 over ``anneal_steps``, then 1.

        Example:
            >>> config = VIConfig(anneal_steps=10, beta_start=0.5)
            >>> config.beta(1), config.beta(6), config.beta(11), VIConfig().beta(1)
            (0.5, 0.75, 1.0, 1.0)
        """
        if not self.anneal_steps:
            return 1.0
        return min(1.0, self.beta_start + (1 - self.beta_start) * (step - 1) / self.anneal_steps)


@dataclass
class VIResult:
    """What :func:`fit` returns.

    Attributes:
        ess: the final normalised effective sample size, in ``(0, 1]``.
        log_z: the final log-normaliser estimate.
        history: per step ``step`` and ``loss`` (of ``p*^beta`` while annealing); per diagnostic ``eval_step``, ``ess``,
            ``log_z``; ``log_z_true`` where the target knows it.
    """

    ess: float
    log_z: float
    history: dict[str, list[float]] = field(default_factory=dict)


def log_weights(
    flow: Flow, target: Target, n: int, temperature: float = 1.0, gradient: str = "reparam", beta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``n`` reparametrised samples of the flow and their log-weights ``beta log p*(x) - log q(x)``.

    With ``gradient`` ``"stl"`` or ``"dreg"`` the log-density is evaluated again at the
    samples by :meth:`~flows.models.Flow.log_prob` with the parameters detached, so the
    log-weights' gradient is the path term alone (see the module docstring); their values
    are the same.

    Returns:
        ``(x, log_w)``, ``(n, dim)`` and ``(n,)``.
    """
    x, log_q = flow.sample_and_log_prob(n, temperature=temperature)
    if gradient != "reparam":
        if not torch.isfinite(x).all():
            # The re-evaluation would refuse them as input; they are the flow's own overflow.
            raise DivergedError(f"log_weights: the flow's samples are non-finite; {_DIVERGED_FIX}")
        with _parameters_detached(flow):
            log_q = flow.log_prob(x)
    return x, beta * target.log_prob(x) - log_q


@contextmanager
def _parameters_detached(module: torch.nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on the module's trainable parameters for the block.

    Autograd then records no path to them (the memory-saving engine too: it collects the
    parameters that require grad when a pass runs), while inputs still carry gradients.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def objective_loss(
    log_w: Tensor, objective: str = "reverse-kl", alpha: float = 0.5, group: int = 4, gradient: str = "reparam"
) -> Tensor:
    """The loss of ``objective`` (see the module docstring) from log-weights ``(B,)``.

    With ``gradient="dreg"`` the value is the same and the gradient is the
    doubly-reparametrised one, given path-only log-weights
    (:func:`log_weights` with ``gradient="dreg"``).

    Example:
        >>> import torch
        >>> log_w = torch.tensor([0.0, 0.0, 2.0, 2.0])
        >>> objective_loss(log_w).item(), round(objective_loss(log_w, "iw", group=2).item(), 4)
        (-1.0, -1.0)
    """
    if objective == "reverse-kl":
        return -log_w.mean()
    if objective not in ("iw", "renyi"):
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "renyi":
        _check_alpha(alpha, "objective_loss")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or log_w.numel() % group:
        raise ValueError(
            f"objective_loss: group must be an integer >= 1 dividing the {log_w.numel()} log-weights, got {group!r}"
        )
    groups = log_w.view(-1, group)
    a = alpha if objective == "renyi" else 0.0  # iw is the Renyi bound of order 0
    scaled = (1 - a) * groups
    loss = -((torch.logsumexp(scaled, 1) - math.log(group)) / (1 - a)).mean()
    if gradient != "dreg":
        return loss
    # The doubly-reparametrised weights of the path terms (module docstring), constants.
    normalised = torch.softmax(scaled, 1).detach()
    surrogate = -((a * normalised + (1 - a) * normalised.pow(2)) * groups).sum(1).mean()
    # The loss's value with the surrogate's gradient.
    return loss.detach() + surrogate - surrogate.detach()


def _check_alpha(alpha: float, where: str) -> None:
    """The Renyi order: a finite real number other than 1 (order 1 is the reverse KL)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{where}: alpha must be a finite number, got {alpha!r}")
    if alpha == 1:
        raise ValueError(f"{where}: alpha = 1 is the reverse KL; use the reverse-kl objective")


def importance_diagnostics(log_w: Tensor) -> tuple[float, float]:
    """``(ESS, log Z)`` from log-weights ``(n,)``: ``(sum w)^2 / (n sum w^2)`` and
    ``logsumexp(log w) - log n``, computed in log space (no overflow).

    Example:
        >>> import torch
        >>> importance_diagnostics(torch.zeros(10))
        (1.0, 0.0)
    """
    log_w = log_w.double()
    n = log_w.numel()
    lse = torch.logsumexp(log_w, 0)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * log_w, 0) - math.log(n))
    return float(ess), float(lse - math.log(n))


@torch.no_grad()
def evaluate(flow: Flow, target: Target, n: int = 4096, chunk: int = 4096) -> tuple[float, float]:
    """``(ESS, log Z)`` of :func:`importance_diagnostics` on ``n`` fresh samples, drawn in chunks."""
    parts = [log_weights(flow, target, min(chunk, n - i))[1] for i in range(0, n, chunk)]
    return importance_diagnostics(torch.cat(parts))


def check_fittable(flow: Flow, target: Target) -> None:
    """Refuse a flow :func:`fit` cannot fit to ``target``, with one line naming why.

    Raises:
        ValueError: a conditional flow, one over another shape than ``(target.dim,)``, or one
            whose samples carry no gradient (``exact_inverse`` False: an i-ResNet's
            fixed-point inverse has no graph).
    """
    if flow.conditional or flow.input_shape != (target.dim,):
        raise ValueError(
            f"fit: the flow must be unconditional over ({target.dim},) to fit {type(target).__name__}, "
            f"got input_shape {flow.input_shape}{' (conditional)' if flow.conditional else ''}"
        )
    if not flow.bijector.exact_inverse:
        raise ValueError(
            "fit: the flow's samples carry no gradient through its iterative inverse (an "
            "i-ResNet's fixed-point inverse has no graph); use a coupling or autoregressive "
            "flow (realnvp, glow, nsf, maf)"
        )


def fit(
    flow: Flow,
    target: Target,
    config: VIConfig | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> VIResult:
    """Fit ``flow`` to ``target`` by minimising ``config.objective`` with Adam.

    The flow's ``memory_saving`` setting applies to its sampling pass (see
    :class:`flows.transforms.Chain`). The target evaluates in the samples' device and dtype.

    Args:
        flow: an unconditional :class:`~flows.models.Flow` over ``(target.dim,)``.
        target: the unnormalised density.
        config: the settings (default :class:`VIConfig()`).
        callback: called as ``callback(step, loss)`` after each step (a progress bar).

    Returns:
        The final diagnostics and the history.

    Raises:
        ValueError: a flow :func:`check_fittable` refuses.
        DivergedError: a non-finite loss, or non-finite samples.
    """
    config = config or VIConfig()
    check_fittable(flow, target)
    torch.manual_seed(config.seed)
    if flow.training:
        # Data-dependent initialisation (ActNorm) runs in a forward pass, which the
        # sampling direction never calls: run it now, on the flow's own samples, so a
        # later log_prob in training mode does not re-initialise a fitted flow.
        with torch.no_grad():
            flow.log_prob(flow.sample(config.batch_size))
    params = [p for p in flow.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, foreach=True)  # one multi-tensor update, CPU too
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    history: dict[str, list[float]] = {"step": [], "loss": [], "eval_step": [], "ess": [], "log_z": []}
    for step in range(1, config.steps + 1):
        beta = config.beta(step)
        _, log_w = log_weights(flow, target, config.batch_size, config.temperature, config.gradient, beta)
        loss = objective_loss(log_w, config.objective, config.alpha, config.group, config.gradient)
        if not torch.isfinite(loss):
            raise DivergedError(f"fit: non-finite loss at step {step}; {_DIVERGED_FIX}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        schedule.step()
        history["step"].append(step)
        history["loss"].append(float(loss.detach()))
        if step % config.eval_every == 0 or step == config.steps:
            ess, log_z = evaluate(flow, target, config.eval_samples)
            history["eval_step"].append(step)
            history["ess"].append(ess)
            history["log_z"].append(log_z)
        if callback is not None:
            callback(step, history["loss"][-1])
    try:
        history["log_z_true"] = [target.log_normalizer]
    except NotImplementedError:
        pass
    return VIResult(history["ess"][-1], history["log_z"][-1], history)


def _density_image(log_density: Tensor) -> Tensor:
    """``exp(log_density - max)``, 1 at the peak, with non-finite log-densities shown as 0.

    An unbounded (``exp``) log-scale overflows the density-direction pass far from the
    samples: ``z`` becomes infinite there and ``log q`` is ``-inf`` or ``inf - inf = nan``;
    that mass is nil, and letting one such point set the maximum would blank the panel.

    Example:
        >>> import torch
        >>> _density_image(torch.tensor([0.0, float("nan"), -float("inf"), -1.0])).tolist()
        [1.0, 0.0, 0.0, 0.3678794503211975]
    """
    finite = torch.isfinite(log_density)
    if not finite.any():
        raise ValueError("save_target_figure: no finite log-density on the grid; the flow overflows everywhere")
    log_density = torch.where(finite, log_density, torch.full_like(log_density, -math.inf))
    return (log_density - log_density[finite].max()).exp()


def save_target_figure(
    flow: Flow,
    target: Target,
    path: str | os.PathLike[str],
    n_samples: int = 20000,
    resolution: int = 200,
    seed: int = 0,
) -> Path:
    """Three panels for a 2D target: ``p*`` on its box, the flow's density ``q`` and its samples.

    Written atomically (:func:`flows.io.atomic_path`); the samples are seeded on a forked
    random state, so drawing the figure leaves a run's random stream alone.

    Args:
        flow: the fitted flow over ``(2,)``.
        target: a 2D target (its ``bounds`` are the view).
        path: the PNG file to write.
        n_samples: samples histogrammed.
        resolution: grid points per axis of the densities.
        seed: seed of the samples.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if target.dim != 2 or target.bounds is None:
        raise ValueError(f"save_target_figure: needs a 2D target, got {type(target).__name__} in {target.dim} D")
    lo, hi = target.bounds
    axis = torch.linspace(lo, hi, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    reference = next(flow.parameters())
    was_training = flow.training
    flow.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            samples = flow.sample(n_samples).double().cpu().numpy()
            points = grid.to(device=reference.device, dtype=reference.dtype)
            log_q = torch.cat([flow.log_prob(g) for g in points.split(8192)]).double().cpu()
    finally:
        flow.train(was_training)
    log_p = target.log_prob(grid)
    panels = [("target p* (unnormalised)", log_p), ("flow density q", log_q)]
    fig = Figure(figsize=(10.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (title, log_density) in zip(axes, panels):
        image = _density_image(log_density).reshape(resolution, resolution).numpy()
        ax.imshow(image, origin="lower", extent=[lo, hi, lo, hi], cmap="viridis")
        ax.set_title(title)
    axes[2].hist2d(samples[:, 0], samples[:, 1], bins=100, range=[[lo, hi], [lo, hi]], cmap="viridis")
    axes[2].set_title("flow samples")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)  # the temporary name has no .png suffix
    return path
