"""Density estimation: RealNVP, Glow and i-ResNet at matched sizes on digits and 2D toys.

Trains each model with :func:`flows.train` (Adam, batch 64, lr 1e-3, 100 warm-up steps,
gradient clipping at 50) and prints a markdown table: parameters, steps, wall time and
the test metric, bits/dim on digits (dequantized, log(17) discretisation included) and
negative log-likelihood in nats on the toys. Parameter counts are matched within each
data kind:

* digits ``(1, 8, 8)``, about 120k parameters: RealNVP L=2, 3 couplings per phase, width
  24, one residual block per conditioner (115k); Glow L=2 K=6, width 64, learned split
  prior (122k, the README's model); i-ResNet L=2, 4 blocks per level, width 80 (122k);
* toys ``(2,)``, about 27k parameters: six steps of width 64 each (RealNVP couplings, Glow
  steps, i-ResNet blocks).

The i-ResNet trains with its truncated power-series log-det (biased, stochastic); its
headline number is the exact likelihood (:func:`flows.models.logdet_mode` ``"exact"``,
the full Jacobian per example), with the training estimator's value next to it.

``--downsampling squeeze,haar,learned`` sweeps the multi-scale downsampling of the image
models (one row per choice; the toys have none). ``--figure`` draws, for every toy, the
test data next to each model's learned density and samples
(:func:`flows.figures.save_density`, one row per model).

Run:
    python experiments/density.py --json runs/density.json
    python experiments/density.py --models glow --data digits --downsampling squeeze,haar,learned
    python experiments/density.py --quick   # seconds, tiny models, no figure unless --figure
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import flows
from flows.arguments import checked_default, integer, number, seed
from flows.data.dataset import Dataset
from flows.diagnostics import cpu_model
from flows.io import atomic_path, writable_file
from flows.models import MAF, NSF, Glow, IResNet, RealNVP, logdet_mode
from flows.training import NonFiniteLossError, TrainConfig
from flows.transforms import ResidualBlock

MODELS = ("realnvp", "glow", "iresnet", "nsf", "maf")
DEFAULT_MODELS = ("realnvp", "glow", "iresnet")
VECTOR_ONLY = ("nsf", "maf")
NAMES = {"realnvp": "RealNVP", "glow": "Glow", "iresnet": "i-ResNet", "nsf": "NSF", "maf": "MAF"}
DOWNSAMPLING = ("squeeze", "haar", "learned")
ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "figures" / "density_toys.png"


@dataclass
class Row:
    """One trained model and its test numbers."""

    model: str
    data: str
    downsampling: str | None
    params: int
    steps: int
    wall_time: float
    metric: str
    test: float
    test_estimator: float | None = None
    exact_eval_time: float | None = None
    error: str | None = None


def build(name: str, data: Dataset, quick: bool, downsampling: str) -> nn.Module:
    """Model ``name`` for ``data``, at the size matched across models for that data kind."""
    shape = data.shape
    kw: dict[str, Any]
    if len(shape) == 3:
        # Every model takes its dequantized [0, 1] pixels through Logit(0.05) first (Glow's
        # own default is no preprocessing; the Logit gains ~0.13 bits/dim on digits).
        kw = dict(levels=2, n_levels=data.n_levels or 256, downsampling=downsampling, logit_alpha=0.05)
        if quick:
            sizes = {
                "realnvp": dict(steps=1, hidden_channels=8, res_blocks=1),
                "glow": dict(steps=1, hidden_channels=8, split_prior=True),
                "iresnet": dict(blocks=1, hidden_channels=8),
            }
        else:
            sizes = {
                "realnvp": dict(steps=3, hidden_channels=24, res_blocks=1),
                "glow": dict(steps=6, hidden_channels=64, split_prior=True),
                "iresnet": dict(blocks=4, hidden_channels=80),
            }
    else:
        width, depth = (8, 2) if quick else (64, 6)
        # NSF and MAF at about the others' size: 5 spline-coupling steps (29k parameters)
        # and 6 MADE blocks (28k) against 27k for RealNVP's 6 couplings.
        if name in VECTOR_ONLY:
            steps = 2 if quick else {"nsf": 5, "maf": 6}[name]
            return {"nsf": NSF, "maf": MAF}[name](shape, steps=steps, hidden_channels=width)
        kw = dict(levels=1, hidden_channels=width)
        sizes = {"realnvp": dict(steps=depth), "glow": dict(steps=depth), "iresnet": dict(blocks=depth)}
    if name in VECTOR_ONLY:
        raise ValueError(f"{NAMES[name]} models vectors only; {data.name} holds images {shape}")
    factory: Callable[..., nn.Module] = {"realnvp": RealNVP, "glow": Glow, "iresnet": IResNet}[name]
    return factory(shape, **kw, **sizes[name])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_one(
    name: str, data: Dataset, steps: int, args: argparse.Namespace, downsampling: str | None
) -> tuple[Row, nn.Module]:
    """Train one model and evaluate it (the exact log-det too for the i-ResNet)."""
    torch.manual_seed(args.seed)
    model = build(name, data, args.quick, downsampling or "squeeze")
    metric = "bits/dim" if data.discrete else "nll"
    row = Row(NAMES[name], data.name, downsampling, n_params(model), steps, math.nan, metric, math.nan)
    warmup = min(100, steps // 5)
    start = time.perf_counter()
    try:
        config = TrainConfig(
            steps=steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=warmup,
            eval_every=max(steps, 1),
            seed=args.seed,
            progress=False,
        )
        history = flows.train(model, data, config)
    except NonFiniteLossError as error:
        row.wall_time, row.error = time.perf_counter() - start, str(error)
        return row, model
    row.wall_time = time.perf_counter() - start
    row.test = float(history["final_test"])
    if name == "iresnet":
        # Training used the truncated series (biased by the truncation, noisy through the
        # Hutchinson probes); the exact log-det makes the likelihood comparable.
        row.test_estimator = row.test
        start = time.perf_counter()
        with logdet_mode(model, "exact"):
            row.test = flows.evaluate(model, data, batch_size=100 if data.discrete else 1000)
        row.exact_eval_time = time.perf_counter() - start
    return row, model


def _crop(image: Any) -> Any:
    """Trim the white margin around a PNG drawn by ``save_density``."""
    ink = (image[..., :3] < 0.98).any(-1)
    rows, cols = ink.any(1).nonzero()[0], ink.any(0).nonzero()[0]
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def save_toys_figure(
    trained: dict[str, list[tuple[str, nn.Module]]], datasets: dict[str, Dataset], path: Path, quick: bool = False
) -> None:
    """A grid, one row per model and one column per toy, of ``save_density``'s three
    panels (test data, learned density, samples)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    from flows.figures import save_density

    toys = list(trained)
    labels = list(dict.fromkeys(label for models in trained.values() for label, _ in models))
    fig = Figure(figsize=(9.0 * len(toys), 3.2 * len(labels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(labels), len(toys), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    with tempfile.TemporaryDirectory() as tmp:
        for j, toy in enumerate(toys):
            for label, model in trained[toy]:
                file = Path(tmp) / f"{toy}-{len(label)}.png"
                exact = any(isinstance(m, ResidualBlock) for m in model.modules())
                # The density panel is exp(log_prob) on a grid: draw the i-ResNet's exact one.
                with logdet_mode(model, "exact") if exact else nullcontext():
                    save_density(
                        model, datasets[toy], file, n_samples=500 if quick else 5000, resolution=40 if quick else 150
                    )
                ax = axes[labels.index(label), j]
                ax.set_axis_on()
                ax.imshow(_crop(imread(file)), interpolation="lanczos")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                ax.set_ylabel(label, fontsize=13)
    with atomic_path(path) as tmp_file:
        fig.savefig(tmp_file, format="png", dpi=110)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| model | data | downsampling | params | steps | wall time (s) | test bits/dim or NLL (nats) | "
        "training estimator |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        unit = "bits/dim" if r.metric == "bits/dim" else "nats"
        test = f"{fmt(r.test)} {unit}" + (" (exact log-det)" if r.test_estimator is not None else "")
        if r.error:
            test = "diverged"
        lines.append(
            f"| {r.model} | {r.data} | {r.downsampling or '-'} | {r.params:,} | {r.steps} | {r.wall_time:.0f} | "
            f"{test} | {fmt(r.test_estimator)} |"
        )
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (a smoke test)")
    parser.add_argument(
        "--steps", type=integer(1), default=None, help="steps for every run (default: digits 500, toys 1000)"
    )
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma list of {', '.join(MODELS)} (nsf and maf: vector data only)",
    )
    parser.add_argument("--data", default="digits,moons,checkerboard", help="comma list of datasets")
    parser.add_argument(
        "--downsampling",
        default="squeeze",
        help="comma list of squeeze, haar, learned (image data; 'all' for every one)",
    )
    parser.add_argument("--batch-size", type=integer(1), default=64)
    parser.add_argument("--lr", type=number(0, strict=True), default=1e-3)
    parser.add_argument("--seed", type=seed(), default=0)
    parser.add_argument("--threads", type=integer(1), default=1)
    parser.add_argument("--json", type=writable_file, default=None, help="write every number here (atomically)")
    parser.add_argument(
        "--figure",
        type=writable_file,
        default=None,
        help=f"toy density figure (default {FIGURE.relative_to(ROOT)}; none for --quick)",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    args.data = [d.strip().lower() for d in args.data.split(",") if d.strip()]
    args.downsampling = list(DOWNSAMPLING) if args.downsampling == "all" else args.downsampling.split(",")
    known_data = tuple(name for name in flows.data.NAMES if name in flows.data.IMAGES or name in flows.data.TOYS)
    checks = (
        (args.models, MODELS, "model"),
        (args.downsampling, DOWNSAMPLING, "downsampling"),
        (args.data, known_data, "data"),
    )
    for value, allowed, what in checks:
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    images = [d for d in args.data if d in flows.data.IMAGES]
    vector_models = [m for m in args.models if m in VECTOR_ONLY]
    if images and vector_models:
        parser.error(f"{', '.join(vector_models)} model vectors only; drop {', '.join(images)} from --data")
    if args.figure is None and not args.quick:
        # Checked as a given one is: the figure is drawn after every run.
        args.figure = checked_default(parser, "--figure", writable_file, FIGURE)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    rows: list[Row] = []
    datasets: dict[str, Dataset] = {}
    trained: dict[str, list[tuple[str, nn.Module]]] = {}
    for data_name in args.data:
        kwargs = {"n_train": 2000, "n_test": 500} if args.quick and data_name != "digits" else {}
        data = flows.data.load(data_name, **kwargs)
        datasets[data.name] = data
        image = len(data.shape) == 3
        steps = args.steps if args.steps is not None else (20 if args.quick else 500 if image else 1000)
        for name in args.models:
            for downsampling in args.downsampling if image else [None]:
                row, model = run_one(name, data, steps, args, downsampling)
                rows.append(row)
                extra = "" if row.test_estimator is None else f" (estimator {row.test_estimator:.4f})"
                print(
                    f"[{time.perf_counter() - began:6.0f} s] {row.model} {row.data} {downsampling or ''}: "
                    f"{row.metric} {row.test:.4f}{extra}, {row.wall_time:.0f} s{' ' + row.error if row.error else ''}",
                    file=sys.stderr,
                    flush=True,
                )
                if len(data.shape) == 1 and data.shape[0] == 2 and not row.error:
                    trained.setdefault(data.name, []).append((row.model, model))

    print(table(rows))
    print(
        f"\n{time.strftime('%Y-%m-%d', time.gmtime())}, torch {torch.__version__}, {cpu_model()}, "
        f"{torch.get_num_threads()} thread(s), batch {args.batch_size}, lr {args.lr}, "
        f"total {time.perf_counter() - began:.0f} s"
    )
    if args.figure is not None and trained:
        save_toys_figure(trained, datasets, args.figure, args.quick)
        print(f"figure: {args.figure}")
    if args.json is not None:
        report = {
            # NaN (a diverged run) becomes null, so the file stays strict JSON.
            "rows": [
                {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}
                for r in rows
            ],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "total_time": time.perf_counter() - began,
        }
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
