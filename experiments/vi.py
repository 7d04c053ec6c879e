"""Variational inference: reverse-KL fits against normflows, and sampling-direction memory.

    /tmp/peervenv/bin/python experiments/vi.py            # ~4 minutes at 1 thread (2-core Xeon)
    python experiments/vi.py --quick --json /tmp/vi.json  # seconds-long smoke run

(a) Reverse KL, ``E_q[log q - log p*]``, on the targets of :mod:`flows.targets`: the 2D
    ring mixture, two-moons energy and double well, and a correlated Gaussian in 20
    dimensions. Each ``log Z`` is known (closed form, or quadrature for the 2D energies).
    Both libraries get the same recipe: ``K`` affine coupling layers alternating halves,
    MLP conditioners with two hidden layers of width ``H`` (ReLU, last layer zero), a fixed
    standard normal base, batch ``B``, ``S`` steps of Adam at ``lr`` cosine-annealed to
    zero, gradient norm clipped at 10, seeds 0, 1, 2 (model and samples). flows: ``RealNVP((D,), levels=1, steps=K,
    hidden_channels=H)`` (each coupling after an ActNorm; ``tanh``-bounded log-scales),
    trained by :func:`flows.variational.fit`. normflows (when it imports): ``K`` times
    ``AffineCouplingBlock(MLP([D/2, H, H, D], init_zeros=True))`` + ``Permute(D, "swap")``
    on ``DiagGaussian(D, trainable=False)``, loss ``NormalizingFlow.reverse_kld(B)``, the
    same optimiser loop. Swapping fixed halves mixes no dimensions within a half linearly,
    which a correlated Gaussian needs: on it both libraries also run with a learned
    LU-decomposed linear map at every step ("lu": flows' vector ``Glow((D,), levels=1,
    steps=K)``, ActNorm + ``InvConv1x1(lu=True)`` + the coupling; normflows' coupling +
    ``LULinearPermute(D)``). Afterwards, on ``--eval-samples`` fresh samples each: the
    normalised effective sample size ``ESS = (sum w)^2 / (n sum w^2)`` of the weights
    ``w = p*(x) / q(x)`` and the error of ``log Z ~ logsumexp(log w) - log n``. The two
    libraries are run target by target in one process, one after the other, and the time
    per step (steps 2 to S, the loop only) is compared only within a target. Which modes a
    run keeps is decided early and differs from seed to seed (reverse KL is mode-seeking;
    the ESS does not see a lost mode, the ``log Z`` error does: ``-log 2`` for a lost lobe
    of two-moons or a lost well), hence several seeds, each reported.
(b) Sampling-direction memory: ``RealNVP((16,), levels=1, steps=depth, hidden=64)``, one
    reverse-KL-like step (``sample_and_log_prob`` of a batch of 256, then backward) with
    ordinary and with memory-saving backward, interleaved: the bytes autograd keeps
    (:func:`flows.saved_bytes`, parameters excluded), the median step time over
    ``--repeats`` and the float32 gradient parity (:func:`flows.gradient_parity`).

Prints markdown tables; ``--json`` writes the raw results (atomically).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import flows
from flows.diagnostics import cpu_model
from flows.io import write_text
from flows.models import Glow, RealNVP
from flows.parity import ramp_nll
from flows.targets import Target, make_target
from flows.variational import VIConfig, evaluate, fit, importance_diagnostics

TARGETS = ("ring", "two-moons", "double-well", "gaussian")
EVAL_SEED = 1000  # of the diagnostic samples, the same for every run


@dataclass(frozen=True)
class Recipe:
    layers: int
    hidden: int
    batch: int
    steps: int
    lr: float
    eval_samples: int


def _ours(target: Target, recipe: Recipe, mixing: str, seed: int) -> tuple[dict, float]:
    torch.manual_seed(seed)
    builder = RealNVP if mixing == "swap" else Glow
    flow = builder((target.dim,), levels=1, steps=recipe.layers, hidden_channels=recipe.hidden)
    config = VIConfig(
        steps=recipe.steps, batch_size=recipe.batch, lr=recipe.lr, seed=seed, eval_every=recipe.steps, eval_samples=256
    )
    stamps: list[float] = []
    fit(flow, target, config, callback=lambda step, loss: stamps.append(time.perf_counter()))
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # steps 2..S: no first-call costs
    torch.manual_seed(EVAL_SEED)
    ess, log_z = evaluate(flow, target, recipe.eval_samples)
    return {"ess": ess, "log_z": log_z, "params": sum(p.numel() for p in flow.parameters())}, per_step


def _normflows(target: Target, recipe: Recipe, mixing: str, seed: int) -> tuple[dict, float]:
    import normflows as nf

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
    for _ in range(recipe.steps):
        loss = model.reverse_kld(recipe.batch)
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


def fits(recipe: Recipe, gaussian_dim: int, peers: bool, seeds: int) -> list[dict]:
    rows = []
    runners: dict[str, Callable[[Target, Recipe, str, int], tuple[dict, float]]] = {"flows": _ours}
    if peers:
        runners["normflows"] = _normflows
    arms = [(name, "swap") for name in TARGETS] + [("gaussian", "lu")]
    for name, mixing in arms:
        target = make_target(name) if name != "gaussian" else type(make_target(name))(gaussian_dim)
        target.log_normalizer  # noqa: B018 - the quadrature (cached) runs before any timing
        for seed, (library, run) in itertools.product(range(seeds), runners.items()):
            result, per_step = run(target, recipe, mixing, seed)
            rows.append(
                {
                    "target": name,
                    "dim": target.dim,
                    "mixing": mixing,
                    "library": library,
                    "seed": seed,
                    **result,
                    "log_z_true": target.log_normalizer,
                    "log_z_error": result["log_z"] - target.log_normalizer,
                    "ms_per_step": 1000 * per_step,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--json", default=None, help="write the raw results here (e.g. docs/results/vi.json)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 500; --quick 20)")
    parser.add_argument("--seeds", type=int, default=None, help="runs per target and library (default 3; --quick 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode of the memory table")
    parser.add_argument("--no-peers", action="store_true", help="skip normflows even if it imports")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        recipe = Recipe(layers=2, hidden=8, batch=32, steps=args.steps or 20, lr=1e-3, eval_samples=512)
        gaussian_dim, depths, batch, repeats, seeds = 10, (2, 8), 32, 1, args.seeds or 1
    else:
        recipe = Recipe(layers=6, hidden=64, batch=256, steps=args.steps or 500, lr=1e-3, eval_samples=20000)
        gaussian_dim, depths, batch, repeats, seeds = 20, (4, 16, 64), 256, args.repeats, args.seeds or 3
    peers = not args.no_peers
    if peers:
        try:
            import normflows  # noqa: F401
        except ImportError:
            print("normflows does not import here: flows only (run with /tmp/peervenv/bin/python)")
            peers = False
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    hardware = f"{cpu_model()}; torch {torch.__version__}, 1 thread (shared machine)"
    print(f"# {when}; {hardware}")
    print(
        f"\n## (a) Reverse KL: K={recipe.layers} couplings, width {recipe.hidden}, batch {recipe.batch}, "
        f"{recipe.steps} steps, Adam lr {recipe.lr:g} cosine, clip 10; ESS and log Z on "
        f"{recipe.eval_samples} samples\n"
    )
    rows = fits(recipe, gaussian_dim, peers, seeds)
    print("| target | D | mixing | library | params | ESS per seed | log Z error per seed | median abs error "
          "| true log Z | ms/step |")
    print("|---|---:|---|---|---:|---|---|---:|---:|---:|")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["mixing"], r["library"]), []).append(r)
    for (name, mixing, library), runs in groups.items():
        first = runs[0]
        ess = ", ".join(f"{r['ess']:.3f}" for r in runs)
        errors = ", ".join(f"{r['log_z_error']:+.4f}" for r in runs)
        median_error = statistics.median(abs(r["log_z_error"]) for r in runs)
        ms = statistics.median(r["ms_per_step"] for r in runs)
        print(
            f"| {name} | {first['dim']} | {mixing} | {library} | {first['params']:,} | {ess} | {errors} "
            f"| {median_error:.4f} | {first['log_z_true']:.4f} | {ms:.1f} |"
        )
    print(f"\n## (b) Sampling direction, RealNVP((16,)), width 64, batch {batch}: kept bytes and step time\n")
    table = memory(depths, batch, repeats)
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
    if args.json:
        report = {"date": when, "hardware": hardware, "recipe": recipe.__dict__, "fits": rows, "memory": table}
        write_text(args.json, json.dumps(report, indent=1, default=float))
        print(f"\nwrote {args.json}")
    if any(not math.isfinite(r["log_z"]) for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
