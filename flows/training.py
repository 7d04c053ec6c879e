"""Maximum-likelihood training of flows, with exact resume and verified checkpoints.

:func:`train` runs Adam with a linear learning-rate warm-up and gradient-norm clipping as a
:class:`TrainConfig` describes, shows a progress bar with the live loss, evaluates on the
test split every ``eval_every`` steps, and writes ``checkpoint.pt`` (and ``history.json``)
into ``out_dir``. A checkpoint holds everything the next step depends on: model, optimiser
and scheduler state, the step, the batch sampler's position, and the torch / numpy / python
random states. Resuming from it therefore produces bit-for-bit the loss sequence an
uninterrupted run would have (on the same machine, thread count and torch version).

What a run keeps when something goes wrong:

- Every checkpoint is written atomically with a SHA-256 digest of its contents
  (:mod:`flows.io`) and verified on load; the one before it stays as ``checkpoint.prev.pt``.
  A run killed at any moment, also inside a write, resumes exactly.
- A fresh run writes a step-0 checkpoint (after the data-dependent initialisation), so
  there is always a state to go back to.
- A non-finite loss or gradient norm at step ``s`` stops training before that step is
  applied. The loss of step ``s`` depends only on the weights after step ``s - 1``, so a
  checkpoint of step ``s - 1`` would fail the same way on resume, whatever the learning
  rate: it is set aside (``checkpoint.diverged.pt``) and the previous one restored.
- Ctrl-C (SIGINT) finishes the current step, writes a checkpoint and raises
  :class:`Interrupted`; a second Ctrl-C stops at once.

For discrete data (images) the loss is the bits/dim of a uniformly dequantized batch
(``model.bits_per_dim``); for continuous data (2D toys) it is the negative
log-likelihood in nats.

A conditional model (``model.conditional``) is fitted to ``p(x | c)``: every batch, the
data-dependent initialisation and every evaluation carry the context of their examples
(:func:`context_source` says which: the dataset's float context, or the class labels for a
model built with ``num_classes=K``). The batches are the same indices either way, so a
conditional run resumes exactly as an unconditional one does.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flows.data.dataset import Dataset
from flows.io import CheckpointError, load_verified, remove_stale_temporaries, save_verified, write_text
from flows.memory import module_device

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
DIVERGED = "checkpoint.diverged.pt"
HISTORY = "history.json"
_FORMAT = "flows-checkpoint-2"
# Written before checkpoints carried a digest: still loaded, unverified.
_LEGACY_FORMATS = ("flows-checkpoint-1",)


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss (or gradient norm) and stopped.

    The step that produced it was not applied. A checkpoint holding the weights that
    produced it was set aside and the previous checkpoint restored.

    Attributes:
        step: the step (1-based) whose loss or gradient was not finite.
        checkpoint: the checkpoint file to resume from, or ``None`` when there is none.
        checkpoint_step: the step stored in that checkpoint, or ``None``.
        set_aside: where the checkpoint of the diverged weights was moved, or ``None``.
    """

    def __init__(
        self,
        what: str,
        step: int,
        value: float,
        checkpoint: Path | None,
        checkpoint_step: int | None,
        set_aside: Path | None = None,
    ) -> None:
        self.step = step
        self.checkpoint = checkpoint
        self.checkpoint_step = checkpoint_step
        self.set_aside = set_aside
        if checkpoint is not None and checkpoint_step is not None:
            kept = f"The last good checkpoint {checkpoint} (step {checkpoint_step}) is intact; resume from it"
        else:
            kept = "No good checkpoint remains; start over"
        if set_aside is not None:
            kept = f"The checkpoint of the weights that produced it was moved to {set_aside}. {kept}"
        super().__init__(
            f"non-finite {what} ({value}) at step {step}; training stopped without applying that step. "
            f"{kept} with a lower learning rate (--lr), a longer warm-up or a smaller gradient-clipping norm."
        )


class Interrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C) between two steps.

    Attributes:
        step: the last completed step.
        checkpoint: the checkpoint holding it, or ``None`` when the run writes none.
    """

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        where = f"checkpoint {checkpoint} holds it" if checkpoint is not None else "no out_dir, nothing saved"
        super().__init__(f"interrupted after step {step}; {where}")


@dataclass
class TrainConfig:
    """How :func:`train` fits a model.

    Attributes:
        steps: the total number of optimisation steps (a resumed run continues up to it).
        batch_size: examples per step.
        lr: Adam's learning rate after warm-up (applies on resume too).
        warmup: the number of linear warm-up steps (0 for none).
        clip: the maximum gradient norm, or ``None`` for no clipping.
        weight_decay: Adam's L2 penalty.
        seed: seeds the batch order, the dequantization noise and, at a fresh start, the
            global torch / numpy / python generators (a resumed run restores those instead).
        eval_every: steps between test evaluations.
        checkpoint_every: steps between checkpoints (default ``eval_every``); a
            checkpoint is also written at step 0 and after the last step.
        init_batch_size: examples for the data-dependent initialisation.
        eval_batch_size: examples per forward pass during evaluation.
        out_dir: directory for the checkpoints and ``history.json``; ``None`` writes nothing.
        resume: continue from ``out_dir/checkpoint.pt`` (model, optimiser, scheduler,
            sampler and random states), reproducing the uninterrupted run exactly.
        progress: show a tqdm progress bar with the live loss.
        metadata: JSON-like description stored in the checkpoint under ``"config"`` (the
            model name and builder arguments, so the command line can rebuild the model).

    Raises:
        ValueError: a setting out of range (the message names it).

    Example:
        >>> TrainConfig(steps=100, lr=3e-4).checkpoint_every
        500
    """

    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    clip: float | None = 50.0
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 500
    checkpoint_every: int | None = None
    init_batch_size: int = 512
    eval_batch_size: int = 500
    out_dir: str | os.PathLike[str] | None = None
    resume: bool = False
    progress: bool = True
    metadata: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_every is None:
            self.checkpoint_every = self.eval_every
        at_least = {
            "steps": 0,
            "batch_size": 1,
            "warmup": 0,
            "eval_every": 1,
            "checkpoint_every": 1,
            "init_batch_size": 1,
            "eval_batch_size": 1,
        }
        for name, least in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"TrainConfig: {name} must be an integer >= {least}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig: lr must be a finite number > 0, got {self.lr!r}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"TrainConfig: clip must be > 0 or None, got {self.clip!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.resume and self.out_dir is None:
            raise ValueError("TrainConfig: resume=True needs out_dir")

    def settings(self) -> dict[str, Any]:
        """The optimisation settings stored in a checkpoint and compared on resume."""
        return {k: getattr(self, k) for k in ("batch_size", "lr", "warmup", "clip", "seed", "weight_decay")}


def checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file of ``path``: the file itself, or ``checkpoint.pt`` in a run directory."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str], keep_previous: bool = True) -> None:
    """Write a checkpoint dict atomically, with a digest of its contents (see :mod:`flows.io`).

    Args:
        state: the checkpoint contents (tensors, dicts, lists and Python scalars).
        path: the destination file.
        keep_previous: keep the checkpoint ``path`` held as ``checkpoint.prev.pt`` beside it.
    """
    path = Path(path)
    save_verified(state, path, previous=path.with_name(PREVIOUS) if keep_previous else None)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` and verify it.

    Loading uses ``weights_only=True``: checkpoints hold only tensors and plain Python
    containers, so no code runs on load. The stored digest is checked first.

    Args:
        path: the checkpoint file, or a run directory holding ``checkpoint.pt``.
        map_location: where to put the tensors.

    Returns:
        The checkpoint dict (keys ``model``, ``optimizer``, ``scheduler``, ``step``,
        ``config``, ``data``, ``train``, ``rng``, ``sampler``, ``history``).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        flows.io.CheckpointError: the file is empty, truncated, corrupted, edited or no
            flows checkpoint; the message names it (and an intact previous checkpoint).
    """
    file = checkpoint_file(path)
    try:
        state = load_verified(file, legacy=lambda s: s.get("format") in _LEGACY_FORMATS)
        if not isinstance(state, dict) or state.get("format") not in (_FORMAT, *_LEGACY_FORMATS):
            raise CheckpointError(file, "is not a flows training checkpoint")
    except CheckpointError as error:
        raise CheckpointError(file, error.reason + _previous_hint(file)) from None
    if torch.device(map_location).type != "cpu":
        state = {k: v if k == "rng" else _to(v, torch.device(map_location)) for k, v in state.items()}
    return state


