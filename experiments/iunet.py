"""i-UNet experiments: activation memory against depth, and denoising of the bundled digits.

    python experiments/iunet.py            # default: ~6 minutes of CPU time, 1 thread
    python experiments/iunet.py --quick    # seconds-long smoke run, measured in-process
    python experiments/iunet.py --full     # adds a deeper row per input (5 x 4, 3D 4 x 3)

(a) Memory against depth. For 2D ``(8, 16, 64, 64)`` and 3D ``(2, 8, 32, 32, 32)`` inputs
    and depths (levels x coupling blocks per level) 2 x 1, 3 x 2 and 4 x 3 (3D: 4 x 2),
    one training step (forward, MSE to a random target, backward, SGD) of the models
    below. One flows block is two couplings; the peer gets ``2 x blocks`` layers per
    level, so both have as many couplings.

    * :class:`flows.nn.IUNet`, ordinary backward and memory-saving backward;
    * the ``iunets`` peer package (Etmann et al., built on ``memcnn``), with its custom
      gradient disabled ("ordinary") and enabled ("memory-saving"), when it imports;
      it is never a dependency: ``pip install --no-deps iunets memcnn`` to include it;
    * an ordinary (non-invertible) U-Net whose width is picked to match the flows
      i-UNet's parameter count.

    Columns: parameters; ``flows.saved_bytes`` (tensors saved for backward, seen through
    ``saved_tensors_hooks``, parameters excluded); bytes that custom autograd Functions hold
    as plain ``ctx`` attributes and the hooks cannot see (``memcnn`` keeps its outputs
    there; found by walking the graph, counted at their size after the forward pass, not
    already in the hooks' set); peak RSS (``VmHWM``) of a fresh subprocess that builds
    the model and runs the steps, and its rise over the pre-step value; median seconds
    per step after a warm-up step; that time over the same package's ordinary backward
    (the U-Net's over the flows i-UNet's ordinary backward). One intra-op thread.

    What memory-saving rows keep: the output (2 MiB at 8 x 16 x 64 x 64, also the MSE's
    saved input) and the MSE's target (2 MiB). iunets wraps its learnable resampling
    layers with memcnn's wrapper disabled (``disable=learnable``), so their inputs stay
    saved too: a little more, growing slightly per level. The flows i-UNet is a chain of
    ``Tail`` blocks over one flat state (skips, then the current tensor); memory-saving
    backward rebuilds each coupling with its fused ``reconstruct``, so each conditioner
    runs twice per step (forward, backward; once under ordinary backward). In ordinary
    mode the flows i-UNet keeps more than iunets: its conditioners are wider, and each
    ``Tail`` hands its block a view of the flat state, which the first saved input of a
    level's couplings (and of each resampling) keeps alive whole.

(b) Denoising. scikit-learn's digits (8x8) upsampled bilinearly to 32x32 in [0, 1], plus
    Gaussian noise (sigma 0.3), trained to recover the clean image: ``x + proj(core(lift(x)))``
    with conv lift 1 -> C channels and projection C -> 1 around a memory-saving
    :class:`flows.nn.IUNet` or an ordinary U-Net of about as many parameters, the same
    steps, batches and optimiser. Reports test PSNR, parameters, seconds per step, bytes
    kept for backward and peak RSS (fresh subprocess per model), and saves a figure with
    noisy / i-UNet / U-Net / clean rows (``docs/figures/iunet_denoising.png``).

``--quick`` uses tiny sizes and measures in this process (no fresh-subprocess RSS) so that
it finishes in seconds; its figures go to ``--out``, not ``docs/figures``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import flows
from flows.arguments import checked_default, integer, number
from flows.io import writable_directory
from flows.nn.iunet import IUNet

ROOT = Path(__file__).resolve().parents[1]
CONV = {2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
MIB = 2.0**20
KINDS = ("ordinary", "saving", "iunets-ordinary", "iunets-saving", "unet")
KIND_NAMES = {
    "ordinary": "flows i-UNet, ordinary",
    "saving": "flows i-UNet, memory-saving",
    "iunets-ordinary": "iunets, ordinary",
    "iunets-saving": "iunets, memory-saving",
    "unet": "U-Net (matched params)",
}
# Which row's time a row's time is divided by.
REFERENCE = {
    "ordinary": "ordinary",
    "saving": "ordinary",
    "iunets-ordinary": "iunets-ordinary",
    "iunets-saving": "iunets-ordinary",
    "unet": "ordinary",
}


# ----------------------------------------------------------------------------- helpers
def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def peak_rss() -> int:
    """Peak RSS of this process image in bytes.

    ``VmHWM`` belongs to the current address space; ``ru_maxrss`` survives ``exec`` and
    would report the parent's size in a child forked from a larger parent.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _tensors_in(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def ctx_held_bytes(run: Callable[[], Tensor], exclude: nn.Module) -> int:
    """Bytes held as plain attributes of custom autograd Function contexts after ``run()``.

    ``saved_tensors_hooks`` see only what goes through ``save_for_backward`` (and built-in
    ops); a Function may keep tensors as ``ctx.outputs = ...`` instead (``memcnn`` does).
    Walk the graph from ``run()``'s result and count those storages at their size now
    (``memcnn`` frees inputs by resizing them to 0), leaving out ``exclude``'s
    parameters and storages the hooks already saw.
    """
    params = {p.untyped_storage().data_ptr() for p in exclude.parameters()}
    hooked: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        hooked.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    storages: dict[int, int] = {}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for value in getattr(node, "__dict__", {}).values():
            for t in _tensors_in(value):
                s = t.untyped_storage()
                if s.data_ptr() not in params and s.data_ptr() not in hooked:
                    storages[s.data_ptr()] = s.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


