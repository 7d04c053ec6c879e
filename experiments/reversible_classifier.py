"""Reversible classifiers on digits: an i-RevNet-style conv stack and a reversible ViT.

    python experiments/reversible_classifier.py [--quick] [--depth 8] [--steps 400] [--json PATH]

Both are trained with memory-saving backward (Adam, batch 64) on scikit-learn's bundled
8x8 digits (1400 train / 397 test images, a fixed seeded split). The table reports per
model:

* test accuracy after ``--steps`` steps, and the median CPU time of one memory-saving
  step (one intra-op thread);
* the bytes autograd keeps for one training step on a batch of 64 with ordinary and
  with memory-saving backward (:func:`flows.saved_bytes`: ``saved_tensors_hooks``,
  distinct storages, parameters excluded), at ``--depth`` and, for an untrained model of
  the same kind, at 4x that depth: the ordinary bytes grow with depth, the memory-saving
  ones do not;
* the gradient parity of that batch (:func:`flows.parity.gradient_parity`, the rule
  ``flows.check`` and ``flows bench`` use): the largest difference between the
  memory-saving and the ordinary parameter gradients, relative to the largest gradient
  entry (float32).

Models:

* **i-RevNet-style conv**: a conv stem lifts ``(1, 8, 8)`` to ``(16, 8, 8)``; then one
  :class:`flows.nn.Reversible` stack of :class:`~flows.transforms.rev_coupling.RevCoupling`
  blocks (``F``, ``G``: conv3x3-GroupNorm-GELU-conv3x3 on half the channels), half of
  them at ``(16, 8, 8)``, an invertible :class:`~flows.transforms.Squeeze` to
  ``(64, 4, 4)`` (i-RevNet's downsampling, no information lost), the other half there;
  then a mean-pooled linear head. Only the stem and the head are not invertible.
* **reversible ViT**: :class:`flows.nn.vit.ReversibleViT`, 2x2 patches (16 tokens),
  width 32 per stream, 4 heads, MLP ratio 2.

``--quick`` (depth 2, 10 steps) is a smoke test: its accuracies are near chance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flows.arguments import integer
from flows.diagnostics import cpu_model, saved_bytes
from flows.io import writable_file, write_text
from flows.nn.reversible import Reversible
from flows.nn.vit import ReversibleViT
from flows.parity import gradient_parity
from flows.transforms import Squeeze
from flows.transforms.rev_coupling import RevCoupling

BATCH = 64


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images in ``[0, 1]`` as ``(N, 1, 8, 8)`` and labels: 1400 for training, 397 for test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy((data.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(data.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def conv_branch(channels: int) -> nn.Module:
    """A coupling function ``F`` or ``G``; GroupNorm (not BatchNorm: no running statistics
    that a memory-saving recompute would update twice)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.GroupNorm(1, channels),
        nn.GELU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


