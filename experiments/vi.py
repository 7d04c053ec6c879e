"""Variational inference: reverse-KL fits against normflows, gradient estimators, and
sampling-direction memory.

    /tmp/peervenv/bin/python experiments/vi.py --parts fits --seeds 10   # (a): 18 min, 1 thread, shared 2-core Xeon
    python experiments/vi.py --parts estimators              # (c): 16 minutes, same
    python experiments/vi.py --parts memory                  # (b): 2 minutes, same
    python experiments/vi.py --quick --json /tmp/vi.json         # seconds-long smoke run

(a) Reverse KL, ``E_q[log q - log p*]``, on the targets of :mod:`flows.targets`: the 2D
    ring mixture, two-moons energy and double well, and a correlated Gaussian in 20
    dimensions. Each ``log Z`` is known (closed form, or quadrature for the 2D energies).
    Both libraries get the same recipe: ``K`` affine coupling layers alternating halves,
    MLP conditioners with two hidden layers of width ``H`` (ReLU, last layer zero), a fixed
    standard normal base, batch ``B``, ``S`` steps of Adam at ``lr`` cosine-annealed to
    zero, gradient norm clipped at 10, ``--seeds`` seeds from ``--first-seed`` (default 0;
    the model's seeds; flows' samples are seeded apart, ``seed + NOISE_SEED_OFFSET``:
    normflows' continue after its init).
    flows: the recipe ``FLOWS_VI_REALNVP``, ``RealNVP((D,), levels=1, steps=K,
    hidden_channels=H, direction="sampling", scale="exp")``: each coupling after an ActNorm,
    its map written in the sampling direction, ``x_B = z_B exp(s) + t``, with the raw
    network output as log-scale, as normflows writes it; chosen on seeds 10 to 29, never the
    reported ones, among ActNorm on/off, ``tanh``/``exp`` log-scales and the plain/STL
    gradient (docs/variational.md), trained by :func:`flows.variational.fit` with plain
    reparametrised gradients.
    normflows (when it imports): ``K`` times ``AffineCouplingBlock(MLP([D/2, H, H, D],
    init_zeros=True))`` + ``Permute(D, "swap")`` on ``DiagGaussian(D, trainable=False)``,
    loss ``NormalizingFlow.reverse_kld(B, beta)``, the same optimiser loop. Swapping fixed
    halves mixes no dimensions within a half linearly, which a correlated Gaussian needs: on
    it both libraries also run with a learned LU-decomposed linear map at every step ("lu":
    flows' vector ``Glow((D,), levels=1, steps=K)``, ActNorm + ``InvConv1x1(lu=True)`` + the
    coupling; normflows' coupling + ``LULinearPermute(D)``). "swap+anneal" rows fit the two
    multimodal 2D targets with the training target annealed, ``p*^beta`` with ``beta``
    rising from 0.1 to 1 over ``--anneal-steps`` (both libraries, the same schedule:
    :meth:`flows.variational.VIConfig.beta`). Afterwards, on 20000 fresh
    samples each: the normalised effective sample size ``ESS = (sum w)^2 / (n sum w^2)`` of
    the weights ``w = p*(x) / q(x)``, the error of ``log Z ~ logsumexp(log w) - log n`` and
    from it the modes covered (:func:`flows.targets.modes_covered`). The two libraries are
    run target by target in one process, alternating seed by seed, and the time per step
    (steps 2 to S, the loop only) is compared only within a target. Which modes a run keeps
    is decided early and differs from seed to seed (reverse KL is mode-seeking; the ESS does
    not see a lost mode, the ``log Z`` error does: ``-log 2`` for a lost lobe of two-moons
    or a lost well, ``log(7/8)`` for one of the ring's 8), hence several seeds, each reported.
(b) Sampling-direction memory: ``RealNVP((16,), levels=1, steps=depth, hidden=64)``, one
    reverse-KL-like step (``sample_and_log_prob`` of a batch of 256, then backward) with
    ordinary and with memory-saving backward, interleaved: the bytes autograd keeps
    (:func:`flows.saved_bytes`, parameters excluded), the median step time over
    ``--repeats`` and the float32 gradient parity (:func:`flows.gradient_parity`).
(c) Gradient estimators (:mod:`flows.variational`: ``reparam``, ``stl``, ``dreg``) for each
    objective on the 6-D correlated Gaussian of ``tests/test_variational.py``
    (``RealNVP((6,), levels=1, steps=4, hidden_channels=32)``, 400 steps, batch 128, Adam
    lr 3e-3): final ESS and ``log Z`` error on 8192 samples per seed.

Prints markdown tables; ``--json`` writes the raw results (atomically). A flows run that
diverges (:class:`flows.variational.DivergedError`) is a row with NaN ESS and ``log Z``,
counted as covering no mode; the medians are those of the runs that finished, and the
script exits 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

import flows
from flows.arguments import SEED_MAX, integer
from flows.arguments import seed as seed_type  # `seed` names the loop variables below
from flows.diagnostics import cpu_model
from flows.io import writable_file, write_text
from flows.models import Glow, RealNVP
from flows.parity import ramp_nll
from flows.targets import CorrelatedGaussian, Target, make_target, modes_covered
from flows.variational import REALNVP_RECIPE, DivergedError, VIConfig, evaluate, fit, importance_diagnostics

TARGETS = ("ring", "two-moons", "double-well", "gaussian")
# The targets whose coordinates play different parts: two-moons' lobes and the double
# well's wells lie along x_1. Swapping coupling halves is swapping a target's coordinates
# (docs/variational.md), so with --layouts given,reversed each library also fits these with
# the coordinates reversed. The ring maps onto itself (its means at 2 pi j/8 reflect onto one
# another), the Gaussian is unimodal: one layout each.
LAYOUTS = ("given", "reversed")
LAYOUT_SENSITIVE = ("two-moons", "double-well")
EVAL_SEED = 1000  # of the diagnostic samples, the same for every run
# fit reseeds with its config's seed; given the run's own seed, every variant of a run drew
# the same noise, and that noise decided which two-moons runs lost a lobe whatever the flow
# (docs/variational.md). normflows' samples continue its stream after the initialisation;
# flows' get a stream of their own, apart from the weights' and EVAL_SEED's.
NOISE_SEED_OFFSET = 10_000
# flows' recipe for reverse KL with a vector RealNVP (flows.variational.REALNVP_RECIPE, at the
# recipe's depth K): the best of ActNorm on/off x tanh/exp x plain/STL gradient on seeds 10-29
# of ring and two-moons (annealed) and the double well (fewest runs losing a mode or
# diverging, 3 of 60); the STL gradient lost more (33 of 160 against 19 of 160 over the four
# builder variants), hence the plain gradient.
FLOWS_VI_REALNVP = {key: value for key, value in REALNVP_RECIPE.items() if key not in ("levels", "steps")}


class Reversed(Target):
    """``target`` with its coordinates in reverse order: ``log p*(x) = log p*_target(x_D, ..., x_1)``.

    The same normaliser and modes; a flow whose coupling halves come in one fixed order
    meets the target's layout the other way round.
    """

    def __init__(self, target: Target) -> None:
        super().__init__()
        self.target = target
        self.dim, self.bounds, self.modes = target.dim, target.bounds, target.modes

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.target.log_prob(x.flip(-1))

    @property
    def log_normalizer(self) -> float:
        return self.target.log_normalizer


@dataclass(frozen=True)
class Recipe:
    layers: int
    hidden: int
    batch: int
    steps: int
    lr: float
    eval_samples: int


def _ours(target: Target, recipe: Recipe, mixing: str, seed: int, options: dict | None = None) -> tuple[dict, float]:
    """flows' fit; ``options`` holds ``VIConfig`` overrides (e.g. ``anneal_steps``) and, under
    ``"builder"``, keyword arguments of the builder."""
    options = dict(options or {})
    torch.manual_seed(seed)
    builder = RealNVP if mixing == "swap" else Glow
    kwargs = dict(FLOWS_VI_REALNVP) if builder is RealNVP else {}
    kwargs.update(options.pop("builder", {}))
    flow = builder((target.dim,), levels=1, steps=recipe.layers, hidden_channels=recipe.hidden, **kwargs)
    config = VIConfig(
        steps=recipe.steps, batch_size=recipe.batch, lr=recipe.lr, seed=seed + NOISE_SEED_OFFSET,
        eval_every=recipe.steps, eval_samples=256,
        **options,
    )
    stamps: list[float] = []
    try:
        fit(flow, target, config, callback=lambda step, loss: stamps.append(time.perf_counter()))
    except DivergedError:
        # A diverged run is one of the recipe's results (an exp log-scale is unbounded), not
        # the end of the comparison: it counts as covering no mode.
        return {"ess": math.nan, "log_z": math.nan, "params": sum(p.numel() for p in flow.parameters())}, math.nan
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # steps 2..S: no first-call costs
    torch.manual_seed(EVAL_SEED)
    ess, log_z = evaluate(flow, target, recipe.eval_samples)
    return {"ess": ess, "log_z": log_z, "params": sum(p.numel() for p in flow.parameters())}, per_step


def _normflows(
    target: Target, recipe: Recipe, mixing: str, seed: int, options: dict | None = None
) -> tuple[dict, float]:
    """normflows' reverse KL; ``options`` may hold ``anneal_steps`` (its ``reverse_kld``'s
    ``beta``, on flows' schedule)."""
    import normflows as nf

    schedule_of = VIConfig(steps=recipe.steps, **(options or {}))  # the same beta schedule as ours

    class Wrapped(nf.distributions.Target):
        def log_prob(self, z: torch.Tensor) -> torch.Tensor:
            return target.log_prob(z)

    torch.manual_seed(seed)
    d = target.dim
    layers = []
    for _ in range(recipe.layers):
        net = nf.nets.MLP([d // 2, recipe.hidden, recipe.hidden, d], init_zeros=True)
        layers.append(nf.flows.AffineCouplingBlock(net))
        layers.append(nf.flows.Permute(d, mode="swap") if mixing == "swap" else nf.flows.LULinearPermute(d))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), layers, Wrapped())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.steps)
    stamps: list[float] = []
    for step in range(1, recipe.steps + 1):
        loss = model.reverse_kld(recipe.batch, beta=schedule_of.beta(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        schedule.step()
        stamps.append(time.perf_counter())
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    torch.manual_seed(EVAL_SEED)
    with torch.no_grad():
        parts = []
        for i in range(0, recipe.eval_samples, 4096):
            z, log_q = model.sample(min(4096, recipe.eval_samples - i))
            parts.append(target.log_prob(z) - log_q)
    ess, log_z = importance_diagnostics(torch.cat(parts))
    return {"ess": ess, "log_z": log_z, "params": sum(p.numel() for p in params)}, per_step


RUNNERS: dict[str, Callable[..., tuple[dict, float]]] = {"flows": _ours, "normflows": _normflows}


def _row(
    target: Target, name: str, layout: str, mixing: str, library: str, seed: int, result: dict, per_step: float
) -> dict:
    error = result["log_z"] - target.log_normalizer
    return {
        "target": name,
        "layout": layout,
        "dim": target.dim,
        "mixing": mixing,
        "library": library,
        "seed": seed,
        **result,
        "log_z_true": target.log_normalizer,
        "log_z_error": error,
        "modes": target.modes,
        "modes_covered": modes_covered(target, error) if math.isfinite(error) else 0,
        "ms_per_step": 1000 * per_step,
    }


def fits(
    recipe: Recipe,
    gaussian_dim: int,
    peers: bool,
    seeds: range,
    anneal_steps: int,
    targets: tuple[str, ...] = TARGETS,
    layouts: tuple[str, ...] = ("given",),
) -> list[dict]:
    """Every arm of ``targets``, each library, each seed of ``seeds``; with ``anneal_steps`` the 2D
    multimodal targets also run annealed (both libraries, the same schedule), as mixing
    ``swap+anneal``; the targets of ``LAYOUT_SENSITIVE`` in each of ``layouts``."""
    rows = []
    libraries = ["flows", "normflows"] if peers else ["flows"]
    arms: list[tuple[str, str, dict]] = [(name, "swap", {}) for name in TARGETS] + [("gaussian", "lu", {})]
    if anneal_steps:
        arms += [(name, "swap+anneal", {"anneal_steps": anneal_steps}) for name in ("ring", "two-moons")]
    arms = [arm for arm in arms if arm[0] in targets]
    for name, mixing, options in arms:
        given = make_target(name) if name != "gaussian" else CorrelatedGaussian(gaussian_dim)
        given.log_normalizer  # noqa: B018 - the quadrature (cached) runs before any timing
        for layout in layouts if name in LAYOUT_SENSITIVE else ("given",):
            target = given if layout == "given" else Reversed(given)
            for seed, library in itertools.product(seeds, libraries):
                result, per_step = RUNNERS[library](target, recipe, mixing.split("+")[0], seed, options)
                rows.append(_row(target, name, layout, mixing, library, seed, result, per_step))
    return rows


# (c) gradient estimators on the 6-D Gaussian of tests/test_variational.py
ESTIMATORS = [
    ("reverse-kl", "reparam", 1),
    ("reverse-kl", "stl", 1),
    ("iw", "reparam", 4),
    ("iw", "stl", 4),
    ("iw", "dreg", 4),
    ("iw", "reparam", 16),
    ("iw", "dreg", 16),
    ("renyi", "reparam", 4),
    ("renyi", "dreg", 4),
]


def estimators(steps: int, seeds: int, cases: list[tuple[str, str, int]]) -> list[dict]:
    """``RealNVP((6,), levels=1, steps=4, hidden_channels=32)`` on ``CorrelatedGaussian(6,
    rho=0.8)``, batch 128, Adam lr 3e-3: final ESS and ``log Z`` error on 8192 samples."""
    target = CorrelatedGaussian(6, rho=0.8)
    rows = []
    for (objective, gradient, group), seed in itertools.product(cases, range(seeds)):
        torch.manual_seed(seed)
        flow = RealNVP((6,), levels=1, steps=4, hidden_channels=32)
        config = VIConfig(
            steps=steps, batch_size=128, lr=3e-3, objective=objective, gradient=gradient, group=max(group, 1),
            seed=seed, eval_every=steps, eval_samples=8192,
        )
        stamps: list[float] = []
        result = fit(flow, target, config, callback=lambda step, loss, t=stamps: t.append(time.perf_counter()))
        rows.append(
            {
                "objective": objective, "gradient": gradient, "group": group, "seed": seed, "ess": result.ess,
                "log_z_error": result.log_z - target.log_normalizer,
                "ms_per_step": 1000 * (stamps[-2] - stamps[0]) / (steps - 2),  # steps 2..S-1: no evaluation
            }
        )
    return rows


def memory(depths: tuple[int, ...], batch: int, repeats: int) -> list[dict]:
    rows = []
    for depth in depths:
        torch.manual_seed(0)
        model = RealNVP((16,), levels=1, steps=depth, hidden_channels=64)
        with torch.no_grad():
            model.log_prob(model.sample(batch))  # ActNorm's initialisation
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))  # away from the zero-initialised identity

        def step(m: torch.nn.Module = model) -> None:
            ramp_nll(_pair(m, batch)).backward()

        kept, times = {}, {False: [], True: []}
        for saving in (False, True):
            model.memory_saving = saving
            kept[saving] = flows.saved_bytes(lambda m=model: ramp_nll(_pair(m, batch)), exclude=model)
            step()  # warm-up
        for _ in range(repeats):  # interleaved: both modes see the same machine load
            for saving in (False, True):
                model.memory_saving = saving
                start = time.perf_counter()
                step()
                times[saving].append(time.perf_counter() - start)
        model.memory_saving = False
        parity = flows.gradient_parity(model, objective=lambda m: ramp_nll(_pair(m, batch))).error
        rows.append(
            {
                "depth": depth,
                "kept_ordinary": kept[False],
                "kept_memory_saving": kept[True],
                "ms_ordinary": 1000 * statistics.median(times[False]),
                "ms_memory_saving": 1000 * statistics.median(times[True]),
                "gradient_parity": parity,
            }
        )
    return rows


