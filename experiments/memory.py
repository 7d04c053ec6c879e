"""Memory and time of ordinary vs memory-saving backward, as depth grows.

    python experiments/memory.py [--quick] [--repeats N] [--families a,b] [--json PATH]

For each configuration and depth, measures

* **saved**: bytes autograd keeps for backward while the loss is built
  (:func:`flows.saved_bytes`: every tensor through ``saved_tensors_hooks``, distinct
  storages once, parameters excluded), in MiB;
* **RSS**: peak resident set size (``VmHWM``) of a *fresh* process per configuration and
  mode: this script with the hidden ``--rss-server`` flag imports torch and flows once,
  does the one-time lazy imports (the first optimizer step imports ``torch._dynamo``;
  digits import scikit-learn), builds nothing, and forks one child per configuration and
  mode. The child builds the model and the data and runs the data-dependent
  initialisation (its peak then is the *baseline*), then does one training step; the
  table shows the baseline and the step's increase of the peak (activations + gradients
  + Adam state + allocator slack). A forked child counts only the pages of the server it
  touches, so its baseline is lower than that of a process started from scratch;
* **grad parity**: :func:`flows.parity.gradient_parity` of the loss on the batch, the
  largest difference of any parameter gradient entry between the two modes over the
  largest gradient entry (the rule ``flows.check`` and ``flows bench`` report);
* **time**: the median CPU time (``time.process_time``) of one training step (forward,
  backward, Adam) over ``--repeats`` steps after one warm-up step per mode, the modes
  interleaved; the overhead is the ratio of these medians. With one intra-op thread the
  CPU time is the step's work, which other processes on a shared machine barely change;
  the ratio of median wall times is shown next to it.

Modes: ``ordinary`` autograd, ``memory-saving`` as the public switch sets it
(``model.memory_saving = True``, which turns on every chain, nested ones included), and
``checkpointed``, the usual baseline: activation checkpointing
(``torch.utils.checkpoint``, ``use_reentrant=False``) around each block of the outermost
chain (:func:`flows.benchmark.checkpointed`: each Glow step, each RevCoupling), ordinary
autograd otherwise. It keeps one input per checkpointed block and recomputes each block's
forward once, so at equal depth its memory grows with depth and its time is close to
memory-saving backward's (which also rebuilds inputs with ``inverse``).

Configurations (``--quick``: tiny sizes and depths, a smoke test):

* ``glow-digits``: :func:`flows.models.Glow` on ``(1, 8, 8)``, a real batch of
  scikit-learn's digits; 2 levels, 4/8/16/32 steps per level, hidden 64, batch 64
  (quick: 2 steps, hidden 16, batch 16);
* ``glow-32``: Glow on ``(3, 32, 32)``, uniform random 8-bit images (only shapes matter);
  3 levels, 2/4/8/16 steps per level, hidden 64, batch 16 (quick: 1 step, hidden 16,
  batch 2);
* ``reversible``: a :class:`flows.nn.Reversible` stack of
  :class:`flows.transforms.rev_coupling.RevCoupling` blocks, ``F`` and ``G`` each
  conv3x3-ReLU-conv3x3 on half the channels, input ``(32, 32, 16, 16)``, loss
  ``mean(y**2)``, depth 4/16/64 (quick: input ``(4, 16, 8, 8)``, depth 2/8).

``--device cuda`` measures on a GPU instead: time is the median wall time of a step (the
device synchronised before each clock reading; the overhead is the ratio of these), and
the memory column is the step's peak of allocated CUDA memory above what was allocated
when it began (``torch.cuda.max_memory_allocated``), in place of the RSS of a fresh
process. Three families sized for a GPU (slow on a CPU) are added to the default set there:

* ``glow-paper``: Glow on ``(3, 32, 32)`` at the Glow paper's CIFAR-10 width: 3 levels,
  8/16/32 steps per level, hidden 512, batch 64 (quick: 1 step, hidden 16, batch 2);
* ``glow-64``: Glow on ``(3, 64, 64)``, 4 levels, 8/16 steps per level, hidden 512, batch 32
  (quick: 1 step, hidden 16, batch 2);
* ``reversible-wide``: the Reversible stack on ``(64, 256, 32, 32)``, ``F`` and ``G`` on
  128 channels, depth 8/32 (quick: ``(4, 16, 8, 8)``, depth 2).

The default run takes 4 to 6 minutes on 2 shared CPU cores; ``--quick`` takes 10 to 30 s,
most of it the RSS server importing torch (its timings are then disturbed by that server:
a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import flows
from flows.arguments import integer
from flows.benchmark import checkpointed
from flows.diagnostics import cpu_model
from flows.io import writable_file
from flows.parity import gradient_parity

ORDINARY = "ordinary"
SAVING = "memory-saving"
CHECKPOINTED = "checkpointed"
MODES = (ORDINARY, SAVING, CHECKPOINTED)
BASELINES = (SAVING, CHECKPOINTED)  # the modes whose time and memory are compared with ordinary
MIB = 2.0**20
TARGET = 1.5  # the acceptance bound on the time overhead of memory-saving backward
PARITY_NOTE = "flows.parity.gradient_parity, max |memory-saving - ordinary| / max |ordinary| over parameter gradients"


@dataclass(frozen=True)
class Size:
    """The sizes of one configuration (full or quick)."""

    depths: tuple[int, ...]
    batch: int
    width: int  # Glow: conditioner hidden channels; Reversible: channels of x
    spatial: int = 16  # Reversible: height and width of x


@dataclass(frozen=True)
class Family:
    """One kind of network whose depth the experiment varies."""

    name: str
    title: str  # formatted with the Size's fields
    depth_label: str
    full: Size
    quick: Size

    def size(self, quick: bool) -> Size:
        return self.quick if quick else self.full


FAMILIES = {
    f.name: f
    for f in (
        Family(
            "glow-digits",
            "Glow on (1, 8, 8) digits, 2 levels, hidden {width}, batch {batch}",
            "steps/level",
            Size((4, 8, 16, 32), 64, 64),
            Size((2,), 16, 16),
        ),
        Family(
            "glow-32",
            "Glow on (3, 32, 32), 3 levels, hidden {width}, batch {batch}",
            "steps/level",
            Size((2, 4, 8, 16), 16, 64),
            Size((1,), 2, 16),
        ),
        Family(
            "reversible",
            "Reversible RevCoupling conv stack, x ({batch}, {width}, {spatial}, {spatial}), "
            "F = G = conv3x3-relu-conv3x3",
            "depth",
            Size((4, 16, 64), 32, 32),
            Size((2, 8), 4, 16, spatial=8),
        ),
        Family(
            "glow-paper",
            "Glow on (3, 32, 32), 3 levels, hidden {width}, batch {batch}",
            "steps/level",
            Size((8, 16, 32), 64, 512),
            Size((1,), 2, 16),
        ),
        Family(
            "glow-64",
            "Glow on (3, 64, 64), 4 levels, hidden {width}, batch {batch}",
            "steps/level",
            Size((8, 16), 32, 512),
            Size((1,), 2, 16),
        ),
        Family(
            "reversible-wide",
            "Reversible RevCoupling conv stack, x ({batch}, {width}, {spatial}, {spatial}), "
            "F = G = conv3x3-relu-conv3x3",
            "depth",
            Size((8, 32), 64, 256, spatial=32),
            Size((2,), 4, 16, spatial=8),
        ),
    )
}
CPU_FAMILIES = ("glow-digits", "glow-32", "reversible")
"""The default set on a CPU; on CUDA every family runs."""


def title(family: Family, quick: bool) -> str:
    size = family.size(quick)
    return family.title.format(batch=size.batch, width=size.width, spatial=size.spatial)


@dataclass
class Setup:
    """A model, the loss of one input batch and how to switch modes."""

    module: nn.Module
    objective: Callable[[nn.Module], Tensor]  # the loss of the batch, for this module or a copy
    set_mode: Callable[[str], None]  # switches module between ordinary and memory-saving
    blocks: int
    mode: str = ORDINARY
    checkpointed: nn.Module | None = None  # built on first use of the checkpointed mode

    def switch(self, mode: str) -> None:
        """Run ``mode`` from now on (the checkpointed mode runs a checkpointed copy)."""
        self.mode = mode
        self.set_mode(ORDINARY if mode == CHECKPOINTED else mode)
        if mode == CHECKPOINTED and self.checkpointed is None:
            self.checkpointed = checkpointed(self.module)

    def runner(self) -> nn.Module:
        """The module the current mode runs."""
        return self.checkpointed if self.mode == CHECKPOINTED else self.module

    def loss(self) -> Tensor:
        """The loss of the batch under the current mode."""
        return self.objective(self.runner())


def build(family: str, depth: int, quick: bool = False, device: str = "cpu") -> Setup:
    """Build the network and the data of one configuration on ``device``, initialised (ActNorm)."""
    torch.manual_seed(0)
    size = FAMILIES[family].size(quick)
    generator = torch.Generator().manual_seed(0)
    if family == "glow-digits":
        digits = flows.data.load("digits")
        x = digits.prepare(digits.train[: size.batch], generator=generator)
        model = flows.models.Glow((1, 8, 8), levels=2, steps=depth, hidden_channels=size.width, n_levels=17)
        blocks = 2 * depth
    elif family in ("glow-32", "glow-paper", "glow-64"):
        side, levels = (64, 4) if family == "glow-64" else (32, 3)
        pixels = torch.randint(0, 256, (size.batch, 3, side, side), generator=generator, dtype=torch.uint8)
        x = flows.data.dequantize(pixels, 256, generator=generator)
        model = flows.models.Glow(
            (3, side, side), levels=levels, steps=depth, hidden_channels=size.width, n_levels=256
        )
        blocks = levels * depth
    elif family in ("reversible", "reversible-wide"):
        from flows.nn.reversible import Reversible
        from flows.transforms.rev_coupling import RevCoupling

        half = size.width // 2

        def conv_relu_conv() -> nn.Module:
            return nn.Sequential(nn.Conv2d(half, half, 3, padding=1), nn.ReLU(), nn.Conv2d(half, half, 3, padding=1))

        layer = Reversible(*[RevCoupling(conv_relu_conv(), conv_relu_conv()) for _ in range(depth)]).to(device)
        x = torch.randn(size.batch, size.width, size.spatial, size.spatial, generator=generator).to(device)

        def set_rev(mode: str) -> None:
            layer.memory_saving = mode != ORDINARY

        return Setup(layer, lambda m: m(x).pow(2).mean(), set_rev, depth)
    else:
        raise ValueError(f"unknown family {family!r}")

    model, x = model.to(device), x.to(device)
    with torch.no_grad():
        model.train()
        model.log_prob(x)  # ActNorm's data-dependent initialisation, outside any timing

    def set_flow(mode: str) -> None:
        model.memory_saving = mode != ORDINARY  # the public switch: every chain

    return Setup(model, lambda m: m.bits_per_dim(x).mean(), set_flow, blocks)


def train_step(setup: Setup, optimizer: torch.optim.Optimizer) -> float:
    """One step (forward, backward, Adam); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = setup.loss()
    loss.backward()
    optimizer.step()
    return loss.item()