class RevNetClassifier(nn.Module):
    """Conv stem, a reversible stack with an invertible squeeze inside, pooled linear head.

    The stack is i-RevNet's idea: every block is a
    :class:`~flows.transforms.rev_coupling.RevCoupling` over channel halves and the
    downsampling is a space-to-depth :class:`~flows.transforms.Squeeze`, so the whole
    stack is invertible and memory-saving backward rebuilds its activations from its
    output.

    Args:
        depth: the number of coupling blocks (at least 2; ``depth // 2`` before the squeeze).
        channels: the channels after the stem (even).
    """

    def __init__(self, depth: int, channels: int = 16) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"RevNetClassifier: depth must be at least 2, got {depth}")
        before = depth // 2
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = Reversible(
            *[RevCoupling(conv_branch(channels // 2), conv_branch(channels // 2)) for _ in range(before)],
            Squeeze(),
            *[RevCoupling(conv_branch(2 * channels), conv_branch(2 * channels)) for _ in range(depth - before)],
        )
        self.head = nn.Linear(4 * channels, 10)

    @property
    def memory_saving(self) -> bool:
        """Whether the reversible stack keeps only its output for backward."""
        return self.blocks.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        self.blocks.memory_saving = value

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 1, 8, 8)`` images -> ``(B, 10)`` logits."""
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def kept_bytes(model: nn.Module, x: Tensor, y: Tensor, saving: bool) -> int:
    """Bytes autograd keeps for the loss of one batch, parameters excluded."""
    model.memory_saving = saving
    model.train()
    return saved_bytes(lambda: nn.functional.cross_entropy(model(x), y), model)


def gradient_difference(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """:func:`flows.parity.gradient_parity` of the cross-entropy on one batch:
    ``max |g_saving - g_ordinary| / max |g_ordinary|`` over the parameter gradients."""
    return gradient_parity(model, x, loss=lambda logits: nn.functional.cross_entropy(logits, y)).error


def fit(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> float:
    """Train with memory-saving backward; returns the median CPU seconds per step.

    CPU time (one intra-op thread) is the step's work, which other processes on a shared
    machine barely change; wall time would measure their load too.
    """
    model.memory_saving = True
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps):
        start = time.process_time()
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        times.append(time.process_time() - start)
    return float(np.median(times)) if times else float("nan")


BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "i-RevNet-style conv": lambda depth: RevNetClassifier(depth),
    "reversible ViT": lambda depth: ReversibleViT(8, 2, 1, 10, width=32, depth=depth, heads=4, mlp_ratio=2.0),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run in seconds (depth 2, 10 steps)")
    parser.add_argument("--depth", type=integer(2), default=None, help="reversible blocks (default 8, quick 2)")
    parser.add_argument("--steps", type=integer(0), default=None, help="training steps (default 400, quick 10)")
    parser.add_argument("--json", type=writable_file, default=None, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (10 if args.quick else 400)
    depth = args.depth if args.depth is not None else (2 if args.quick else 8)
    torch.set_num_threads(1)
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    hardware = f"{cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    print(f"{date}; {hardware}; torch {torch.__version__}, 1 intra-op thread", flush=True)
    began = time.perf_counter()
    x_tr, y_tr, x_te, y_te = digits()
    batch = (x_tr[:BATCH], y_tr[:BATCH])
    rows: list[dict[str, Any]] = []
    for name, make in BUILDERS.items():
        torch.manual_seed(0)
        model = make(depth)
        ordinary, saving = (kept_bytes(model, *batch, s) for s in (False, True))
        grad_diff = gradient_difference(model, *batch)
        seconds = fit(model, x_tr, y_tr, steps)
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
        rows.append(
            {
                "model": name,
                "depth": depth,
                "params": sum(p.numel() for p in model.parameters()),
                "test_accuracy": accuracy,
                "kept_bytes[ordinary]": ordinary,
                "kept_bytes[memory-saving]": saving,
                "gradient_difference": grad_diff,
                "cpu_ms_per_step[memory-saving]": 1e3 * seconds,
            }
        )
        torch.manual_seed(0)
        deep = make(4 * depth)
        ordinary, saving = (kept_bytes(deep, *batch, s) for s in (False, True))
        rows.append(
            {
                "model": name,
                "depth": 4 * depth,
                "params": sum(p.numel() for p in deep.parameters()),
                "test_accuracy": None,
                "kept_bytes[ordinary]": ordinary,
                "kept_bytes[memory-saving]": saving,
                "gradient_difference": gradient_difference(deep, *batch),
                "cpu_ms_per_step[memory-saving]": None,
            }
        )

    print()
    print(f"Trained {steps} steps with memory-saving backward; kept bytes for one step on a batch of {BATCH}.")
    print()
    print(
        "| model | blocks | params | test acc | bytes kept, ordinary | bytes kept, memory-saving "
        "| ordinary / memory-saving | grad parity | CPU ms/step (memory-saving) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        acc = "(untrained)" if r["test_accuracy"] is None else f"{r['test_accuracy']:.3f}"
        ms = r["cpu_ms_per_step[memory-saving]"]
        ms = "" if ms is None else f"{ms:.1f}"
        ratio = r["kept_bytes[ordinary]"] / r["kept_bytes[memory-saving]"]
        print(
            f"| {r['model']} | {r['depth']} | {r['params']:,} | {acc} | {r['kept_bytes[ordinary]']:,} "
            f"| {r['kept_bytes[memory-saving]']:,} | {ratio:.1f}x | {r['gradient_difference']:.1e} | {ms} |"
        )
    elapsed = time.perf_counter() - began
    print(f"\ntotal {elapsed:.0f} s")
    if args.json:
        payload = {
            "experiment": "reversible_classifier",
            "date": date,
            "hardware": hardware,
            "torch": torch.__version__,
            "steps": steps,
            "batch": BATCH,
            "quick": args.quick,
            "seconds": elapsed,
            "rows": rows,
        }
        write_text(args.json, json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
