"""MEFT on digits: pre-train a small ViT, fine-tune on rotated held-out digits four ways.

    python experiments/meft.py [--quick] [--out runs/meft] [--figure docs/figures/meft.png]

1. Pre-train a ViT (6 blocks, width 64, patch 2) on 1000 of scikit-learn's 8x8 digits with
   ordinary training.
2. Fine-tune on 500 other digits, each rotated by a random angle in [-45, 45] degrees, and
   test on the remaining 297 (rotated the same way): full fine-tuning, parallel adapters
   (frozen blocks, no reversibility), MEFT (variant 1, ``x1_factor=0.1``) with ordinary
   backward, and MEFT with memory-saving backward. The same adapter init and the same
   mini-batches for both MEFT rows.
3. Print a markdown table (test accuracy, trainable parameters, bytes kept for backward,
   peak RSS, RSS growth during training, time per step), the same memory figures at 2x and
   4x depth (randomly initialised; memory does not depend on the weights), and save a plot.

Measurements:

* **bytes kept**: :func:`flows.saved_bytes` of one batch-64 loss (distinct storages passed
  to ``saved_tensors_hooks``, parameters excluded);
* **peak RSS**: the resident high-water mark of a fresh subprocess per row during its
  training steps (Linux: reset through ``/proc/self/clear_refs`` just before them, so
  import-time transients do not mask it; elsewhere ``ru_maxrss``), interpreter and torch
  included, scipy and scikit-learn not (workers load the data from a file);
* **RSS growth**: that peak minus the resident size just before training: activations,
  gradients, Adam state and allocator slack;
* **ms/step**: mean wall time of a training step after one warm-up step, one intra-op
  thread.

``--quick`` (a smoke test of seconds: 2 blocks, a few steps) runs every row in this
process, so its RSS figures include earlier rows' leftovers and its RSS growth is
understated (memory freed by earlier rows is reused); it writes the plot into ``--out``
unless ``--figure`` is given.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flows.arguments import checked_default, integer
from flows.diagnostics import saved_bytes
from flows.io import writable_directory, writable_file
from flows.nn.meft import Adapter, convert_to_reversible
from flows.nn.vit import ViT
from flows.parity import gradient_parity

CONFIGS = ["full", "adapters", "meft", "meft-memory-saving"]
WIDTH, DEPTH, HEADS, BATCH = 64, 6, 4, 64
ROOT = Path(__file__).resolve().parents[1]
MIB = 2.0**20


@functools.lru_cache(maxsize=1)
def digits() -> dict[str, torch.Tensor]:
    """Pre-training split, the rotated fine-tuning task and its test set (deterministic)."""
    from scipy.ndimage import rotate
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    angles = rng.uniform(-45, 45, size=len(x))
    rotated = np.stack(
        [np.clip(rotate(img, a, reshape=False, order=1), 0, 1) for img, a in zip(x, angles)]
    ).astype(np.float32)

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    return {
        "pre_x": images(x[:1000]), "pre_y": labels(y[:1000]),
        "ft_x": images(rotated[1000:1500]), "ft_y": labels(y[1000:1500]),
        "test_x": images(rotated[1500:]), "test_y": labels(y[1500:]),
        "plain_test_x": images(x[1500:]),
    }


def make_vit(depth: int) -> ViT:
    return ViT(8, 2, 1, 10, width=WIDTH, depth=depth, heads=HEADS, mlp_ratio=2.0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int = 0) -> float:
    """Adam on random mini-batches; returns seconds per step after the first (warm-up) step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return (time.perf_counter() - start) / max(steps - 1, 1)


class AdapterBlock(nn.Module):
    """An ordinary (frozen) block plus a parallel adapter: ``block(x) + adapter(x)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.adapter = Adapter(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.adapter(x)


def build(config: str, state: dict | None, depth: int) -> nn.Module:
    model = make_vit(depth)
    if state is not None:
        model.load_state_dict(state)
    if config == "full":
        return model
    if config == "adapters":
        model.requires_grad_(False)
        model.blocks = nn.Sequential(*[AdapterBlock(b) for b in model.blocks])
        model.head.requires_grad_(True)
        return model
    return convert_to_reversible(model, variant=1, x1_factor=0.1, memory_saving=config == "meft-memory-saving")


def loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def gradient_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """:func:`flows.parity.gradient_parity` of the fine-tuning loss (float32 drift):
    ``max |g_saving - g_ordinary| / max |g_ordinary|`` over the trainable parameters."""
    return gradient_parity(model, x, y, objective=loss_on).error


def _status_mib(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (Linux), in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _reset_peak_rss() -> float | None:
    """Reset the resident high-water mark; the resident size now, or None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mib("VmRSS")
    except (OSError, AttributeError):
        return None