def _pair(model: torch.nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, -log q(x))`` of a batch: :func:`ramp_nll` of it is ``E[ramp energy + log q]``."""
    x, log_q = model.sample_and_log_prob(batch)
    return x, -log_q


def _median(values: Iterable[float]) -> float:
    """The median of the finite values (NaN if none): a diverged run's NaN would scramble
    the order statistics, and it is counted apart."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _summary(runs: list[dict]) -> tuple[str, float, float]:
    """Runs losing a mode (``"k of n"``, diverged runs counted apart), median ESS and median
    abs ``log Z`` error of a group of runs."""
    diverged = sum(not math.isfinite(r["log_z_error"]) for r in runs)
    # A unimodal target has no mode to lose: a poor fit there shows in the error alone.
    lost = f"{sum(r['modes_covered'] < r['modes'] for r in runs)} of {len(runs)}" if runs[0]["modes"] > 1 else "-"
    lost += f" ({diverged} diverged)" if diverged else ""
    return lost, _median(r["ess"] for r in runs), _median(abs(r["log_z_error"]) for r in runs)


def _fits_table(rows: list[dict]) -> None:
    print(
        "| target | layout | D | mixing | library | params | ESS per seed | median ESS | log Z error per seed "
        "| median abs error | runs losing a mode | true log Z | ms/step |"
    )
    print("|---|---|---:|---|---|---:|---|---:|---|---:|---:|---:|---:|")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r.get("layout", "given"), r["mixing"], r["library"]), []).append(r)
    for (name, layout, mixing, library), runs in groups.items():
        first = runs[0]
        ess = ", ".join(f"{r['ess']:.3f}" for r in runs)
        errors = ", ".join(f"{r['log_z_error']:+.4f}" for r in runs)
        lost, median_ess, median_error = _summary(runs)
        print(
            f"| {name} | {layout} | {first['dim']} | {mixing} | {library} | {first['params']:,} | {ess} "
            f"| {median_ess:.3f} | {errors} | {median_error:.4f} "
            f"| {lost} | {first['log_z_true']:.4f} | {_median(r['ms_per_step'] for r in runs):.1f} |"
        )
    pooled: dict[tuple, list[dict]] = {}
    for r in rows:
        pooled.setdefault((r["target"], r["mixing"], r["library"]), []).append(r)
    if len(pooled) == len(groups):
        return
    print("\nPooled over the layouts each target ran in:\n")
    print("| target | layouts | mixing | library | runs losing a mode | median ESS | median abs error |")
    print("|---|---|---|---|---:|---:|---:|")
    for (name, mixing, library), runs in pooled.items():
        lost, median_ess, median_error = _summary(runs)
        layouts = ", ".join(dict.fromkeys(r.get("layout", "given") for r in runs))
        print(f"| {name} | {layouts} | {mixing} | {library} | {lost} | {median_ess:.3f} | {median_error:.4f} |")


