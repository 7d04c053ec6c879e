"""The ``flows`` command: train, sample, interpolate, bench.

Examples::

    flows train --model glow --data digits --steps 3000 --out runs/glow-digits
    flows train --model glow --data digits --steps 6000 --out runs/glow-digits --resume
    flows sample runs/glow-digits --temperatures 0.5 0.7 1.0
    flows interpolate runs/glow-digits --pairs 4 --steps 8
    flows train --model realnvp --data moons --steps 2000 --out runs/realnvp-moons
    flows bench --model glow --data digits --batch 64
    flows bench --model glow --data digits --levels 2 -K 16 --batch 256 --device cuda

``bench`` times a training step of the configured model with ordinary and with
memory-saving backward and prints, per mode, the step time, the bytes kept for backward
(and the CUDA peak), their ratios and the gradient parity of the two modes.

A run directory holds ``checkpoint.pt`` (model, optimiser, random states, and the model
name and builder arguments, so ``sample`` / ``interpolate`` / ``--resume`` rebuild the
model), ``history.json`` and the figures.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flows import data as datasets
from flows import models
from flows.training import CHECKPOINT, NonFiniteLossError, evaluate, initialize, load_checkpoint, train

# Largest event size at which `flows train` also reports an i-ResNet's exact likelihood.
EXACT_EVAL_MAX_DIM = 256


MODELS: dict[str, Callable[..., nn.Module]] = {
    "glow": models.Glow,
    "realnvp": models.RealNVP,
    "iresnet": models.IResNet,
}
"""Model registry: name -> builder ``(input_shape, **kwargs) -> Flow``."""


def build_model(name: str, input_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a key of :data:`MODELS` (``glow``, ``realnvp``, ``iresnet``).
        input_shape: the event shape, ``(C, H, W)`` or ``(D,)``.
        **kwargs: builder arguments (``levels``, ``steps``, ``hidden_channels``,
            ``n_levels``, ...). ``None`` values are dropped, so the builder's defaults apply.

    Returns:
        The :class:`~flows.models.Flow`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return MODELS[name](tuple(input_shape), **kwargs)


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint written by ``flows train``.

    Args:
        path: the checkpoint file or its run directory.
        map_location: where to put the tensors.

    Returns:
        ``(model, checkpoint)``, the model in eval mode with the trained weights.
    """
    state = load_checkpoint(path, map_location=map_location)
    config = state.get("config") or {}
    if "model" not in config:
        raise ValueError(f"{path}: the checkpoint does not record which model it holds")
    model = build_model(config["model"], config["input_shape"], **config.get("kwargs", {}))
    model.load_state_dict(state["model"])
    model.to(map_location)
    model.eval()
    return model, state


def _model_kwargs(args: argparse.Namespace, data: datasets.Dataset) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "levels": args.levels,
        "hidden_channels": args.hidden,
    }
    if args.downsampling is not None:
        kwargs["downsampling"] = args.downsampling
    if args.model == "iresnet":
        kwargs["blocks"] = args.steps_per_level
        kwargs["lipschitz"] = args.lipschitz
        kwargs["logdet"] = args.logdet
        kwargs["n_terms"] = args.n_terms
    else:
        kwargs["steps"] = args.steps_per_level
        kwargs["split_prior"] = True if args.split_prior else None
    if args.model == "glow":
        kwargs["coupling"] = args.coupling
        kwargs["permutation"] = args.permutation
        kwargs["lu"] = False if args.no_lu else None
    if args.model == "realnvp":
        kwargs["res_blocks"] = args.res_blocks
    if data.n_levels is not None:
        kwargs["n_levels"] = data.n_levels
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if len(data.shape) == 3:
        # Recorded even when off, so a checkpoint never depends on a builder's default.
        kwargs["logit_alpha"] = args.logit_alpha if args.logit_alpha > 0 else None
    return kwargs


def _data_spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": args.data, "seed": args.data_seed}
    if args.data_dir is not None:
        spec["data_dir"] = str(args.data_dir)
    if args.n_train is not None:
        spec["n_train"] = args.n_train
    if args.n_test is not None:
        spec["n_test"] = args.n_test
    return spec


def _load_data(spec: dict[str, Any], data_dir: str | None = None) -> datasets.Dataset:
    spec = dict(spec)
    name = spec.pop("name")
    if data_dir is not None:
        spec["data_dir"] = data_dir
    return datasets.load(name, **spec)


