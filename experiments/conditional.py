"""Conditional flows: class-conditional Glow on digits, and the Gaussian-linear posterior.

    python experiments/conditional.py --out runs/conditional   # ~6 minutes at 1 thread (2-core Xeon)
    python experiments/conditional.py --quick --out /tmp/cond  # seconds-long smoke run

(a) Digits. A class-conditional Glow (``num_classes=10``: the label's embedding enters
    every coupling as extra channels, the split priors and the top prior) against the
    unconditional Glow of the same architecture, on scikit-learn's bundled 8x8 digits
    (17 grey levels, 1497 train / 300 test images). Both use the README's digits recipe:
    L=2, K=6 steps per level, width 64, learned split prior, ``Logit(0.05)`` in front
    (the ``flows train`` default), Adam lr 1e-3 with a 100-step linear warm-up, gradient
    norm clipped at 50, batch 64 of uniformly dequantized images drawn as shuffled epochs,
    ActNorm initialised on 512 training images: the schedule of :func:`flows.train`, run
    here by one small loop for both models so that the conditional one gets its labels.
    Test bits/dim of ``log p(x | y)`` and of ``log p(x)`` are measured every
    ``--eval-every`` steps with the same dequantization noise for both models. 1497
    images are overfit after about 1000-1500 steps (a 4000-step run left the conditional
    model 0.11 bits/dim above the unconditional one at its last step, 0.045 below at
    step 1000), so 200 training images (the same for both) are held out and each model
    keeps the weights of its evaluation with the lowest validation bits/dim (early
    stopping); its test bits/dim there is the result, the last step's is shown too. The
    conditional model's extra parameters all read the label only (a projection of its
    embedding broadcast over space as 8 input channels of each conditioner, the priors'
    context networks): as a function of ``x`` both conditioners have the same size.
    Conditioning on one of 10 roughly balanced classes saves at most
    ``I(x; y) / D <= log2(10) / 64 = 0.052`` bits/dim. Also reported: the conditional
    model's marginal ``log p(x) = log sum_y p(x | y) p(y)`` (``p(y)`` the training
    frequencies) and the accuracy of its Bayes classifier ``argmax_y p(x | y) p(y)``.
(b) Class accuracy of conditional samples. 100 samples per class at temperatures 0.5,
    0.7 and 1.0, quantized to the 17 grey levels, classified by an RBF support-vector
    machine (scikit-learn ``SVC(gamma=0.001, C=10)``) and a logistic regression, both
    fitted on the 64 pixel levels of the real training digits; their accuracy on the real
    test digits is the reference row.
(c) Gaussian linear (``flows.data.load("gaussian-linear")``: ``theta ~ N(0, I_5)``,
    ``x = theta + N(0, 0.1^2 I_5)``, 20k train / 5k test pairs). A conditional flow
    ``q(theta | x)`` is trained by maximum likelihood with the shared peer harness's
    schedule (``../shared/peers/vector_nll.py``: Adam lr 1e-3, batch 256 drawn with
    replacement, 1000 steps, K = 4 flow steps, width 64). The posterior is known
    (``flows.data.gaussian_linear_log_posterior``), so ``mean log p(theta | x) - mean
    log q(theta | x)`` over the test pairs estimates the expected KL divergence
    ``E_x KL(p(. | x) || q(. | x))`` (floor 0; noisy by about 0.01 nats). Models: flows'
    vector ``RealNVP((5,), levels=1, steps=K, context_features=5)``, vector ``Glow``,
    ``NSF((5,), steps=K)`` and ``MAF((5,), steps=K)``, and, when they import, zuko's,
    nflows' and normflows' conditional NSF (8 bins, tail bound 5) and zuko's and nflows'
    MAF (normflows' MADE takes no context) at the same K and width, on the same tensors
    and batches (``--peers``; none is a dependency: the peer venv of
    ``../shared/peers/setup.sh`` has them).
(d) Figure: class-conditional samples at T = 0.7, one row per class
    (``docs/figures/conditional_digits.png``; ``--quick`` writes it under ``--out``).

Everything is printed as markdown tables and written to ``--out`` (``report.md``,
``conditional.json``; ``--json`` names another file for the JSON, written atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import flows
from flows.arguments import checked_default, integer, number, seed
from flows.data.dataset import Dataset
from flows.diagnostics import cpu_model
from flows.io import atomic_path, writable_directory, writable_file
from flows.models import MAF, NSF, Glow, RealNVP

ROOT = Path(__file__).resolve().parents[1]
FIGURE = "conditional_digits.png"
PEERS = ("zuko", "nflows", "normflows")
TEMPERATURES = (0.5, 0.7, 1.0)
BOUND = math.log2(10) / 64  # the most 10 classes can save per dimension


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def finite(value: float | None) -> float | None:
    """``None`` for NaN / inf, so the JSON stays strict."""
    return None if value is None or not math.isfinite(value) else float(value)


# ----------------------------------------------------------------------------- (a) digits
def build_digits_glow(data: Dataset, args: argparse.Namespace, conditional: bool) -> nn.Module:
    kw: dict[str, Any] = {"num_classes": 10} if conditional else {}
    return Glow(
        data.shape,
        levels=args.levels,
        steps=args.steps_per_level,
        hidden_channels=args.hidden,
        split_prior=True,
        logit_alpha=0.05,
        n_levels=data.n_levels or 256,
        **kw,
    )


@torch.no_grad()
def mean_bpd(model: nn.Module, data: Dataset, images: Tensor, labels: Tensor | None, seed: int = 0) -> float:
    """Mean bits/dim of ``images`` (given ``labels`` for a conditional model), fixed dequantization noise."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(images), 300):
            x = data.prepare(images[start : start + 300], generator=generator)
            y = None if labels is None else labels[start : start + 300]
            total += model.bits_per_dim(x, y).double().sum().item()
    finally:
        model.train(was_training)
    return total / len(images)