def _estimators_table(rows: list[dict]) -> None:
    print("| objective | K | gradient | ESS per seed | median ESS | log Z error per seed | median abs error "
          "| ms/step |")
    print("|---|---:|---|---|---:|---|---:|---:|")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["objective"], r["group"], r["gradient"]), []).append(r)
    for (objective, group, gradient), runs in groups.items():
        ess = ", ".join(f"{r['ess']:.3f}" for r in runs)
        errors = ", ".join(f"{r['log_z_error']:+.4f}" for r in runs)
        print(
            f"| {objective} | {group} | {gradient} | {ess} | {statistics.median(r['ess'] for r in runs):.3f} "
            f"| {errors} | {statistics.median(abs(r['log_z_error']) for r in runs):.4f} "
            f"| {statistics.median(r['ms_per_step'] for r in runs):.1f} |"
        )


def _memory_table(table: list[dict]) -> None:
    print(
        "| depth | kept, ordinary | kept, memory-saving | ratio | ms ordinary | ms memory-saving | time ratio "
        "| gradient parity (float32) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(
            f"| {r['depth']} | {r['kept_ordinary']:,} | {r['kept_memory_saving']:,} "
            f"| {r['kept_ordinary'] / r['kept_memory_saving']:.1f}x | {r['ms_ordinary']:.1f} "
            f"| {r['ms_memory_saving']:.1f} | {r['ms_memory_saving'] / r['ms_ordinary']:.2f} "
            f"| {r['gradient_parity']:.1e} |"
        )