def measure(config: str, data: dict[str, torch.Tensor], steps: int, depth: int, state: dict | None = None) -> dict:
    """Build and fine-tune one configuration, then measure it; peak RSS is this process's.

    With the pre-trained ``state`` also the test accuracy and, for the memory-saving row, the
    memory-saving vs ordinary gradient error at conversion and after fine-tuning.
    """
    torch.manual_seed(1)
    model = build(config, state, depth)
    result: dict = {
        "config": config, "depth": depth,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    batch_x, batch_y = data["ft_x"][:BATCH], data["ft_y"][:BATCH]
    # Lazy one-off costs stay out of the RSS growth: the first optimizer imports
    # torch._dynamo (~100 MiB resident), the first backward starts the autograd engine. One
    # sample keeps the allocator from holding a batch's activations before the measurement.
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    loss_on(model, batch_x[:1], batch_y[:1]).backward()
    model.zero_grad(set_to_none=True)
    # Memory during training first, so later checks (gradient_error runs ordinary backward
    # too) cannot raise this row's peak.
    rss_before = _reset_peak_rss()
    lr = 1e-3 if config == "full" else 3e-3
    result["sec_per_step"] = train(model, data["ft_x"], data["ft_y"], steps, lr)
    if rss_before is None:
        # No resettable high-water mark: the process peak (Linux and BSD report KiB).
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["rss_growth_mib"] = None
    else:
        result["peak_rss_mib"] = _status_mib("VmHWM")
        result["rss_growth_mib"] = result["peak_rss_mib"] - rss_before
    if state is not None:
        result["accuracy"] = accuracy(model, data["test_x"], data["test_y"])
    model.train()
    result["bytes_kept"] = saved_bytes(lambda: loss_on(model, batch_x, batch_y), model)
    if state is not None and config == "meft-memory-saving":
        result["grad_error_tuned"] = gradient_error(model, batch_x, batch_y)
        torch.manual_seed(1)  # the same adapter init as the model just fine-tuned
        result["grad_error_start"] = gradient_error(build(config, state, depth), batch_x, batch_y)
    return result


def run_worker(
    config: str, data: Path, steps: int, depth: int, pretrained: Path | None = None, fresh: bool = True
) -> dict:
    """:func:`measure` in a fresh subprocess (``fresh``) or in this process."""
    if not fresh:
        state = torch.load(pretrained) if pretrained is not None else None
        return measure(config, torch.load(data), steps, depth, state)
    cmd = [sys.executable, __file__, "--worker", config, "--data", str(data), "--steps", str(steps),
           "--depth", str(depth)]
    if pretrained is not None:
        cmd += ["--pretrained", str(pretrained)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {config} ({depth} blocks) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plot(results: list[dict], depth_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar([r["config"] for r in results], [r["accuracy"] for r in results],
                color=[f"C{i}" for i in range(len(results))])
    for i, r in enumerate(results):
        axes[0].text(i, r["accuracy"] + 0.02, f"{r['accuracy']:.3f}", ha="center")
    axes[0].set_ylabel("test accuracy (rotated digits)")
    axes[0].set_ylim(0, 1)
    axes[0].tick_params(axis="x", rotation=20)
    for i, config in enumerate(CONFIGS):
        rows = sorted((r for r in depth_rows if r["config"] == config), key=lambda r: r["depth"])
        blocks = [r["depth"] for r in rows]
        axes[1].plot(blocks, [r["bytes_kept"] / MIB for r in rows], "o-", color=f"C{i}", label=config)
        if all(r["rss_growth_mib"] is not None for r in rows):
            axes[2].plot(blocks, [r["rss_growth_mib"] for r in rows], "o-", color=f"C{i}", label=config)
    axes[1].set_ylabel(f"MiB kept for backward (batch {BATCH})")
    axes[2].set_ylabel("RSS growth during training (MiB)")
    for ax in axes[1:]:
        ax.set_xlabel("blocks")
        ax.set_xticks(sorted({r["depth"] for r in depth_rows}))
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run in seconds (in-process)")
    parser.add_argument(
        "--out", type=writable_directory, default="runs/meft", help="output folder (pre-trained weights)"
    )
    parser.add_argument("--figure", type=writable_file, default=None,
                        help="plot path (default docs/figures/meft.png; OUT/meft.png with --quick)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=integer(1), default=300, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=integer(1), default=DEPTH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.figure is None and not args.worker:
        # The default is checked as a given one is: the plot is written at the end of the run.
        default = args.out / "meft.png" if args.quick else ROOT / "docs" / "figures" / "meft.png"
        args.figure = checked_default(parser, "--figure", writable_file, default)
    torch.set_num_threads(1)
    if args.worker:
        state = torch.load(args.pretrained) if args.pretrained is not None else None
        print(json.dumps(measure(args.worker, torch.load(args.data), args.steps, args.depth, state)))
    else:
        run(args)
    return 0


def run(args: argparse.Namespace) -> None:
    """Pre-train, fine-tune four ways, print the tables and save the plot."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    figure = args.figure
    torch.manual_seed(0)
    data = digits()
    # Workers read the data from a file: no scipy / scikit-learn in their RSS.
    _save(data, out / "data.pt")
    # --quick: 2 blocks (2, 4, 8 in the depth table) instead of 6 (6, 12, 24).
    depth = 2 if args.quick else DEPTH
    model = make_vit(depth)
    pre_steps, ft_steps, depth_steps = (4, 3, 2) if args.quick else (400, 200, 6)
    fresh = not args.quick
    sec = train(model, data["pre_x"], data["pre_y"], pre_steps, lr=1e-3)
    pretrained = out / "pretrained.pt"
    _save(model.state_dict(), pretrained)
    print(f"torch {torch.__version__}, 1 thread; pre-training: {pre_steps} steps of batch {BATCH} "
          f"({sec * 1e3:.1f} ms/step); test accuracy of the pre-trained model: "
          f"{accuracy(model, data['plain_test_x'], data['test_y']):.3f} upright, "
          f"{accuracy(model, data['test_x'], data['test_y']):.3f} rotated")

    results = [run_worker(c, out / "data.pt", ft_steps, depth, pretrained, fresh) for c in CONFIGS]
    print(f"\nfine-tuning on rotated digits: {ft_steps} steps of batch {BATCH}, {depth} blocks")
    print("\n| config | test acc | trainable params | bytes kept for backward | peak RSS (MiB) "
          "| RSS growth (MiB) | ms/step |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['accuracy']:.3f} | {r['trainable']:,} | {r['bytes_kept']:,} | "
              f"{_mib(r['peak_rss_mib'])} | {_mib(r['rss_growth_mib'])} | {r['sec_per_step'] * 1e3:.1f} |")
    saving = next(r for r in results if "grad_error_start" in r)
    print(f"\nmemory-saving vs ordinary MEFT gradients (float32, x1_factor=0.1), gradient parity "
          f"(flows.parity: max |memory-saving - ordinary| / max |ordinary| over the trainable parameters): "
          f"{saving['grad_error_start']:.1e} at conversion, {saving['grad_error_tuned']:.1e} "
          "after fine-tuning (reconstruction drift grows as the adapters grow)")

    depth_rows = list(results)
    for mult in (2, 4):
        depth_rows += [run_worker(c, out / "data.pt", depth_steps, depth * mult, None, fresh) for c in CONFIGS]
    print(f"\nmemory as depth grows ({depth_steps} training steps per row, random weights)")
    print("\n| config | blocks | bytes kept for backward | peak RSS (MiB) | RSS growth (MiB) | ms/step |")
    print("|---|---|---|---|---|---|")
    for r in sorted(depth_rows, key=lambda r: (CONFIGS.index(r["config"]), r["depth"])):
        print(f"| {r['config']} | {r['depth']} | {r['bytes_kept']:,} | {_mib(r['peak_rss_mib'])} | "
              f"{_mib(r['rss_growth_mib'])} | {r['sec_per_step'] * 1e3:.1f} |")
    where = ("a fresh subprocess per row" if fresh
             else "this one process (--quick: RSS growth understated, memory freed by earlier rows is reused)")
    print(f"\npeak RSS: resident high-water mark during training of {where}, interpreter and torch "
          "included; RSS growth: that peak minus the resident size before training; bytes kept: "
          "flows.saved_bytes (saved_tensors_hooks, distinct storages, parameters excluded).")
    plot(results, depth_rows, figure)
    print(f"plot: {figure}")


if __name__ == "__main__":
    raise SystemExit(main())
