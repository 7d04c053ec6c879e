"""The ``flows`` command: train, sample, interpolate, bench.

Examples::

    flows train --model glow --data digits --steps 3000 --out runs/glow-digits
    flows train --model glow --data digits --steps 6000 --out runs/glow-digits --resume
    flows sample runs/glow-digits --temperatures 0.5 0.7 1.0
    flows interpolate runs/glow-digits --pairs 4 --steps 8
    flows train --model realnvp --data moons --steps 2000 --out runs/realnvp-moons
    flows train --model glow --data digits --conditional --out runs/glow-digits-cond
    flows sample runs/glow-digits-cond --class 3
    flows train --model realnvp --data gaussian-linear --conditional --out runs/posterior
    flows train --model glow --data path/to/images --image-size 32 --workers 4 --out runs/glow-images
    torchrun --nproc_per_node 2 -m flows train --model glow --data digits --threads 1 --out runs/glow-ddp
    flows train --model realnvp --objective reverse-kl --target two-moons --out runs/vi-moons
    flows bench --model glow --data digits --batch 64
    flows bench --model glow --data digits --levels 2 -K 16 --batch 256 --device cuda

``--conditional`` trains ``p(x | c)``: on the class labels of image data (a class-conditional
model, ``num_classes`` from the labels) or on the float context of ``gaussian-linear`` and
``rotated-moons`` (``context_features`` from the data); ``--data FOLDER --conditional`` takes
the classes from the folder's subfolders (``FOLDER/<class>/*.png``, sorted by name), an
``.npz`` its labels from ``y``. ``sample`` then draws one row per class (``--class K``: rows
of class ``K``, an index or a subfolder's name), and a 2D run's density figure shows ``p(x | c)``
for a few contexts; where the true conditional density is known, ``train`` also prints the
test KL divergence to it.

``bench`` times a training step of the configured model with ordinary and with
memory-saving backward and with activation checkpointing (``--compile``: also with
regional compilation; ``--precision bf16|fp16``: also in mixed precision, with the
gradients' agreement with float32) and prints, per mode, the step time, the bytes kept
for backward (and the CUDA peak), their ratios and the gradient parity of the two modes.

A run directory holds ``checkpoint.pt`` (model, optimiser, random states, and the model
name and builder arguments, so ``sample`` / ``interpolate`` / ``--resume`` rebuild the
model), ``checkpoint.prev.pt`` (the one before), ``best.pt`` (the weights with the best
validation score, with ``--validation``), ``history.json`` and the figures, drawn from the
weights ``best.pt`` holds when there is one. ``sample`` and ``interpolate`` take
``--weights best|last|ema`` and print which file, weights and step they use, as ``train``
does for its figures.

Every option is checked before anything is built. A usage error (a bad option, an
unwritable ``--out``, ``--device cuda`` without CUDA) prints one line and exits with 2; a
failure at run time (a missing data file, a corrupted checkpoint, a diverged run, a full
disk) prints one line and exits with 1; Ctrl-C writes a checkpoint and exits with 130. A
bug in the package itself still shows its traceback. torch is imported only once the
options are parsed, so ``flows --help`` answers at once.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from flows.arguments import integer, number, seed
from flows.models.registry import (
    DEFAULTS_VERSION,
    MODELS,
    OPTIONS,
    VARIATIONAL_MODEL,
    build_model,
    cli_kwargs,
    conditional_kwargs,
    config_kwargs,
    load_model,
    model_file,
    option_default,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from flows.data import Dataset
    from flows.training import TrainConfig

# Largest event size at which `flows train` also reports an i-ResNet's exact likelihood.
EXACT_EVAL_MAX_DIM = 256

# The names flows.data.load accepts (a test keeps this list equal to flows.data.NAMES; it is
# spelled out so that --help does not import torch).
DATA_NAMES = (
    "digits",
    "mnist",
    "mnist5k",
    "cifar10",
    "moons",
    "circles",
    "checkerboard",
    "eight-gaussians",
    "pinwheel",
    "spirals",
    "gaussian-linear",
    "rotated-moons",
)

# Training settings a resumed run takes from its checkpoint unless given again.
TRAIN_DEFAULTS = {
    "batch": 64,
    "lr": 1e-3,
    "warmup": 100,
    "clip": 50.0,
    "seed": 0,
    "schedule": "constant",
    "weight_decay": 0.0,
    "validation": 0.1,
    "ema": 0.0,
}
# The weights `sample` and `interpolate` can draw from (see _load_run).
WEIGHTS = ("best", "last", "ema")
# The most samples per temperature `flows sample --n` draws: a figure of 32 rows of 32.
SAMPLES_MAX = 1024
# Pairs `flows interpolate` draws unless --pairs says (fewer where the test split is smaller).
PAIRS = 4


class UsageError(Exception):
    """A bad option or combination of options: one line, exit status 2."""


class Failure(Exception):
    """A run-time failure the user can fix (data, files): one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's own prints the whole usage first)."""

    commands: dict[str, argparse.ArgumentParser] | None = None  # the subcommands' parsers, by name

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """As argparse's, but an option the subcommand does not know is refused by the subcommand
        (``flows train: error: unrecognized arguments: --hiden 8; did you mean --hidden?``), not by
        ``flows`` with a pointer to the top-level ``--help`` that does not list it."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            where = (self.commands or {}).get(getattr(parsed, "command", None) or "", self)
            where.error(f"unrecognized arguments: {' '.join(extra)}{_did_you_mean(where, extra)}")
        return parsed


def _did_you_mean(parser: argparse.ArgumentParser, extra: Sequence[str]) -> str:
    """``; did you mean --hidden?`` for the first unknown option that is close to a known one."""
    import difflib

    known = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    for word in extra:
        if word.split("=", 1)[0] in ("--num-classes", "--context-features") and "--conditional" in known:
            # The builders' keywords, which --conditional sets from the data's labels or context.
            return "; --conditional conditions the model on the data's class labels or context vectors"
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.8)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


class _Given(argparse.Action):
    """Stores an option's value (``nargs=0``: its ``const``, a switch) and records it as typed:
    ``args.given`` maps the ``dest`` of each model or data option given to the flag typed, so
    ``train`` refuses one its model does not read, or one a resumed run's checkpoint contradicts."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given = {**namespace.given, self.dest: option_string}


# -- option types ------------------------------------------------------------------------------


PRECISIONS = ("fp32", "bf16", "fp16")
"""``--precision`` of train and bench: :data:`flows.precision.PRECISIONS`, spelled here so that
``--help`` answers without importing torch (a test keeps the two equal)."""

COMPILE_UNITS = ("step", "block", "model")
"""``--compile``'s units, the first its default: :data:`flows.compiling.UNITS`, spelled here for
the same reason (a test keeps the two equal)."""