PARTS = ("fits", "memory", "estimators")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument(
        "--json", type=writable_file, default=None, help="write the raw results here (e.g. docs/results/vi.json)"
    )
    parser.add_argument("--steps", type=integer(1), default=None, help="training steps (default 500; --quick 20)")
    parser.add_argument(
        "--seeds", type=integer(1), default=None, help="runs per arm and library (default 5; --quick 1)"
    )
    parser.add_argument(
        "--first-seed", type=seed_type(), default=0,
        help="(a): the first seed (default 0: seeds 0 to --seeds - 1; 10-29 chose the recipe, report others)",
    )
    parser.add_argument(
        "--anneal-steps", type=integer(0), default=200, help="(a): also fit ring and two-moons annealed (steps; 0: no)"
    )
    parser.add_argument(
        "--layouts", default="given",
        help=f"(a): comma-separated, of {', '.join(LAYOUTS)}: the coordinate orders {', '.join(LAYOUT_SENSITIVE)} "
        "run in (default: given)",
    )
    parser.add_argument("--repeats", type=integer(1), default=5, help="timed steps per mode of the memory table")
    parser.add_argument("--no-peers", action="store_true", help="skip normflows even if it imports")
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"(a): comma-separated, of {', '.join(TARGETS)} (default: all)"
    )
    parser.add_argument(
        "--parts", default="fits,memory", help=f"comma-separated, of {', '.join(PARTS)} (default: fits,memory)"
    )
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    targets = tuple(args.targets.split(","))
    if unknown := sorted(set(targets) - set(TARGETS)):
        parser.error(f"--targets: unknown {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    layouts = tuple(args.layouts.split(","))
    if unknown := sorted(set(layouts) - set(LAYOUTS)):
        parser.error(f"--layouts: unknown {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    seeds = args.seeds or (1 if args.quick else 5)
    if args.first_seed + seeds - 1 > SEED_MAX:  # the last seed of the range, not just the first
        parser.error(
            f"--first-seed {args.first_seed}: with {seeds} seed(s) the last is {args.first_seed + seeds - 1}, "
            f"past the largest seed {SEED_MAX}; give a smaller --first-seed or fewer --seeds"
        )
    torch.set_num_threads(1)
    if args.quick:
        recipe = Recipe(layers=2, hidden=8, batch=32, steps=args.steps or 20, lr=1e-3, eval_samples=512)
        gaussian_dim, depths, batch, repeats = 10, (2, 8), 32, 1
        anneal = min(args.anneal_steps, recipe.steps // 2)
        cases = [("iw", "reparam", 4), ("iw", "dreg", 4)]
    else:
        recipe = Recipe(layers=6, hidden=64, batch=256, steps=args.steps or 500, lr=1e-3, eval_samples=20000)
        gaussian_dim, depths, batch, repeats = 20, (4, 16, 64), 256, args.repeats
        anneal, cases = args.anneal_steps, ESTIMATORS
    peers = not args.no_peers and "fits" in parts
    if peers:
        try:
            import normflows  # noqa: F401
        except ImportError:
            print("normflows does not import here: flows only (run with /tmp/peervenv/bin/python)")
            peers = False
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    hardware = f"{cpu_model()}; torch {torch.__version__}, 1 thread (shared machine)"
    print(f"# {when}; {hardware}")
    report: dict = {"date": when, "hardware": hardware, "recipe": recipe.__dict__}
    if "fits" in parts:
        print(
            f"\n## (a) Reverse KL: K={recipe.layers} couplings, width {recipe.hidden}, batch {recipe.batch}, "
            f"{recipe.steps} steps, Adam lr {recipe.lr:g} cosine, clip 10; ESS and log Z on "
            f"{recipe.eval_samples} samples; anneal: beta 0.1 -> 1 over {anneal} steps\n"
        )
        report["fits"] = fits(
            recipe, gaussian_dim, peers, range(args.first_seed, args.first_seed + seeds), anneal, targets, layouts
        )
        _fits_table(report["fits"])
    if "estimators" in parts:
        steps = 20 if args.quick else 400
        print(f"\n## (c) Gradient estimators, 6-D correlated Gaussian, {steps} steps, batch 128, lr 3e-3\n")
        report["estimators"] = estimators(steps, seeds, cases)
        _estimators_table(report["estimators"])
    if "memory" in parts:
        print(f"\n## (b) Sampling direction, RealNVP((16,)), width 64, batch {batch}: kept bytes and step time\n")
        report["memory"] = memory(depths, batch, repeats)
        _memory_table(report["memory"])
    if args.json:
        write_text(args.json, json.dumps(report, indent=1, default=float))
        print(f"\nwrote {args.json}")
    results = report.get("fits", []) + report.get("estimators", [])
    if any(not math.isfinite(r["log_z_error"]) for r in results):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