def _previous_hint(file: Path) -> str:
    previous = file.with_name(PREVIOUS)
    if file.name == PREVIOUS or not previous.is_file():
        return ""
    try:
        step = load_verified(previous)["step"]
    except (CheckpointError, KeyError, TypeError):
        return ""
    return f". The previous checkpoint {previous} (step {step}) is intact: move it onto {file.name} to resume from it"


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, weights: Mapping[str, Tensor], file: str | os.PathLike[str]) -> None:
    """``model.load_state_dict(weights)``, with one line naming ``file`` when they do not fit.

    Raises:
        flows.io.CheckpointError: missing, unexpected or differently shaped entries.
    """
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        # torch lists every mismatch on its own line (65 for a config edited to another width).
        lines = str(error).splitlines()
        problems = [line.strip() for line in lines[1:] if line.strip()] or lines[:1]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(file, f"its weights do not fit the model: {problems[0]}{more}") from None


def initialize(model: nn.Module, batch: Tensor, context: Tensor | None = None) -> None:
    """Run the data-dependent initialisation (ActNorm) on one batch, without gradients.

    Calls ``model.log_prob(batch, context)`` in training mode under ``torch.no_grad()``, so
    every ``ActNorm`` sets its bias and scale from a large batch (e.g. 512 examples) before
    the first optimisation step, instead of from the first small training batch.

    Args:
        model: a :class:`~flows.models.Flow`.
        batch: model inputs ``(B, *input_shape)`` (dequantized for image data).
        context: the batch's context ``(B, ...)`` for a conditional model, else ``None``.
    """
    model.train()
    with torch.no_grad():
        # An unconditional model is called without a context: a user's model may not take one.
        model.log_prob(batch) if context is None else model.log_prob(batch, context)


def context_source(model: nn.Module, data: Dataset) -> str | None:
    """What a model conditions on in ``data``: ``"labels"``, ``"context"`` or ``None``.

    * An unconditional model (``model.conditional`` false or absent): ``None``.
    * A class-conditional model (its embedding is a
      :class:`~flows.models.context.ClassEmbedding`, i.e. built with ``num_classes=K``):
      ``"labels"``, the dataset's ``train_labels`` / ``test_labels``.
    * Any other conditional model: ``"context"``, the dataset's float ``train_context`` /
      ``test_context``.

    Raises:
        ValueError: the model is conditional but the data lack what it conditions on, or the
            labels reach past the model's classes.
    """
    if not getattr(model, "conditional", False):
        return None
    from flows.models.context import ClassEmbedding

    embedding = getattr(model, "embedding", None)
    if isinstance(embedding, ClassEmbedding):
        if data.train_labels is None:
            raise ValueError(
                f"train: the model is class-conditional but {data.name!r} has no class labels to condition on"
            )
        classes = data.num_classes or 0
        if classes > embedding.num_classes:
            raise ValueError(
                f"train: {data.name!r} has labels up to {classes - 1} but the model has "
                f"{embedding.num_classes} classes (num_classes={embedding.num_classes})"
            )
        return "labels"
    if data.train_context is None:
        raise ValueError(f"train: the model is conditional but {data.name!r} has no context to condition on")
    return "context"


