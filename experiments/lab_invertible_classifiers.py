"""Invertible classifiers: a plain CNN, a ResNet, an i-RevNet and an i-ResNet on the same layout.

    python experiments/lab_invertible_classifiers.py [--quick] [--mnist DIR] [--json PATH]

Data. scikit-learn's bundled 8x8 digits (levels 0..16 scaled to ``[0, 1]``), split once
with a seeded permutation into 500 training images and 1297 test images, and reshaped
by one space-to-depth squeeze to ``(4, 4, 4)``. With ``--mnist DIR`` also MNIST from
local IDX files (``train-``/``t10k-images-idx3-ubyte`` and ``-labels-idx1-ubyte``, raw
or ``.gz``, in ``DIR``, ``DIR/MNIST/raw`` or ``DIR/mnist``; nothing is downloaded), scaled
to ``[0, 1]`` and squeezed twice to ``(16, 7, 7)``.

Models. Every trunk maps ``(C, H, W)`` to ``(C, H, W)`` with the same number of blocks
``L``, and a linear head reads the flattened trunk output:

* **linear**: no trunk, the baseline every trunk has to beat;
* **cnn**: ``L`` plain blocks ``ReLU(conv3x3(ReLU(conv3x3(x))))`` with ``C -> hidden ->
  C`` channels (no skip connection, not invertible; He initialisation);
* **resnet**: the lab notebook's ResNet (its question 10), ``L`` blocks ``x - ReLU(b(x))``
  with the branch ``b = conv3x3 -> ReLU -> conv3x3`` of a cnn block (so the parameters of
  the cnn; torch's default initialisation, as the skip connection carries the signal). Not
  invertible: nothing bounds the branch's Lipschitz constant;
* **i-revnet**: ``L`` :class:`flows.transforms.RevCoupling` blocks over the channel
  halves, ``F`` and ``G`` each ``conv3x3 -> ReLU -> conv3x3`` with ``C/2 -> hidden ->
  C/2`` channels (the convolution weights of a cnn block, plus ``hidden`` biases);
* **i-resnet**: ``L`` :meth:`flows.transforms.ResidualBlock.conv` blocks (spectral norm,
  Lipschitz 0.9, fixed-point inverse), ``g = conv3x3 -> LipSwish -> conv1x1 -> LipSwish
  -> conv3x3``. A classifier needs no log-det: inside :class:`flows.nn.Reversible` the
  blocks skip it (:func:`flows.transforms.skipping_logdet`).

The invertible trunks are :class:`flows.nn.Reversible` stacks and train with
memory-saving backward on. All models train with Adam, a cosine learning-rate decay and
the same seed and batch order.

Printed per model: parameters, train and test accuracy, the trunk's invertibility error
``max |trunk.inverse(trunk(x)) - x|`` on (up to 500) test images (float32 as trained, and
in float64 on a copy), the bytes autograd keeps for backward of one training batch
(:func:`flows.saved_bytes`, parameters excluded) with ordinary and with memory-saving
backward, the largest difference between the parameter gradients of the two modes
relative to the largest gradient entry (:func:`flows.parity.gradient_parity`, eval mode,
one batch), the final training loss (mean over the last tenth of the steps) and the
training time.
The kept bytes are cross-checked with an independent count of the saved storages still
held by the loss's graph when the forward pass returns.

Figures. ``FIGURES/lab_training_loss.png`` (``_mnist`` suffix for MNIST): every model's
training loss (the batch cross-entropy, faint, and its running mean) against the step, in
one plot. Per invertible model, ``FIGURES/lab_<model>_interpolation.png`` (``<model>`` is
``irevnet`` / ``iresnet``, with an ``_mnist`` suffix for MNIST): between two test digits
of different classes, ``x_t = trunk.inverse((1 - t) trunk(x0) + t trunk(x1))`` in the
upper row of each pair and the pixel blend ``(1 - t) x0 + t x1`` below it, the class the
model predicts above each frame. Printed with it: the value range of the trunk-space
frames, their mean distance to the pixel blend, and how often the predicted class
changes along each kind of path.

``--quick`` is a smoke test (2 layers, hidden 8, 30 steps, 300 test images; seconds);
the default (4 layers, hidden 32, 600 steps) takes a few minutes on one CPU thread, most
of it in the i-ResNet, whose memory-saving backward inverts each block by fixed-point
iteration.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flows
from flows.arguments import checked_default, integer, number, seed
from flows.io import atomic_path, writable_directory, writable_file, write_text
from flows.nn import Reversible
from flows.parity import gradient_parity
from flows.transforms import ResidualBlock, RevCoupling, Squeeze

MODELS = ("linear", "cnn", "resnet", "i-revnet", "i-resnet")
INVERTIBLE = ("i-revnet", "i-resnet")
CLASS_PAIRS = ((3, 8), (1, 7), (4, 9), (0, 6))
KIB = 1024.0
_MNIST = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# -- data ------------------------------------------------------------------------------------


@dataclass
class Split:
    """Images in the invertible layout ``(N, C, H, W)`` with their labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    squeezes: int  # space-to-depth squeezes from the original (1, H, W) images

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def space_to_depth(x: Tensor, times: int) -> Tensor:
    """Apply :class:`flows.transforms.Squeeze` ``times`` times (a permutation of pixels)."""
    for _ in range(times):
        x = Squeeze()(x)[0]
    return x