def import_iunets() -> tuple[Any, str | None]:
    """The peer's ``iUNet`` class, or ``None`` and why it does not import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # memcnn's torch.cuda.amp deprecation warnings
            from iunets import iUNet
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"{type(e).__name__}: {e}"
    return iUNet, None


class UNet(nn.Module):
    """An ordinary U-Net: residual conv blocks, strided-conv down, transposed-conv up,
    skip concatenation reduced by a 1x1 conv. Channels double per level."""

    def __init__(self, channels: int, levels: int, blocks: int, dims: int = 2, width: int = 16):
        super().__init__()
        conv, conv_t = CONV[dims], CONV_T[dims]

        def stack(c: int) -> nn.ModuleList:
            return nn.ModuleList(
                nn.Sequential(conv(c, c, 3, padding=1), nn.LeakyReLU(0.1), conv(c, c, 3, padding=1))
                for _ in range(blocks)
            )

        widths = [width * 2**level for level in range(levels)]
        self.inp = conv(channels, widths[0], 1)
        self.down_blocks = nn.ModuleList(stack(c) for c in widths)
        self.downs = nn.ModuleList(conv(c, 2 * c, 2, stride=2) for c in widths[:-1])
        self.ups = nn.ModuleList(conv_t(2 * c, c, 2, stride=2) for c in widths[:-1])
        self.merges = nn.ModuleList(conv(2 * c, c, 1) for c in widths[:-1])
        self.up_blocks = nn.ModuleList(stack(c) for c in widths[:-1])
        self.out = conv(widths[0], channels, 1)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: Tensor) -> Tensor:
        for block in blocks:
            h = h + block(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        skips = []
        for level, down in enumerate(self.downs):
            h = self._run(self.down_blocks[level], h)
            skips.append(h)
            h = down(h)
        h = self._run(self.down_blocks[-1], h)
        for level in reversed(range(len(self.downs))):
            h = self.merges[level](torch.cat([skips[level], self.ups[level](h)], 1))
            h = self._run(self.up_blocks[level], h)
        return self.out(h)


def matched_width(target: int, make: Callable[[int], nn.Module]) -> int:
    """The width whose model's parameter count is closest to ``target`` (built on meta)."""

    def params(w: int) -> int:
        with torch.device("meta"):
            return count_params(make(w))

    lo, hi = 1, 512
    while hi - lo > 1:  # parameters grow with width
        mid = (lo + hi) // 2
        if params(mid) < target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda w: abs(params(w) - target))


# ----------------------------------------------------------------------------- (a) memory
def build_core(cfg: dict) -> nn.Module:
    dims, levels, blocks = cfg["dims"], cfg["levels"], cfg["blocks"]
    channels = cfg["shape"][1]
    skip = 0.5 if dims == 2 else 0.75  # what the peer's slice_mode="double" gives at stride 2

    def flows_iunet(memory_saving: bool) -> IUNet:
        return IUNet(channels, levels, blocks, dims=dims, skip_fraction=skip, memory_saving=memory_saving)

    kind = cfg["kind"]
    if kind in ("ordinary", "saving"):
        return flows_iunet(kind == "saving")
    if kind == "unet":
        target = count_params(flows_iunet(False))
        width = matched_width(target, lambda w: UNet(channels, levels, blocks, dims, width=w))
        return UNet(channels, levels, blocks, dims, width=width)
    iunet_cls, why = import_iunets()
    if iunet_cls is None:
        raise ImportError(why)
    return iunet_cls(
        channels,
        (2 * blocks,) * levels,
        dim=dims,
        disable_custom_gradient=kind == "iunets-ordinary",
        verbose=0,
    )


