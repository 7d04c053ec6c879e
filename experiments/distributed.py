"""Two processes of one thread against one process of two threads: Glow on digits.

    python experiments/distributed.py [--quick] [--rounds 3] [--steps 40] [--batch 64]

All modes run :func:`flows.train` on the same global batches of scikit-learn's 8x8
digits: "2 x 1" as two ranks of a gloo process group on 127.0.0.1 (each started as
``torchrun`` starts it: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``, the rendezvous store served by this script as by torchrun's agent; each
trains on half of every batch inside ``DistributedDataParallel``),
"1 x 2" as one process with two intra-op threads, and "1 x 1", one process of one thread,
as the baseline. The modes alternate round by round (A B C, C B A, ...) and the table
gives the median over the rounds.

Measurements, per mode:

* **examples/s**: ``steps * batch / (t(steps) - t(0))``, where ``t(k)`` is the wall time of
  a whole ``train`` call of ``k`` steps in the same process (``t(0)``: the data-dependent
  initialisation and one test evaluation, which ``t(steps)`` also holds), so only the
  training steps count; a 2-step call before both takes the first-call costs;
* **peak RSS**: the resident high-water mark (``ru_maxrss``) of each process at the end,
  interpreter and torch included (workers load the digits from a file, without
  scikit-learn), and the resident size right after the imports;
* **final loss**: the last training loss (bits/dim), equal in both modes up to float32
  rounding: they compute the same run.

``--quick`` (a tiny Glow, 3 steps, one round; its rates are noise) is the smoke test of
``tests/test_experiment_distributed.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from flows.arguments import integer, number

ROOT = Path(__file__).resolve().parents[1]
# (name, processes, threads per process); "1 x 1" is the baseline both are compared with.
MODES = [("2 x 1", 2, 1), ("1 x 2", 1, 2), ("1 x 1", 1, 1)]
MIB = 1024.0  # ru_maxrss is in KiB on Linux


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _model(quick: bool) -> torch.nn.Module:
    from flows.models import Glow

    torch.manual_seed(0)
    if quick:
        return Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8, n_levels=17)
    return Glow((1, 8, 8), levels=2, steps=4, hidden_channels=64, n_levels=17)


def _timed_train(data, steps: int, batch: int, quick: bool) -> tuple[float, list[float]]:
    from flows.training import TrainConfig, train

    config = TrainConfig(
        steps=steps,
        batch_size=batch,
        warmup=10,
        validation=0,
        eval_every=max(steps, 1),
        init_batch_size=64 if quick else 256,
        progress=False,
    )
    model = _model(quick)
    began = time.perf_counter()
    history = train(model, data, config)
    return time.perf_counter() - began, history["train"]


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process) of a mode: time the runs, write this rank's figures."""
    torch.set_num_threads(args.threads)
    from flows import distributed
    from flows.data import Dataset

    imported = _rss_mib()
    with distributed.process_group(torch.device("cpu")):
        saved = torch.load(args.data, weights_only=True)
        data = Dataset("digits", saved["train"], saved["test"], 17, (1, 8, 8))
        _timed_train(data, 2, args.batch, args.quick)  # first-call costs (allocator, thread pool) land here
        empty, _ = _timed_train(data, 0, args.batch, args.quick)
        full, losses = _timed_train(data, args.steps, args.batch, args.quick)
        result = {
            "rank": distributed.rank(),
            "world": distributed.world_size(),
            "threads": torch.get_num_threads(),
            "examples_per_s": args.steps * args.batch / max(full - empty, 1e-9),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB,
            "imported_mib": imported,
            "final_loss": losses[-1],
        }
    Path(f"{args.out}.{result['rank']}").write_text(json.dumps(result))


def _store(timeout: float) -> dist.TCPStore:
    """The rendezvous store of one launch, served by this process as torchrun's agent serves
    it, on a port the OS assigns as the store binds it: a port found free, closed and handed
    to rank 0 to bind could be taken in between."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))


def _launch(processes: int, threads: int, args: argparse.Namespace, data: Path, out: Path) -> list[dict]:
    """Start ``processes`` ranks as torchrun would (env://, every rank a client of the store
    this process serves), wait at most ``args.timeout`` seconds for each, and read their figures."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads)]
    command += ["--steps", str(args.steps), "--batch", str(args.batch), "--data", str(data), "--out", str(out)]
    command += ["--quick"] if args.quick else []
    store = _store(args.timeout) if processes > 1 else None
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ranks = []
    try:
        for rank in range(processes):
            env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads)}
            if store is not None:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes))
                env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
            ranks.append(subprocess.Popen(command, env=env))
        for process in ranks:
            if process.wait(timeout=args.timeout) != 0:
                raise RuntimeError(f"a worker of {processes} x {threads} exited with status {process.returncode}")
    finally:
        for process in ranks:  # after a failure: the other rank would wait for it until its timeout
            if process.poll() is None:
                process.kill()
                process.wait()
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(processes)]