def depth_to_space(x: Tensor, times: int) -> Tensor:
    """Undo :func:`space_to_depth`: back to ``(N, 1, H, W)`` images for display."""
    for _ in range(times):
        x = Squeeze().inverse(x)[0]
    return x


def load_digits(n_train: int = 500, seed: int = 0, n_test: int | None = None) -> Split:
    """scikit-learn's digits, ``n_train`` training images and the rest (or ``n_test``) for test.

    The split is :func:`flows.data.digits`'s seeded permutation with the roles swapped: the
    lab trains on few images, so it trains on the ``n_train`` images that permutation holds
    out first (``digits(n_test=n_train).test``) and tests on the rest, labels included.
    """
    try:
        data = flows.data.digits(n_test=n_train, seed=seed)
    except ValueError as error:
        raise ValueError(f"digits: --n-train {n_train} is out of range ({error})") from error
    return _squeezed_split("digits", data.test, data.test_labels, data.train, data.train_labels, n_test, 16, 1)


def load_mnist(directory: str | Path, n_train: int, n_test: int | None, seed: int = 0) -> Split:
    """MNIST from local IDX files, labels included, a seeded subset of ``n_train`` training images."""
    directory = Path(directory).expanduser()
    missing = FileNotFoundError(
        f"--mnist {directory}: expected the IDX files {', '.join(_MNIST.values())} (raw or .gz) "
        f"in {directory}, {directory / 'MNIST/raw'} or {directory / 'mnist'}; nothing is downloaded"
    )
    try:
        with warnings.catch_warnings():
            # Images without label files: the error below names all four files instead.
            warnings.filterwarnings("ignore", message="mnist: no class labels", category=UserWarning)
            data = flows.data.mnist(directory, source="files")
    except FileNotFoundError as error:
        raise missing from error
    if data.train_labels is None or data.test_labels is None:
        raise missing
    if data.shape != (1, 28, 28):
        raise ValueError(f"MNIST: expected (1, 28, 28) images, got {data.shape}")
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n_train]
    return _squeezed_split(
        "mnist", data.train[order], data.train_labels[order], data.test, data.test_labels, n_test, 255, 2
    )


def _squeezed_split(
    name: str,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    n_test: int | None,
    top_level: int,
    squeezes: int,
) -> Split:
    """The first ``n_test`` test images (all if ``None``), pixels scaled to ``[0, 1]`` by the
    top level and squeezed ``squeezes`` times, with their labels."""
    if n_test is not None:
        x_test, y_test = x_test[:n_test], y_test[:n_test]

    def prepare(x: Tensor) -> Tensor:
        return space_to_depth(x.float().div(float(top_level)), squeezes)

    return Split(name, prepare(x_train), y_train, prepare(x_test), y_test, squeezes=squeezes)


# -- models ----------------------------------------------------------------------------------


def conv_relu_conv(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, c_out, 3, padding=1)
    )