def test_bpd(model: nn.Module, data: Dataset, labels: Tensor | None, seed: int = 0) -> float:
    """Mean test bits/dim (given ``labels`` for a conditional model)."""
    return mean_bpd(model, data, data.test, labels, seed)


@torch.no_grad()
def marginal_scores(model: nn.Module, data: Dataset, seed: int = 0) -> tuple[float, float]:
    """The conditional model's marginal test bits/dim ``-log2 sum_y p(x | y) p(y) / D`` and the
    accuracy of ``argmax_y p(x | y) p(y)``, with the same dequantization noise as :func:`test_bpd`."""
    assert data.train_labels is not None and data.test_labels is not None
    prior = torch.bincount(data.train_labels, minlength=10).double() / len(data.train_labels)
    x = data.prepare(data.test, generator=torch.Generator().manual_seed(seed))
    model.eval()
    joint = (
        torch.stack([model.log_prob(x, torch.full((len(x),), k, dtype=torch.int64)).double() for k in range(10)], 1)
        + prior.log()
    )
    model.train()
    log_px = torch.logsumexp(joint, 1)
    d = data.dim
    bpd = ((-log_px + d * math.log(data.n_levels or 256)) / (d * math.log(2))).mean().item()
    accuracy = (joint.argmax(1) == data.test_labels).double().mean().item()
    return bpd, accuracy