def measure(cfg: dict) -> dict:
    """One memory-table configuration, in this process."""
    if cfg["kind"].startswith("iunets"):
        # iunets and memcnn call deprecated torch APIs (torch.lu, Tensor.storage) each step.
        warnings.filterwarnings("ignore", module=r"(iunets|memcnn)\.")
        warnings.filterwarnings("ignore", message=".*(deprecated|TypedStorage).*")
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    net = build_core(cfg).train()
    x = torch.randn(cfg["shape"])
    target = torch.randn(cfg["shape"])
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)

    # memcnn frees its inputs' storage (resize to 0): feed every step a fresh copy.
    def loss() -> Tensor:
        return F.mse_loss(net(x.clone()), target)

    rss_before = peak_rss()
    times = []
    for step in range(cfg["steps"] + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        if step > 0:  # step 0 warms up
            times.append(time.perf_counter() - start)
    rss_after = peak_rss()
    return {
        **cfg,
        "params": count_params(net),
        "saved_bytes": flows.saved_bytes(loss, exclude=net),
        "ctx_bytes": ctx_held_bytes(loss, exclude=net),
        "peak_rss": rss_after if cfg["fresh"] else None,
        "rss_rise": max(0, rss_after - rss_before) if cfg["fresh"] else None,
        "sec_per_step": float(np.median(times)),
    }


def memory_suites(args: argparse.Namespace) -> list[tuple[int, tuple[int, ...], list[tuple[int, int]]]]:
    if args.quick:
        return [(2, (2, 4, 16, 16), [(2, 1), (3, 2)])]
    # The shapes. Halving their batch would not save much: with batch 1, CPU conv3d
    # takes a slower im2col path whose buffers dominate RSS.
    deeper = [(5, 4)], [(4, 3)]
    return [
        (2, (8, 16, 64, 64), [(2, 1), (3, 2), (4, 3), *(deeper[0] if args.full else [])]),
        (3, (2, 8, 32, 32, 32), [(2, 1), (3, 2), (4, 2), *(deeper[1] if args.full else [])]),
    ]


def run_job(job: dict, fresh: bool) -> dict:
    """Run a worker job in a fresh subprocess (``fresh``) or in this process."""
    if not fresh:
        return WORKERS[job["task"]](job)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise RuntimeError(f"worker failed for {job}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(args: argparse.Namespace) -> list[dict]:
    _, why_not = import_iunets()
    rows = []
    print(MEMORY_HEADER, flush=True)
    for dims, shape, depths in memory_suites(args):
        for levels, blocks in depths:
            times: dict[str, float] = {}
            for kind in KINDS:
                cfg = dict(
                    task="memory",
                    dims=dims,
                    shape=list(shape),
                    levels=levels,
                    blocks=blocks,
                    kind=kind,
                    threads=args.threads,
                    steps=1 if args.quick else 2,
                    fresh=not args.quick,
                )
                if kind.startswith("iunets") and why_not is not None:
                    row = {**cfg, "missing": why_not}
                else:
                    row = run_job(cfg, fresh=not args.quick)
                    times[kind] = row["sec_per_step"]
                    ref = times.get(REFERENCE[kind])
                    row["time_ratio"] = row["sec_per_step"] / ref if ref else None
                rows.append(row)
                print(format_memory_row(row), flush=True)
    return rows


MEMORY_HEADER = (
    "| dims | input | levels x blocks | model | params | saved_bytes | + held on ctx | "
    "peak RSS | RSS rise in steps | s / step | x ordinary |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _mib(value: float | None) -> str:
    """Bytes as text: MiB from 1 MiB up, KiB below."""
    if value is None:
        return "-"
    if value >= MIB:
        return f"{value / MIB:.1f} MiB"
    return f"{value / 1024:.1f} KiB"


def format_memory_row(r: dict) -> str:
    head = f"| {r['dims']}D | {tuple(r['shape'])} | {r['levels']} x {r['blocks']} | {KIND_NAMES[r['kind']]} |"
    if "missing" in r:
        return head + f" does not import ({r['missing']}) | - | - | - | - | - | - |"
    ratio = "-" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}"
    return (
        f"{head} {r['params']:,} | {_mib(r['saved_bytes'])} | {_mib(r['ctx_bytes'])} | "
        f"{_mib(r['peak_rss'])} | {_mib(r['rss_rise'])} | {r['sec_per_step']:.3f} | {ratio} |"
    )


def save_memory_figure(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = sorted({(r["dims"], tuple(r["shape"])) for r in rows})
    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 3.9), squeeze=False)
    for ax, (dims, shape) in zip(axes[0], suites):
        for kind in KINDS:
            pts = [r for r in rows if r["dims"] == dims and tuple(r["shape"]) == shape and r["kind"] == kind]
            pts = [r for r in pts if "missing" not in r]
            if pts:
                labels = [f"{r['levels']}x{r['blocks']}" for r in pts]
                kept = [(r["saved_bytes"] + r["ctx_bytes"]) / MIB for r in pts]
                ax.plot(labels, kept, marker="o", label=KIND_NAMES[kind])
        ax.set_yscale("log")
        ax.set_title(f"{dims}D input {shape}", fontsize=9)
        ax.set_xlabel("levels x blocks per level")
        ax.set_ylabel("kept for backward (MiB)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, path)


# ----------------------------------------------------------------------------- (b) denoising
def digits(size: int, sigma: float, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Train images, test images and a fixed noisy copy of the test images, in [0, 1]."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    train, test = images[perm[:1500]], images[perm[1500:]]
    return train, test, test + sigma * torch.randn(test.shape, generator=g)


class Denoiser(nn.Module):
    """``x + proj(core(lift(x)))``: non-invertible lift and projection around the core."""

    def __init__(self, core: nn.Module, channels: int):
        super().__init__()
        self.lift = nn.Conv2d(1, channels, 3, padding=1)
        self.core = core
        self.proj = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(self.core(self.lift(x)))


def denoisers(channels: int, levels: int, blocks: int) -> dict[str, Denoiser]:
    torch.manual_seed(0)
    iunet = Denoiser(IUNet(channels, levels, blocks, memory_saving=True), channels)
    width = matched_width(count_params(iunet), lambda w: Denoiser(UNet(channels, levels, 1, width=w), channels))
    torch.manual_seed(0)
    return {"i-UNet": iunet, "U-Net": Denoiser(UNet(channels, levels, 1, width=width), channels)}


def psnr(x: Tensor, ref: Tensor) -> float:
    mse = (x.clamp(0, 1) - ref).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse)).mean())