def peak_kib() -> int:
    """Peak RSS of this process image in KiB.

    Linux's ``ru_maxrss`` survives ``exec``: a child forked from a large parent reports
    the parent's RSS at fork time when that is higher than its own peak. ``VmHWM`` in
    ``/proc/self/status`` belongs to the new address space, so it is the worker's own
    peak; ``ru_maxrss`` is the fallback where ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_one(spec: str) -> dict[str, Any]:
    """Build the ``FAMILY:DEPTH:MODE:QUICK`` configuration, do one step; peak RSS before and after."""
    family, depth, mode, quick = spec.split(":")
    setup = build(family, int(depth), quick == "1")
    setup.switch(mode)
    optimizer = torch.optim.Adam(setup.runner().parameters(), lr=1e-4)
    baseline = peak_kib()
    train_step(setup, optimizer)
    return {"spec": spec, "baseline_kib": baseline, "peak_kib": peak_kib()}


def rss_server(specs: list[str]) -> None:
    """The hidden ``--rss-server SPEC...`` mode: one fresh forked child per spec.

    This process imports torch and flows once and builds nothing; every child, forked
    from it, builds its configuration, steps once, prints one JSON line and exits, so
    each peak belongs to a process that never held another configuration (and a child
    need not import torch again, which takes seconds on a loaded machine). ``VmHWM``
    starts afresh in a forked child.
    """
    # Before any op: a child forked after OpenMP started a thread pool would hang.
    torch.set_num_threads(1)
    # One-time lazy imports, so that a child's step increase is the step's memory, not
    # module code: the first optimizer step imports torch._dynamo (~800 modules, ~2 s of
    # CPU, ~75 MiB of RSS here), the digits loader imports scikit-learn.
    warm = nn.Parameter(torch.zeros(1))
    warm.grad = torch.ones(1)
    torch.optim.Adam([warm]).step()
    if any(spec.startswith("glow-digits:") for spec in specs):
        flows.data.load("digits")
    for spec in specs:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                print(json.dumps(run_one(spec)), flush=True)
                status = 0
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(status)  # no cleanup of the parent's state in the child
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"RSS worker for {spec} failed (wait status {status})")


def start_rss(specs: list[str], servers: int) -> list[tuple[list[str], subprocess.Popen[str]]]:
    """Start ``servers`` fork servers (``--rss-server``) sharing ``specs``; see :func:`collect_rss`."""
    if not hasattr(os, "fork"):
        raise RuntimeError("the RSS measurement needs os.fork (Linux or macOS)")
    # CPU measurements: with a CUDA build of torch, Adam's step would initialise CUDA in the
    # server (a graph-capture check), and a forked child cannot use CUDA after that.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    script = str(Path(__file__).resolve())
    groups = [specs[i::servers] for i in range(servers) if specs[i::servers]]
    return [
        (
            group,
            subprocess.Popen(
                [sys.executable, script, "--rss-server", *group],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            ),
        )
        for group in groups
    ]


def collect_rss(started: list[tuple[list[str], subprocess.Popen[str]]]) -> dict[str, dict[str, float]]:
    """Wait for the servers; baseline and after-step peak RSS in MiB of each spec."""
    results: dict[str, dict[str, float]] = {}
    for group, proc in started:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"RSS server failed:\n{err[-3000:]}")
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[r["spec"]] = {"baseline": r["baseline_kib"] / 1024.0, "peak": r["peak_kib"] / 1024.0}
        missing = [spec for spec in group if spec not in results]
        if missing:
            raise RuntimeError(f"RSS server returned nothing for {missing}")
    return results


def measure_in_process(family: Family, depth: int, repeats: int, quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Parameter count, saved bytes and median step time in each mode (on CUDA also each
    mode's largest step increase of allocated memory)."""
    cuda = torch.device(device).type == "cuda"
    setup = build(family.name, depth, quick, device)
    params = [p for p in setup.module.parameters() if p.requires_grad]
    row: dict[str, Any] = {
        "family": family.name,
        "depth": depth,
        "blocks": setup.blocks,
        "params": sum(p.numel() for p in params),
    }
    for mode in MODES:
        setup.switch(mode)
        row[f"saved_mib[{mode}]"] = flows.saved_bytes(setup.loss, exclude=setup.runner()) / MIB
    setup.switch(ORDINARY)
    row["gradient_parity"] = gradient_parity(setup.module, objective=setup.objective).error
    optimizer = torch.optim.Adam(params, lr=1e-4)
    optimizers = {ORDINARY: optimizer, SAVING: optimizer}
    optimizers[CHECKPOINTED] = torch.optim.Adam(setup.checkpointed.parameters(), lr=1e-4)
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    peak: dict[str, int] = {mode: 0 for mode in MODES}
    for rep in range(repeats + 1):
        for mode in MODES:
            setup.switch(mode)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                allocated = torch.cuda.memory_allocated(device)
            began_cpu, began_wall = time.process_time(), time.perf_counter()
            train_step(setup, optimizers[mode])
            if cuda:
                torch.cuda.synchronize(device)
            if rep > 0:  # the first step of each mode is a warm-up
                cpu[mode].append(time.process_time() - began_cpu)
                wall[mode].append(time.perf_counter() - began_wall)
                if cuda:
                    peak[mode] = max(peak[mode], torch.cuda.max_memory_allocated(device) - allocated)
    for mode in MODES:
        row[f"time_ms[{mode}]"] = 1000.0 * statistics.median(cpu[mode])
        row[f"wall_ms[{mode}]"] = 1000.0 * statistics.median(wall[mode])
        row[f"times_ms[{mode}]"] = [round(1000.0 * t, 2) for t in cpu[mode]]
        row[f"walls_ms[{mode}]"] = [round(1000.0 * t, 2) for t in wall[mode]]
        if cuda:
            row[f"cuda_peak_mib[{mode}]"] = peak[mode] / MIB
    for mode in BASELINES:
        row[f"overhead[{mode}]"] = row[f"time_ms[{mode}]"] / row[f"time_ms[{ORDINARY}]"]
        row[f"wall_overhead[{mode}]"] = row[f"wall_ms[{mode}]"] / row[f"wall_ms[{ORDINARY}]"]
    return row


