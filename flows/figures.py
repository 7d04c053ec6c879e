"""PNG figures of a trained flow: samples, interpolations, training curves, 2D densities.

Figures are drawn with matplotlib's object API on the Agg canvas (no ``pyplot``, so the
global backend of an interactive session is left alone); matplotlib is imported only when
a figure is drawn. Every file is written atomically: a temporary file next to the target,
then ``os.replace``. Sampling is seeded and runs on a forked random state, so drawing a
figure never perturbs a training run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from flows.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from flows.data.dataset import Dataset

PathLike = str | os.PathLike[str]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike, dpi: int = 120) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        # The temporary name has no .png suffix, so the format is given explicitly.
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _montage(images: Tensor, pad: int = 1) -> np.ndarray:
    """Lay ``(N, C, H, W)`` images in ``[0, 1]`` side by side: ``(H, N*(W+pad)-pad, C)``."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    strip = np.ones((h, n * (w + pad) - pad, c), dtype=np.float32)
    for i in range(n):
        strip[:, i * (w + pad) : i * (w + pad) + w] = images[i].permute(1, 2, 0).numpy()
    return strip


def _show_strip(ax: Any, strip: np.ndarray, label: str | None = None) -> None:
    if strip.shape[2] == 1:
        ax.imshow(strip[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(strip, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if label:
        ax.set_ylabel(label, rotation=0, ha="right", va="center")


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    shape = tuple(getattr(model, "input_shape", ()))
    if len(shape) != 3:
        raise ValueError(
            f"this figure needs an image model with input_shape (C, H, W), got {shape}; "
            "use save_density for 2D models"
        )
    return shape  # type: ignore[return-value]


def save_samples(
    model: nn.Module,
    path: PathLike,
    temperatures: Sequence[float] = (0.5, 0.7, 1.0),
    n: int = 10,
    seed: int = 0,
) -> Path:
    """A grid of samples, one row per temperature (Glow's reduced-temperature sampling).

    Args:
        model: an image :class:`~flows.models.Flow` (``input_shape`` ``(C, H, W)``).
        path: the PNG file to write.
        temperatures: the base-noise scales, one row each.
        n: samples per row.
        seed: seed of the base noise (the global random state is left unchanged).

    Returns:
        The path written.
    """
    _image_shape(model)
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for t in temperatures:
                torch.manual_seed(seed)
                rows.append(_montage(model.sample(n, temperature=t)))
    finally:
        model.train(was_training)
    width = max(3.0, 0.6 * n)
    fig = _figure(width, 0.65 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, t, row in zip(axes, temperatures, rows, strict=True):
        _show_strip(ax, row, f"T = {t:g}")
    fig.suptitle("samples")
    return _save(fig, path)


def save_interpolation(
    model: nn.Module,
    x0: Tensor,
    x1: Tensor,
    path: PathLike,
    steps: int = 8,
) -> Path:
    """Latent interpolation strips ``decode((1 - t) encode(x0) + t encode(x1))``.

    Args:
        model: an image :class:`~flows.models.Flow`.
        x0: start images ``(P, C, H, W)`` (dequantized, in ``[0, 1]``); one row per pair.
        x1: end images, same shape as ``x0``.
        path: the PNG file to write.
        steps: images per row, ends included.

    Returns:
        The path written.
    """
    shape = _image_shape(model)
    if x0.dim() == 3:
        x0, x1 = x0.unsqueeze(0), x1.unsqueeze(0)
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            frames = model.interpolate(x0.to(device), x1.to(device), steps)
    finally:
        model.train(was_training)
    # Flow.interpolate returns (steps, P, C, H, W); one row per pair.
    frames = frames.reshape(steps, -1, *shape).transpose(0, 1)
    fig = _figure(max(3.0, 0.6 * steps), 0.7 * len(frames) + 0.4)
    axes = fig.subplots(len(frames), 1, squeeze=False)[:, 0]
    for ax, row in zip(axes, frames, strict=True):
        _show_strip(ax, _montage(row))
    fig.suptitle("latent interpolation")
    return _save(fig, path)


def save_curve(history: dict[str, Any], path: PathLike) -> Path:
    """The training curve: per-step training loss and test evaluations against the step.

    Args:
        history: as returned by :func:`flows.training.train` (keys ``step``, ``train``,
            ``test_step``, ``test``, ``metric``).
        path: the PNG file to write.

    Returns:
        The path written.
    """
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    steps = np.asarray(history.get("step", []), dtype=float)
    train = np.asarray(history.get("train", []), dtype=float)
    if len(train):
        window = max(1, len(train) // 50)
        faint = 0.3 if window > 1 else 1.0
        ax.plot(steps, train, color="tab:blue", alpha=faint, linewidth=0.8, label="train (batch)")
        if window > 1:
            smooth = np.convolve(train, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="tab:blue", label="train (running mean)")
    if history.get("test"):
        ax.plot(history["test_step"], history["test"], "o-", color="tab:orange", label="test")
    metric = history.get("metric", "loss")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim" if metric == "bits/dim" else "negative log-likelihood (nats)")
    if len(train) > 1:
        # Early losses dwarf the rest; clip the view to the range after the first tenth.
        tail = train[len(train) // 10 :]
        values = np.concatenate([tail, np.asarray(history.get("test") or [], dtype=float)])
        values = values[np.isfinite(values)]
        if len(values):
            lo, hi = values.min(), values.max()
            margin = 0.05 * (hi - lo) + 1e-3
            ax.set_ylim(lo - margin, hi + margin)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def save_density(
    model: nn.Module,
    data: Dataset,
    path: PathLike,
    n_samples: int = 5000,
    resolution: int = 200,
    seed: int = 0,
) -> Path:
    """Three panels for a 2D model: test data, learned density ``exp(log_prob)``, samples.

    Args:
        model: a :class:`~flows.models.Flow` on ``(B, 2)`` inputs.
        data: the 2D dataset (its test split is drawn).
        path: the PNG file to write.
        n_samples: model samples to histogram.
        resolution: grid points per axis for the density.
        seed: seed of the samples (the global random state is left unchanged).

    Returns:
        The path written.
    """
    if tuple(data.shape) != (2,):
        raise ValueError(f"save_density needs 2D data, got shape {tuple(data.shape)}")
    points = data.test.float().numpy()
    lo = np.quantile(points, 0.001, axis=0)
    hi = np.quantile(points, 0.999, axis=0)
    pad = 0.15 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    device = _device(model)
    gx = np.linspace(lo[0], hi[0], resolution)
    gy = np.linspace(lo[1], hi[1], resolution)
    xx, yy = np.meshgrid(gx, gy)
    grid = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32))
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            log_p = torch.cat([model.log_prob(g.to(device)).cpu() for g in grid.split(4096)])
            torch.manual_seed(seed)
            samples = model.sample(n_samples).cpu().numpy()
    finally:
        model.train(was_training)
    density = log_p.exp().reshape(resolution, resolution).numpy()
    extent = [lo[0], hi[0], lo[1], hi[1]]
    bins = [np.linspace(lo[0], hi[0], 100), np.linspace(lo[1], hi[1], 100)]

    fig = _figure(10.5, 3.6)
    axes = fig.subplots(1, 3)
    axes[0].hist2d(points[:, 0], points[:, 1], bins=bins, cmap="viridis")
    axes[0].set_title(f"data ({data.name}, test)")
    axes[1].imshow(
        np.nan_to_num(density), origin="lower", extent=extent, cmap="viridis", aspect="auto"
    )
    axes[1].set_title("learned density")
    finite = np.isfinite(samples).all(1)
    axes[2].hist2d(samples[finite, 0], samples[finite, 1], bins=bins, cmap="viridis")
    axes[2].set_title("samples")
    for ax in axes:
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
