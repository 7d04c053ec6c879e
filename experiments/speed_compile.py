"""Which regions to compile in a Glow: each block, or each whole step of flow.

    python experiments/speed_compile.py [--steps 4] [--hidden 32] [--batch 64] [--repeats 10]

:func:`flows.compile_regions` with ``unit="block"`` compiles every leaf of every chain
(ActNorm, the 1x1 convolution and the coupling of a step as three regions); with
``unit="step"`` (its default) each step of flow (the ``Chain(ActNorm, InvConv1x1,
coupling)`` inside a multi-scale ``Tail``) is one region, which ordinary autograd calls as
one graph (one forward and one backward graph per step); memory-saving backward rebuilds
leaf by leaf, so there the step-compiled model runs its leaves eagerly.

For each variant (``eager``, ``block``, ``step``) and mode (ordinary, memory-saving) it
prints the first step's wall time (compiling included) and the median thread CPU time of a
training step (forward, backward, Adam) over ``--repeats`` steps, the variants and modes
interleaved step by step, one intra-op thread (the first compiled variant's first step also pays
torch's one-time start-up of its compiler). Defaults: the quick-start Glow on
``(1, 8, 8)`` (2 levels, 4 steps per level, hidden 32, batch 64).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import flows
from flows.compiling import compile_regions

MODES = ("ordinary", "memory-saving")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per level (default 4)")
    parser.add_argument("--hidden", type=int, default=32, help="conditioner width (default 32)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = flows.models.Glow((1, 8, 8), levels=2, steps=args.steps, hidden_channels=args.hidden)
    x = torch.rand(args.batch, 1, 8, 8)
    with torch.no_grad():
        base.log_prob(x)
    variants = {
        "eager": copy.deepcopy(base),
        "block": compile_regions(copy.deepcopy(base), unit="block"),
        "step": compile_regions(copy.deepcopy(base), unit="step"),
    }
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-5) for name, m in variants.items()}

    def step(name: str, mode: str) -> None:
        model, optimizer = variants[name], optimizers[name]
        model.memory_saving = mode == "memory-saving"
        optimizer.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()
        optimizer.step()

    first: dict[tuple[str, str], float] = {}
    for name in variants:
        for mode in MODES:
            start = time.perf_counter()
            step(name, mode)
            first[name, mode] = time.perf_counter() - start
    times: dict[tuple[str, str], list[float]] = {key: [] for key in first}
    for _ in range(args.repeats + 1):
        for key in times:
            start = time.thread_time()
            step(*key)
            times[key].append(time.thread_time() - start)
    median = {key: 1000 * statistics.median(v[1:]) for key, v in times.items()}
    print(f"Glow (1, 8, 8), 2 levels, {args.steps} steps per level, hidden {args.hidden}, batch {args.batch}; "
          f"torch {torch.__version__}, 1 thread; median CPU ms of {args.repeats} steps after warm-up, interleaved")
    print()
    print("| regions compiled | ordinary step (CPU ms) | memory-saving step (CPU ms) | memory-saving / ordinary "
          "| first step ordinary (s) | first step memory-saving (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in variants:
        o, m = median[name, "ordinary"], median[name, "memory-saving"]
        print(f"| {name} | {o:.1f} | {m:.1f} | {m / o:.2f}x | {first[name, 'ordinary']:.1f} | "
              f"{first[name, 'memory-saving']:.1f} |")
    best_saving = min(median[name, "memory-saving"] for name in variants)
    print(f"\nfastest memory-saving step / compiled ordinary (step regions): "
          f"{best_saving / median['step', 'ordinary']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