def run(args: argparse.Namespace) -> list[dict]:
    """Run the modes, alternating, and return one row per mode."""
    from flows.data import load

    digits = load("digits")
    results: dict[str, list[list[dict]]] = {name: [] for name, _, _ in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits.pt"
        # --quick: a short test split, evaluated once per run.
        torch.save({"train": digits.train, "test": digits.test[:32] if args.quick else digits.test}, data)
        for r in range(args.rounds):
            for name, processes, threads in MODES if r % 2 == 0 else MODES[::-1]:
                results[name].append(_launch(processes, threads, args, data, Path(tmp) / f"{name}-{r}"))
    rows = []
    for name, processes, threads in MODES:
        runs = results[name]
        rows.append(
            {
                "mode": name,
                "processes": processes,
                "threads": threads,
                "examples_per_s": statistics.median(ranks[0]["examples_per_s"] for ranks in runs),
                "all_examples_per_s": [ranks[0]["examples_per_s"] for ranks in runs],
                "peak_mib": max(rank["peak_mib"] for ranks in runs for rank in ranks),
                "imported_mib": max(rank["imported_mib"] for ranks in runs for rank in ranks),
                "final_loss": runs[0][0]["final_loss"],
            }
        )
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Glow on digits, {args.steps} steps x global batch {args.batch}, median of {args.rounds} round(s), "
        "modes alternating",
        "",
        "| mode (processes x threads) | examples/s | each round | peak RSS per process (MiB) | "
        "RSS after imports (MiB) | final loss (bits/dim) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        each = ", ".join(f"{v:.0f}" for v in row["all_examples_per_s"])
        lines.append(
            f"| {row['mode']} | {row['examples_per_s']:.0f} | {each} | {row['peak_mib']:.0f} | "
            f"{row['imported_mib']:.0f} | {row['final_loss']:.4f} |"
        )
    rate = {row["mode"]: row["examples_per_s"] for row in rows}
    lines += [""] + [
        f"throughput {a} / {b}: {rate[a] / rate[b]:.2f}"
        for a, b in (("2 x 1", "1 x 2"), ("2 x 1", "1 x 1"), ("1 x 2", "1 x 1"))
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run in seconds (tiny Glow, 3 steps, 1 round)")
    parser.add_argument("--rounds", type=integer(1), default=None, help="rounds of both modes (default: 3; quick 1)")
    parser.add_argument(
        "--steps", type=integer(1), default=None, help="timed training steps per run (default: 40; quick 3)"
    )
    parser.add_argument("--batch", type=integer(2), default=None, help="global batch size (default: 64; quick 16)")
    parser.add_argument(
        "--timeout", type=number(0, strict=True), default=600, help="seconds a worker may take (default: 600)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=integer(1), default=1, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        # A rank leaves without finalising the interpreter. Its process group outlives
        # destroy_process_group() (torch keeps the gloo backend and its threads alive), and a
        # gloo thread that drops its last collective's tensors after the main thread began
        # finalising dies taking the GIL, which aborts the rank ("terminate called without an
        # active exception", status -6): one quick run in about ten failed so. Its figures are
        # written and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    for name, full, quick in (("rounds", 3, 1), ("steps", 40, 3), ("batch", 64, 16)):
        if getattr(args, name) is None:  # an option given stays as given, with --quick too
            setattr(args, name, quick if args.quick else full)
    if args.batch % 2:
        parser.error(f"--batch {args.batch}: the global batch splits over the 2 processes; give an even number")
    torch.set_num_threads(1)
    print(table(run(args), args))
    print(
        f"\n{torch.__version__}, {os.cpu_count()} CPUs reported; the machine may be shared with other jobs, "
        "so compare the modes only within this run"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