def _validation(text: str) -> float | int:
    """``--validation``: a fraction in [0, 1) (``0.1``) or a number of examples (``200``)."""
    try:
        value: float | int = int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or a number of examples, got {text!r}") from None
    if isinstance(value, float) and value == 0:
        return 0
    if isinstance(value, float) and not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1), a count an integer; got {text}")
    return value


_TYPES: dict[str | None, Any] = {"int": integer(1), "unit": number(0, strict=True, below=1), None: None}


# -- shared steps ------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    """``--device NAME`` as a device this machine has, or a :class:`UsageError`."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"--device {name}: this machine has no {device.type} device; use --device cpu")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise UsageError(f"--device {name}: there are {count()} {device.type} device(s), numbered from 0")
    return device


def _writable_dir(out: Path, option: str = "--out") -> Path:
    """Check that files can be written to ``out``, or to the folder it would be made in.

    Creates nothing: the first file a run writes creates ``out``, so a run refused later (bad
    data, an option that does not fit) leaves no empty directory behind.
    """
    from flows.io import remove_stale_temporaries

    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {out}: is a file, not a directory; give a directory")
    _checked_writable(out / ".probe", f"{option} {out}: cannot write there", "give another directory")
    remove_stale_temporaries(out)
    return out


def _writable_file(path: Path, given: bool = True) -> Path:
    """``path`` (an ``--out`` given, or with ``given=False`` a figure's default place in the run
    directory) if a PNG can be written there, or a :class:`UsageError` naming the fix."""
    if not given:
        return _checked_writable(path, f"cannot write {path}", "give --out FILE.png somewhere writable")
    if path.is_dir():
        raise UsageError(f"--out {path}: is a directory; give a file name ending in .png")
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out {path}: figures are written as PNG; give a file name ending in .png")
    # Name the file given and the folder it would go in (--out /proc/x.png, not "--out /proc").
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"--out {path}: {path.parent} is a file, not a directory; give a path in a directory")
    _checked_writable(path, f"--out {path}: cannot write in {path.parent}", "give a path somewhere writable")
    if path.parent.is_dir():
        from flows.io import remove_stale_temporaries

        remove_stale_temporaries(path.parent)  # as _writable_dir does for a run directory
    return path


def _checked_writable(path: Path, what: str, fix: str) -> Path:
    """:func:`flows.io.check_writable` of ``path``; its refusal one :class:`UsageError` line,
    ``what (the system's reason); fix``."""
    from flows.io import check_writable

    try:
        return check_writable(path)
    except OSError as error:
        raise UsageError(f"{what} ({error.strerror or error}); {fix}") from None


def _data_spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": args.data, "seed": args.data_seed}
    if args.data_dir is not None:
        spec["data_dir"] = str(args.data_dir)
    if args.n_train is not None:
        spec["n_train"] = args.n_train
    if args.n_test is not None:
        spec["n_test"] = args.n_test
    from flows.data import dataset_name, is_path

    # A path even if it does not exist yet: the loader then names it (not its options).
    path = dataset_name(args.data) is None and is_path(args.data)
    if path:
        # A folder or array file (flows.data.streaming): absolute, so --resume finds it from anywhere.
        spec["name"] = str(Path(args.data).resolve())
        if getattr(args, "conditional", False):
            spec["labels"] = True  # class subfolders / an .npz's label arrays (flows.data.streaming)
    for option in ("image_size", "workers"):
        if getattr(args, option) is None:
            continue
        if not path:
            flag = option.replace("_", "-")
            raise UsageError(f"--{flag} applies to --data PATH (an image folder, a .npy or an .npz); drop it")
        spec[option] = getattr(args, option)
    return spec


def _load_data(spec: dict[str, Any], data_dir: str | None = None) -> Dataset:
    """The data of ``spec`` (``--data`` and its options, or a run's record of them).

    Raises:
        UsageError: an unknown dataset name, or a size option the dataset does not take.
        Failure: missing or unreadable data files, or a loader's own refusal.
    """
    from flows import data as datasets

    spec = dict(spec)
    name = spec.pop("name")
    if data_dir is not None:
        spec["data_dir"] = data_dir
    try:
        return datasets.load(name, **spec)
    except TypeError:
        # A loader without a size keyword: those of fixed splits have no n_train, MNIST's and
        # CIFAR-10's no n_test either (the generated datasets take both).
        if "n_train" in spec:
            generated = ", ".join((*datasets.TOYS, *datasets.CONDITIONAL))
            raise UsageError(
                f"--n-train {spec['n_train']}: {name} has a fixed training set; --n-train sizes the generated "
                f"datasets ({generated}); drop it"
            ) from None
        if "n_test" in spec:
            raise UsageError(f"--n-test {spec['n_test']}: {name} has a fixed test split; drop it") from None
        raise
    except ValueError as error:
        # An unknown name is the user's option (the loader lists the known ones); a loader's other
        # refusals (a file's contents) are run-time failures.
        known = datasets.is_path(name) or datasets.dataset_name(name) is not None
        message = str(error)
        if datasets.is_path(name) and name not in message:
            # numpy's own refusal (a truncated .npy: "mmap length is greater than file size")
            # names no file: say which.
            message = f"{name}: cannot read it ({message}); write it again (np.save / np.savez)"
        raise (Failure if known else UsageError)(message) from None
    except (FileNotFoundError, ImportError) as error:
        # The loaders' own errors name the dataset, the files and where to put them.
        raise Failure(str(error)) from None


def _builder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The builder keywords of ``--model`` from its options; one given that it does not read is a usage error."""
    for option in OPTIONS:
        if option.dest in args.given and args.model not in option.models:
            raise UsageError(
                f"{args.given[option.dest]} applies to {', '.join(option.models)}, not {args.model}; drop it "
                "or choose one of those models"
            )
    if "logit_alpha" in args.given and "logit_alpha" not in MODELS[args.model].keywords():
        readers = ", ".join(name for name, spec in MODELS.items() if "logit_alpha" in spec.keywords())
        raise UsageError(f"--logit-alpha applies to {readers}, not {args.model}; drop it or choose one of those models")
    return cli_kwargs(args.model, vars(args))


def _logit_alpha(args: argparse.Namespace) -> float | None:
    """The builder's ``logit_alpha`` of ``--logit-alpha`` (0: no Logit, ``None``)."""
    return args.logit_alpha if args.logit_alpha > 0 else None


def _model_kwargs(args: argparse.Namespace, data: Dataset) -> dict[str, Any]:
    kwargs = _builder_kwargs(args)
    if data.n_levels is not None:
        kwargs["n_levels"] = data.n_levels
    if len(data.shape) == 3 and "logit_alpha" in MODELS[args.model].keywords():
        # Recorded even when off, so a checkpoint never depends on a builder's default.
        kwargs["logit_alpha"] = _logit_alpha(args)
    if getattr(args, "conditional", False):
        try:
            kwargs.update(conditional_kwargs(data))
        except ValueError as error:
            raise UsageError(f"--conditional: {error}; drop --conditional or choose other data") from None
    return kwargs


