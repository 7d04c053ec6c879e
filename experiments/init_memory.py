"""Peak memory of the data-dependent initialisation and of evaluation against a training step.

    python experiments/init_memory.py [--size 64] [--batch 8] [--init-batch 512] [--test 512] [--json PATH]

Each phase runs in a fresh Python process (``--phase``, run by this script), which imports
torch and flows, builds the same Glow on ``(3, size, size)`` (3 levels, 4 steps per level,
hidden 128), makes uniform random 8-bit images (``init-batch`` training and ``test`` test
images: only shapes matter) and then runs one phase; it reports its peak resident set
size (``VmHWM``), and its RSS before the phase:

* ``init``: :func:`flows.training.initialize` on ``init-batch`` images in micro-batches of
  ``batch`` (what :func:`flows.train` does now);
* ``init-whole``: the same initialisation in one forward pass of ``init-batch`` images
  (what it did before: the memory peak of a run at 64x64 and above);
* ``eval``: :func:`flows.training.evaluate` on the ``test`` test images in batches of
  ``batch`` (``evaluate(..., batch_size=500)`` was the old default);
* ``eval-500``: the same in batches of 500;
* ``train``: a training step at ``batch`` (forward, backward, Adam), measured on the second
  step (the first allocates Adam's state).

The figures are whole-process peaks: torch itself, the model and the images are in every
one of them, so the phases compare directly. One intra-op thread per process, two
processes at a time. Takes about a minute on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PHASES = ("init", "init-whole", "eval", "eval-500", "train")
SIZE_MULTIPLE = 2**3  # the Glow's 3 squeezes need image sizes divisible by 8


def peak_mib() -> tuple[float, float]:
    """``(VmHWM, VmRSS)`` of this process in MiB (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmHWM"], fields["VmRSS"]


def run_phase(phase: str, size: int, batch: int, init_batch: int, test: int) -> dict[str, Any]:
    """Build the model and data, run ``phase``, and return the process's peak (this process)."""
    import torch

    from flows.data.dataset import Dataset
    from flows.models import Glow
    from flows.training import evaluate, initialize

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Glow((3, size, size), levels=3, steps=4, hidden_channels=128)
    images = torch.randint(0, 256, (init_batch + test, 3, size, size), dtype=torch.uint8)
    data = Dataset("random", images[:init_batch], images[init_batch:], 256, (3, size, size))
    generator = torch.Generator().manual_seed(0)
    # Only what the phase itself needs is prepared: the init batch is part of the initialisation's cost.
    x = data.prepare(data.train if phase.startswith("init") else data.train[:batch], generator=generator)
    if not phase.startswith("init"):
        initialize(model, x)  # an initialised model, as after the initialisation of a run
    before, rss = peak_mib()
    if phase == "init":
        initialize(model, x, micro_batch_size=batch)
    elif phase == "init-whole":
        initialize(model, x)
    elif phase in ("eval", "eval-500"):
        evaluate(model, data, batch_size=batch if phase == "eval" else 500)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            model.bits_per_dim(x).mean().backward()
            optimizer.step()
    peak, _ = peak_mib()
    return {"phase": phase, "peak_mib": peak, "rss_before_mib": rss, "peak_before_mib": before}


def measure(
    size: int, batch: int, init_batch: int, test: int, phases: tuple[str, ...] = PHASES, parallel: int = 2
) -> dict[str, dict[str, Any]]:
    """Run each phase in a fresh process (``parallel`` at a time) and collect their reports."""
    script = Path(__file__).resolve()
    started = []
    results: dict[str, dict[str, Any]] = {}
    for phase in phases:
        argv = [sys.executable, str(script), "--phase", phase, "--size", str(size)]
        argv += ["--batch", str(batch), "--init-batch", str(init_batch), "--test", str(test)]
        started.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=_env()))
        if len(started) == parallel or phase == phases[-1]:
            for process in started:
                out, _ = process.communicate(timeout=600)
                if process.returncode != 0:
                    raise RuntimeError(f"phase process failed with status {process.returncode}")
                report = json.loads(out.strip().splitlines()[-1])
                results[report["phase"]] = report
            started = []
    return results


def _env() -> dict[str, str]:
    import os

    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def table(results: dict[str, dict[str, Any]], size: int, batch: int, init_batch: int, test: int) -> str:
    train = results["train"]["peak_mib"]
    what = {
        "init": f"initialise on {init_batch}, micro-batches of {batch} (now)",
        "init-whole": f"initialise on {init_batch} in one pass (before)",
        "eval": f"evaluate {test} test images, batches of {batch} (now)",
        "eval-500": f"evaluate {test} test images, batches of 500 (before)",
        "train": f"training step, batch {batch}",
    }
    lines = [
        f"Glow (3, {size}, {size}), 3 levels x 4 steps, hidden 128: peak RSS of a fresh process per phase",
        "| phase | peak RSS (MiB) | RSS before the phase (MiB) | peak / training step |",
        "|---|---:|---:|---:|",
    ]
    for phase in PHASES:
        if phase in results:
            r = results[phase]
            lines.append(f"| {what[phase]} | {r['peak_mib']:.0f} | {r['rss_before_mib']:.0f} | "
                         f"{r['peak_mib'] / train:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from flows.arguments import integer  # flows (and torch) load in main: the phases run apart
    from flows.io import writable_file

    def image_size(text: str) -> int:
        size = integer(SIZE_MULTIPLE)(text)
        if size % SIZE_MULTIPLE:
            raise argparse.ArgumentTypeError(
                f"must be a multiple of {SIZE_MULTIPLE} (the Glow's 3 levels each halve it), got {size}"
            )
        return size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=image_size, default=64, help="image height and width, a multiple of 8")
    parser.add_argument("--batch", type=integer(1), default=8)
    parser.add_argument("--init-batch", type=integer(1), default=512)
    parser.add_argument("--test", type=integer(1), default=512, help="test images the evaluation phases evaluate")
    parser.add_argument("--json", type=writable_file, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase is not None:
        print(json.dumps(run_phase(args.phase, args.size, args.batch, args.init_batch, args.test)))
        return 0
    results = measure(args.size, args.batch, args.init_batch, args.test)
    print(table(results, args.size, args.batch, args.init_batch, args.test))
    if args.json:
        from flows.io import write_text

        write_text(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
