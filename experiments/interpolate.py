"""Latent interpolation with a trained Glow / RealNVP: between test images and class means.

    python experiments/interpolate.py --checkpoint RUN_DIR [--out PNG] [--pairs 4] [--steps 9]

``RUN_DIR`` (or the ``checkpoint.pt`` in it) is written by ``flows train``, e.g.::

    flows train --model glow --data digits --steps 800 --levels 2 --steps-per-level 4 \\
        --threads 1 --out /tmp/glow-digits

The test images are dequantized at the centres of their bins, ``(level + 1/2) / n_levels``,
so the run is deterministic, and encoded to flat latents ``z = f(x)``. The script prints

* the round-trip error ``max |decode(encode(x)) - x|`` over the test set;
* along the linear paths ``decode((1 - t) z0 + t z1)`` between test images of different
  classes and between class means, the mean bits/dim of the decoded frames and the mean
  latent norm ``|z_t| / sqrt(D)`` (about 1 for a typical draw of the unit Gaussian base);
* per class, the norm of the mean latent ``mu_c`` of its test images, the bits/dim of
  ``decode(mu_c)`` and the mean bits/dim of the class's own test images, and the accuracy
  of the nearest-class-mean rule in latent space (the means are computed from the same
  test images, so this is a description of the latent space, not a held-out score).

Class labels are the dataset's ``test_labels`` (:class:`flows.data.Dataset`): the digit of
each test image for ``digits``, and for ``mnist`` the ``t10k-labels-idx1-ubyte`` file next to
the images; data without labels (the 2D toys, MNIST without its label files) get the
test-pair rows only.

The figure (``--out``, default ``docs/figures/interpolate_<data>.png``) shows one row per
test pair, the decoded class means, and one row per class-mean pair.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import flows
from flows.arguments import checked_default, integer, seed
from flows.io import CheckpointError, writable_file, write_text
from flows.models.registry import load_model

CLASS_PAIRS = ((3, 8), (1, 7), (4, 9), (0, 6))


# -- data ----------------------------------------------------------------------------------------


def load_data(spec: dict[str, Any], data_dir: str | None) -> flows.data.Dataset:
    """The dataset a checkpoint was trained on (its ``config["data"]`` spec)."""
    spec = dict(spec)
    name = spec.pop("name")
    if data_dir is not None:
        spec["data_dir"] = data_dir
    return flows.data.load(name, **spec)


# -- measurements --------------------------------------------------------------------------------


@torch.no_grad()
def batched(fn: Any, x: Tensor, batch: int = 500) -> Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def path(model: nn.Module, z0: Tensor, z1: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Latents ``(1 - t) z0 + t z1`` and their decoded frames, ``(steps, P, ...)`` each."""
    t = torch.linspace(0, 1, steps).view(-1, 1, 1)
    z = (1 - t) * z0 + t * z1
    frames = model.decode(z.flatten(0, 1))
    return z, frames.view(steps, len(z0), *frames.shape[1:])


@torch.no_grad()
def path_stats(model: nn.Module, z: Tensor, frames: Tensor) -> tuple[list[float], list[float]]:
    """Per step: mean bits/dim of the frames and mean ``|z_t| / sqrt(D)``."""
    dim = z.shape[-1]
    bpd = model.bits_per_dim(frames.flatten(0, 1)).view(frames.shape[:2]).mean(1)
    norm = z.norm(dim=-1).mean(1) / math.sqrt(dim)
    return bpd.tolist(), norm.tolist()