def _contexts(model: nn.Module, data: Dataset) -> tuple[Tensor | None, Tensor | None]:
    """The train and test contexts the model sees (``(None, None)`` for an unconditional model)."""
    source = context_source(model, data)
    if source == "labels":
        return data.train_labels, data.test_labels
    if source == "context":
        return data.train_context, data.test_context
    return None, None


def _rows(context: Tensor | None, idx: Tensor | slice, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """The context rows of a batch, on the model's device (float contexts in its dtype)."""
    if context is None:
        return None
    rows = context[idx]
    return rows.to(device, dtype) if rows.is_floating_point() else rows.to(device)


def _objective(model: nn.Module, data: Dataset, x: Tensor, context: Tensor | None = None) -> Tensor:
    """Per-example loss: bits/dim for discrete data, NLL in nats for continuous data."""
    # An unconditional model is called without a context: a user's model may not take one.
    given = () if context is None else (context,)
    if data.discrete:
        return model.bits_per_dim(x, *given)
    return -model.log_prob(x, *given)


def _fork_rng(device: torch.device) -> AbstractContextManager[None]:
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def evaluate(
    model: nn.Module,
    data: Dataset,
    split: str = "test",
    batch_size: int = 500,
    seed: int = 0,
) -> float:
    """Mean test bits/dim (discrete data) or negative log-likelihood in nats (continuous).

    Dequantization noise comes from a generator seeded with ``seed``, and the global
    random state is restored afterwards, so evaluating never changes a training run. A
    conditional model is evaluated on ``-log p(x | c)`` with each example's context (see
    :func:`context_source`).

    Args:
        model: a :class:`~flows.models.Flow`.
        data: the dataset.
        split: ``"test"`` or ``"train"``.
        batch_size: examples per forward pass.
        seed: seed of the dequantization noise.

    Returns:
        The mean over the split, as a Python float.
    """
    if split not in ("test", "train"):
        raise ValueError(f"evaluate: split must be 'test' or 'train', got {split!r}")
    examples = data.test if split == "test" else data.train
    contexts = _contexts(model, data)
    context = contexts[0] if split == "train" else contexts[1]
    device = module_device(model)
    dtype = _float_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with _fork_rng(device), torch.no_grad():
            for start in range(0, len(examples), batch_size):
                rows = slice(start, start + batch_size)
                x = data.prepare(examples[rows], generator=generator)
                c = _rows(context, rows, device, dtype)
                total += _objective(model, data, x.to(device), c).double().sum().item()
    finally:
        model.train(was_training)
    return total / len(examples)


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (float contexts are cast to it)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


class _Sampler:
    """Shuffled mini-batches without replacement, epoch after epoch, resumable."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm = torch.randperm(n, generator=generator)
        self.cursor = 0

    def next(self) -> Tensor:
        # The incomplete tail of each permutation is dropped, so all batches are full.
        if self.cursor + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.cursor = 0
        idx = self.perm[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.cursor = state["perm"].clone(), int(state["cursor"])


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "batches": generator.get_state(),
        # numpy's state is stored as plain lists so the checkpoint loads with weights_only.
        "numpy": {"key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batches"])
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _LinearWarmup:
    """Learning-rate factor ``min(1, (step + 1) / warmup)``: linear ramp, then constant."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return 1.0 if self.warmup <= 0 else min(1.0, (step + 1) / self.warmup)


@contextmanager
def _deferred_interrupt() -> Iterator[threading.Event]:
    """Turn the first SIGINT into a flag the loop reads between steps; a second one interrupts.

    A step interrupted inside the optimiser's update would leave the weights half updated,
    so the first Ctrl-C only asks the loop to stop after the current step. Signal handlers
    can only be set in the main thread; elsewhere SIGINT keeps its usual effect.
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def _new_history(metric: str) -> dict[str, Any]:
    return {
        "metric": metric,
        "step": [],
        "train": [],
        "lr": [],
        "grad_norm": [],
        "test_step": [],
        "test": [],
        "sessions": [],
        "wall_time": 0.0,
        "final_test": None,
    }


class _Run:
    """The state of one training session and its steps (:func:`train` runs them in order)."""

    def __init__(self, model: nn.Module, data: Dataset, config: TrainConfig) -> None:
        if config.batch_size > len(data.train):
            raise ValueError(f"train: batch_size {config.batch_size} exceeds the {len(data.train)} training examples")
        self.model, self.data, self.config = model, data, config
        self.train_context, _ = _contexts(model, data)  # checks the data fit a conditional model
        self.dtype = _float_dtype(model)
        self.out = Path(config.out_dir) if config.out_dir is not None else None
        self.file = self.out / CHECKPOINT if self.out is not None else None
        self.device = module_device(model)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _LinearWarmup(config.warmup))
        self.sampler = _Sampler(len(data.train), config.batch_size, self.generator)
        self.history = _new_history("bits/dim" if data.discrete else "nll")
        self.step = 0
        self.saved: int | None = None  # the step in checkpoint.pt, as this session knows it
        self.params = [p for p in model.parameters() if p.requires_grad]

    # -- starting -------------------------------------------------------------------------

    def start(self) -> None:
        """Restore from the checkpoint, or initialise and write the step-0 checkpoint (the state
        to roll back to if the first steps diverge)."""
        if self.out is not None:
            remove_stale_temporaries(self.out)
        if self.config.resume:
            self._restore()
        else:
            self._fresh()
        self.history.setdefault("sessions", []).append({"start_step": self.step, **self.config.settings()})
        if not self.config.resume:
            self.checkpoint(keep_previous=False)

    def _fresh(self) -> None:
        seed = self.config.seed
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        # Re-drawn after seeding, so the batch order depends on the seed alone.
        self.sampler = _Sampler(len(self.data.train), self.config.batch_size, self.generator)
        n_init = min(self.config.init_batch_size, len(self.data.train))
        idx = torch.randperm(len(self.data.train), generator=self.generator)[:n_init]
        batch = self.data.prepare(self.data.train[idx], generator=self.generator).to(self.device)
        initialize(self.model, batch, _rows(self.train_context, idx, self.device, self.dtype))
        if self.out is not None:
            # A previous run's files in out_dir must never be rolled back to.
            for name in (PREVIOUS, DIVERGED):
                (self.out / name).unlink(missing_ok=True)

    def _restore(self) -> None:
        assert self.file is not None
        state = load_checkpoint(self.file)
        start = int(state["step"])
        if self.config.steps < start:
            raise ValueError(
                f"train: steps={self.config.steps} is below the step {start} of the checkpoint {self.file}; "
                f"give steps >= {start}"
            )
        _check_resume(state, self.config.settings(), self.data)
        load_weights(self.model, state["model"], self.file)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_settings()
        self.history = state["history"]
        self.sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"], self.generator)
        self.step = self.saved = start

    def _apply_settings(self) -> None:
        """Make the configured lr, warm-up and weight decay hold after loading older states.

        The optimiser's and scheduler's state dicts carry their own base rate, warm-up and
        weight decay; without this a resumed run would silently keep the old ones. With
        unchanged settings every value is recomputed to the same float.
        """
        config, scheduler = self.config, self.scheduler
        groups = self.optimizer.param_groups
        scheduler.base_lrs = [float(config.lr)] * len(groups)
        scheduler.lr_lambdas = [_LinearWarmup(config.warmup) for _ in groups]
        for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(scheduler.last_epoch)
            group["weight_decay"] = config.weight_decay

    # -- checkpoints ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        data = self.data
        return {
            "format": _FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.config.metadata or {},
            "data": {
                "name": data.name,
                "shape": list(data.shape),
                "n_levels": data.n_levels,
                "context": context_source(self.model, data),
            },
            "train": self.config.settings(),
            "rng": _rng_state(self.generator),
            "sampler": self.sampler.state_dict(),
            "history": self.history,
        }

    def checkpoint(self, keep_previous: bool = True) -> None:
        """Write the checkpoint of the current step (the previous one is kept)."""
        if self.file is None or self.saved == self.step:
            return
        try:
            save_checkpoint(self.state(), self.file, keep_previous=keep_previous)
            write_text(self.file.with_name(HISTORY), json.dumps(self.history, indent=1))
        except OSError as error:
            kept = (
                f"the checkpoint of step {self.saved} there is intact"
                if self.saved is not None
                else "no checkpoint was written before"
            )
            reason = error.strerror or str(error)
            raise CheckpointError(self.file, f"could not be written at step {self.step} ({reason}); {kept}") from error
        self.saved = self.step

    def roll_back(self, failed: int) -> tuple[Path | None, int | None, Path | None]:
        """Set aside a checkpoint whose weights produced the non-finite step ``failed``.

        Returns:
            The checkpoint to resume from and its step (``None`` if none remains), and
            where the set-aside checkpoint went (``None`` if none was).
        """
        if self.file is None or self.saved is None or not self.file.is_file():
            return None, None, None
        if self.saved < failed - 1:
            return self.file, self.saved, None  # its weights gave a finite loss at step saved + 1
        aside = self.file.with_name(DIVERGED)
        os.replace(self.file, aside)
        previous = self.file.with_name(PREVIOUS)
        if not previous.is_file():
            self.saved = None
            return None, None, aside
        os.replace(previous, self.file)
        state = load_checkpoint(self.file)
        self.saved = int(state["step"])
        write_text(self.file.with_name(HISTORY), json.dumps(state["history"], indent=1))
        return self.file, self.saved, aside

    # -- training -------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimisation step; raises :class:`NonFiniteLossError` before applying a bad one."""
        step = self.step + 1
        model, data, history = self.model, self.data, self.history
        model.train()
        idx = self.sampler.next()
        x = data.prepare(data.train[idx], generator=self.generator).to(self.device)
        loss = _objective(model, data, x, _rows(self.train_context, idx, self.device, self.dtype)).mean()
        if not torch.isfinite(loss):
            self.diverged("loss", step, loss.item())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = math.inf if self.config.clip is None else self.config.clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.diverged("gradient norm", step, grad_norm.item())
        history["lr"].append(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        history["step"].append(step)
        history["train"].append(loss.item())
        history["grad_norm"].append(grad_norm.item())
        self.step = step
        return history["train"][-1]

    def diverged(self, what: str, step: int, value: float) -> None:
        kept, kept_step, aside = self.roll_back(step)
        raise NonFiniteLossError(what, step, value, kept, kept_step, aside)

    def loop(self) -> None:
        from tqdm import tqdm

        config, history = self.config, self.history
        steps = config.steps
        bar = tqdm(total=steps, initial=min(self.step, steps), disable=not config.progress, dynamic_ncols=True)
        began = time.perf_counter()
        try:
            with _deferred_interrupt() as interrupt:
                while self.step < steps:
                    loss = self.train_step()
                    step = self.step
                    postfix = {history["metric"]: f"{loss:.4f}"}
                    if history["test"]:
                        postfix["test"] = f"{history['test'][-1]:.4f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                    if step % config.eval_every == 0 or step == steps:
                        history["test_step"].append(step)
                        history["test"].append(evaluate(self.model, self.data, batch_size=config.eval_batch_size))
                    if step % config.checkpoint_every == 0 or step == steps or interrupt.is_set():
                        history["wall_time"] += time.perf_counter() - began
                        began = time.perf_counter()
                        self.checkpoint()
                    if interrupt.is_set():
                        raise Interrupted(step, self.file)
        finally:
            bar.close()
            history["wall_time"] += time.perf_counter() - began

    def finish(self) -> dict[str, Any]:
        history = self.history
        if history["test"] and history["test_step"][-1] == self.step:
            history["final_test"] = history["test"][-1]
        else:
            history["final_test"] = evaluate(self.model, self.data, batch_size=self.config.eval_batch_size)
        return history


def train(model: nn.Module, data: Dataset, config: TrainConfig) -> dict[str, Any]:
    """Fit a flow by maximum likelihood.

    Each step draws a batch (shuffled epochs, without replacement), dequantizes it for
    discrete data, minimises the mean bits/dim (discrete) or NLL in nats (continuous) with
    Adam, a linear learning-rate warm-up and gradient-norm clipping. A conditional model
    minimises ``-log p(x | c)`` with each example's context (the dataset's float context, or
    its class labels for a ``num_classes=K`` model; :func:`context_source`). Before the first step,
    :func:`initialize` runs the data-dependent initialisation on ``init_batch_size``
    training examples. The test split is evaluated every ``eval_every`` steps and at the end.

    Args:
        model: a :class:`~flows.models.Flow` on the device to train on.
        data: the dataset (see :func:`flows.data.load`).
        config: the settings (:class:`TrainConfig`).

    Returns:
        The history: ``metric`` (``"bits/dim"`` or ``"nll"``), per-step lists ``step``,
        ``train`` (the loss), ``lr`` and ``grad_norm``; ``test_step`` and ``test`` for the
        evaluations; ``sessions`` (the step each session started at, with its settings);
        ``wall_time`` in seconds (summed over resumed sessions) and ``final_test``.

    Raises:
        NonFiniteLossError: a loss or gradient norm was NaN or infinite; that step was not
            applied, and the checkpoint to resume from is named.
        Interrupted: Ctrl-C; the completed steps are in the checkpoint.
        FileNotFoundError: ``resume=True`` but ``out_dir`` holds no checkpoint.
        ValueError: a setting does not fit the data, or the model is conditional and the
            data have no context (labels) for it.
        flows.io.CheckpointError: a checkpoint could not be read or written.

    Example:
        >>> from flows import data as datasets
        >>> from flows.models import Glow
        >>> moons = datasets.load("moons", n_train=256, n_test=64)
        >>> model = Glow((2,), levels=1, steps=2, hidden_channels=8)
        >>> history = train(model, moons, TrainConfig(steps=5, batch_size=32, progress=False))
        >>> history["step"]
        [1, 2, 3, 4, 5]
    """
    run = _Run(model, data, config)
    run.start()
    run.loop()
    return run.finish()


def _check_resume(state: dict[str, Any], settings: dict[str, Any], data: Dataset) -> None:
    if state["data"]["name"] != data.name or tuple(state["data"]["shape"]) != tuple(data.shape):
        raise ValueError(
            f"train: the checkpoint was trained on {state['data']['name']!r} "
            f"{tuple(state['data']['shape'])}, not on {data.name!r} {tuple(data.shape)}"
        )
    changed = {k: (state["train"].get(k), v) for k, v in settings.items() if state["train"].get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        note = " (the seed only applies to a fresh start)" if "seed" in changed else ""
        warnings.warn(
            f"train: resuming with changed settings ({detail}){note}; they apply from step {state['step']} on, "
            "so the run will not match an uninterrupted one",
            RuntimeWarning,
            stacklevel=4,
        )


__all__ = [
    "CHECKPOINT",
    "HISTORY",
    "PREVIOUS",
    "Interrupted",
    "NonFiniteLossError",
    "TrainConfig",
    "checkpoint_file",
    "context_source",
    "evaluate",
    "initialize",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "train",
]
