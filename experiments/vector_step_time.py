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
import statistics
import sys
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=str(Path(__file__).resolve().parents[2] / "shared" / "peers"))
    parser.add_argument("--libs", default="flows,zuko,nflows,normflows")
    parser.add_argument("--rounds", type=integer(1), default=60)
    parser.add_argument("--warmup", type=integer(0), default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core each for the shared machine's jobs; the harness's --threads 1
    sys.path.insert(0, args.peers)
    import vector_nll as harness  # the harness's builders and data

    libs = args.libs.split(",")
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