class MinusResidual(nn.Module):
    """The lab notebook's residual block ``y = x - ReLU(b(x))`` (He et al., arXiv:1512.03385)."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        return x - F.relu(self.branch(x))


class Classifier(nn.Module):
    """A trunk ``(B, C, H, W) -> (B, C, H, W)`` and a linear head on its flattened output."""

    def __init__(self, trunk: nn.Module, shape: tuple[int, int, int], classes: int = 10) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(math.prod(shape), classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x).flatten(1))


def build(name: str, shape: tuple[int, int, int], layers: int, hidden: int) -> Classifier:
    """One of :data:`MODELS` with ``layers`` blocks on inputs of ``shape``."""
    c = shape[0]
    if name == "linear":
        trunk: nn.Module = nn.Identity()
    elif name == "cnn":
        trunk = nn.Sequential(
            *[nn.Sequential(conv_relu_conv(c, hidden, c), nn.ReLU()) for _ in range(layers)]
        )
        # He initialisation: without a skip connection, torch's default init shrinks the
        # signal at every layer and a stack of 2L plain ReLU convolutions barely trains.
        for m in trunk.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    elif name == "resnet":
        trunk = nn.Sequential(*[MinusResidual(conv_relu_conv(c, hidden, c)) for _ in range(layers)])
    elif name == "i-revnet":
        trunk = Reversible(
            *[
                RevCoupling(conv_relu_conv(c // 2, hidden, c // 2), conv_relu_conv(c // 2, hidden, c // 2))
                for _ in range(layers)
            ]
        )
    elif name == "i-resnet":
        trunk = Reversible(
            *[
                ResidualBlock.conv(c, hidden, lipschitz=0.9)
                for _ in range(layers)
            ]
        )
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return Classifier(trunk, shape)


# -- measurements ----------------------------------------------------------------------------


def fit(model: Classifier, split: Split, steps: int, batch: int, lr: float, seed: int) -> tuple[float, list[float]]:
    """Adam with cosine decay on shuffled epochs; returns the wall time in seconds and the
    training loss (batch cross-entropy) of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    order = torch.empty(0, dtype=torch.long)
    losses = []
    model.train()
    began = time.perf_counter()
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(len(split.x_train), generator=generator)
        idx, order = order[:batch], order[batch:]
        loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
    seconds = time.perf_counter() - began
    return seconds, torch.stack(losses).tolist() if losses else []


@torch.no_grad()
def predict(model: Classifier, x: Tensor, batch: int = 500) -> Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def accuracy(model: Classifier, x: Tensor, y: Tensor) -> float:
    return (predict(model, x) == y).double().mean().item()


@torch.no_grad()
def invertibility_error(trunk: Reversible, x: Tensor, dtype: torch.dtype) -> float:
    """``max |trunk.inverse(trunk(x)) - x|`` in eval mode, computed in ``dtype``."""
    if dtype != x.dtype:
        trunk = copy.deepcopy(trunk).to(dtype)
    trunk.eval()
    x = x.to(dtype)
    return (trunk.inverse(trunk(x)) - x).abs().max().item()


class _Packed:
    """What the cross-check's saved-tensor hook hands autograd: a detached alias.

    Detached, so a tensor saved as an output of its own node does not hold that node
    (tensor -> grad_fn -> saved variable -> tensor would be a cycle Python's collector
    cannot see); the box is freed exactly when the graph that saved it is freed.
    """

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def kept_bytes(model: Classifier, x: Tensor, y: Tensor, memory_saving: bool | None) -> tuple[int, int]:
    """Bytes autograd keeps for backward of one training batch, parameters excluded.

    Returns ``(library, check)``: :func:`flows.saved_bytes`, and an independent count of
    the storages of saved tensors still held by the loss's graph when the forward pass
    returns (tensors saved by graphs built and freed inside the forward pass, such as the
    i-ResNet log-det's vector-Jacobian products, are not kept).
    """
    model.train()
    if memory_saving is not None:
        model.trunk.memory_saving = memory_saving
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    boxes: list[tuple[weakref.ref[_Packed], int, int]] = []

    def pack(t: Tensor) -> _Packed:
        box = _Packed(t.detach())
        storage = t.untyped_storage()
        boxes.append((weakref.ref(box), storage.data_ptr(), storage.nbytes()))
        return box

    with torch.random.fork_rng(devices=[]):
        library = flows.saved_bytes(lambda: F.cross_entropy(model(x), y), exclude=model)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
            loss = F.cross_entropy(model(x), y)
        # Alive storages have distinct addresses, so the address identifies a storage here.
        alive = {ptr: n for ref, ptr, n in boxes if ref() is not None and ptr not in skip}
        del loss
    return library, sum(alive.values())


def gradient_difference(model: Classifier, x: Tensor, y: Tensor) -> float:
    """The :func:`flows.parity.gradient_parity` error of the classifier's parameter gradients
    (largest |memory-saving - ordinary| entry over the largest entry) on one batch.

    Eval mode, as the figures use the model; the helper also freezes the spectral norm's
    power iteration, so both passes differentiate the same function.
    """
    model.eval()
    return gradient_parity(model, x, loss=lambda logits: F.cross_entropy(logits, y)).error