def pick_pairs(n_test: int, labels: Tensor | None, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` random index pairs, of different classes when labels are known."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for i in torch.randperm(n_test, generator=generator).tolist():
        if len(first) == n:
            break
        for j in torch.randperm(n_test, generator=generator)[:50].tolist():
            if j != i and (labels is None or labels[i] != labels[j]):
                first.append(i)
                second.append(j)
                break
    return torch.tensor(first), torch.tensor(second)


# -- figure ------------------------------------------------------------------------------------------


def montage(images: Tensor, pad: int = 1) -> np.ndarray:
    """``(N, C, H, W)`` in ``[0, 1]`` side by side as one ``(H, N (W + pad) - pad, C)`` strip."""
    images = images.detach().float().clamp(0, 1)
    n, c, h, w = images.shape
    strip = np.ones((h, n * (w + pad) - pad, c), dtype=np.float32)
    for i in range(n):
        strip[:, i * (w + pad) : i * (w + pad) + w] = images[i].permute(1, 2, 0).numpy()
    return strip


def save_figure(rows: list[tuple[str, Tensor]], title: str, out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = max(len(images) for _, images in rows)
    fig = Figure(figsize=(0.62 * width + 1.4, 0.72 * len(rows) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (label, images) in zip(axes, rows):
        strip = montage(images)
        if strip.shape[2] == 1:
            ax.imshow(strip[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(strip, interpolation="nearest")
        ax.set_xlim(-0.5, width * (images.shape[-1] + 1) - 1.5)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out


# -- main -------------------------------------------------------------------------------------------


def _row(label: str, values: list[float], spec: str = ".3f") -> str:
    return f"| {label} | " + " | ".join(format(v, spec) for v in values) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint.pt of `flows train`")
    parser.add_argument(
        "--out", type=writable_file, default=None, help="PNG (default docs/figures/interpolate_<data>.png)"
    )
    parser.add_argument("--pairs", type=integer(1), default=4, help="test-image pairs")
    parser.add_argument("--steps", type=integer(2), default=9, help="frames per path, ends included")
    parser.add_argument("--seed", type=seed(), default=0, help="seed of the pair choice")
    parser.add_argument("--data-dir", default=None, help="MNIST / CIFAR-10 directory (default: the checkpoint's)")
    parser.add_argument("--threads", type=integer(1), default=1)
    parser.add_argument("--json", type=writable_file, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        model, state = load_model(args.checkpoint)
    except (FileNotFoundError, CheckpointError) as error:  # both name the file and why
        parser.error(f"--checkpoint: {error}")
    config = state["config"]
    if len(model.input_shape) != 3:
        parser.error(f"{args.checkpoint}: holds a {config['model']} on vectors; interpolation needs images")
    data = load_data(config["data"], args.data_dir)
    if args.out is None:  # checked as a given one is: the figure is drawn after the measurements
        args.out = checked_default(parser, "--out", writable_file, f"docs/figures/interpolate_{data.name}.png")
    labels = data.test_labels
    model.eval()
    # Bin centres instead of random dequantization: deterministic and unbiased in the mean.
    x = (data.test.float() + 0.5) / data.n_levels
    z = batched(model.encode, x)
    round_trip = (batched(model.decode, z) - x).abs().max().item()
    bpd_test = batched(model.bits_per_dim, x)
    dim = z.shape[1]
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{config['model']} ({n_params:,} parameters, step {state['step']}) on {data.name}: "
        f"{len(x)} test images, D = {dim}, test bits/dim at bin centres {bpd_test.mean():.4f}"
    )
    print(f"round trip max |decode(encode(x)) - x| = {round_trip:.2e}")

    results: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "model": config["model"],
        "data": data.name,
        "params": n_params,
        "round_trip_error": round_trip,
        "test_bpd": bpd_test.mean().item(),
    }
    steps = args.steps
    t_values = torch.linspace(0, 1, steps).tolist()
    i0, i1 = pick_pairs(len(x), labels, args.pairs, args.seed)
    z_pair, frames_pair = path(model, z[i0], z[i1], steps)
    paths = {"test pairs": path_stats(model, z_pair, frames_pair)}
    figure_rows = []
    for p in range(len(i0)):
        label = f"{int(labels[i0[p]])} -> {int(labels[i1[p]])}" if labels is not None else f"pair {p}"
        figure_rows.append((f"test {label}", frames_pair[:, p]))

    if labels is not None:
        classes = sorted(set(labels.tolist()))
        means = torch.stack([z[labels == c].mean(0) for c in classes])
        with torch.no_grad():
            decoded = model.decode(means)
            bpd_means = model.bits_per_dim(decoded)
        distances = torch.cdist(z, means)
        nearest = torch.tensor(classes)[distances.argmin(1)]
        accuracy = (nearest == labels).double().mean().item()
        print("\n| class | test images | mean latent norm / sqrt(D) | images' latent norm / sqrt(D) "
              "| bits/dim of decoded mean | images' bits/dim |")
        print("|---:|---:|---:|---:|---:|---:|")
        per_class = []
        for k, c in enumerate(classes):
            members = labels == c
            row = {
                "class": c,
                "count": int(members.sum()),
                "mean_norm": (means[k].norm() / math.sqrt(dim)).item(),
                "images_norm": (z[members].norm(dim=1).mean() / math.sqrt(dim)).item(),
                "decoded_mean_bpd": bpd_means[k].item(),
                "images_bpd": bpd_test[members].mean().item(),
            }
            per_class.append(row)
            print(
                f"| {c} | {row['count']} | {row['mean_norm']:.3f} | {row['images_norm']:.3f} "
                f"| {row['decoded_mean_bpd']:.3f} | {row['images_bpd']:.3f} |"
            )
        print(f"\nnearest class mean in latent space (means from the same test images): accuracy {accuracy:.3f}")
        results.update(per_class=per_class, nearest_mean_accuracy=accuracy)
        figure_rows.append((f"class means {classes[0]}..{classes[-1]}", decoded))
        pairs = [(a, b) for a, b in CLASS_PAIRS if a in classes and b in classes]
        if pairs:
            a_idx = torch.tensor([classes.index(a) for a, _ in pairs])
            b_idx = torch.tensor([classes.index(b) for _, b in pairs])
            z_mean, frames_mean = path(model, means[a_idx], means[b_idx], steps)
            paths["class means"] = path_stats(model, z_mean, frames_mean)
            for p, (a, b) in enumerate(pairs):
                figure_rows.append((f"mean {a} -> {b}", frames_mean[:, p]))

    header = " | ".join(f"t={t:.2f}" for t in t_values)
    print(f"\n| path | {header} |\n|---|" + "---:|" * steps)
    for name, (bpd, norm) in paths.items():
        print(_row(f"{name}: bits/dim", bpd))
        print(_row(f"{name}: norm / sqrt(D)", norm))
    results["paths"] = {name: {"t": t_values, "bpd": bpd, "norm": norm} for name, (bpd, norm) in paths.items()}

    out = args.out
    title = f"{config['model']} on {data.name}: decode((1 - t) z0 + t z1), t from 0 to 1"
    save_figure(figure_rows, title, out)
    results["figure"] = str(out)
    print(f"\nwrote {out}")
    if args.json:
        write_text(args.json, json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