def table(family: Family, rows: list[dict[str, Any]], repeats: int, quick: bool) -> str:
    """One markdown table for a family, a column per mode for each quantity (CPU rows: RSS
    and CPU time; CUDA rows: the step's CUDA peak and wall time)."""
    cuda = f"cuda_peak_mib[{ORDINARY}]" in rows[0]
    saved = "".join(f"| saved {mode} (MiB) " for mode in MODES)
    if cuda:
        memory = "".join(f"| CUDA step peak {mode} (MiB) " for mode in MODES)
        times = "".join(f"| step {mode} (ms) " for mode in MODES)
    else:
        memory = "| RSS baseline (MiB) " + "".join(f"| RSS step increase {mode} (MiB) " for mode in MODES)
        times = "".join(f"| step {mode} (CPU ms) " for mode in MODES)
    overheads = "".join(f"| {mode} time overhead " for mode in BASELINES)
    header = f"| {family.depth_label} | blocks | params " + saved + memory + times + overheads + "| grad parity |"
    lines = [f"### {title(family, quick)}", "", header, "|" + "---:|" * header.count(" |")]
    for r in rows:
        saved_cells = "".join(f"| {r[f'saved_mib[{mode}]']:.{2 if mode == ORDINARY else 3}f} " for mode in MODES)
        if cuda:
            memory_cells = "".join(f"| {r[f'cuda_peak_mib[{mode}]']:.1f} " for mode in MODES)
            time_cells = "".join(f"| {r[f'wall_ms[{mode}]']:.1f} " for mode in MODES)
            time_cells += "".join(f"| {r[f'wall_overhead[{mode}]']:.2f}x " for mode in BASELINES)
        else:
            memory_cells = f"| {r['rss_mib[baseline]']:.0f} " + "".join(
                f"| {r[f'rss_increase_mib[{mode}]']:.1f} " for mode in MODES
            )
            time_cells = "".join(f"| {r[f'time_ms[{mode}]']:.1f} " for mode in MODES)
            time_cells += "".join(
                f"| {r[f'overhead[{mode}]']:.2f}x (wall {r[f'wall_overhead[{mode}]']:.2f}x) " for mode in BASELINES
            )
        lines.append(
            f"| {r['depth']} | {r['blocks']} | {r['params']:,} "
            + saved_cells
            + memory_cells
            + time_cells
            + f"| {r['gradient_parity']:.1e} |"
        )
    lines.append("")
    if cuda:
        lines.append(
            f"(step times: median wall time of {repeats} steps after one warm-up per mode, modes interleaved, "
            "the device synchronised before each clock reading; CUDA step peak: the largest increase of "
            "allocated memory during a step over the allocation when it began; grad parity: "
            f"{PARITY_NOTE})"
        )
    else:
        lines.append(
            f"(step times: median CPU time of {repeats} steps after one warm-up per mode, modes interleaved; "
            f"in brackets the same ratio of median wall times; grad parity: {PARITY_NOTE})"
        )
    return "\n".join(lines)