# -- interpolation figure ----------------------------------------------------------------------


def pick_pairs(y: Tensor, n: int) -> list[tuple[int, int]]:
    """Indices of up to ``n`` test pairs of different classes (preferred class pairs first)."""
    pairs = []
    for a, b in CLASS_PAIRS:
        ia, ib = (y == a).nonzero().flatten(), (y == b).nonzero().flatten()
        if len(ia) and len(ib):
            pairs.append((int(ia[0]), int(ib[0])))
    if not pairs:
        differ = (y != y[0]).nonzero().flatten()
        if len(differ):
            pairs.append((0, int(differ[0])))
    return pairs[:n]


@torch.no_grad()
def trunk_path(model: Classifier, x0: Tensor, x1: Tensor, steps: int) -> Tensor:
    """``trunk.inverse((1 - t) trunk(x0) + t trunk(x1))`` for ``steps`` t in [0, 1]: (steps, ...)."""
    model.eval()
    z = model.trunk(torch.stack([x0, x1]))
    t = torch.linspace(0, 1, steps).view(-1, 1, 1, 1)
    return model.trunk.inverse((1 - t) * z[0] + t * z[1])


def save_interpolation(
    model: Classifier, split: Split, title: str, path: Path, steps: int = 9, n_pairs: int = 3
) -> tuple[Path, dict[str, float]]:
    """Write the figure; returns its path and what the paths show.

    The statistics: ``end_error``, the largest ``|x_t - x|`` at the two ends (a
    reconstruction error); ``range_min`` / ``range_max`` of the trunk-space frames (the
    data lie in ``[0, 1]``); ``gap``, the mean ``|x_t - ((1 - t) x0 + t x1)|`` over the
    inner frames; ``switches_trunk`` / ``switches_pixels``, how often the predicted class
    changes along the paths, summed over the pairs.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pairs = pick_pairs(split.y_test, n_pairs)
    if not pairs:
        raise ValueError(f"{split.name}: the test set holds a single class; nothing to interpolate")
    t = torch.linspace(0, 1, steps).view(-1, 1, 1, 1)
    rows: list[tuple[str, Tensor, Tensor]] = []
    stats = {"end_error": 0.0, "range_min": math.inf, "range_max": -math.inf, "gap": 0.0}
    stats.update(switches_trunk=0, switches_pixels=0)
    for i0, i1 in pairs:
        x0, x1 = split.x_test[i0], split.x_test[i1]
        latent, pixels = trunk_path(model, x0, x1, steps), (1 - t) * x0 + t * x1
        stats["end_error"] = max(
            stats["end_error"], (latent[0] - x0).abs().max().item(), (latent[-1] - x1).abs().max().item()
        )
        stats["range_min"] = min(stats["range_min"], latent.min().item())
        stats["range_max"] = max(stats["range_max"], latent.max().item())
        stats["gap"] += (latent[1:-1] - pixels[1:-1]).abs().mean().item() / len(pairs)
        label = f"{int(split.y_test[i0])}->{int(split.y_test[i1])}"
        for kind, frames in (("trunk", latent), ("pixels", pixels)):
            predicted = predict(model, frames)
            stats[f"switches_{kind}"] += int((predicted[1:] != predicted[:-1]).sum())
            span = f"\n[{frames.min():.2g}, {frames.max():.2g}]"
            rows.append((f"{label}\n{kind}{span}", frames, predicted))
    # One image holding every frame, labels as text: no layout engine, so drawing and
    # saving take a fraction of what a grid of axes does.
    _, _, h, w = depth_to_space(rows[0][1][:1], split.squeezes).shape
    cell_h, cell_w = h + 4, w + 1  # 3 pixel rows above each frame for its predicted class
    mosaic = torch.ones(len(rows) * cell_h, steps * cell_w - 1)
    for r, (_, frames, _) in enumerate(rows):
        images = depth_to_space(frames, split.squeezes)[:, 0].clamp(0, 1)
        for c in range(steps):
            mosaic[r * cell_h + 3 : r * cell_h + 3 + h, c * cell_w : c * cell_w + w] = images[c]
    scale = 0.75 / w  # inches per pixel: a frame is 0.75 inch wide
    left, top, bottom = 1.1, 0.55, 0.3
    width, height = mosaic.shape[1] * scale, mosaic.shape[0] * scale
    fig = Figure(figsize=(left + width + 0.1, top + height + bottom))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / fig.get_figwidth(), bottom / fig.get_figheight(),
                       width / fig.get_figwidth(), height / fig.get_figheight()))
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for r, (label, _, predicted) in enumerate(rows):
        y = r * cell_h + 1.2
        for c in range(steps):
            ax.text(c * cell_w + (w - 1) / 2, y, f"{int(predicted[c])}", ha="center", va="center", fontsize=7)
        ax.text(-1.0, r * cell_h + 3 + (h - 1) / 2, label, ha="right", va="center", fontsize=7)
    for c in range(steps):
        ax.text(c * cell_w + (w - 1) / 2, len(rows) * cell_h, f"t={float(t.flatten()[c]):.2f}",
                ha="center", va="top", fontsize=6)
    fig.suptitle(
        f"{title}: trunk-space vs pixel-space interpolation\n"
        "(above each frame: the predicted class; frames clipped to [0, 1], each row's value range at the left)",
        fontsize=8,
        y=1 - 0.05 / fig.get_figheight(),
        va="top",
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)  # the temporary name has no .png suffix
    return path, stats


def save_loss_curves(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Every row's training loss against the step in one plot: the batch losses faint, their
    running mean (over a thirtieth of the run) drawn over them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    window = 1
    for i, row in enumerate(rows):
        losses = torch.tensor(row["train_loss"], dtype=torch.float64)
        if not len(losses):
            continue
        window = max(1, len(losses) // 30)
        steps, color = torch.arange(1, len(losses) + 1), f"C{i}"
        if window > 1:
            ax.plot(steps.numpy(), losses.numpy(), color=color, alpha=0.25, linewidth=0.7)
        smooth = losses.unfold(0, window, 1).mean(1)
        ax.plot(steps[window - 1 :].numpy(), smooth.numpy(), color=color, linewidth=1.6, label=row["model"])
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    smoothing = f" (faint) and its running mean over {window} steps" if window > 1 else ""
    ax.set_title(f"{title}: batch loss{smoothing}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.lines:  # none with --steps 0
        ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


# -- the lab -----------------------------------------------------------------------------------


def run(split: Split, args: argparse.Namespace, figures: Path) -> list[dict[str, Any]]:
    """Train and measure every model on one dataset; print its table."""
    # Copies: a view would count the whole training set's storage as kept.
    x_mem, y_mem = split.x_train[: args.batch].clone(), split.y_train[: args.batch].clone()
    n_inv = min(len(split.x_test), 500)
    results = []
    for name in MODELS:
        torch.manual_seed(args.seed)
        model = build(name, split.shape, args.layers, args.hidden)
        invertible = name in INVERTIBLE
        row: dict[str, Any] = {
            "data": split.name,
            "model": name,
            "layers": args.layers,
            "params": sum(p.numel() for p in model.parameters()),
        }
        row["kept_ordinary"], row["check_ordinary"] = kept_bytes(model, x_mem, y_mem, False if invertible else None)
        if invertible:
            row["kept_memory_saving"], row["check_memory_saving"] = kept_bytes(model, x_mem, y_mem, True)
        else:
            row["kept_memory_saving"] = row["check_memory_saving"] = None
        if invertible:
            model.trunk.memory_saving = True  # train with memory-saving backward
        row["train_seconds"], row["train_loss"] = fit(model, split, args.steps, args.batch, args.lr, args.seed)
        row["train_acc"] = accuracy(model, split.x_train, split.y_train)
        row["test_acc"] = accuracy(model, split.x_test, split.y_test)
        if invertible:
            row["inv_error_f32"] = invertibility_error(model.trunk, split.x_test[:n_inv], torch.float32)
            row["inv_error_f64"] = invertibility_error(model.trunk, split.x_test[:n_inv], torch.float64)
            row["grad_diff"] = gradient_difference(model, x_mem, y_mem)
            model.trunk.memory_saving = True
            key = name.replace("-", "") + ("" if split.name == "digits" else f"_{split.name}")
            path, stats = save_interpolation(
                model, split, f"{name} on {split.name}", figures / f"lab_{key}_interpolation.png"
            )
            row["figure"] = str(path)
            row["interpolation"] = stats
        results.append(row)
    suffix = "" if split.name == "digits" else f"_{split.name}"
    loss_figure = save_loss_curves(results, split.name, figures / f"lab_training_loss{suffix}.png")
    print_table(split, args, results)
    print(f"training loss curves: wrote {loss_figure}")
    return results


def final_loss(losses: list[float]) -> float | None:
    """The mean training loss over the last tenth of the steps (``None`` without steps)."""
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail) if tail else None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(split: Split, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    c, h, w = split.shape
    print(
        f"\n### {split.name}: ({c}, {h}, {w}) layout, {len(split.x_train)} train / {len(split.x_test)} test, "
        f"{args.layers} layers, hidden {args.hidden}, {args.steps} steps of batch {args.batch}\n"
    )
    print(
        "| model | params | train acc | test acc | inv. error f32 | inv. error f64 "
        "| kept KiB ordinary | kept KiB memory-saving | grad diff | final loss | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kept_ms = r["kept_memory_saving"]
        print(
            f"| {r['model']} | {r['params']:,} | {r['train_acc']:.3f} | {r['test_acc']:.3f} "
            f"| {_fmt(r.get('inv_error_f32'), '.1e')} | {_fmt(r.get('inv_error_f64'), '.1e')} "
            f"| {r['kept_ordinary'] / KIB:.1f} | {_fmt(None if kept_ms is None else kept_ms / KIB, '.1f')} "
            f"| {_fmt(r.get('grad_diff'), '.1e')} | {_fmt(final_loss(r['train_loss']), '.2g')} "
            f"| {r['train_seconds']:.1f} |"
        )
    mismatches = [
        f"{r['model']} {mode}: {r[f'kept_{mode}']} vs {r[f'check_{mode}']} bytes"
        for r in rows
        for mode in ("ordinary", "memory_saving")
        if r[f"kept_{mode}"] != r[f"check_{mode}"]
    ]
    print(
        "\nkept bytes: flows.saved_bytes; an independent count of the saved storages still held "
        "by the loss's graph " + ("agrees on every row" if not mismatches else "differs: " + "; ".join(mismatches))
    )
    for r in rows:
        if "figure" in r:
            st = r["interpolation"]
            print(
                f"{r['model']} interpolation: trunk-space frames in [{st['range_min']:.3g}, {st['range_max']:.3g}] "
                f"(data in [0, 1]), mean |x_t - pixel blend| {st['gap']:.3g}, class changes along the "
                f"paths {st['switches_trunk']} (trunk) vs {st['switches_pixels']} (pixels), "
                f"end error {st['end_error']:.1e}; wrote {r['figure']}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny models, seconds")
    parser.add_argument("--mnist", default=None, help="directory of local MNIST IDX files (never downloaded)")
    parser.add_argument("--layers", type=integer(1), default=None, help="blocks per trunk (default 4; quick 2)")
    parser.add_argument("--hidden", type=integer(1), default=None, help="hidden channels (default 32; quick 8)")
    parser.add_argument("--steps", type=integer(0), default=None, help="training steps (default 600; quick 30)")
    parser.add_argument("--batch", type=integer(1), default=64)
    parser.add_argument("--lr", type=number(0, strict=True), default=2e-3)
    parser.add_argument("--n-train", type=integer(1), default=500, help="digits training images")
    parser.add_argument("--n-test", type=integer(1), default=None, help="cap on test images (default all)")
    parser.add_argument("--mnist-train", type=integer(1), default=10000, help="MNIST training subset")
    parser.add_argument("--seed", type=seed(), default=0)
    parser.add_argument("--threads", type=integer(1), default=1)
    parser.add_argument(
        "--figures",
        type=writable_directory,
        default=None,
        help="directory of the PNG figures (default docs/figures; runs/lab with --quick)",
    )
    parser.add_argument("--json", type=writable_file, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.layers = args.layers if args.layers is not None else (2 if args.quick else 4)
    args.hidden = args.hidden if args.hidden is not None else (8 if args.quick else 32)
    args.steps = args.steps if args.steps is not None else (30 if args.quick else 600)
    if args.quick and args.n_test is None:
        args.n_test = 300
    if args.figures is None:
        # A smoke run must not overwrite the published figures. Checked as a given one is: the
        # figures are written after the training.
        default = "runs/lab" if args.quick else "docs/figures"
        args.figures = checked_default(parser, "--figures", writable_directory, default)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")

    try:  # both loads come before any training: an option out of range, or files missing, is a usage line
        splits = [load_digits(args.n_train, args.seed, args.n_test)]
        if args.mnist is not None:
            splits.append(load_mnist(args.mnist, args.mnist_train, args.n_test, args.seed))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    results: list[dict[str, Any]] = []
    for split in splits:
        results += run(split, args, args.figures)
    if args.json:
        write_text(args.json, json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