def _build(name: str, shape: Sequence[int], kwargs: dict[str, Any], data: Dataset) -> nn.Module:
    try:
        return build_model(name, shape, **kwargs)
    except ValueError as error:
        # The builders name the argument and its value; the options are the user's.
        hint = ""
        if len(shape) == 3 and shape[2] in (1, 3, 4) and shape[0] not in (1, 3, 4):
            # (H, W, C) read as (C, H, W): the fix is the array's axes, not padding or levels.
            hint = (
                f"; but the images look channels-last ((N, H, W, C) = (N, {', '.join(map(str, shape))}) read as "
                "(N, C, H, W)): save them as x.transpose(0, 3, 1, 2)"
            )
        raise UsageError(f"the model options do not fit {data.name} {tuple(data.shape)}: {error}{hint}") from None


def _figures(model: nn.Module, data: Dataset, history: dict | None, out: Path) -> list[Path]:
    from flows import figures

    written = []
    conditional = getattr(model, "conditional", False)
    classes = figures.num_classes(model)
    if data.discrete and (not conditional or classes is not None):
        written.append(figures.save_samples(model, out / "samples.png"))
        x0, x1, labels = _pairs(data, 4, seed=0, same_class=classes is not None)
        if len(x0):
            written.append(figures.save_interpolation(model, x0, x1, out / "interpolation.png", context=labels))
        else:  # a small (labelled) test split may hold no two images (of one class)
            pair = "two images of one class" if classes is not None else "two images"
            print(f"no interpolation.png: the test split holds no {pair} to interpolate between")
    elif tuple(data.shape) == (2,):
        written.append(figures.save_density(model, data, out / "density.png", true_log_density=_truth(model, data)))
    if history is not None:
        written.append(figures.save_curve(history, out / "curve.png"))
    return written


def _truth(model: nn.Module, data: Dataset) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The true conditional log-density of the data, for a model conditioned on their context."""
    from flows.data import LOG_DENSITIES

    if not getattr(model, "conditional", False) or data.test_context is None:
        return None
    return LOG_DENSITIES.get(data.name)


def _class_names(data: Dataset) -> list[str] | None:
    """The names of the classes of labelled streaming data (an image folder's subfolders), else ``None``."""
    from flows.data import StreamingDataset

    return list(data.classes) if isinstance(data, StreamingDataset) and data.classes is not None else None


def _class_index(text: str, classes: int, names: Sequence[str] | None, checkpoint: str) -> int:
    """``--class``: a class name of the run (its image folder's subfolders), else an index ``0..classes-1``."""
    if names and text in names:
        return list(names).index(text)
    try:
        index = int(text)
    except ValueError:
        known = f"its classes are {', '.join(names)}" if names else "its classes have no names"
        raise UsageError(
            f"--class {text}: not a class of {checkpoint}; {known}; or give an index 0 to {classes - 1}"
        ) from None
    if not 0 <= index < classes:
        raise UsageError(f"--class {text}: the model has {classes} classes, numbered 0 to {classes - 1}")
    return index


def _pairs(
    data: Dataset, n: int, seed: int, same_class: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``n`` pairs of test examples (dequantized); with ``same_class``, both of a pair share a
    class, returned as the third item (the context of a class-conditional interpolation)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.test), generator=generator)
    if not same_class:
        x = data.prepare(data.test[idx[: 2 * n]], generator=generator)
        half = len(x) // 2
        return x[:half], x[half : 2 * half], None
    labels = data.test_labels
    assert labels is not None
    first, second = [], []
    for i in idx.tolist():
        others = idx[(labels[idx] == labels[i]) & (idx != i)]
        if len(others) and i not in second:
            first.append(i)
            second.append(int(others[0]))
        if len(first) == n:
            break
    a, b = torch.tensor(first, dtype=torch.int64), torch.tensor(second, dtype=torch.int64)
    return data.prepare(data.test[a], generator=generator), data.prepare(data.test[b], generator=generator), labels[a]


def _run_dir(path: str) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# -- commands ----------------------------------------------------------------------------------


def _changed_on_resume(args: argparse.Namespace, config: dict[str, Any]) -> list[str]:
    """The model and data options given (as typed, with their values) that differ from the
    run's ``config``: ``--resume`` builds the model and loads the data the checkpoint records."""
    given = args.given
    shown = {dest: f"{flag} {getattr(args, dest)}" for dest, flag in given.items()}
    changed = []
    if "model" in given and args.model != config["model"]:
        changed.append(shown["model"])
    spec, recorded = _data_spec(args), config["data"]
    for dest, key in (("data", "name"), ("data_seed", "seed"), ("n_train", "n_train"), ("n_test", "n_test"),
                      ("image_size", "image_size"), ("workers", "workers")):
        if dest in given and spec.get(key) != recorded.get(key):
            changed.append(shown[dest])
    built = {**MODELS[config["model"]].keywords(), **config_kwargs(config)}
    for option in OPTIONS:
        if option.dest in given:
            asked = cli_kwargs(config["model"], {option.dest: getattr(args, option.dest)})
            if not asked or any(built.get(kwarg) != value for kwarg, value in asked.items()):
                changed.append(given[option.dest] if option.value is not None else shown[option.dest])
    if "logit_alpha" in given and built.get("logit_alpha", "none recorded") != _logit_alpha(args):
        changed.append(shown["logit_alpha"])
    if "conditional" in given and not {"num_classes", "context_features"} & set(config["kwargs"]):
        changed.append(given["conditional"])
    return changed


def _train_settings(args: argparse.Namespace, stored: dict[str, Any] | None) -> dict[str, Any]:
    """The optimisation settings: as given, else the checkpoint's, else the defaults."""
    from flows.training import LEGACY_SETTINGS

    keys = {"batch": "batch_size", "weight_decay": "weight_decay", "ema": "ema_decay"}
    if stored is not None:
        stored = {**LEGACY_SETTINGS, **stored}  # a checkpoint from before a setting existed
    settings = {}
    for name, default in TRAIN_DEFAULTS.items():
        key = keys.get(name, name)
        value = getattr(args, name)
        if value is None:
            value = stored[key] if stored is not None and key in stored else default
        settings[name] = None if name in ("clip", "ema") and not value else value  # --clip 0, --ema 0: off
    if stored is not None and settings["validation"] != stored["validation"]:
        raise UsageError(
            f"--validation {settings['validation']}: the run holds out --validation {stored['validation']} "
            "(the split decides which examples the batches come from); leave --validation out to resume"
        )
    if stored is not None and settings["seed"] != stored.get("seed", settings["seed"]):
        # The seed draws the validation split again on resume (flows.training._split): another
        # one would validate on examples the run has trained on.
        raise UsageError(
            f"--seed {settings['seed']}: the run was trained with --seed {stored['seed']} (its checkpoint says), "
            "which draws its validation split; leave --seed out to resume"
        )
    return settings


