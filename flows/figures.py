"""PNG figures of a trained flow: samples, interpolations, training curves, 2D densities.

Figures are drawn with matplotlib's object API on the Agg canvas (no ``pyplot``, so the
global backend of an interactive session is left alone); matplotlib is imported only when
a figure is drawn. Every file is written atomically: a temporary file next to the target,
then ``os.replace``. Sampling is seeded and runs on a forked random state, so drawing a
figure never perturbs a training run.

Conditional models: a class-conditional image model's samples are a grid with one row per
class (or rows of one class, ``label=``); a conditional 2D model's density figure shows
``p(x | c)`` for a few contexts of the data, one column each, and a class-conditional 2D
model's shows ``p(x | class)``, one column per class.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from flows.io import atomic_path
from flows.memory import module_device

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
    """Write ``fig`` to ``path`` in the format its suffix names (``.png``, ``.jpg``, ``.pdf``, ...;
    PNG without one)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # The temporary name has no suffix of its own, so the format is given explicitly.
        fig.savefig(tmp, format=path.suffix.removeprefix(".").lower() or "png", dpi=dpi)
    return path


COLUMNS = 32
"""The most images in one row of a sample grid; more wrap onto further rows."""


def _montage(images: Tensor, pad: int = 1, columns: int | None = None) -> np.ndarray:
    """Lay ``(N, C, H, W)`` images in ``[0, 1]`` side by side, ``columns`` to a row (default: all
    ``N`` in one), padded white: ``(R*(H+pad)-pad, K*(W+pad)-pad, C)`` for ``K`` columns, ``R`` rows."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    k = min(n, columns or n)
    rows = -(-n // k)
    grid = np.ones((rows * (h + pad) - pad, k * (w + pad) - pad, c), dtype=np.float32)
    for i in range(n):
        top, left = (i // k) * (h + pad), (i % k) * (w + pad)
        grid[top : top + h, left : left + w] = images[i].permute(1, 2, 0).numpy()
    return grid


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


def num_classes(model: nn.Module) -> int | None:
    """The classes of a class-conditional model (built with ``num_classes=K``), else ``None``."""
    from flows.models.context import ClassEmbedding

    embedding = getattr(model, "embedding", None)
    if getattr(model, "conditional", False) and isinstance(embedding, ClassEmbedding):
        return embedding.num_classes
    return None


def save_samples(
    model: nn.Module,
    path: PathLike,
    temperatures: Sequence[float] = (0.5, 0.7, 1.0),
    n: int = 10,
    seed: int = 0,
    label: int | None = None,
) -> Path:
    """A grid of samples, one panel per temperature (Glow's reduced-temperature sampling).

    A panel lays its ``n`` samples out :data:`COLUMNS` (32) to a row at most. A
    class-conditional model draws ``n`` samples of class ``label`` per temperature; without
    ``label``, the grid has one row of panels per class and one column per temperature.

    Args:
        model: an image :class:`~flows.models.Flow` (``input_shape`` ``(C, H, W)``),
            unconditional or built with ``num_classes=K``.
        path: the file to write (PNG, or the format its suffix names).
        temperatures: the base-noise scales, one row (class grid: one panel) each.
        n: samples per panel.
        seed: seed of the base noise (the global random state is left unchanged).
        label: the class to draw (class-conditional models only).

    Returns:
        The path written.

    Raises:
        ValueError: not an image model; a model conditioned on float context vectors (which
            context to draw at is the caller's choice: ``model.sample(n, context=c)``);
            ``label`` for an unconditional model or outside ``0..K-1``.
    """
    _image_shape(model)
    classes = num_classes(model)
    if getattr(model, "conditional", False) and classes is None:
        raise ValueError(
            "save_samples: the model conditions on float context vectors, not classes; "
            "draw them with model.sample(n, context=c)"
        )
    if label is not None:
        if classes is None:
            raise ValueError(f"save_samples: label={label} given, but the model is not class-conditional")
        if not 0 <= label < classes:
            raise ValueError(f"save_samples: label={label} is outside the model's classes 0..{classes - 1}")
    device = module_device(model)
    grid = classes is not None and label is None
    # The labels of one temperature's draw: n of `label`, or n of each class in turn for the grid.
    if classes is None:
        labels = None
    elif grid:
        labels = torch.arange(classes, device=device).repeat_interleave(n)
    else:
        labels = torch.full((n,), label, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    drawn = []
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for t in temperatures:
                torch.manual_seed(seed)
                count = n if labels is None else len(labels)
                drawn.append(model.sample(count, context=labels, temperature=t))
    finally:
        model.train(was_training)
    columns, rows = min(n, COLUMNS), -(-n // COLUMNS)
    if grid:
        assert classes is not None
        fig = _figure(max(3.0, 0.6 * columns * len(temperatures)), 0.6 * rows * classes + 0.6)
        axes = fig.subplots(classes, len(temperatures), squeeze=False)
        for j, (t, samples) in enumerate(zip(temperatures, drawn, strict=True)):
            for k, row in enumerate(samples.split(n)):
                _show_strip(axes[k, j], _montage(row, columns=COLUMNS), f"{k}" if j == 0 else None)
            axes[0, j].set_title(f"T = {t:g}")
        fig.suptitle("samples, one row per class")
        return _save(fig, path)
    fig = _figure(max(3.0, 0.6 * columns), (0.6 * rows + 0.05) * len(drawn) + 0.5)
    axes = fig.subplots(len(drawn), 1, squeeze=False)[:, 0]
    for ax, t, samples in zip(axes, temperatures, drawn, strict=True):
        _show_strip(ax, _montage(samples, columns=COLUMNS), f"T = {t:g}")
    fig.suptitle("samples" if label is None else f"samples of class {label}")
    return _save(fig, path)


def save_interpolation(
    model: nn.Module,
    x0: Tensor,
    x1: Tensor,
    path: PathLike,
    steps: int = 8,
    context: Tensor | None = None,
) -> Path:
    """Latent interpolation strips ``decode((1 - t) encode(x0) + t encode(x1))``.

    Args:
        model: an image :class:`~flows.models.Flow`.
        x0: start images ``(P, C, H, W)`` (dequantized, in ``[0, 1]``); one row per pair.
        x1: end images, same shape as ``x0``.
        path: the file to write (PNG, or the format its suffix names).
        steps: images per row, ends included.
        context: a conditional model's context ``(P, ...)``, one per pair, held fixed along
            the row (e.g. the class both images share).

    Returns:
        The path written.
    """
    shape = _image_shape(model)
    if x0.dim() == 3:
        x0, x1 = x0.unsqueeze(0), x1.unsqueeze(0)
    device = module_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            c = None if context is None else context.to(device)
            frames = model.interpolate(x0.to(device), x1.to(device), steps, context=c)
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
        path: the file to write (PNG, or the format its suffix names).

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


def density_contexts(data: Dataset, k: int = 4) -> Tensor:
    """``k`` contexts of ``data`` to draw ``p(x | c)`` at: for a one-dimensional context, its
    test quantiles ``(i + 1/2) / k``; otherwise the first ``k`` test contexts. ``(k, C)``."""
    if data.test_context is None:
        raise ValueError(f"density_contexts: {data.name!r} has no context")
    context = data.test_context
    if context.shape[1] == 1:
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        return torch.quantile(context[:, 0].double(), q).to(context.dtype)[:, None]
    return context[:k]


def save_density(
    model: nn.Module,
    data: Dataset,
    path: PathLike,
    n_samples: int = 5000,
    resolution: int = 200,
    seed: int = 0,
    contexts: Tensor | None = None,
    true_log_density: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Path:
    """Three panels for a 2D model: test data, learned density ``exp(log_prob)``, samples.

    A conditional model (on the data's float context) gets one column per context ``c``
    instead, with the rows: the test points whose context is nearest ``c`` (a ``1/k``
    share of them), the true ``p(x | c)`` when ``true_log_density`` is given, the learned
    ``p(x | c)`` and samples drawn given ``c``. A class-conditional model (built with
    ``num_classes=K``) gets one column per class (the first :data:`CLASS_COLUMNS`), its first
    row the test points of that class.

    Args:
        model: a :class:`~flows.models.Flow` on ``(B, 2)`` inputs.
        data: the 2D dataset (its test split is drawn).
        path: the file to write (PNG, or the format its suffix names).
        n_samples: model samples to histogram (per context).
        resolution: grid points per axis for the density.
        seed: seed of the samples (the global random state is left unchanged).
        contexts: a conditional model's contexts ``(k, C)`` (default :func:`density_contexts`),
            or a class-conditional one's labels ``(k,)`` (default ``0..min(K, 10) - 1``).
        true_log_density: ``(x, c) -> log p(x | c)``, ``(N,)``, drawn beside the model's
            (e.g. :func:`flows.data.rotated_moons_log_density`).

    Returns:
        The path written.
    """
    if tuple(data.shape) != (2,):
        raise ValueError(f"save_density needs 2D data, got shape {tuple(data.shape)}")
    if getattr(model, "conditional", False):
        return _save_conditional_density(model, data, path, n_samples, resolution, seed, contexts, true_log_density)
    points = _test_points(data)
    lo, hi = _bounds(points)
    device = module_device(model)
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


def _bounds(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.quantile(points, 0.001, axis=0)
    hi = np.quantile(points, 0.999, axis=0)
    pad = 0.15 * (hi - lo)
    return lo - pad, hi + pad


CLASS_COLUMNS = 10
"""The most classes a class-conditional density figure draws by default (one column each)."""


def _test_points(data: Dataset) -> np.ndarray:
    """The test split as a float array ``(M, 2)``, whether it is a tensor or read on demand
    (a :class:`~flows.data.streaming.StreamingDataset`'s split: indexing reads a tensor)."""
    return data.test[:].float().numpy()


@dataclass
class _Columns:
    """What a conditional density figure draws: one context per column (a class label ``()`` or
    a float context vector ``(C,)``), the test points shown with each, the column titles, the
    name of the data row and the figure's title."""

    contexts: Tensor
    points: list[np.ndarray]
    titles: list[str]
    data_row: str
    title: str


def _columns(model: nn.Module, data: Dataset, points: np.ndarray, contexts: Tensor | None) -> _Columns:
    classes = num_classes(model)
    if classes is not None:
        if data.test_labels is None:
            raise ValueError(
                f"save_density: the model is class-conditional but {data.name!r} has no test labels; "
                "open the data with its labels (labels=True, --conditional)"
            )
        more = ""
        if contexts is None:
            contexts = torch.arange(min(classes, CLASS_COLUMNS))
            more = "" if len(contexts) == classes else f" (classes 0..{len(contexts) - 1} of {classes})"
        labels = data.test_labels.numpy()
        return _Columns(
            contexts,
            [points[labels == int(c)] for c in contexts],
            [f"class {int(c)}" for c in contexts],
            "data of the class",
            f"{data.name}: class-conditional density p(x | class){more}",
        )
    if data.test_context is None:
        raise ValueError(
            f"save_density: a conditional model's density is drawn at contexts of the data, but {data.name!r} "
            "has neither float contexts nor labels"
        )
    contexts = density_contexts(data) if contexts is None else contexts
    # The test points nearest each context in context space: a 1/k share of the test split each.
    distance = torch.cdist(contexts.float(), data.test_context.float())
    share = max(1, len(points) // len(contexts))
    nearest = distance.topk(share, dim=1, largest=False).indices.numpy()
    titles = []
    for c in contexts:
        shown = ", ".join(f"{v:.2f}" for v in c.tolist()[:3]) + (", ..." if len(c) > 3 else "")
        titles.append(f"c = ({shown})")
    return _Columns(
        contexts, [points[i] for i in nearest], titles, "data near c", f"{data.name}: conditional density p(x | c)"
    )


def _repeat(c: Tensor, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``n`` copies of one context (a label ``()`` or a vector ``(C,)``) on ``device``; float
    contexts in the model's ``dtype``, labels kept as integers."""
    c = c.to(device, dtype) if c.is_floating_point() else c.to(device)
    return c[None].expand(n, *c.shape)


def _save_conditional_density(
    model: nn.Module,
    data: Dataset,
    path: PathLike,
    n_samples: int,
    resolution: int,
    seed: int,
    contexts: Tensor | None,
    true_log_density: Callable[[Tensor, Tensor], Tensor] | None,
) -> Path:
    points = _test_points(data)
    columns = _columns(model, data, points, contexts)
    k = len(columns.contexts)
    lo, hi = _bounds(points)
    device, dtype = module_device(model), next(model.parameters()).dtype
    gx = np.linspace(lo[0], hi[0], resolution)
    gy = np.linspace(lo[1], hi[1], resolution)
    xx, yy = np.meshgrid(gx, gy)
    grid = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32))
    # A true density (by quadrature, say) can cost far more than the model's: a coarser grid.
    n_true = min(resolution, 100)
    cx, cy = np.meshgrid(np.linspace(lo[0], hi[0], n_true), np.linspace(lo[1], hi[1], n_true))
    coarse = torch.from_numpy(np.stack([cx.ravel(), cy.ravel()], 1))
    rows = [columns.data_row, "learned p(x | c)", "samples"]
    if true_log_density is not None:
        rows.insert(1, "true p(x | c)")
    bins = [np.linspace(lo[0], hi[0], 80), np.linspace(lo[1], hi[1], 80)]
    extent = [lo[0], hi[0], lo[1], hi[1]]
    fig = _figure(2.6 * k + 0.6, 2.5 * len(rows) + 0.3)
    axes = fig.subplots(len(rows), k, squeeze=False)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for j, c in enumerate(columns.contexts):
                c_grid = _repeat(c, len(grid), device, dtype)
                log_p = torch.cat(
                    [
                        model.log_prob(g.to(device, dtype), part).float().cpu()
                        for g, part in zip(grid.split(4096), c_grid.split(4096), strict=True)
                    ]
                )
                torch.manual_seed(seed)
                samples = model.sample(n_samples, context=_repeat(c, n_samples, device, dtype))
                panels: dict[str, tuple[str, np.ndarray]] = {
                    columns.data_row: ("hist", columns.points[j]),
                    "learned p(x | c)": ("image", log_p.exp().reshape(resolution, resolution).numpy()),
                    "samples": ("hist", samples.float().cpu().numpy()),
                }
                if true_log_density is not None:
                    truth = true_log_density(coarse, _repeat(c, len(coarse), torch.device("cpu"), torch.float64)).exp()
                    panels["true p(x | c)"] = ("image", truth.reshape(n_true, n_true).float().numpy())
                for i, row in enumerate(rows):
                    ax = axes[i, j]
                    kind, values = panels[row]
                    if kind == "hist":
                        finite = np.isfinite(values).all(1)
                        ax.hist2d(values[finite, 0], values[finite, 1], bins=bins, cmap="viridis")
                    else:
                        ax.imshow(np.nan_to_num(values), origin="lower", extent=extent, cmap="viridis", aspect="auto")
                    ax.set_xlim(lo[0], hi[0])
                    ax.set_ylim(lo[1], hi[1])
                    ax.set_aspect("equal")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if j == 0:
                        ax.set_ylabel(row)
                axes[0, j].set_title(columns.titles[j])
    finally:
        model.train(was_training)
    fig.suptitle(columns.title)
    return _save(fig, path)