def train_digits(model: nn.Module, data: Dataset, args: argparse.Namespace, conditional: bool) -> dict[str, Any]:
    """:func:`flows.train`'s schedule, passing the labels as context to a conditional model.

    ``args.validation`` training images (the same for both models) are held out; the
    weights of the evaluation with the lowest validation bits/dim are the model's result
    (early stopping: 1497 images are overfit within the step budget), and its test
    bits/dim is reported beside the last step's.
    """
    assert data.train_labels is not None and data.test_labels is not None
    labels = data.train_labels if conditional else None
    test_labels = data.test_labels if conditional else None
    split = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1234))
    held, kept = split[: args.validation], split[args.validation :]
    val_images, val_labels = data.train[held], (None if labels is None else labels[held])
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    init = kept[torch.randperm(len(kept), generator=generator)[: min(512, len(kept))]]
    model.train()
    with torch.no_grad():  # ActNorm's data-dependent initialisation on a large batch
        model.log_prob(data.prepare(data.train[init], generator=generator), None if labels is None else labels[init])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    warmup = min(args.warmup, max(args.digits_steps // 5, 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    params = [p for p in model.parameters() if p.requires_grad]
    perm, cursor = kept[torch.randperm(len(kept), generator=generator)], 0
    curve: list[tuple[int, float]] = [(0, test_bpd(model, data, test_labels))]
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    losses: list[float] = []
    train_time = 0.0
    for step in range(1, args.digits_steps + 1):
        began = time.perf_counter()
        if cursor + args.batch_size > len(perm):  # shuffled epochs, the incomplete tail dropped
            perm, cursor = kept[torch.randperm(len(kept), generator=generator)], 0
        idx = perm[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        x = data.prepare(data.train[idx], generator=generator)
        loss = model.bits_per_dim(x, None if labels is None else labels[idx]).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 50.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        train_time += time.perf_counter() - began
        if step % args.eval_every == 0 or step == args.digits_steps:
            curve.append((step, test_bpd(model, data, test_labels)))
            validation = mean_bpd(model, data, val_images, val_labels)
            if validation < best[0]:
                best = (validation, step, copy.deepcopy(model.state_dict()))
    last_test = curve[-1][1]
    model.load_state_dict(best[2])
    return {
        "params": n_params(model),
        "steps": args.digits_steps,
        "train_time": train_time,
        "ms_per_step": 1e3 * train_time / max(args.digits_steps, 1),
        "train_bpd_last100": float(np.mean(losses[-100:])) if losses else None,
        "test_curve": curve,
        "last_step_test_bpd": last_test,
        "selected_step": best[1],
        "validation_bpd": best[0],
        "test_bpd": test_bpd(model, data, test_labels),
        "best_test_bpd": min(v for _, v in curve),
    }


# ----------------------------------------------------------------------------- (b) sample accuracy
def fit_classifiers(data: Dataset) -> dict[str, Any]:
    """Classifiers of the 64 pixel levels, fitted on the real training digits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    x = data.train.flatten(1).numpy().astype(np.float64)
    y = data.train_labels.numpy()
    return {
        "SVC": SVC(gamma=0.001, C=10.0).fit(x, y),
        "logistic": LogisticRegression(max_iter=5000).fit(x / 16, y),
    }


def classify(classifiers: dict[str, Any], levels: Tensor) -> dict[str, np.ndarray]:
    x = levels.flatten(1).numpy().astype(np.float64)
    return {"SVC": classifiers["SVC"].predict(x), "logistic": classifiers["logistic"].predict(x / 16)}


@torch.no_grad()
def sample_accuracy(
    model: nn.Module, data: Dataset, classifiers: dict[str, Any], per_class: int, seed: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per temperature: the fraction of conditional samples each classifier assigns to their class."""
    assert data.test_labels is not None
    reference = {
        name: float((pred == data.test_labels.numpy()).mean())
        for name, pred in classify(classifiers, data.test).items()
    }
    model.eval()
    labels = torch.arange(10).repeat_interleave(per_class)
    rows = []
    for t in TEMPERATURES:
        torch.manual_seed(seed)
        x = model.sample(len(labels), context=labels, temperature=t)
        bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
        # Samples in [0, 1) back to the 17 grey levels the classifiers were fitted on.
        levels = (torch.nan_to_num(x, nan=0.0) * (data.n_levels or 256)).floor().clamp(0, (data.n_levels or 256) - 1)
        row: dict[str, Any] = {"temperature": t, "samples": len(labels), "non_finite": bad}
        for name, pred in classify(classifiers, levels).items():
            hits = pred == labels.numpy()
            row[name] = float(hits.mean())
            row[f"{name}_worst_class"] = float(min(hits[labels.numpy() == k].mean() for k in range(10)))
        rows.append(row)
    model.train()
    return rows, reference


def save_figure(model: nn.Module, path: Path, per_row: int, seed: int, temperature: float = 0.7) -> None:
    """Class-conditional samples, one row per class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    model.eval()
    with torch.no_grad():
        torch.manual_seed(seed)
        labels = torch.arange(10).repeat_interleave(per_row)
        x = model.sample(len(labels), context=labels, temperature=temperature).clamp(0, 1)
    model.train()
    images = x.view(10, per_row, *x.shape[-2:]).numpy()
    h, w = images.shape[-2:]
    grid = np.ones((10 * (h + 1) - 1, per_row * (w + 1) - 1))
    for k in range(10):
        for j in range(per_row):
            grid[k * (h + 1) : k * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = images[k, j]
    fig = Figure(figsize=(0.45 * per_row + 0.8, 0.45 * 10 + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([k * (h + 1) + h / 2 - 0.5 for k in range(10)], [str(k) for k in range(10)])
    ax.set_xticks([])
    ax.set_ylabel("class")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"class-conditional Glow, T = {temperature:g}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ----------------------------------------------------------------------------- (c) Gaussian linear
class Conditional:
    """A conditional density ``q(theta | x)`` behind one interface: ``log_prob(theta, x)``."""

    def __init__(self, module: nn.Module, log_prob: Callable[[Tensor, Tensor], Tensor], note: str) -> None:
        self.module, self.log_prob, self.note = module, log_prob, note


def build_ours(kind: str, d: int, c: int, k: int, h: int) -> Conditional:
    if kind in ("NSF", "MAF"):
        builder = {"NSF": NSF, "MAF": MAF}[kind]
        model = builder((d,), steps=k, hidden_channels=h, context_features=c)
        note = f"flows.models.{kind}(({d},), steps={k})"
    else:
        builder = {"RealNVP": RealNVP, "Glow": Glow}[kind]
        model = builder((d,), levels=1, steps=k, hidden_channels=h, context_features=c)
        note = f"flows.models.{kind}(({d},), levels=1, steps={k})"
    return Conditional(model, lambda theta, x: model.log_prob(theta, x), note)


def build_zuko(kind: str, d: int, c: int, k: int, h: int) -> Conditional:
    import zuko

    extra = {"bins": 8} if kind == "NSF" else {}
    flow = getattr(zuko.flows, kind)(d, c, transforms=k, hidden_features=(h, h), **extra)
    return Conditional(flow, lambda theta, x: flow(x).log_prob(theta), f"zuko.flows.{kind} (autoregressive)")


class _ContextMLP(nn.Module):
    """``[x_A, context] -> h -> h -> out``: the conditioner an nflows spline coupling is given."""

    def __init__(self, features: int, out: int, hidden: int, context: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features + context, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out),
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(torch.cat([x, context], 1))


def build_nflows(kind: str, d: int, c: int, k: int, h: int) -> Conditional:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow as NFlow
    from nflows.transforms import autoregressive, coupling, permutations
    from nflows.transforms.base import CompositeTransform
    from nflows.utils.torchutils import create_alternating_binary_mask

    layers: list[nn.Module] = []
    for i in range(k):
        if kind == "NSF":
            layers.append(
                coupling.PiecewiseRationalQuadraticCouplingTransform(
                    mask=create_alternating_binary_mask(d, even=i % 2 == 0),
                    transform_net_create_fn=lambda n_in, n_out: _ContextMLP(n_in, n_out, h, c),
                    num_bins=8,
                    tails="linear",
                    tail_bound=5.0,
                )
            )
        else:
            layers += [
                permutations.ReversePermutation(d),
                autoregressive.MaskedAffineAutoregressiveTransform(
                    features=d, hidden_features=h, context_features=c, num_blocks=1, use_residual_blocks=False
                ),
            ]
    flow = NFlow(CompositeTransform(layers), StandardNormal([d]))
    note = "spline couplings, alternating masks" if kind == "NSF" else "MADE (1 block) + reverse permutation"
    return Conditional(flow, lambda theta, x: flow.log_prob(theta, context=x), f"nflows {note}")


def build_normflows(kind: str, d: int, c: int, k: int, h: int) -> Conditional:
    import normflows as nf

    layers: list[nn.Module] = []
    for i in range(k):
        layers.append(
            nf.flows.CoupledRationalQuadraticSpline(
                d, 1, h, num_context_channels=c, num_bins=8, tails="linear", tail_bound=5.0, reverse_mask=i % 2 == 1
            )
        )
    flow = nf.ConditionalNormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), layers)
    note = "spline couplings (1-block ResidualNet)"
    return Conditional(flow, lambda theta, x: flow.log_prob(theta, context=x), f"normflows {note}")


BUILDERS: dict[str, Callable[[str, int, int, int, int], Conditional]] = {
    "flows": build_ours,
    "zuko": build_zuko,
    "nflows": build_nflows,
    "normflows": build_normflows,
}
KINDS = {
    "flows": ("RealNVP", "Glow", "NSF", "MAF"),
    "zuko": ("NSF", "MAF"),
    "nflows": ("NSF", "MAF"),
    "normflows": ("NSF",),  # its MADE blocks raise NotImplementedError with a context (1.7.3)
}


@torch.no_grad()
def mean_log_q(model: Conditional, theta: Tensor, x: Tensor) -> float:
    model.module.eval()
    value = torch.cat([model.log_prob(theta[i : i + 2500], x[i : i + 2500]) for i in range(0, len(theta), 2500)])
    model.module.train()
    return value.double().mean().item()


def gaussian_linear(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train every conditional model on the same pairs and batches; the gap to the true posterior."""
    n_train, n_test = (2000, 500) if args.quick else (20000, 5000)
    data = flows.data.load("gaussian-linear", n_train=n_train, n_test=n_test, seed=args.seed)
    theta, x = data.train, data.train_context
    theta_test, x_test = data.test, data.test_context
    assert x is not None and x_test is not None
    limit = flows.data.gaussian_linear_log_posterior(theta_test, x_test).double().mean().item()
    task = {"n_train": len(theta), "n_test": len(theta_test), "true_mean_log_posterior": limit}
    d, c = data.shape[0], x.shape[1]
    rows: list[dict[str, Any]] = []
    for lib in ["flows", *args.peers]:
        for kind in KINDS[lib]:
            row: dict[str, Any] = {"lib": lib, "model": kind}
            torch.manual_seed(args.seed)
            try:
                model = BUILDERS[lib](kind, d, c, args.gl_K, args.gl_hidden)
            except ImportError as error:  # a peer that is not installed
                rows.append({**row, "error": f"does not import ({error.name or error})"})
                break
            optimizer = torch.optim.Adam(model.module.parameters(), lr=1e-3)
            generator = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every model
            began, curve = time.perf_counter(), []
            for step in range(1, args.gl_steps + 1):
                idx = torch.randint(len(theta), (args.gl_batch,), generator=generator)
                loss = -model.log_prob(theta[idx], x[idx]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step % max(1, args.gl_steps // 4) == 0 or step == args.gl_steps:
                    curve.append(round(limit - mean_log_q(model, theta_test, x_test), 4))
            log_q = mean_log_q(model, theta_test, x_test)
            row.update(
                params=n_params(model.module),
                steps=args.gl_steps,
                wall_time=time.perf_counter() - began,
                test_log_q=log_q,
                gap=limit - log_q,
                gap_curve=curve,
                note=model.note,
            )
            rows.append(row)
            print(
                f"  gaussian-linear {lib} {kind}: gap {row['gap']:.4f} nats, {row['wall_time']:.0f} s", file=sys.stderr
            )
    return rows, task


# ----------------------------------------------------------------------------- tables
def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def digits_table(results: dict[str, dict[str, Any]], marginal: tuple[float, float] | None) -> list[str]:
    u, cnd = results["unconditional"], results["conditional"]
    lines = [
        "| model | params | steps | s / step | selected step (validation) | test bits/dim there "
        "| test bits/dim at the last step | train bits/dim (last 100) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = (("unconditional", "Glow, log p(x)"), ("conditional", "class-conditional Glow, log p(x \\| y)"))
    for name, label in labels:
        r = results[name]
        lines.append(
            f"| {label} | {r['params']:,} | {r['steps']} | {r['ms_per_step'] / 1e3:.3f} | {r['selected_step']} | "
            f"{fmt(r['test_bpd'], 4)} | {fmt(r['last_step_test_bpd'], 4)} | {fmt(r['train_bpd_last100'], 4)} |"
        )
    if marginal is not None:
        lines.append(
            f"| class-conditional Glow, marginal log sum_y p(x \\| y) p(y) | {cnd['params']:,} | {cnd['steps']} | - | "
            f"{cnd['selected_step']} | {fmt(marginal[0], 4)} | - | - |"
        )
    gap = u["test_bpd"] - cnd["test_bpd"]
    lines += [
        "",
        f"Conditional minus unconditional, each at its validation-selected step: {-gap:+.4f} bits/dim "
        f"(target <= -0.02; at most -{BOUND:.3f} at the optimum)."
        + (
            ""
            if marginal is None
            else f" Bayes classifier argmax_y p(x | y) p(y) on the test digits: {marginal[1]:.1%}."
        ),
        "",
        "Test bits/dim during training:",
        "",
        "| step | " + " | ".join(str(s) for s, _ in u["test_curve"]) + " |",
        "|---|" + "---:|" * len(u["test_curve"]),
        "| log p(x) | " + " | ".join(fmt(v, 3) for _, v in u["test_curve"]) + " |",
        "| log p(x \\| y) | " + " | ".join(fmt(v, 3) for _, v in cnd["test_curve"]) + " |",
    ]
    return lines


def accuracy_table(rows: list[dict[str, Any]], reference: dict[str, float], per_class: int) -> list[str]:
    lines = [
        f"| samples ({per_class} per class) | SVC accuracy | worst class (SVC) | logistic accuracy | non-finite |",
        "|---|---:|---:|---:|---:|",
        f"| real test digits (reference) | {reference['SVC']:.1%} | - | {reference['logistic']:.1%} | - |",
    ]
    for r in rows:
        lines.append(
            f"| T = {r['temperature']:g} | {r['SVC']:.1%} | {r['SVC_worst_class']:.1%} | {r['logistic']:.1%} | "
            f"{r['non_finite']} |"
        )
    return lines


def gaussian_table(rows: list[dict[str, Any]], task: dict[str, Any]) -> list[str]:
    lines = [
        "| library | model | params | steps | wall time (s) | test mean log q(theta \\| x) | gap (nats) | "
        "gap at 1/4, 1/2, 3/4, 1 of the steps |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        f"| true posterior | N(x / 1.01, I / 101) | - | - | - | {task['true_mean_log_posterior']:.3f} | 0 | - |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['lib']} | {r['model'] if r['lib'] == 'flows' else '-'} | - | - | - | {r['error']} | - | - |"
            )
            continue
        lines.append(
            f"| {r['lib']} | {r['model']} | {r['params']:,} | {r['steps']} | {r['wall_time']:.0f} | "
            f"{r['test_log_q']:.3f} | {r['gap']:.3f} | {', '.join(f'{v:.3f}' for v in r['gap_curve'])} |"
        )
    return lines


# ----------------------------------------------------------------------------- main
def _version(module: str) -> str | None:
    """The installed version of a peer library, ``None`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def hardware() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{cpu_model()}, {os.cpu_count()} CPUs"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny models, few steps)")
    parser.add_argument(
        "--out", type=writable_directory, default=str(ROOT / "runs" / "conditional"), help="tables and JSON"
    )
    parser.add_argument(
        "--json", type=writable_file, default=None, help="the JSON report (default: OUT/conditional.json)"
    )
    parser.add_argument(
        "--figures",
        type=writable_directory,
        default=None,
        help="figure folder (default: docs/figures, or --out with --quick)",
    )
    parser.add_argument("--threads", type=integer(1), default=1)
    parser.add_argument("--seed", type=seed(), default=0)
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-gaussian", action="store_true")
    digits = parser.add_argument_group("digits")
    digits.add_argument(
        "--digits-steps", type=integer(1), default=None, help="training steps per model (2000; --quick 20)"
    )
    digits.add_argument(
        "--eval-every", type=integer(1), default=None, help="steps between test evaluations (steps / 8)"
    )
    # The digits are 8x8: a fourth level would squeeze them to 1x1.
    digits.add_argument("--levels", type=integer(1, 3), default=None, help="Glow levels, at most 3 (2)")
    digits.add_argument("--steps-per-level", type=integer(1), default=None, help="Glow steps per level (6; --quick 1)")
    digits.add_argument("--hidden", type=integer(1), default=None, help="Glow width (64; --quick 8)")
    digits.add_argument("--batch-size", type=integer(1), default=64)
    digits.add_argument("--lr", type=number(0, strict=True), default=1e-3)
    digits.add_argument("--warmup", type=integer(1), default=100, help="learning-rate warm-up steps (100; 1: none)")
    digits.add_argument(
        "--validation",
        type=integer(1),
        default=None,
        help="training images held out to select the step (200; quick 16)",
    )
    digits.add_argument("--per-class", type=integer(1), default=None, help="samples per class and temperature (100)")
    gaussian = parser.add_argument_group("Gaussian linear")
    gaussian.add_argument("--gl-steps", type=integer(1), default=None, help="training steps (1000; --quick 20)")
    gaussian.add_argument("--gl-K", type=integer(1), default=4, help="flow steps of every model")
    gaussian.add_argument("--gl-hidden", type=integer(1), default=None, help="conditioner width (64; --quick 16)")
    gaussian.add_argument("--gl-batch", type=integer(1), default=256)
    gaussian.add_argument(
        "--peers", default=",".join(PEERS), help="peer libraries run in-process when they import ('' for none)"
    )
    args = parser.parse_args(argv)
    q = args.quick
    defaults = {
        "digits_steps": 20 if q else 2000,
        "validation": 16 if q else 200,
        "levels": 2,
        "steps_per_level": 1 if q else 6,
        "hidden": 8 if q else 64,
        "per_class": 10 if q else 100,
        "gl_steps": 20 if q else 1000,
        "gl_hidden": 16 if q else 64,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.eval_every is None:
        args.eval_every = max(1, args.digits_steps // 8)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in args.peers if p not in PEERS]
    if bad:
        parser.error(f"unknown peer {', '.join(bad)}; choose from {', '.join(PEERS)}")
    if args.figures is None:
        figures = ROOT / "docs" / "figures"  # checked as a given one is: the figures are written last
        args.figures = args.out if q else checked_default(parser, "--figures", writable_directory, figures)
    if args.json is None:
        args.json = args.out / "conditional.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    stamp = datetime.now(timezone.utc)
    header = (
        f"# Conditional flows ({stamp:%Y-%m-%d %H:%M} UTC; {cpu_model()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {args.threads} thread(s){', --quick' if args.quick else ''})"
    )
    print(header + "\n", flush=True)
    report, results = [header, ""], {}
    if not args.skip_digits:
        data = flows.data.load("digits", seed=args.seed)
        digits: dict[str, dict[str, Any]] = {}
        models: dict[str, nn.Module] = {}
        for name in ("unconditional", "conditional"):
            model = build_digits_glow(data, args, conditional=name == "conditional")
            digits[name] = train_digits(model, data, args, conditional=name == "conditional")
            models[name] = model
            print(
                f"[{time.perf_counter() - began:5.0f} s] digits {name}: {digits[name]['test_bpd']:.4f} bits/dim, "
                f"{digits[name]['train_time']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        conditional = models["conditional"]
        marginal = marginal_scores(conditional, data)
        classifiers = fit_classifiers(data)
        accuracy, reference = sample_accuracy(conditional, data, classifiers, args.per_class, args.seed)
        figure = args.figures / FIGURE
        save_figure(conditional, figure, per_row=10, seed=args.seed)
        table = [
            f"## Class-conditional Glow on digits (L={args.levels}, K={args.steps_per_level}, width {args.hidden}, "
            f"split prior, Logit(0.05); {args.digits_steps} steps, batch {args.batch_size}, lr {args.lr}, "
            f"warm-up {min(args.warmup, max(args.digits_steps // 5, 1))}; {len(data.train)} train / "
            f"{len(data.test)} test images)",
            "",
            *digits_table(digits, marginal),
            "",
            "## Class accuracy of conditional samples (classifiers fitted on the real training digits)",
            "",
            *accuracy_table(accuracy, reference, args.per_class),
            "",
            f"Figure: {figure}",
        ]
        print("\n".join(table) + "\n", flush=True)
        report += [*table, ""]
        results["digits"] = {
            "models": digits,
            "difference_bpd": digits["conditional"]["test_bpd"] - digits["unconditional"]["test_bpd"],
            "bound_bpd": BOUND,
            "marginal_test_bpd": marginal[0],
            "bayes_classifier_accuracy": marginal[1],
            "sample_accuracy": accuracy,
            "classifier_test_accuracy": reference,
            "classifiers": {
                "SVC": "sklearn.svm.SVC(gamma=0.001, C=10) on levels 0..16",
                "logistic": "sklearn LogisticRegression(max_iter=5000) on levels / 16",
            },
            "figure": str(figure),
        }
    if not args.skip_gaussian:
        rows, task = gaussian_linear(args)
        table = [
            f"## Gaussian linear: gap to the true posterior (K={args.gl_K}, width {args.gl_hidden}, "
            f"{args.gl_steps} steps, batch {args.gl_batch}, lr 1e-3; {task['n_train']} train / {task['n_test']} "
            "test pairs)",
            "",
            *gaussian_table(rows, task),
            "",
            "gap = mean log p(theta | x) - mean log q(theta | x) over the test pairs, an estimate of the "
            "expected KL(p || q) (floor 0).",
        ]
        print("\n".join(table) + "\n", flush=True)
        report += [*table, ""]
        results["gaussian_linear"] = {"task": task, "rows": rows}
    total = time.perf_counter() - began
    print(f"total {total:.0f} s", flush=True)
    payload = {
        "command": " ".join(["python", "experiments/conditional.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "interpreter": sys.executable,
        "peer_versions": {lib: _version(lib) for lib in args.peers},
        "cpu": cpu_model(),
        "lscpu": hardware(),
        "threads": args.threads,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "total_time": total,
        **results,
    }
    with atomic_path(args.json) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, allow_nan=False, default=finite))
    with atomic_path(args.out / "report.md") as tmp:
        tmp.write_text("\n".join(report) + f"\ntotal {total:.0f} s\n")
    print(f"wrote {args.json} and {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