def _train_config(
    args: argparse.Namespace, settings: dict[str, Any], data: Dataset, out: Path, resume: bool, config: dict
) -> TrainConfig:
    """The :class:`TrainConfig` of ``flows train``, its range checks as usage errors."""
    from flows import distributed
    from flows.precision import autocast_dtype
    from flows.training import TrainConfig

    try:
        train_config = TrainConfig(
            steps=args.steps,
            batch_size=settings["batch"],
            lr=settings["lr"],
            warmup=settings["warmup"],
            schedule=settings["schedule"],
            clip=settings["clip"],
            weight_decay=settings["weight_decay"],
            seed=settings["seed"],
            validation=settings["validation"],
            ema_decay=settings["ema"],
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            init_batch_size=args.init_batch,
            init_micro_batch_size=args.init_micro_batch,
            eval_batch_size=args.eval_batch,
            out_dir=out,
            resume=resume,
            progress=not args.no_progress,
            metadata=config,
            precision=args.precision,
            compile=args.compile or False,
        )
        autocast_dtype(args.precision, args.device)  # fp16 without CUDA: one line
        held_out = train_config.validation_size(len(data.train))
    except ValueError as error:
        raise UsageError(str(error).removeprefix("TrainConfig: ").removeprefix("train: ")) from None
    if settings["batch"] > len(data.train) - held_out:
        raise UsageError(
            f"--batch {settings['batch']} exceeds the {len(data.train) - held_out} training examples of {data.name}"
            + (f" ({held_out} more held out by --validation)" if held_out else "")
        )
    world = distributed.world_size()
    if settings["batch"] % world:
        raise UsageError(
            f"--batch {settings['batch']}: batch_size {settings['batch']} does not split over {world} processes; "
            f"give a multiple of {world}"
        )
    if not resume and train_config.init_micro_batch_size % world:
        raise UsageError(
            f"--init-micro-batch {train_config.init_micro_batch_size} does not split over {world} processes; "
            f"give a multiple of {world}"
        )
    return train_config


def _cmd_train(args: argparse.Namespace) -> int:
    if args.objective != "likelihood" or any(getattr(args, k) is not None for k in _VARIATIONAL_ONLY):
        return _train_variational(args)
    import torch

    from flows import distributed
    from flows.training import BEST, CHECKPOINT, PREVIOUS, evaluate, load_checkpoint, train

    device = _device(args.device)
    out = _writable_dir(Path(args.out or f"runs/{args.model}-{Path(args.data).stem}"))
    resume = args.resume and (out / CHECKPOINT).is_file()
    earlier = [name for name in (CHECKPOINT, PREVIOUS, BEST) if (out / name).is_file()]
    if args.resume and not resume and earlier:
        # A new run would overwrite the files that are left of the earlier one.
        hint = f"move {PREVIOUS} onto {CHECKPOINT} to resume from it" if PREVIOUS in earlier else "give another --out"
        raise UsageError(
            f"--resume: {out} has no {CHECKPOINT} but holds {', '.join(earlier)} of an earlier run; {hint} "
            "(or remove them to start a new run there)"
        )
    if args.resume and not resume:
        print(f"no checkpoint in {out}; starting a new run")
    state = load_checkpoint(out) if resume else None
    if state is not None:
        if args.steps < state["step"]:
            raise UsageError(
                f"--steps {args.steps} is below step {state['step']} of {out / CHECKPOINT}: --steps is the total "
                f"to train up to; give --steps {state['step']} or more"
            )
        config = state["config"]
        changed = _changed_on_resume(args, config)
        if changed:
            raise UsageError(
                f"{', '.join(changed)}: the run in {out} was trained with other model or data options "
                f"({config['model']} on {Path(config['data']['name']).name}), and --resume takes them from its "
                "checkpoint; drop them to resume, or give another --out for a new run"
            )
        print(f"resuming from {out / CHECKPOINT} at step {state['step']}: model and data settings come from it")
        data = _load_data(config["data"], args.data_dir)
    else:
        spec = _data_spec(args)
        data = _load_data(spec)
        shape, kwargs = list(data.shape), _model_kwargs(args, data)
        config = {
            "model": args.model, "input_shape": shape, "kwargs": kwargs, "data": spec, "defaults": DEFAULTS_VERSION
        }
    classes = _class_names(data)
    if classes is not None:
        if state is not None and config.get("classes") != classes:
            # A class folder added, removed or renamed since would silently shift the labels.
            raise Failure(
                f"the class subfolders of {data.name} are now {', '.join(classes)}, but the run was trained on "
                f"{', '.join(config.get('classes') or [])}; restore them or start a new run"
            )
        config["classes"] = classes  # `flows sample --class NAME` reads them
        names = ", ".join(f"{label} {name}" for label, name in enumerate(classes))
        print(f"classes of {data.name} (its subfolders), by label: {names}")
    settings = _train_settings(args, state["train"] if state is not None else None)
    train_config = _train_config(args, settings, data, out, resume, config)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(settings["seed"])
    # A resumed run builds what its checkpoint trained: its recorded options under the
    # defaults of its version (config_kwargs), as load_model does.
    model = _build(config["model"], config["input_shape"], config_kwargs(config), data).to(device)
    if not args.resume and earlier:
        # Said once every option has been checked and the model built: a refused run overwrites nothing.
        print(f"{out} holds a previous run; it will be overwritten (--resume continues it)")
    if args.memory_saving:
        model.memory_saving = True
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{config['model']} on {data}: {n_params:,} parameters")
    start = state["step"] if state is not None else 0
    began = time.perf_counter()
    history = train(model, data, train_config)
    elapsed = time.perf_counter() - began
    label = "test bits/dim" if data.discrete else "test NLL (nats)"
    session = f"{_count(args.steps - start, 'step')} this session" if state is not None else _count(args.steps, "step")
    print(f"{label}: {history['final_test']:.4f}  (step {args.steps}; {session}, {elapsed:.1f} s)")
    truth = _truth(model, data)
    if truth is not None:
        true_nll = -float(truth(data.test.double(), data.test_context.double()).mean())
        print(
            f"test KL to the true p(x | c), E[log p - log q]: {history['final_test'] - true_nll:.4f} nats "
            f"(true test NLL {true_nll:.4f})"
        )
    if config["model"] == "iresnet" and math.prod(data.shape) <= EXACT_EVAL_MAX_DIM:
        from flows.models import logdet_mode

        # The training estimator is stochastic (and biased for "series"): report the
        # exact likelihood too, affordable at this size.
        with logdet_mode(model, "exact"):
            print(f"{label}, exact log-det: {evaluate(model, data):.4f}")
    if distributed.is_main():
        # The figures show the weights the run selected (best.pt), as `flows sample` would.
        chosen, _ = _load_run(str(out), None, device, purpose="figures")
        for path in _figures(chosen, data, history, out):
            print(f"wrote {path}")
    return 0


