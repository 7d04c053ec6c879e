"""CPU time of one NSF / MAF training step against the peers, interleaved in one process.

The shared harness (``../shared/peers/vector_nll.py``) times each library's 1000 steps one
library after another, so on a shared machine its per-library figures see different
loads. Here the harness's own builders (ours through the public contract) take one
training step each in turn (log_prob, backward, Adam; batch 256), the order rotated every
round, and the table gives the median CPU time of this thread per step and our ratio to
the fastest peer.

Run with the peers' environment (zuko, nflows, normflows installed, flows editable)::

    /tmp/peervenv/bin/python experiments/vector_step_time.py --rounds 60
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from flows.arguments import integer

# (task, model): the harness's settings for every row it times.
CONFIGS = [
    ("moons", "NSF"),
    ("8gaussians", "NSF"),
    ("gauss-linear", "NSF"),
    ("rotmoons", "NSF"),
    ("moons", "MAF"),
    ("8gaussians", "MAF"),
]


def measure(harness, task: str, kind: str, libs: list[str], rounds: int, warmup: int) -> dict[str, float]:
    """Median thread CPU ms per training step of each library's model for ``task``."""
    y, c = harness.sample_task(task, 10000, np.random.default_rng(0))
    gen = torch.Generator().manual_seed(1)
    steps = {}
    for lib in libs:
        torch.manual_seed(0)
        model = harness.BUILDERS[lib](kind, y.shape[1], None if c is None else c.shape[1], 4, 64)
        opt = torch.optim.Adam(model.module.parameters(), lr=1e-3)

        def step(model=model, opt=opt) -> None:
            idx = torch.randint(len(y), (256,), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss = -model.log_prob(y[idx], None if c is None else c[idx]).mean()
            loss.backward()
            opt.step()

        steps[lib] = step
    times: dict[str, list[float]] = {lib: [] for lib in libs}
    for r in range(warmup + rounds):
        order = libs[r % len(libs) :] + libs[: r % len(libs)]  # rotate who goes first
        for lib in order:
            start = time.thread_time()
            steps[lib]()
            if r >= warmup:
                times[lib].append(time.thread_time() - start)
    return {lib: 1e3 * statistics.median(t) for lib, t in times.items()}


def load_harness(parser: argparse.ArgumentParser, peers: str) -> ModuleType:
    """The shared harness's ``vector_nll`` module from the folder ``peers``, or a usage error."""
    if not (Path(peers) / "vector_nll.py").is_file():
        parser.error(f"--peers {peers}: no vector_nll.py there; give the shared peers harness's folder")
    sys.path.insert(0, peers)
    import vector_nll  # the harness's builders and data

    return vector_nll


def check_libs(parser: argparse.ArgumentParser, text: str, known: list[str]) -> list[str]:
    """The libraries of ``--libs``: names the harness builds, ``flows`` and at least one peer
    among them, each once and importable here; else a usage error before any timing."""
    libs = [lib.strip() for lib in text.split(",")]
    unknown = [lib for lib in libs if lib not in known]
    if unknown:
        parser.error(f"--libs: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    twice = sorted({lib for lib in libs if libs.count(lib) > 1})
    if twice:
        parser.error(f"--libs: {', '.join(twice)} given more than once")
    if "flows" not in libs or len(libs) < 2:
        parser.error(f"--libs {text}: give flows and at least one peer, e.g. flows,{known[0]}")
    missing = [lib for lib in libs if importlib.util.find_spec(lib) is None]
    if missing:
        parser.error(
            f"--libs: {', '.join(missing)} cannot be imported here; run in the peers' environment or leave them out"
        )
    return libs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=str(Path(__file__).resolve().parents[2] / "shared" / "peers"))
    parser.add_argument("--libs", default="flows,zuko,nflows,normflows")
    parser.add_argument("--rounds", type=integer(1), default=60)
    parser.add_argument("--warmup", type=integer(0), default=10)
    args = parser.parse_args(argv)
    harness = load_harness(parser, args.peers)
    libs = check_libs(parser, args.libs, list(harness.BUILDERS))
    torch.set_num_threads(1)  # one core each for the shared machine's jobs; the harness's --threads 1
    peers = [lib for lib in libs if lib != "flows"]
    print(f"torch {torch.__version__}, 1 thread, batch 256, K = 4, hidden 64, {args.rounds} rounds")
    print("| task | model | " + " | ".join(libs) + " | flows / fastest peer |")
    print("|---|---|" + "---:|" * (len(libs) + 1))
    for task, kind in CONFIGS:
        ms = measure(harness, task, kind, libs, args.rounds, args.warmup)
        fastest = min(peers, key=ms.__getitem__)
        cells = " | ".join(f"{ms[lib]:.2f}" for lib in libs)
        print(f"| {task} | {kind} | {cells} | {ms['flows'] / ms[fastest]:.2f} ({fastest}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
