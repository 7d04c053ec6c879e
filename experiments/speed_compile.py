"""Which regions to compile in a Glow: each block, each step of flow, or the whole model.

    python experiments/speed_compile.py [--shape 1,8,8] [--steps 4] [--hidden 32] [--batch 64] [--repeats 10]

:func:`flows.compile_regions` with ``unit="block"`` compiles every leaf of every chain
(ActNorm, the 1x1 convolution and the coupling of a step as three regions); with
``unit="step"`` (its default) each step of flow (the ``Chain(ActNorm, InvConv1x1,
coupling)`` inside a multi-scale ``Tail``) is one region, which ordinary autograd calls as
one graph (one forward and one backward graph per step); memory-saving backward rebuilds
leaf by leaf, so there the step-compiled model runs its leaves eagerly; with ``unit="model"``
the flow's whole bijector is one graph (memory-saving backward's engine runs eagerly behind the
graph break it makes).

For each variant (``eager``, ``block``, ``step``, ``model``) and mode (ordinary, memory-saving) it
prints the first step's wall time (compiling included) and the median thread CPU time of a
training step (forward, backward, Adam) over ``--repeats`` steps, the variants and modes
interleaved step by step, one intra-op thread (the first compiled variant's first step also pays
torch's one-time start-up of its compiler), and, timed in the same rounds, the shared
harness's eager floor (``floor_step.py``'s measure, as ``speed_ops.py`` builds it: the steps'
coupling networks alone with their own Adam). Defaults: the quick-start Glow on ``(1, 8, 8)``
(2 levels, 4 steps per level, hidden 32, batch 64); the harness's Glow is ``--steps 8
--hidden 64`` at ``--shape 1,8,8`` and ``--shape 3,16,16``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from flows.arguments import integer
from flows.compiling import UNITS, compile_regions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_ops import add_glow_arguments, build_from, floor  # noqa: E402  (a sibling script: the same Glow and floor)

MODES = ("ordinary", "memory-saving")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_glow_arguments(parser, steps=4, hidden=32)
    parser.add_argument("--repeats", type=integer(1), default=10, help="timed steps per variant and mode (default 10)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape, base, x = build_from(args)
    variants = {"eager": copy.deepcopy(base)}
    variants.update({unit: compile_regions(copy.deepcopy(base), unit=unit) for unit in UNITS})
    floor_phases = floor(base, x)

    def floor_step() -> None:
        for phase in floor_phases.values():
            phase()

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
    floor_step()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in first}
    floor_times: list[float] = []
    for _ in range(args.repeats + 1):
        for key in times:
            start = time.thread_time()
            step(*key)
            times[key].append(time.thread_time() - start)
        start = time.thread_time()
        floor_step()
        floor_times.append(time.thread_time() - start)
    median = {key: 1000 * statistics.median(v[1:]) for key, v in times.items()}
    floor_ms = 1000 * statistics.median(floor_times[1:])
    print(f"Glow {shape}, 2 levels, {args.steps} steps per level, hidden {args.hidden}, batch {args.batch}; "
          f"torch {torch.__version__}, 1 thread; median CPU ms of {args.repeats} steps after warm-up, interleaved")
    print()
    print("| regions compiled | ordinary step (CPU ms) | memory-saving step (CPU ms) | memory-saving / ordinary "
          "| ordinary / eager floor | first step ordinary (s) | first step memory-saving (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        o, m = median[name, "ordinary"], median[name, "memory-saving"]
        print(f"| {name} | {o:.1f} | {m:.1f} | {m / o:.2f}x | {o / floor_ms:.2f}x | {first[name, 'ordinary']:.1f} | "
              f"{first[name, 'memory-saving']:.1f} |")
    print(f"| floor (eager) | {floor_ms:.1f} | | | 1.00x | | |")
    fastest = min(UNITS, key=lambda unit: median[unit, "ordinary"])
    best_saving = min(median[name, "memory-saving"] for name in variants)
    print(f"\nfastest memory-saving step / fastest compiled ordinary ({fastest}): "
          f"{best_saving / median[fastest, 'ordinary']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
