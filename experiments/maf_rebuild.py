"""What a memory-saving rebuild costs a masked autoregressive flow, and why its blocks opt out.

A MAF block's inverse runs its MADE once per feature, so rebuilding the block's input in
memory-saving backward costs ``D`` passes. This script times a training step of
``MAF((D,), steps, hidden)`` with ordinary backward, with the model memory-saving and its
MAF blocks opted out (the default), and with them opted in, plus ``log_prob`` and
``sample`` (the ``D``-pass direction) on their own.

Run: ``python experiments/maf_rebuild.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from flows.arguments import integer
from flows.models import MAF
from flows.transforms import MaskedAutoregressive

MODES = ("ordinary", "memory-saving, MAF blocks opted out (default)", "memory-saving, MAF blocks opted in")


def _cpu_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats * 1000


def measure(features: int, steps: int, hidden: int, batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = MAF((features,), steps=steps, hidden_channels=hidden)
    x = torch.randn(batch, features)
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def step() -> None:
        opt.zero_grad()
        (-model.log_prob(x).mean()).backward()
        opt.step()

    row: dict[str, float] = {}
    for mode in MODES:
        model.memory_saving = mode != MODES[0]
        for block in model.modules():
            if isinstance(block, MaskedAutoregressive):
                block.memory_saving = mode == MODES[2]
        row[mode] = _cpu_ms(step, repeats)
    with torch.no_grad():
        row["log_prob"] = _cpu_ms(lambda: model.log_prob(x), repeats)
        row["sample"] = _cpu_ms(lambda: model.sample(batch), repeats)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--repeats", type=integer(1), default=None, help="timed calls per mode (default 10; quick 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dims, steps, hidden, batch = ((4,), 2, 8, 16) if args.quick else ((8, 32), 4, 64, 256)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 10)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__}, 1 thread; MAF steps={steps} hidden={hidden} batch={batch}; CPU ms, "
          f"mean of {repeats}")
    print("| D | " + " | ".join(MODES) + " | log_prob | sample |")
    print("|---:|" + "---:|" * (len(MODES) + 2))
    for d in dims:
        row = measure(d, steps, hidden, batch, repeats)
        print(f"| {d} | " + " | ".join(f"{row[k]:.1f}" for k in (*MODES, "log_prob", "sample")) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