def summary(families: list[Family], rows: dict[str, list[dict[str, Any]]], cuda: bool = False) -> str:
    """The time overhead of memory-saving backward against the target, per family (CPU
    time on a CPU, wall time on CUDA)."""
    clock = "wall time" if cuda else "CPU time"
    lines = [f"Time overhead of memory-saving over ordinary backward, {clock} (target <= {TARGET}x):"]
    for family in families:
        walls = [r[f"wall_overhead[{SAVING}]"] for r in rows[family.name]]
        ratios = walls if cuda else [r[f"overhead[{SAVING}]"] for r in rows[family.name]]
        met = sum(ratio <= TARGET for ratio in ratios)
        detail = "" if cuda else f"; wall {min(walls):.2f}x to {max(walls):.2f}x"
        lines.append(
            f"- {family.name}, {SAVING}: {min(ratios):.2f}x to {max(ratios):.2f}x "
            f"(median {statistics.median(ratios):.2f}x{detail}), "
            f"target met at {met} of {len(ratios)} depths"
        )
        key = "wall_ms" if cuda else "time_ms"
        versus = [r[f"{key}[{SAVING}]"] / r[f"{key}[{CHECKPOINTED}]"] for r in rows[family.name]]
        kept = [r[f"saved_mib[{CHECKPOINTED}]"] / max(r[f"saved_mib[{SAVING}]"], 1e-12) for r in rows[family.name]]
        lines.append(
            f"  against {CHECKPOINTED}: memory-saving time {min(versus):.2f}x to {max(versus):.2f}x of "
            f"checkpointing's; checkpointing keeps {min(kept):.1f}x to {max(kept):.1f}x memory-saving's bytes "
            "for backward"
        )
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, then ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and depths (a smoke test)")
    parser.add_argument("--repeats", type=integer(1), default=None, help="timed steps per mode (default 5, quick 2)")
    parser.add_argument("--json", type=writable_file, default=None, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--families",
        default=None,
        help=f"comma-separated subset of {', '.join(FAMILIES)} (default on a CPU: {', '.join(CPU_FAMILIES)}; "
        "on CUDA: all)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or a CUDA device such as cuda or cuda:1")
    parser.add_argument("--rss-server", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_server is not None:
        rss_server(args.rss_server)
        return 0
    try:
        device = torch.device(args.device)
    except RuntimeError:  # not a device name torch knows
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch build or on this machine")
    if cuda and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                     "give cuda or cuda:N with N below that")
    if args.families is None:
        args.families = ",".join(FAMILIES if cuda else CPU_FAMILIES)
    names = [name for name in args.families.split(",") if name]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown or not names:
        parser.error(f"--families: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(FAMILIES)}")
    families = [FAMILIES[name] for name in names]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)

    torch.set_num_threads(1)
    began = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    hardware = f"{cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    if cuda:
        hardware = f"{torch.cuda.get_device_name(args.device)}; host {hardware}"
    print(f"{date}; {hardware}; torch {torch.__version__}, 1 intra-op thread", flush=True)

    quick = int(args.quick)
    depths = {f.name: f.size(args.quick).depths for f in families}
    specs = [f"{f.name}:{d}:{mode}:{quick}" for f in families for d in depths[f.name] for mode in MODES]
    # The full run measures peak RSS after the timings, so the workers do not disturb
    # them, with two servers at a time (a peak does not depend on contention). The quick
    # smoke run starts one server first, so its imports overlap the timings.
    started = start_rss(specs, servers=1) if args.quick and not cuda else []
    rows = {
        f.name: [measure_in_process(f, depth, repeats, args.quick, args.device) for depth in depths[f.name]]
        for f in families
    }
    if not cuda:  # on CUDA the step's device peak is measured in process instead
        rss = collect_rss(started or start_rss(specs, servers=2))
        for f in families:
            for r in rows[f.name]:
                for mode in MODES:
                    measured = rss[f"{r['family']}:{r['depth']}:{mode}:{quick}"]
                    r[f"rss_baseline_mib[{mode}]"] = measured["baseline"]
                    r[f"rss_peak_mib[{mode}]"] = measured["peak"]
                    r[f"rss_increase_mib[{mode}]"] = measured["peak"] - measured["baseline"]
                r["rss_mib[baseline]"] = statistics.mean(r[f"rss_baseline_mib[{mode}]"] for mode in MODES)

    print()
    for f in families:
        print(table(f, rows[f.name], repeats, args.quick))
        print()
    print(summary(families, rows, cuda))
    elapsed = time.perf_counter() - began
    print(f"\ntotal {elapsed:.0f} s")
    if args.json:
        write_json(
            args.json,
            {
                "experiment": "memory",
                "date": date,
                "hardware": hardware,
                "torch": torch.__version__,
                "device": args.device,
                "threads": 1,
                "repeats": repeats,
                "quick": args.quick,
                "target_overhead": TARGET,
                "seconds": elapsed,
                "rows": [r for f in families for r in rows[f.name]],
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