def _figures(
    model: nn.Module, data: datasets.Dataset, history: dict | None, out: Path
) -> list[Path]:
    from flows import figures

    written = []
    if data.discrete:
        written.append(figures.save_samples(model, out / "samples.png"))
        x0, x1 = _pairs(data, 4, seed=0)
        written.append(figures.save_interpolation(model, x0, x1, out / "interpolation.png"))
    else:
        written.append(figures.save_density(model, data, out / "density.png"))
    if history is not None:
        written.append(figures.save_curve(history, out / "curve.png"))
    return written


def _pairs(data: datasets.Dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.test), generator=generator)[: 2 * n]
    x = data.prepare(data.test[idx], generator=generator)
    half = len(x) // 2
    return x[:half], x[half : 2 * half]


def _cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/{args.model}-{args.data}")
    resume = args.resume and (out / CHECKPOINT).is_file()
    if args.resume and not resume:
        print(f"no checkpoint in {out}; starting a new run")
    elif not args.resume and (out / CHECKPOINT).is_file():
        print(f"{out} holds a previous run; it will be overwritten (--resume continues it)")
    if resume:
        config = load_checkpoint(out)["config"]
        print(f"resuming from {out / CHECKPOINT}: model and data settings come from it")
        data = _load_data(config["data"], args.data_dir)
    else:
        spec = _data_spec(args)
        data = _load_data(spec)
        config = {
            "model": args.model,
            "input_shape": list(data.shape),
            "kwargs": _model_kwargs(args, data),
            "data": spec,
        }
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(config["model"], config["input_shape"], **config["kwargs"])
    model.to(args.device)
    if args.memory_saving:
        model.memory_saving = True
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{config['model']} on {data}: {n_params:,} parameters")
    began = time.perf_counter()
    history = train(
        model,
        data,
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        warmup=args.warmup,
        clip=args.clip if args.clip > 0 else None,
        eval_every=args.eval_every,
        out_dir=out,
        resume=resume,
        seed=args.seed,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        config=config,
    )
    elapsed = time.perf_counter() - began
    label = "test bits/dim" if data.discrete else "test NLL (nats)"
    print(f"{label}: {history['final_test']:.4f}  (steps {args.steps}, {elapsed:.1f} s)")
    if config["model"] == "iresnet" and math.prod(data.shape) <= EXACT_EVAL_MAX_DIM:
        # The training estimator is stochastic (and biased for "series"): report the
        # exact likelihood too, affordable at this size.
        with models.logdet_mode(model, "exact"):
            print(f"{label}, exact log-det: {evaluate(model, data):.4f}")
    for path in _figures(model, data, history, out):
        print(f"wrote {path}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from flows import figures

    model, state = load_model(args.checkpoint, map_location=args.device)
    run = _run_dir(args.checkpoint)
    if len(model.input_shape) == 3:
        path = Path(args.out or run / "samples.png")
        figures.save_samples(model, path, args.temperatures, n=args.n, seed=args.seed)
    else:
        data = _load_data(state["config"]["data"], args.data_dir)
        path = Path(args.out or run / "density.png")
        figures.save_density(model, data, path, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    from flows import figures

    model, state = load_model(args.checkpoint, map_location=args.device)
    if len(model.input_shape) != 3:
        raise ValueError("interpolate needs an image model; this checkpoint holds a 2D model")
    data = _load_data(state["config"]["data"], args.data_dir)
    x0, x1 = _pairs(data, args.pairs, seed=args.seed)
    path = Path(args.out or _run_dir(args.checkpoint) / "interpolation.png")
    figures.save_interpolation(model, x0, x1, path, steps=args.steps)
    print(f"wrote {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from flows.benchmark import step_benchmark
    from flows.diagnostics import cpu_model

    for name, value, least in (
        ("--batch", args.batch, 1),
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    device = _device(args.device)
    data = _load_data(_data_spec(args))
    if args.batch > len(data.train):
        raise ValueError(f"--batch {args.batch} exceeds the {len(data.train)} training examples of {data.name}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.shape, **_model_kwargs(args, data)).to(device)
    # One training batch, drawn and dequantized as `train` draws its batches (a seeded generator,
    # `data.prepare`); the data-dependent initialisation runs on it (`train` uses up to 512 examples).
    generator = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data.train), generator=generator)[: args.batch]
    x = data.prepare(data.train[idx], generator=generator).to(device)
    initialize(model, x)
    report = step_benchmark(model, x, repeats=args.repeats, warmup=args.warmup)
    n_params = sum(p.numel() for p in model.parameters())
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    dtype = str(x.dtype).removeprefix("torch.")
    threads = torch.get_num_threads()
    print(report)
    print(
        f"{args.model} on {data.name}: {n_params:,} parameters, batch {tuple(x.shape)} {dtype}, "
        f"device {device} ({hardware}), torch {torch.__version__}, "
        f"{_count(threads, 'thread')}; "
        f"median of {_count(args.repeats, 'step')} per mode after {_count(args.warmup, 'warm-up step')}, "
        "modes interleaved"
    )
    print("Training benchmarks (test bits/dim, NLL, wall time): the scripts in experiments/ of the source tree.")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA requested but torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _run_dir(path: str) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flows", description="Train and inspect normalizing flows."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and write checkpoint and figures")
    _add_model_arguments(t)
    t.add_argument("--out", default=None, help="run directory (default runs/MODEL-DATA)")
    t.add_argument("--steps", type=int, default=3000, help="optimisation steps")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    t.add_argument("--clip", type=float, default=50.0, help="gradient-norm clip (0: off)")
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--memory-saving", action="store_true", help="memory-saving backward")
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="write a sample grid (or a 2D density) from a checkpoint")
    s.add_argument("checkpoint", help="checkpoint file or run directory")
    s.add_argument("--out", default=None, help="PNG path (default RUN/samples.png)")
    s.add_argument("--n", type=int, default=10, help="samples per temperature")
    s.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_cmd_sample)

    i = sub.add_parser("interpolate", help="write latent interpolations between test images")
    i.add_argument("checkpoint", help="checkpoint file or run directory")
    i.add_argument("--out", default=None, help="PNG path (default RUN/interpolation.png)")
    i.add_argument("--pairs", type=int, default=4)
    i.add_argument("--steps", type=int, default=8)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--data-dir", default=None)
    i.add_argument("--device", default="cpu")
    i.set_defaults(func=_cmd_interpolate)

    b = sub.add_parser(
        "bench",
        help="time a training step and measure its memory with ordinary and memory-saving backward",
        description="Time a training step (forward, backward, Adam) of the model that `flows train` would build "
        "with the same options, with ordinary and with memory-saving backward, on one training batch; print "
        "the median step time, the bytes kept for backward (and the CUDA peak) per mode, their ratios and "
        "the gradient parity of the two modes.",
    )
    _add_model_arguments(b)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--repeats", type=int, default=5, help="timed steps per mode (the median is reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before them")
    b.add_argument("--seed", type=int, default=0, help="seed of the model and of the batch")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.set_defaults(func=_cmd_bench)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and data options that `train` and `bench` share (read by `_model_kwargs`, `_data_spec`)."""
    parser.add_argument("--model", default="glow", choices=sorted(MODELS))
    parser.add_argument("--data", default="digits", help=f"one of {', '.join(datasets.NAMES)}")
    parser.add_argument("--data-dir", default=None, help="directory of MNIST / CIFAR-10 files")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the split / toy points")
    parser.add_argument("--n-train", type=int, default=None, help="toy training points")
    parser.add_argument("--n-test", type=int, default=None, help="test points (toys, digits)")
    parser.add_argument("--levels", type=int, default=None, help="scales of the model")
    parser.add_argument("--steps-per-level", "-K", type=int, default=None, help="flow steps (blocks) per level")
    parser.add_argument("--hidden", type=int, default=None, help="conditioner width")
    parser.add_argument("--coupling", choices=("affine", "additive"), default=None)
    parser.add_argument("--permutation", choices=("conv1x1", "shuffle", "reverse"), default=None)
    parser.add_argument("--no-lu", action="store_true", help="dense instead of LU 1x1 convolutions")
    parser.add_argument("--split-prior", action="store_true", help="learned prior at factor-outs")
    parser.add_argument("--res-blocks", type=int, default=None, help="RealNVP conditioner depth")
    parser.add_argument("--lipschitz", type=float, default=None, help="i-ResNet Lipschitz bound")
    parser.add_argument(
        "--logdet", choices=("series", "unbiased", "exact"), default=None, help="i-ResNet estimator"
    )
    parser.add_argument("--n-terms", type=int, default=None, help="i-ResNet series terms")
    parser.add_argument(
        "--logit-alpha",
        type=float,
        default=0.05,
        help="Logit preprocessing margin for [0, 1] image data (0: none)",
    )
    parser.add_argument(
        "--downsampling", choices=("squeeze", "haar", "learned"), default=None, help="2x2 step between levels"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flows`` command line.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on an error (reported on stderr, no traceback).
    """
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, NonFiniteLossError, ValueError, ImportError) as error:
        print(f"flows {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"flows {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