def train_denoiser(job: dict) -> dict:
    """Train one denoiser (``job["model"]``) and evaluate it on the test set."""
    torch.set_num_threads(job["threads"])
    train, test, test_noisy = digits(job["size"], job["sigma"])
    model = denoisers(job["channels"], job["levels"], job["blocks"])[job["model"]]
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=job["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, job["steps"])
    rss_before = peak_rss()
    times = []
    for _ in range(job["steps"]):
        clean = train[torch.randint(len(train), (job["batch"],), generator=g)]
        noisy = clean + job["sigma"] * torch.randn(clean.shape, generator=g)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(noisy), clean).backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
    rss_after = peak_rss()

    def loss() -> Tensor:
        return F.mse_loss(model(noisy), clean)

    model.eval()
    with torch.no_grad():
        denoised = torch.cat([model(b) for b in test_noisy.split(256)])
    return {
        "model": job["model"],
        "params": count_params(model),
        "sec_per_step": float(np.median(times[1:] or times)),
        "saved_bytes": flows.saved_bytes(loss, exclude=model),
        "peak_rss": rss_after if job["fresh"] else None,
        "rss_rise": max(0, rss_after - rss_before) if job["fresh"] else None,
        "psnr": psnr(denoised, test),
        "examples": denoised[: job["examples"]].clamp(0, 1).tolist(),
    }


def denoising(args: argparse.Namespace) -> tuple[dict[str, dict], float, tuple[Tensor, Tensor, Tensor]]:
    data = digits(args.size, args.sigma)
    results = {}
    for name in ("i-UNet", "U-Net"):
        job = dict(
            task="denoise",
            model=name,
            threads=args.threads,
            size=args.size,
            sigma=args.sigma,
            channels=args.channels,
            levels=args.levels,
            blocks=args.blocks,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            examples=8,
            fresh=not args.quick,
        )
        results[name] = run_job(job, fresh=not args.quick)
    return results, psnr(data[2], data[1]), data