# Options that only a variational --objective uses (their presence selects that path).
_VARIATIONAL_ONLY = ("target", "gradient", "anneal_steps", "group", "alpha")
# Options of maximum-likelihood training that a variational fit does not read (the data
# options are recorded in ``args.given``; these count as given when they differ from the default).
_LIKELIHOOD_ONLY = (
    "warmup", "schedule", "weight_decay", "validation", "ema", "checkpoint_every", "eval_batch",
    "init_batch", "init_micro_batch", "precision", "data_dir",
)
_DATA_OPTIONS = ("data", "data_seed", "n_train", "n_test", "image_size", "workers", "logit_alpha")


def _likelihood_only(args: argparse.Namespace) -> list[str]:
    """The options given (as typed, with their values) that only likelihood training reads."""
    given = [
        f"{args.given[dest]} {getattr(args, dest)}" for dest in _DATA_OPTIONS if dest in args.given
    ]
    train = _parser().commands["train"]  # type: ignore[attr-defined]  # its defaults, not a copy of them
    for dest in _LIKELIHOOD_ONLY:
        if getattr(args, dest) != train.get_default(dest):
            given.append(f"--{dest.replace('_', '-')} {getattr(args, dest)}")
    return given


def _train_variational(args: argparse.Namespace) -> int:
    """``flows train --objective reverse-kl --target NAME``: fit the model to an unnormalised
    target (:func:`flows.variational.fit`); write ``history.json``, ``model.pt``
    (:data:`~flows.models.registry.VARIATIONAL_MODEL`, which ``sample`` and ``load_model`` read)
    and, for a 2D target, ``target.png`` (its density beside the flow's), all atomically."""
    import json

    import torch

    from flows import variational
    from flows.io import save_verified, write_text
    from flows.targets import TARGETS, make_target

    if args.objective == "likelihood":
        flag = next(k for k in _VARIATIONAL_ONLY if getattr(args, k) is not None).replace("_", "-")
        raise UsageError(f"--{flag} needs a variational objective: add --objective reverse-kl (or iw, renyi)")
    if args.target not in TARGETS:
        given = "is missing" if args.target is None else f"{args.target!r} is unknown"
        raise UsageError(f"--objective {args.objective}: --target {given}; choose one of {', '.join(TARGETS)}")
    for flag in ("resume", "conditional", "compile"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} does not apply to --objective {args.objective}; drop it")
    ignored = _likelihood_only(args)
    if ignored:
        raise UsageError(
            f"{', '.join(ignored)}: {'does' if len(ignored) == 1 else 'do'} not apply to --objective "
            f"{args.objective}, which fits --target {args.target} from the flow's own samples (no data, no "
            f"validation split, no moving average); drop {'it' if len(ignored) == 1 else 'them'}"
        )
    device = _device(args.device)
    out = _writable_dir(Path(args.out or f"runs/{args.model}-{args.target}"))
    for flag, objectives in (("group", ("iw", "renyi")), ("alpha", ("renyi",))):
        if getattr(args, flag) is not None and args.objective not in objectives:
            raise UsageError(
                f"--{flag} applies to --objective {' or '.join(objectives)}, not {args.objective}; drop it"
            )
    given = {
        "batch_size": args.batch, "lr": args.lr, "seed": args.seed, "gradient": args.gradient,
        "anneal_steps": args.anneal_steps, "group": args.group, "alpha": args.alpha,
    }
    try:
        config = variational.VIConfig(
            steps=args.steps,
            objective=args.objective,
            eval_every=args.eval_every,
            **{key: value for key, value in given.items() if value is not None},
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config.anneal_steps >= config.steps:
        raise UsageError(
            f"--anneal-steps {config.anneal_steps}: the annealing would not end before the last step; "
            f"give fewer than --steps {config.steps}"
        )
    if args.clip is not None:
        config.clip = args.clip or None  # --clip 0: off
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    target = make_target(args.target)
    # A vector RealNVP gets the recipe measured for VI where the command line leaves it open
    # (its log-scale only for affine couplings: a spline coupling has none).
    chosen = _builder_kwargs(args)
    recipe = dict(variational.REALNVP_RECIPE) if args.model == "realnvp" else {}
    if chosen.get("coupling", "affine") != "affine":
        recipe.pop("scale")
    kwargs = {**recipe, **chosen}
    torch.manual_seed(config.seed)
    try:
        model = build_model(args.model, (target.dim,), **kwargs).to(device)
    except ValueError as error:
        raise UsageError(f"the model options do not fit target {args.target} ({target.dim},): {error}") from None
    try:
        variational.check_fittable(model, target)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.memory_saving:
        model.memory_saving = True
    print(f"{args.model} on target {args.target} ({target.dim} D), {args.objective}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters"
          + ("; " + ", ".join(f"{k}={v}" for k, v in kwargs.items()) if recipe else ""))
    from tqdm import tqdm

    with tqdm(total=config.steps, disable=args.no_progress, dynamic_ncols=True) as bar:

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        try:
            result = variational.fit(model, target, config, callback=progress)
        except variational.DivergedError as error:
            raise Failure(str(error)) from None
    truth = result.history.get("log_z_true")
    error = f" (true {truth[0]:.4f}, error {result.log_z - truth[0]:+.4f})" if truth else ""
    print(f"ESS {result.ess:.3f} of {config.eval_samples} samples; log Z estimate {result.log_z:.4f}{error}")
    recorded = {
        "model": args.model, "input_shape": [target.dim], "kwargs": kwargs, "defaults": DEFAULTS_VERSION,
        "target": args.target,
    }
    save_verified({"model": model.state_dict(), "config": recorded}, out / VARIATIONAL_MODEL)
    written = [write_text(out / "history.json", json.dumps(result.history)), out / VARIATIONAL_MODEL]
    if target.dim == 2:
        written.append(variational.save_target_figure(model, target, out / "target.png"))
    for path in written:
        print(f"wrote {path}")
    return 0


def _cmd_train_launched(args: argparse.Namespace) -> int:
    """``flows train``, also as one rank under ``torchrun``: join the launcher's process group
    (gloo, or nccl on ``cuda:LOCAL_RANK``) for the run, and print on rank 0 only."""
    from flows import distributed

    with distributed.process_group(_device(args.device)) as device, distributed.quiet_unless_main():
        args.device = str(device)
        return _cmd_train(args)


def _load_run(
    path: str, weights: str | None, device: torch.device, purpose: str = "weights"
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run with the weights ``--weights`` picks; prints which file, weights and step
    (after ``purpose:``).

    ``best``: ``best.pt`` (the weights, raw or averaged, with the lowest validation metric);
    ``last``: the raw weights of ``checkpoint.pt`` (or of the checkpoint file given); ``ema``:
    their moving average. Default (``None``): ``best`` for a run directory holding ``best.pt``,
    else the file given (``checkpoint.pt`` of a directory). A variational run's ``model.pt`` holds
    one set of weights.
    """
    from flows.io import CheckpointError
    from flows.training import BEST, CHECKPOINT, load_weights

    given = model_file(path)
    if given.name == VARIATIONAL_MODEL:
        if weights not in (None, "last"):
            raise UsageError(
                f"--weights {weights}: {given} is a variational run's, with one set of weights; drop --weights"
            )
        model, state = load_model(given, map_location=device)
        print(f"{purpose}: the weights fitted to target {state['config']['target']}, from {given}")
        return model, state
    best_file = given.with_name(BEST)
    if weights is None:
        weights = "best" if Path(path).is_dir() and best_file.is_file() else "given"
    if weights == "best" and not best_file.is_file():
        raise UsageError(
            f"--weights best: no {BEST} beside {given} (a run without --validation, or from before best.pt "
            "existed); use --weights last"
        )
    if weights == "best":
        file = best_file
    elif weights != "given" and given.name == BEST:
        file = given.with_name(CHECKPOINT)  # the last weights and their average are in the checkpoint
    else:
        file = given
    try:
        model, state = load_model(file, map_location=device)
    except CheckpointError as error:
        if file.name != BEST:
            raise
        # best.pt is no training checkpoint, but another --weights reads one.
        raise CheckpointError(
            file, f"{error.reason}; --weights last reads {file.with_name(CHECKPOINT)} instead"
        ) from None
    step = state["step"]
    if "best" in state:  # best.pt, asked for or given as the file
        best = state["best"]
        if not math.isfinite(best["validation"]):
            # Weights that score NaN draw NaN images: refuse them rather than write a blank figure.
            raise Failure(
                f"{file} holds the weights of step {step}, whose validation {best['metric']} is "
                f"{best['validation']} (the run diverged there); use --weights last, or train again with a "
                "lower --lr"
            )
        kind = "moving-average" if best["weights"] == "ema" else "raw"
        line = f"the {kind} weights of step {step}, best validation {best['metric']} {best['validation']:.4f}"
        if "test" in best:  # an older best.pt lacks its test score
            line += f" (test {best['test']:.4f})"
    elif weights == "ema":
        if "ema" not in state:
            raise UsageError(f"--weights ema: {file} was trained without --ema; use --weights last")
        load_weights(model, state["ema"], file)
        line = f"the moving average (decay {state['train']['ema_decay']:g}) of the weights at step {step}"
    else:
        line = f"the raw weights of step {step}"
    print(f"{purpose}: {line}, from {file}")
    return model, state


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from flows import figures

    device = _device(args.device)
    run = _run_dir(args.checkpoint)
    out = _writable_file(Path(args.out)) if args.out else None  # the default's name depends on the model
    model, state = _load_run(args.checkpoint, args.weights, device)
    classes = figures.num_classes(model)
    conditional = getattr(model, "conditional", False)
    if args.label is not None and classes is None:
        kind = "a model conditioned on float context vectors" if conditional else "an unconditional model"
        raise UsageError(
            f"--class {args.label}: {args.checkpoint} holds {kind}; --class needs a class-conditional run "
            "(flows train --conditional on data with class labels)"
        )
    label = None
    if args.label is not None and classes is not None:
        label = _class_index(args.label, classes, state["config"].get("classes"), args.checkpoint)
    shape = tuple(model.input_shape)
    if len(shape) == 3:
        if conditional and classes is None:
            raise UsageError(f"{args.checkpoint} conditions on float context vectors; no sample grid for it")
        path = out or _writable_file(run / "samples.png", given=False)
        figures.save_samples(model, path, args.temperatures, n=args.n, seed=args.seed, label=label)
    elif shape == (2,) and "target" in state["config"]:
        from flows.targets import make_target
        from flows.variational import save_target_figure

        path = out or _writable_file(run / "target.png", given=False)
        save_target_figure(model, make_target(state["config"]["target"]), path, seed=args.seed)
    elif shape == (2,):
        path = out or _writable_file(run / "density.png", given=False)
        data = _load_data(state["config"]["data"], args.data_dir)
        chosen = None if label is None else torch.tensor([label])  # --class: that class's column alone
        figures.save_density(model, data, path, seed=args.seed, contexts=chosen, true_log_density=_truth(model, data))
    else:
        raise UsageError(f"{args.checkpoint} holds a {shape} model; figures are drawn for images and 2D data")
    print(f"wrote {path}")
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    from flows import figures

    device = _device(args.device)
    path = _writable_file(Path(args.out or _run_dir(args.checkpoint) / "interpolation.png"), given=bool(args.out))
    model, state = _load_run(args.checkpoint, args.weights, device)
    if len(model.input_shape) != 3:
        raise UsageError(f"interpolate needs an image model; {args.checkpoint} holds a {model.input_shape} model")
    classes = figures.num_classes(model)
    if getattr(model, "conditional", False) and classes is None:
        raise UsageError(f"{args.checkpoint} conditions on float context vectors; no interpolation for it")
    data = _load_data(state["config"]["data"], args.data_dir)
    most = len(data.test) // 2
    pairs = args.pairs if args.pairs is not None else min(PAIRS, most)
    if not 1 <= pairs <= most:
        asked = f"--pairs {pairs}: " if args.pairs is not None else ""
        raise UsageError(f"{asked}the test split of {data.name} has {len(data.test)} images, {most} pairs")
    x0, x1, labels = _pairs(data, pairs, seed=args.seed, same_class=classes is not None)
    if not len(x0):
        raise UsageError(
            f"the test split of {data.name} holds no two images of one class to interpolate between; "
            "train with a larger --n-test"
        )
    figures.save_interpolation(model, x0.to(device), x1.to(device), path, steps=args.steps, context=labels)
    print(f"wrote {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from flows.benchmark import step_benchmark
    from flows.diagnostics import cpu_model
    from flows.training import initialize

    device = _device(args.device)
    data = _load_data(_data_spec(args))
    if args.batch > len(data.train):
        raise UsageError(f"--batch {args.batch} exceeds the {len(data.train)} training examples of {data.name}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = _build(args.model, data.shape, _model_kwargs(args, data), data).to(device)
    # One training batch, drawn and dequantized as `train` draws its batches (a seeded generator,
    # `data.prepare`); the data-dependent initialisation runs on it (`train` uses up to 512 examples).
    generator = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data.train), generator=generator)[: args.batch]
    x = data.prepare(data.train[idx], generator=generator).to(device)
    initialize(model, x)
    try:
        report = step_benchmark(
            model, x, repeats=args.repeats, warmup=args.warmup, compiled=args.compile is not None,
            precision=args.precision, compile_options={"unit": args.compile} if args.compile else None,
        )
    except ValueError as error:  # a precision the device cannot run (fp16 off CUDA)
        raise UsageError(str(error)) from None
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


# -- parser ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from flows import __version__

    parser = _Parser(prog="flows", description="Train and inspect normalizing flows.")
    parser.add_argument("--version", action="version", version=f"flows {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices
    positive, count = integer(1), integer(0)

    t = sub.add_parser("train", help="train a model and write checkpoints and figures")
    _add_model_arguments(t)
    t.add_argument("--out", default=None, help="run directory (default: runs/MODEL-DATA)")
    t.add_argument("--steps", type=positive, default=3000, help="total optimisation steps (default: 3000)")
    d = TRAIN_DEFAULTS
    resumed = "; --resume keeps the checkpoint's unless given"
    t.add_argument(
        "--batch", "--batch-size", dest="batch", type=positive, help=f"batch size (default: {d['batch']}{resumed})"
    )
    t.add_argument("--lr", type=number(0, strict=True), help=f"learning rate (default: {d['lr']:g}{resumed})")
    t.add_argument("--warmup", type=count, help=f"linear warm-up steps (default: {d['warmup']}{resumed})")
    t.add_argument("--clip", type=number(0), help=f"gradient-norm clip, 0: off (default: {d['clip']:g}{resumed})")
    t.add_argument(
        "--schedule", choices=("constant", "cosine"), help=f"lr after warm-up (default: {d['schedule']}{resumed})"
    )
    t.add_argument(
        "--weight-decay",
        type=number(0),
        help=f"decoupled (AdamW) weight decay (default: {d['weight_decay']:g}{resumed})",
    )
    t.add_argument(
        "--validation",
        type=_validation,
        help=f"training examples held out for validation and best.pt: a fraction or a count, 0: none "
        f"(default: {d['validation']:g}{resumed})",
    )
    t.add_argument(
        "--ema",
        type=number(0, below=1),
        help=f"decay of a moving average of the weights, e.g. 0.999, warmed up as min(decay, (1+n)/(10+n)) "
        f"over the first n updates; 0: none (default: {d['ema']:g}{resumed})",
    )
    t.add_argument(
        "--eval-every", type=positive, default=250, help="steps between validation and test evaluations (default: 250)"
    )
    t.add_argument(
        "--checkpoint-every", type=positive, default=None, help="steps between checkpoints (default: --eval-every)"
    )
    t.add_argument(
        "--eval-batch", type=positive, default=None, help="examples per evaluation forward pass (default: --batch)"
    )
    t.add_argument(
        "--init-batch", type=positive, default=512, help="examples the ActNorm initialisation sees (default: 512)"
    )
    t.add_argument(
        "--init-micro-batch",
        type=positive,
        default=None,
        help="examples per forward pass of that initialisation (default: --batch)",
    )
    t.add_argument("--seed", type=seed(), help=f"seed of a fresh run (default: {d['seed']})")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--memory-saving", action="store_true", help="memory-saving backward")
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="the bijectors' networks in bf16 or fp16 (CUDA, with loss scaling), the invertible path in "
        "float32 (default: fp32)",
    )
    t.add_argument(
        "--compile",
        nargs="?",
        const=COMPILE_UNITS[0],
        choices=COMPILE_UNITS,
        help="compile the model after the initialisation: per step of flow (the default unit), per block, "
        "or the whole model as one graph (fastest ordinary steps, longest first step; with --memory-saving "
        "its engine still runs eagerly)",
    )
    t.add_argument(
        "--conditional",
        action=_Given,
        nargs=0,
        const=True,
        default=False,
        help="train p(x | c): on the class labels of image data (--data FOLDER: its class subfolders; an .npz: "
        "its y array), or the context of gaussian-linear / rotated-moons",
    )
    t.add_argument(
        "--objective",
        default="likelihood",
        choices=("likelihood", "reverse-kl", "iw", "renyi"),
        help="likelihood of --data, or fit an unnormalised --target by variational inference (default: likelihood)",
    )
    t.add_argument(
        "--target", default=None, help="with a variational --objective: ring, two-moons, double-well, gaussian"
    )
    t.add_argument(
        "--gradient",
        default=None,
        choices=("reparam", "stl", "dreg"),
        help="variational gradient estimator: reparam, stl (sticking the landing), dreg (iw/renyi) (default: reparam)",
    )
    t.add_argument(
        "--group",
        type=int,
        default=None,
        help="variational, iw and renyi: samples per importance-weighted bound, dividing --batch (default: 4)",
    )
    t.add_argument(
        "--alpha", type=float, default=None, help="variational, renyi: the bound's order, not 1 (default: 0.5)"
    )
    t.add_argument(
        "--anneal-steps",
        type=int,
        default=None,
        help="variational: steps over which the target p*^beta anneals from beta 0.1 to 1 (default: 0, off)",
    )
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default: cpu)")
    t.add_argument("--threads", type=positive, default=None, help="torch CPU threads (default: torch's)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train_launched)

    s = sub.add_parser("sample", help="write a sample grid (or a 2D density) from a checkpoint")
    s.add_argument("checkpoint", help="checkpoint file or run directory")
    s.add_argument(
        "--out", default=None, help="PNG path (default: RUN/samples.png; a 2D run's density.png, target.png)"
    )
    s.add_argument(
        "--n",
        type=integer(1, most=SAMPLES_MAX),
        default=10,
        help=f"samples per temperature, at most {SAMPLES_MAX} (default: 10)",
    )
    s.add_argument(
        "--temperatures", type=number(0), nargs="+", default=[0.5, 0.7, 1.0], help="(default: 0.5 0.7 1.0)"
    )
    s.add_argument("--seed", type=seed(), default=0, help="(default: 0)")
    s.add_argument(
        "--class",
        dest="label",
        default=None,
        help="class-conditional run: rows of this class, by index or by name (an image folder's subfolder) "
        "(default: a grid, one row per class)",
    )
    s.add_argument("--data-dir", default=None, help="directory of MNIST / CIFAR-10 files (2D toys: unused)")
    s.add_argument("--device", default="cpu", help="(default: cpu)")
    s.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=None,
        help="best.pt, the last raw weights or their moving average (default: best when the run has it)",
    )
    s.set_defaults(func=_cmd_sample)

    i = sub.add_parser("interpolate", help="write latent interpolations between test images")
    i.add_argument("checkpoint", help="checkpoint file or run directory")
    i.add_argument("--out", default=None, help="PNG path (default: RUN/interpolation.png)")
    i.add_argument(
        "--pairs",
        type=positive,
        default=None,
        help=f"pairs of test images (default: {PAIRS}, or as many as a smaller test split holds)",
    )
    i.add_argument("--steps", type=integer(2), default=8, help="frames per pair, ends included (default: 8)")
    i.add_argument("--seed", type=seed(), default=0, help="(default: 0)")
    i.add_argument("--data-dir", default=None, help="directory of MNIST / CIFAR-10 files")
    i.add_argument("--device", default="cpu", help="(default: cpu)")
    i.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=None,
        help="best.pt, the last raw weights or their moving average (default: best when the run has it)",
    )
    i.set_defaults(func=_cmd_interpolate)

    b = sub.add_parser(
        "bench",
        help="time a training step and measure its memory with ordinary and memory-saving backward",
        description="Time a training step (forward, backward, Adam) of the model that `flows train` would build "
        "with the same options, with ordinary and with memory-saving backward and with activation "
        "checkpointing per block (optionally also compiled, or in mixed precision), on one training batch; print "
        "the median step time, the first step's time, the bytes kept for backward (and the CUDA peak) per mode, "
        "their ratios and the gradient parity of the two modes.",
    )
    _add_model_arguments(b)
    b.add_argument("--batch", "--batch-size", dest="batch", type=positive, default=64, help="(default: 64)")
    b.add_argument("--repeats", type=positive, default=5, help="timed steps per mode, median reported (default: 5)")
    b.add_argument("--warmup", type=count, default=1, help="untimed steps per mode before them (default: 1)")
    b.add_argument("--seed", type=seed(), default=0, help="seed of the model and of the batch (default: 0)")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    b.add_argument("--threads", type=positive, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument(
        "--compile",
        nargs="?",
        const=COMPILE_UNITS[0],
        choices=COMPILE_UNITS,
        help="add both modes compiled (flows.compiling.compile_regions: per step of flow by default, per block, "
        "or the whole model; the first step compiles)",
    )
    b.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="add both modes in mixed precision (low-precision networks, float32 invertible path; fp16 needs "
        "CUDA), with the gradients' agreement with float32 (default: fp32, none)",
    )
    b.set_defaults(func=_cmd_bench)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and data options that `train` and `bench` share (read by `_model_kwargs`, `_data_spec`;
    each records itself in ``args.given`` when typed, see :class:`_Given`)."""
    parser.set_defaults(given={})
    add = functools.partial(parser.add_argument, action=_Given)
    models = ", ".join(f"{name} ({spec.summary})" for name, spec in MODELS.items())
    add("--model", default="glow", choices=list(MODELS), help=f"{models} (default: glow)")
    add(
        "--data",
        default="digits",
        help=f"one of {', '.join(DATA_NAMES)}, or the path of an image folder, a .npy or an .npz file "
        "(default: digits)",
    )
    parser.add_argument("--data-dir", default=None, help="directory of MNIST / CIFAR-10 files (default: ./data)")
    add("--data-seed", type=seed(), default=0, help="seed of the split / toy points (default: 0)")
    add("--n-train", type=integer(1), default=None, help="training points of the toys and conditional datasets")
    add("--n-test", type=integer(1), default=None, help="test points (not MNIST, CIFAR-10)")
    add(
        "--image-size",
        type=integer(1),
        default=None,
        help="--data FOLDER: resize each image (shorter side) to N and crop the centre N x N (default: as stored)",
    )
    add("--workers", type=integer(0), default=None, help="--data PATH: loader worker processes (default: 2)")
    # Switches that set one builder keyword (--split-prior, --no-split-prior) exclude each other.
    groups: dict[str, Any] = {}
    for option in OPTIONS:
        default = option_default(option)
        readers = "" if option.models == tuple(MODELS) else f"{', '.join(option.models)}: "
        text = f"{readers}{option.help}" + (f" (default: {default})" if default is not None else "")
        if sum(other.kwarg == option.kwarg for other in OPTIONS) > 1:
            if option.kwarg not in groups:  # not setdefault: an unused empty group breaks --help
                groups[option.kwarg] = parser.add_mutually_exclusive_group()
            add_option = functools.partial(groups[option.kwarg].add_argument, action=_Given)
        else:
            add_option = add
        if option.value is not None:
            add_option(*option.flags, dest=option.dest, nargs=0, const=True, default=False, help=text)
        else:
            add_option(*option.flags, dest=option.dest, type=_TYPES[option.type], choices=option.choices, help=text)
    add(
        "--logit-alpha",
        type=number(0, below=0.5),
        default=0.05,
        help="Logit preprocessing margin for [0, 1] image data, 0: none (default: 0.05)",
    )


@contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Print warnings as ``flows CMD: warning: ...`` (one line, no source line)."""
    previous = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = str(message).removeprefix(f"{command}: ")  # the library's own "train: " prefix
        print(f"flows {command}: warning: {text}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flows`` command line.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on a usage error, 1 on a run-time failure (both
        one line on stderr, no traceback), 130 on Ctrl-C.
    """
    args = _parser().parse_args(argv)
    from flows.distributed import launch_rank, launch_world_size
    from flows.io import CheckpointError

    rank = launch_rank()
    tag = f" [rank {rank}]" if launch_world_size() > 1 else ""

    def say(line: str, collective: bool) -> None:
        """Under torchrun every rank runs this: what all ranks decide alike (a usage error,
        a non-finite loss, a stop) rank 0 says; a failure may be one rank's own: it says which."""
        if not collective:
            print(f"flows {args.command}{tag}: {line}", file=sys.stderr)
        elif rank == 0:
            print(f"flows {args.command}: {line}", file=sys.stderr)

    try:
        with _one_line_warnings(args.command):
            return args.func(args)
    except UsageError as error:
        say(f"error: {error}", collective=True)
        return 2
    except (Failure, CheckpointError, FileNotFoundError) as error:
        say(f"error: {error}", collective=False)
        return 1
    except KeyboardInterrupt as error:
        from flows.training import Interrupted

        if isinstance(error, Interrupted) and error.checkpoint is not None:
            say(f"{error}; continue with --resume", collective=True)
        else:
            say("interrupted", collective=True)
        return 130
    except Exception as error:
        from flows.training import NonFiniteLossError

        if isinstance(error, NonFiniteLossError):
            say(f"error: {error}", collective=True)
            return 1
        if isinstance(error, OSError) and error.errno is not None:
            # The environment (a full disk, permissions), not a bug: say which file.
            where = f" ({error.filename})" if error.filename else ""
            say(f"error: {error.strerror}{where}", collective=False)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