def save_denoising_figure(path: Path, data: tuple[Tensor, Tensor, Tensor], results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, test, noisy = data
    rows = [("noisy", noisy)]
    rows += [(name, torch.tensor(r["examples"])) for name, r in results.items()]
    rows.append(("clean", test))
    n = len(results["i-UNet"]["examples"])
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 0.95), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            ax.imshow(images[j, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


WORKERS: dict[str, Callable[[dict], dict]] = {"memory": measure, "denoise": train_denoiser}


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=writable_directory, default=str(ROOT / "runs" / "iunet"), help="tables and JSON")
    parser.add_argument(
        "--figures",
        type=writable_directory,
        default=None,
        help="figure folder (default: docs/figures, or --out with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run, in-process")
    parser.add_argument("--full", action="store_true", help="more depths of the memory table")
    parser.add_argument("--threads", type=integer(1), default=1)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-denoise", action="store_true")
    parser.add_argument("--steps", type=integer(1), default=None, help="denoising training steps")
    parser.add_argument("--batch", type=integer(1), default=32)
    parser.add_argument("--lr", type=number(0, strict=True), default=2e-3)
    parser.add_argument("--size", type=integer(1), default=None, help="digit image size (8 -> size)")
    parser.add_argument("--sigma", type=number(0), default=0.3, help="noise standard deviation")
    parser.add_argument("--channels", type=integer(2), default=None, help="lifted channels, even (8; --quick 4)")
    parser.add_argument("--levels", type=integer(1), default=3, help="denoiser levels")
    parser.add_argument("--blocks", type=integer(1), default=None, help="denoiser i-UNet blocks per level")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 300
    if args.channels is None:
        args.channels = 4 if args.quick else 8
    if args.channels % 2:  # IUNet's first level splits off skip_fraction 0.5 of them
        parser.error(f"--channels {args.channels}: the i-UNet splits half of them off as a skip; give an even number")
    if args.blocks is None:
        args.blocks = 1
    if args.size is None:
        args.size = 16 if args.quick else 32
    if args.size % 2 ** (args.levels - 1):  # every level below the first halves the image
        parser.error(
            f"--size {args.size}: {args.levels} levels halve it {args.levels - 1} time(s); "
            f"give a multiple of {2 ** (args.levels - 1)} or fewer --levels"
        )
    if args.figures is None:
        figures = ROOT / "docs" / "figures"  # checked as a given one is: the figures are written last
        args.figures = args.out if args.quick else checked_default(parser, "--figures", writable_directory, figures)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job["task"]](job)))
        return 0
    torch.set_num_threads(args.threads)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"# i-UNet experiments ({stamp}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} thread(s)"
        f"{', --quick' if args.quick else ''})\n"
    )
    print(header, flush=True)
    report = [header]
    if not args.skip_memory:
        rows = memory_table(args)
        report += ["## Memory against depth\n", MEMORY_HEADER, *map(format_memory_row, rows), ""]
        write_atomic(args.out / "memory.json", json.dumps(rows, indent=1))
        save_memory_figure(args.figures / "iunet_memory.png", rows)
    if not args.skip_denoise:
        results, noisy_psnr, data = denoising(args)
        table = [
            f"## Denoising digits ({args.size}x{args.size}, sigma {args.sigma}, {args.steps} Adam steps, "
            f"batch {args.batch}; {len(data[0])} train / {len(data[1])} test images)\n",
            "| model | params | test PSNR (dB) | s / step | saved_bytes | peak RSS | RSS rise in training |",
            "|---|---|---|---|---|---|---|",
            f"| noisy input | - | {noisy_psnr:.2f} | - | - | - | - |",
        ]
        for name, r in results.items():
            label = f"{name} ({args.levels} x {args.blocks}, memory-saving)" if name == "i-UNet" else name
            table.append(
                f"| {label} | {r['params']:,} | {r['psnr']:.2f} | {r['sec_per_step']:.3f} | "
                f"{_mib(r['saved_bytes'])} | {_mib(r['peak_rss'])} | {_mib(r['rss_rise'])} |"
            )
        print("\n".join(table), flush=True)
        figure = args.figures / "iunet_denoising.png"
        save_denoising_figure(figure, data, results)
        report += [*table, "", f"Figure: {figure}", ""]
        summary = {name: {k: v for k, v in r.items() if k != "examples"} for name, r in results.items()}
        summary["noisy_psnr"] = noisy_psnr
        write_atomic(args.out / "denoising.json", json.dumps(summary, indent=1))
    write_atomic(args.out / "report.md", "\n".join(report))
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
