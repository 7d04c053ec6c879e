"""Maximum-likelihood training of flows, with exact resume and verified checkpoints.

:func:`train` runs Adam (weight decay decoupled, as AdamW) with a linear learning-rate
warm-up, then a constant or cosine-decaying rate, and gradient-norm clipping as a
:class:`TrainConfig` describes, shows a progress bar with the live loss, evaluates on a
validation split carved from the training data and on the test split every ``eval_every``
steps, and writes ``checkpoint.pt`` (and ``history.json``) into ``out_dir``. A checkpoint
holds everything the next step depends on: model, optimiser and scheduler state, the step,
the batch sampler's position, the torch / numpy / python random states, and the moving
average of the weights when one is kept. Resuming from it
therefore produces bit-for-bit the loss sequence an uninterrupted run would have (on the
same machine, thread count and torch version).

Keeping the best: with ``ema_decay`` the run keeps an exponential moving average of the
weights (:class:`flows.ema.EMA`, its decay warmed up over the first updates; the
checkpoint holds the average and its update count), evaluated beside the raw weights.
Whenever the validation metric of the raw or averaged weights beats every earlier
evaluation, those weights go to ``best.pt`` (written and verified like ``checkpoint.pt``),
which records their step, which weights they are (``"raw"`` or ``"ema"``) and their
validation and test scores.

Memory: the data-dependent initialisation (:func:`initialize`) and the evaluations run in
micro-batches (by default of the training batch size), so neither needs more memory than a
training step; the initialisation's statistics are still those of the whole init batch.

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
log-likelihood in nats. The dequantization noise is keyed per example: example ``j`` of
the global batch of step ``s`` takes the noise of ``example_seed(seed, stream, s, j)``
(:mod:`flows.data.streaming`), whichever process or loader worker prepares it.

Several processes (a default process group, :mod:`flows.distributed`; ``flows train``
under ``torchrun``): every rank draws the same global batch from the one seeded sampler
and trains on its contiguous shard inside ``DistributedDataParallel``; the logged loss,
the non-finite checks, the stop after Ctrl-C and the evaluations (sharded, sums
all-reduced) are the same on every rank; rank 0 alone shows the progress bar and writes
the files. Such a run computes what one process computes on the same global batches (up
to the rounding of the gradient all-reduce; layers that draw from torch's global generator
in a step, dropout and i-ResNet's probes, draw per rank: ``docs/distributed.md``), so its
checkpoint resumes at any world size.
A :class:`~flows.data.streaming.StreamingDataset` is read by its ``DataLoader`` workers,
which replay the sampler from a copy of its state.

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
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flows import distributed
from flows.compiling import UNITS, compile_regions
from flows.data.dataset import Dataset
from flows.data.streaming import StreamingDataset, example_seed, prepare_examples
from flows.ema import EMA
from flows.io import CheckpointError, load_verified, remove_stale_temporaries, save_verified, write_text
from flows.memory import module_device
from flows.models.flow import Flow
from flows.optimizer import adamw, update_kernel
from flows.precision import PRECISIONS, grad_scaler, mixed_precision
from flows.transforms.inv_conv import pack_lu_checkpoint
from flows.transforms.switches import skipping_logdet

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
DIVERGED = "checkpoint.diverged.pt"
HISTORY = "history.json"
BEST = "best.pt"
SCHEDULES = ("constant", "cosine")
_FORMAT = "flows-checkpoint-2"
# Written before checkpoints carried a digest: still loaded, unverified.
_LEGACY_FORMATS = ("flows-checkpoint-1",)
# What a checkpoint written before these settings existed trained with.
LEGACY_SETTINGS = {
    "schedule": "constant", "validation": 0, "ema_decay": None, "decoupled_weight_decay": False, "ema_warmup": False
}
# The streams of keyed dequantization noise: a training example's noise is a function of
# (seed, stream, step, position), never of the process that draws it (flows.data.streaming);
# an evaluated example's, of (seed, index) alone.
_TRAIN, _INIT = 0, 1


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
        schedule: the rate after warm-up: ``"constant"``, or ``"cosine"``, which decays
            it as ``lr * (1 + cos(pi * t)) / 2`` with ``t`` going from 0 after warm-up to
            1 at ``steps``.
        clip: the maximum gradient norm, or ``None`` for no clipping.
        weight_decay: decoupled weight decay (AdamW: every step multiplies the weights by
            ``1 - lr * weight_decay``), not an L2 penalty inside Adam's normalisation.
        seed: seeds the batch order, the validation split, the dequantization noise and,
            at a fresh start, the global torch / numpy / python generators (a resumed run
            restores those instead).
        validation: held out from the training data for validation, a fraction in
            ``(0, 1)`` or a number of examples (``0``: none, and no ``best.pt``); chosen
            at random with ``seed``, the same examples for the whole run.
        ema_decay: keep an exponential moving average of the weights with this decay
            (e.g. 0.999; warmed up as ``min(ema_decay, (1 + n) / (10 + n))`` at update
            ``n``, :class:`flows.ema.EMA`), evaluated and checkpointed beside them; ``None``
            or ``0``: none.
        eval_every: steps between validation and test evaluations.
        checkpoint_every: steps between checkpoints (default ``eval_every``); a
            checkpoint is also written at step 0 and after the last step.
        init_batch_size: examples for the data-dependent initialisation.
        init_micro_batch_size: examples per forward pass of the initialisation (default
            ``batch_size``); the statistics are those of all ``init_batch_size`` examples.
        eval_batch_size: examples per forward pass during evaluation (default ``batch_size``).
        out_dir: directory for the checkpoints and ``history.json``; ``None`` writes nothing.
        resume: continue from ``out_dir/checkpoint.pt`` (model, optimiser, scheduler,
            sampler and random states), reproducing the uninterrupted run exactly.
        progress: show a tqdm progress bar with the live loss.
        metadata: JSON-like description stored in the checkpoint under ``"config"`` (the
            model name and builder arguments, so the command line can rebuild the model).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA): the bijectors' networks
            run in that dtype while the invertible path stays in float32
            (:func:`flows.precision.mixed_precision`); fp16 scales the loss
            (:func:`flows.precision.grad_scaler`).
        compile: compile the model after the initialisation
            (:func:`flows.compiling.compile_regions`): ``True`` or ``"step"`` per step of
            flow, ``"block"`` per block, ``"model"`` the whole flow as one graph (fastest
            ordinary steps, longest first step); ``False``: eager.

    Raises:
        ValueError: a setting out of range (the message names it).

    Example:
        >>> config = TrainConfig(steps=100, lr=3e-4)
        >>> config.checkpoint_every, config.eval_batch_size
        (500, 64)
    """

    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "constant"
    clip: float | None = 50.0
    weight_decay: float = 0.0
    seed: int = 0
    validation: float | int = 0.1
    ema_decay: float | None = None
    eval_every: int = 500
    checkpoint_every: int | None = None
    init_batch_size: int = 512
    init_micro_batch_size: int | None = None
    eval_batch_size: int | None = None
    out_dir: str | os.PathLike[str] | None = None
    resume: bool = False
    progress: bool = True
    metadata: dict[str, Any] | None = None
    precision: str = "fp32"
    compile: bool | str = False

    def __post_init__(self) -> None:
        if self.checkpoint_every is None:
            self.checkpoint_every = self.eval_every
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size
        if self.init_micro_batch_size is None:
            self.init_micro_batch_size = self.batch_size
        if self.ema_decay == 0:
            self.ema_decay = None
        at_least = {
            "steps": 0,
            "batch_size": 1,
            "warmup": 0,
            "eval_every": 1,
            "checkpoint_every": 1,
            "init_batch_size": 1,
            "init_micro_batch_size": 1,
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
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        v = self.validation
        fraction = isinstance(v, float) and 0 < v < 1
        count = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0
        if not (fraction or count):
            raise ValueError(
                f"TrainConfig: validation must be a fraction in (0, 1) or a number of examples >= 0, got {v!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.compile, bool) and self.compile not in UNITS:
            raise ValueError(f"TrainConfig: compile must be True, False or one of {UNITS}, got {self.compile!r}")
        if self.compile and self.precision != "fp32":
            raise ValueError(
                f"TrainConfig: compile with precision {self.precision!r} is not supported (compiled regions keep "
                "the precision they were first traced in); use one of them"
            )
        d = self.ema_decay
        if d is not None and not (isinstance(d, (int, float)) and math.isfinite(d) and 0 < d < 1):
            raise ValueError(f"TrainConfig: ema_decay must be in (0, 1) (e.g. 0.999) or None, got {d!r}")

    def settings(self) -> dict[str, Any]:
        """The optimisation settings stored in a checkpoint and compared on resume."""
        names = ("batch_size", "lr", "warmup", "schedule", "clip", "seed", "weight_decay", "validation", "ema_decay")
        settings = {k: getattr(self, k) for k in names}
        settings["decoupled_weight_decay"] = True
        settings["ema_warmup"] = True  # the average's decay warms up (flows.ema.EMA)
        if self.schedule == "cosine":
            settings["steps"] = self.steps  # the cosine's length: a longer run decays more slowly
        return settings

    def validation_size(self, n: int) -> int:
        """The number of the ``n`` training examples held out for validation."""
        if isinstance(self.validation, float):
            return min(n - 1, max(1, round(self.validation * n)))
        if self.validation >= n:
            raise ValueError(
                f"train: validation={self.validation} leaves none of the {n} training examples to train on; "
                f"give fewer (or a fraction, e.g. 0.1)"
            )
        return int(self.validation)


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
        ``config``, ``data``, ``train``, ``rng``, ``sampler``, ``history``; with a moving
        average, ``ema`` (a state dict of the model) and ``ema_updates``).

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
    """How to resume from the previous checkpoint when ``file`` is the unreadable training
    checkpoint it preceded (nothing for another file: ``best.pt`` is not one to replace)."""
    previous = file.with_name(PREVIOUS)
    if file.name != CHECKPOINT or not previous.is_file():
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


def initialize(
    model: nn.Module, batch: Tensor, context: Tensor | None = None, micro_batch_size: int | None = None
) -> None:
    """Run the data-dependent initialisation (ActNorm) on one batch, without gradients.

    Every ``ActNorm`` sets its bias and scale from the statistics of the whole ``batch``
    (e.g. 512 examples) before the first optimisation step, instead of from the first small
    training batch, while no forward pass holds more than ``micro_batch_size`` examples:
    the batch goes through the model's bijector block by block
    (:meth:`~flows.transforms.Bijector.initialize_chunks`), each block seeing all chunks
    before the next one starts. Only the batch itself, at one block boundary, is held
    whole. The log-dets are not computed (nothing is learnt from them here). Any other
    model with a ``log_prob`` (a wrapper of a flow) initialises on one ``log_prob`` call
    of the whole batch, as its blocks cannot be reached.

    Args:
        model: a :class:`~flows.models.Flow`; left in training mode.
        batch: model inputs ``(B, *input_shape)`` (dequantized for image data).
        context: the batch's context ``(B, ...)`` for a conditional model, else ``None``;
            each chunk goes with its rows.
        micro_batch_size: examples per forward pass (``None``: the whole batch at once).

    Example:
        >>> from flows.models import Glow
        >>> model = Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4)
        >>> initialize(model, 3 + torch.randn(64, 1, 4, 4), micro_batch_size=16)
        >>> z = model.encode(3 + torch.randn(4096, 1, 4, 4))
        >>> bool(z.mean().abs() < 0.1)
        True
    """
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"initialize: micro_batch_size must be >= 1, got {micro_batch_size}")
    model.train()
    if not isinstance(model, Flow):
        with torch.no_grad():
            # An unconditional model is called without a context: a user's model may not take one.
            model.log_prob(batch) if context is None else model.log_prob(batch, context)
        return
    model._check_input(batch)
    size = len(batch) if micro_batch_size is None else micro_batch_size
    chunks = list(batch.split(size))
    rows = [None] * len(chunks) if context is None else list(context.split(size))
    with torch.no_grad(), skipping_logdet():
        contexts = [model._embed(c, len(x), "initialize") for x, c in zip(chunks, rows, strict=True)]
        model.bijector.initialize_chunks(chunks, contexts)


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
    rows: Tensor | None = None,
) -> float:
    """Mean test bits/dim (discrete data) or negative log-likelihood in nats (continuous).

    The dequantization noise of example ``i`` of the split is drawn from its own seed,
    ``example_seed(seed, i)`` (:func:`flows.data.streaming.prepare_examples`), and the global
    random state is restored afterwards, so evaluating never changes a training run and
    gives the same value at any ``batch_size``. In a multi-process run every rank evaluates
    its shard of the examples and the sums are all-reduced (every rank must call it). A
    conditional model is evaluated on ``-log p(x | c)`` with each example's context (see
    :func:`context_source`).

    Args:
        model: a :class:`~flows.models.Flow`.
        data: the dataset.
        split: ``"test"`` or ``"train"``.
        batch_size: examples per forward pass.
        seed: seed of the dequantization noise.
        rows: the indices of the examples of the split to evaluate (default: all), e.g.
            the validation examples of the training split.

    Returns:
        The mean over the split (or its ``rows``), as a Python float.
    """
    if split not in ("test", "train"):
        raise ValueError(f"evaluate: split must be 'test' or 'train', got {split!r}")
    examples = data.test if split == "test" else data.train
    contexts = _contexts(model, data)
    context = contexts[0] if split == "train" else contexts[1]
    positions = torch.arange(len(examples)) if rows is None else torch.as_tensor(rows)
    device = module_device(model)
    dtype = _float_dtype(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with _fork_rng(device), torch.no_grad():
            # Each rank evaluates its shard; the noise of example i is keyed by (seed, i), so
            # the sum is the same at every world size and batch size.
            mine = positions[distributed.shard(len(positions))]
            for chunk in mine.split(batch_size):
                seeds = [example_seed(seed, i) for i in chunk.tolist()]
                x = prepare_examples(data, examples[chunk], seeds).to(device, dtype)
                total += _objective(model, data, x, _rows(context, chunk, device, dtype)).double().sum()
    finally:
        model.train(was_training)
    return distributed.all_reduce_sum(total).item() / len(positions)


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


class _Schedule:
    """Learning-rate factor of step ``k + 1`` (``k`` steps done): warm-up, then constant or cosine.

    Warm-up ``(k + 1) / warmup`` for ``k < warmup``; then ``1`` (constant) or
    ``(1 + cos(pi * (k - warmup) / (steps - warmup))) / 2`` (cosine: 1 right after the
    warm-up, decaying toward 0, which the last step, ``k = steps - 1``, stays above).
    """

    def __init__(self, warmup: int, kind: str = "constant", steps: int = 0) -> None:
        self.warmup, self.kind, self.steps = warmup, kind, steps

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return (k + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        t = min(1.0, (k - self.warmup) / max(1, self.steps - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * t))


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
        "validation": [],
        "test_ema": [],
        "validation_ema": [],
        "best": None,
        "sessions": [],
        "wall_time": 0.0,
        "final_test": None,
    }


class _Loss(nn.Module):
    """The per-example objective as a module, so ``DistributedDataParallel`` can wrap it: the
    gradients of a loss are all-reduced only when its forward runs through the wrapper."""

    def __init__(self, model: nn.Module, data: Dataset) -> None:
        super().__init__()
        self.model, self.data = model, data

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return _objective(self.model, self.data, x, context)


def _shard_of(idx: Tensor, seed: int, stream: int, step: int, chunk: int | None = None) -> tuple[Tensor, list[int]]:
    """This rank's part of the global batch ``idx`` and the noise seeds of its examples.

    The part is the rank's contiguous slice of each consecutive ``chunk`` of positions
    (default: the whole batch is one chunk), so the ranks' ``i``-th micro-batches of
    ``chunk / world`` examples together are the ``i``-th micro-batch of one process.
    """
    size = max(1, len(idx) if chunk is None else chunk)
    positions: list[int] = []
    for start in range(0, len(idx), size):
        chunk_positions = range(start, min(start + size, len(idx)))
        positions += chunk_positions[distributed.shard(len(chunk_positions))]
    return idx[torch.tensor(positions, dtype=torch.long)], [example_seed(seed, stream, step, j) for j in positions]


class _Plan:
    """A batch sampler for a streaming loader: per step from ``start + 1`` to ``steps``, the
    ``(train position, noise seed)`` pairs of this rank's shard.

    It replays the trainer's :class:`_Sampler` from a copy of its state (and of its
    generator's), so the workers may read ahead while the trainer's own sampler, the one
    a checkpoint stores, advances one step at a time; the trainer checks that each batch it
    receives is the one its sampler drew.
    """

    def __init__(
        self, sampler: _Sampler, generator: torch.Generator, fit_idx: Tensor, seed: int, start: int, steps: int
    ) -> None:
        self.state, self.generator_state = sampler.state_dict(), generator.get_state()
        self.n, self.batch_size = sampler.n, sampler.batch_size
        self.fit_idx, self.seed, self.start, self.steps = fit_idx, seed, start, steps

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator()
        sampler = _Sampler(self.n, self.batch_size, generator)
        generator.set_state(self.generator_state)
        sampler.load_state_dict(self.state)
        for step in range(self.start + 1, self.steps + 1):
            local, seeds = _shard_of(self.fit_idx[sampler.next()], self.seed, _TRAIN, step)
            yield list(zip(local.tolist(), seeds))


def _check_fit(model: nn.Module, data: Dataset) -> None:
    """Refuse what would train but report a wrong number (bits/dim scored for other grey
    levels than the data's) or fail deep inside (data that is not a dataset)."""
    if not isinstance(data, Dataset):
        raise TypeError(
            f"train: data must be a flows Dataset (flows.data.load(name) makes one), got {type(data).__name__}"
        )
    if data.discrete and isinstance(model, Flow) and model.n_levels != data.n_levels:
        raise ValueError(
            f"train: the model scores bits/dim for n_levels={model.n_levels} grey levels but {data.name} "
            f"has {data.n_levels}; build it with n_levels={data.n_levels}"
        )


def _split(n: int, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """The training and validation indices of ``n`` training examples: a random split fixed by
    the seed alone (its own generator, so the batch order does not depend on it)."""
    held_out = config.validation_size(n)
    if held_out == 0:
        return torch.arange(n), torch.arange(0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    return perm[held_out:].sort().values, perm[:held_out].sort().values


class _Run:
    """The state of one training session and its steps (:func:`train` runs them in order)."""

    def __init__(self, model: nn.Module, data: Dataset, config: TrainConfig) -> None:
        _check_fit(model, data)
        self.fit_idx, self.val_idx = _split(len(data.train), config)
        if config.batch_size > len(self.fit_idx):
            held_out = f" ({len(self.val_idx)} more held out for validation)" if len(self.val_idx) else ""
            raise ValueError(
                f"train: batch_size {config.batch_size} exceeds the {len(self.fit_idx)} training examples{held_out}"
            )
        self.model, self.data, self.config = model, data, config
        self.train_context, _ = _contexts(model, data)  # checks the data fit a conditional model
        self.dtype = _float_dtype(model)
        self.out = Path(config.out_dir) if config.out_dir is not None else None
        self.file = self.out / CHECKPOINT if self.out is not None else None
        self.device = module_device(model)
        self.generator = torch.Generator().manual_seed(config.seed)
        # AdamW: Adam with decoupled weight decay (Adam's own flag for it needs torch >= 2.7),
        # plain Adam at weight_decay 0, with the fused update where the device has it.
        self.optimizer = adamw(model.parameters(), config.lr, config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule())
        self.scaler = grad_scaler(config.precision, self.device)  # a no-op scale unless fp16
        self.sampler = _Sampler(len(self.fit_idx), config.batch_size, self.generator)
        self.history = _new_history("bits/dim" if data.discrete else "nll")
        self.step = 0
        self.saved: int | None = None  # the step in checkpoint.pt, as this session knows it
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema: EMA | None = None  # started after the initialisation, or restored
        self._distribute()

    def _distribute(self) -> None:
        """Check the batch splits over the ranks and wrap the loss in DDP (a no-op in one process).

        Wrapped before the data-dependent initialisation: the wrapper's construction
        broadcasts rank 0's weights, so every rank initialises the same network.
        """
        world = distributed.world_size()
        if self.config.batch_size % world:
            raise ValueError(
                f"train: batch_size {self.config.batch_size} does not split over {world} processes; "
                f"give a multiple of {world} (each rank trains on batch_size / {world} examples of every batch)"
            )
        micro = self.config.init_micro_batch_size
        if not self.config.resume and micro % world:
            raise ValueError(
                f"train: init_micro_batch_size {micro} does not split over {world} processes; "
                f"give a multiple of {world}"
            )
        n_init = min(self.config.init_batch_size, len(self.fit_idx))
        if not self.config.resume and 0 < n_init % micro < world:
            # Each micro-batch is sharded over the ranks: a rank with none fails, the others wait.
            raise ValueError(
                f"train: the initialisation's {n_init} examples leave a last micro-batch of {n_init % micro}, "
                f"fewer than the {world} processes; give init_batch_size a multiple of "
                f"init_micro_batch_size ({micro})"
            )
        self.loss = distributed.wrap(_Loss(self.model, self.data), self.device)
        self.stream: Iterator[tuple[Tensor, Tensor]] | None = None  # a StreamingDataset's loader, in loop()

    def examples(self, idx: Tensor, stream: int, step: int, chunk: int | None = None) -> tuple[Tensor, Tensor]:
        """This rank's shard of the global batch ``idx`` (train positions), prepared, and its positions.

        Example ``j`` of the global batch is dequantized with the noise of
        ``example_seed(seed, stream, step, j)``, so a rank's shard holds exactly the values
        the same positions have in a single process (``chunk``: sharded micro-batch by
        micro-batch, :func:`_shard_of`). Training batches of a
        :class:`~flows.data.streaming.StreamingDataset` come from its loader's workers
        (:class:`_Plan` gives them the same positions and seeds).
        """
        local, seeds = _shard_of(idx, self.config.seed, stream, step, chunk)
        if stream == _TRAIN and self.stream is not None:
            x, read = next(self.stream)
            if not torch.equal(read, local):
                raise RuntimeError(f"the data loader's batch of step {step} is not the sampler's")
        else:
            x = prepare_examples(self.data, self.data.train[local], seeds)
        return x.to(self.device, self.dtype), local

    def _stream(self) -> Iterator[tuple[Tensor, Tensor]] | None:
        """The training batches of a :class:`~flows.data.streaming.StreamingDataset` from here
        to ``steps``, read by its loader's workers (``None`` for in-memory data)."""
        if not isinstance(self.data, StreamingDataset):
            return None
        plan = _Plan(self.sampler, self.generator, self.fit_idx, self.config.seed, self.step, self.config.steps)
        return iter(self.data.loader(plan, pin_memory=self.device.type == "cuda"))

    # -- starting -------------------------------------------------------------------------

    def start(self) -> None:
        """Restore from the checkpoint, or initialise and write the step-0 checkpoint (the state
        to roll back to if the first steps diverge)."""
        if self.out is not None and distributed.is_main():
            remove_stale_temporaries(self.out)
        if self.config.resume:
            self._restore()
        else:
            self._fresh()
        self.history.setdefault("sessions", []).append({"start_step": self.step, **self.config.settings()})
        if not self.config.resume:
            self.checkpoint(keep_previous=False)

    def _check_best(self) -> None:
        """Warn, on resume, when the run's ``best.pt`` cannot be read: nothing rewrites it until an
        evaluation beats the best recorded, and ``flows sample`` would refuse it meanwhile."""
        best = None if self.out is None else self.out / BEST
        if best is None or not best.is_file() or not distributed.is_main():
            return
        try:
            load_verified(best)
        except CheckpointError as error:
            warnings.warn(
                f"train: {error}; training goes on, and the first evaluation better than the best recorded "
                "replaces it (until then sample with --weights last)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _fresh(self) -> None:
        seed = self.config.seed
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        # Re-drawn after seeding, so the batch order depends on the seed alone.
        self.sampler = _Sampler(len(self.fit_idx), self.config.batch_size, self.generator)
        n_init = min(self.config.init_batch_size, len(self.fit_idx))
        idx = self.fit_idx[torch.randperm(len(self.fit_idx), generator=self.generator)[:n_init]]
        # Sharded micro-batch by micro-batch: with ActNorm's all-reduced moments, every layer
        # then sees in each micro-batch what it sees in one process.
        micro = self.config.init_micro_batch_size
        batch, idx = self.examples(idx, _INIT, 0, chunk=micro)
        context = _rows(self.train_context, idx, self.device, self.dtype)
        initialize(self.model, batch, context, micro // distributed.world_size())
        del batch, context  # the init batch is no longer needed while training
        if self.config.ema_decay is not None:
            self.ema = EMA(self.model, self.config.ema_decay)
        if self.out is not None and distributed.is_main():
            # A previous run's files in out_dir must never be rolled back to (nor sampled from).
            for name in (PREVIOUS, DIVERGED, BEST):
                (self.out / name).unlink(missing_ok=True)

    def _restore(self) -> None:
        assert self.file is not None
        state = load_checkpoint(self.file)
        self._check_best()
        start = int(state["step"])
        if self.config.steps < start:
            raise ValueError(
                f"train: steps={self.config.steps} is below the step {start} of the checkpoint {self.file}; "
                f"give steps >= {start}"
            )
        _check_resume(state, self.config.settings(), self.data)
        load_weights(self.model, state["model"], self.file)  # refuses weights of another model first
        pack_lu_checkpoint(self.model, state)  # one written before the LU factors were one parameter
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self._apply_settings()
        if self.config.ema_decay is not None:
            self.ema = EMA(self.model, self.config.ema_decay)
            if "ema" in state:  # else (averaging switched on at resume) it starts from the weights
                # A checkpoint from before the count was stored had at most one update per step.
                self.ema.load_state_dict(state["ema"], int(state.get("ema_updates", start)))
        # Histories of checkpoints written before validation and averaging get their lists.
        self.history = {**_new_history(state["history"]["metric"]), **state["history"]}
        self.sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"], self.generator)
        self.step = self.saved = start

    def _apply_settings(self) -> None:
        """Make the configured lr, schedule and weight decay hold after loading older states.

        The optimiser's and scheduler's state dicts carry their own base rate, warm-up and
        weight decay; without this a resumed run would silently keep the old ones. With
        unchanged settings every value is recomputed to the same float.
        """
        config, scheduler = self.config, self.scheduler
        groups = self.optimizer.param_groups
        scheduler.base_lrs = [float(config.lr)] * len(groups)
        scheduler.lr_lambdas = [self._schedule() for _ in groups]
        for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(scheduler.last_epoch)
            group["weight_decay"] = config.weight_decay
            # A checkpoint of the L2 era (Adam's own weight decay) resumes as AdamW.
            group["decoupled_weight_decay"] = True
            # A checkpoint's groups carry the update of the run that wrote them (torch's
            # default None, foreach or fused, maybe for another device): this run's applies.
            group.update({"fused": None, "foreach": None, **update_kernel(group["params"])})

    def _schedule(self) -> _Schedule:
        return _Schedule(self.config.warmup, self.config.schedule, self.config.steps)

    # -- checkpoints ----------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        """What any file of the run records: the step, the model and data it trained on, the settings."""
        data = self.data
        return {
            "format": _FORMAT,
            "step": self.step,
            "config": self.config.metadata or {},
            "data": {
                "name": data.name,
                "shape": list(data.shape),
                "n_levels": data.n_levels,
                "context": context_source(self.model, data),
                "sizes": [len(data.train), len(data.test)],
            },
            "train": self.config.settings(),
        }

    def state(self) -> dict[str, Any]:
        return {
            **self.provenance(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.generator),
            "sampler": self.sampler.state_dict(),
            "history": self.history,
            **({} if self.ema is None else {"ema": self.ema.state_dict(self.model), "ema_updates": self.ema.updates}),
            **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
        }

    def checkpoint(self, keep_previous: bool = True) -> None:
        """Write the checkpoint of the current step (the previous one is kept); rank 0 alone
        writes, once every rank has finished the step (the state is the same on all)."""
        if self.file is None or self.saved == self.step:
            return
        distributed.barrier()

        def write() -> None:
            save_checkpoint(self.state(), self.file, keep_previous=keep_previous)
            write_text(self.file.with_name(HISTORY), json.dumps(self.history, indent=1))

        self._write_on_main(write, self.file)
        self.saved = self.step

    def _write_on_main(self, write: Callable[[], None], file: Path) -> None:
        """Run ``write`` on rank 0 and share how it went: when it fails (a full disk) every rank
        raises the same one-line error, saying what is intact (the others would otherwise wait
        for rank 0 in their next collective)."""
        reason = None
        if distributed.is_main():
            try:
                write()
            except OSError as error:
                reason = error.strerror or str(error)
        reason = distributed.broadcast_object(reason)
        if reason is not None:
            kept = (
                f"the checkpoint of step {self.saved} there is intact"
                if self.saved is not None
                else "no checkpoint was written before"
            )
            raise CheckpointError(file, f"could not be written at step {self.step} ({reason}); {kept}")

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
        model, history = self.model, self.history
        model.train()
        x, idx = self.examples(self.fit_idx[self.sampler.next()], _TRAIN, step)
        # Backward runs inside the precision context too: a memory-saving rebuild recomputes
        # the networks as the forward pass ran them.
        with mixed_precision(model, self.config.precision, self.device):
            loss = self.loss(x, _rows(self.train_context, idx, self.device, self.dtype)).mean()
            # The global batch's mean (each rank's shard is an equal part of it); every rank
            # then takes the same decision on it.
            mean = distributed.all_reduce_sum(loss.detach().clone()) / distributed.world_size()
            if not torch.isfinite(mean):
                self.diverged("loss", step, mean.item())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # clip and check the true gradients
        max_norm = math.inf if self.config.clip is None else self.config.clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
            # (an fp16 scaler skips such a step itself and lowers its scale)
            self.optimizer.zero_grad(set_to_none=True)
            self.diverged("gradient norm", step, grad_norm.item())
        history["lr"].append(self.optimizer.param_groups[0]["lr"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        history["step"].append(step)
        history["train"].append(mean.item())
        history["grad_norm"].append(grad_norm.item())
        self.step = step
        return history["train"][-1]

    def diverged(self, what: str, step: int, value: float) -> None:
        # Rank 0 owns the files; every rank raises the same error.
        kept, kept_step, aside = distributed.broadcast_object(self.roll_back(step) if distributed.is_main() else None)
        raise NonFiniteLossError(what, step, value, kept, kept_step, aside)

    def loop(self) -> None:
        from tqdm import tqdm

        config, history = self.config, self.history
        steps = config.steps
        shown = config.progress and distributed.is_main()
        bar = tqdm(total=steps, initial=min(self.step, steps), disable=not shown, dynamic_ncols=True)
        self.stream = self._stream()
        began = time.perf_counter()
        try:
            with _deferred_interrupt() as interrupt:
                while self.step < steps:
                    loss = self.train_step()
                    step = self.step
                    stop = distributed.any_rank(interrupt.is_set())  # all ranks stop after the same step
                    postfix = {history["metric"]: f"{loss:.4f}"}
                    if history["test"]:
                        postfix["test"] = f"{history['test'][-1]:.4f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                    if step % config.eval_every == 0 or step == steps:
                        self.evaluate()
                    if step % config.checkpoint_every == 0 or step == steps or stop:
                        history["wall_time"] += time.perf_counter() - began
                        began = time.perf_counter()
                        self.checkpoint()
                    if stop:
                        raise Interrupted(step, self.file)
        finally:
            self.stream = None  # a loader's workers stop with their iterator
            bar.close()
            history["wall_time"] += time.perf_counter() - began

    # -- evaluation and the best weights ---------------------------------------------------

    def evaluate(self) -> None:
        """Evaluate the raw (and averaged) weights on the validation and test splits; keep the best."""
        history, batch = self.history, self.config.eval_batch_size
        candidates = [("raw", nullcontext())]
        if self.ema is not None:
            candidates.append(("ema", self.ema.applied(self.model)))
        history["test_step"].append(self.step)
        scores, tests = {}, {}
        for kind, weights in candidates:
            suffix = "" if kind == "raw" else "_ema"
            with weights:
                tests[kind] = evaluate(self.model, self.data, batch_size=batch)
                history["test" + suffix].append(tests[kind])
                if len(self.val_idx):
                    scores[kind] = evaluate(self.model, self.data, "train", batch, rows=self.val_idx)
                    history["validation" + suffix].append(scores[kind])
        scores = {kind: score for kind, score in scores.items() if math.isfinite(score)}  # NaN never wins
        if not scores:
            return
        kind = min(scores, key=scores.__getitem__)  # raw first: a tie keeps the raw weights
        best = history["best"]
        # A best recorded as NaN (by a version that kept one) is no best.
        if best is None or not math.isfinite(best["validation"]) or scores[kind] < best["validation"]:
            history["best"] = {"step": self.step, "weights": kind, "validation": scores[kind], "test": tests[kind]}
            self.write_best()

    def write_best(self) -> None:
        """Write ``best.pt``: the weights ``history["best"]`` names, with the run's config
        (rank 0 writes; every rank calls this, as every rank takes the same decisions)."""
        if self.out is None:
            return
        best = self.history["best"]

        def write() -> None:
            weights = self.ema.state_dict(self.model) if best["weights"] == "ema" else self.model.state_dict()
            payload = {**self.provenance(), "model": weights, "best": dict(best, metric=self.history["metric"])}
            save_checkpoint(payload, self.out / BEST, keep_previous=False)

        self._write_on_main(write, self.out / BEST)

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
    Adam (decoupled weight decay), a linear learning-rate warm-up then a constant or cosine
    rate, and gradient-norm clipping, over the training examples outside the validation
    split. A conditional model
    minimises ``-log p(x | c)`` with each example's context (the dataset's float context, or
    its class labels for a ``num_classes=K`` model; :func:`context_source`). Before the first step,
    :func:`initialize` runs the data-dependent initialisation on ``init_batch_size``
    training examples, ``init_micro_batch_size`` at a time. The validation and test splits
    are evaluated every ``eval_every`` steps and at the end, with the raw weights and (with
    ``ema_decay``) their moving average; the best of them on validation go to ``best.pt``.

    In a multi-process run (a default process group is initialised, e.g. by
    :func:`flows.distributed.process_group` under ``torchrun``) every rank calls ``train``
    with the same arguments: each trains on its contiguous shard of every global batch of
    ``batch_size`` examples inside ``DistributedDataParallel``, rank 0 alone shows the
    progress bar and writes the files, evaluations are sharded and reduced, and the
    result, as the checkpoints, is that of one process on the same global batches (noise
    keyed per example, :func:`flows.data.streaming.prepare_examples`), so a checkpoint
    resumes at any world size.

    Args:
        model: a :class:`~flows.models.Flow` on the device to train on.
        data: the dataset (see :func:`flows.data.load`).
        config: the settings (:class:`TrainConfig`).

    Returns:
        The history: ``metric`` (``"bits/dim"`` or ``"nll"``), per-step lists ``step``,
        ``train`` (the loss), ``lr`` and ``grad_norm``; ``test_step`` and ``test`` for the
        evaluations, with ``validation`` (empty without a split), ``test_ema`` and
        ``validation_ema`` (empty without ``ema_decay``) beside them; ``best`` (``step``,
        ``weights``: ``"raw"`` or ``"ema"``, ``validation`` and ``test``, their scores;
        ``None`` without a split);
        ``sessions`` (the step each session started at, with its settings);
        ``wall_time`` in seconds (summed over resumed sessions) and ``final_test``.

    Raises:
        NonFiniteLossError: a loss or gradient norm was NaN or infinite; that step was not
            applied, and the checkpoint to resume from is named.
        Interrupted: Ctrl-C; the completed steps are in the checkpoint.
        FileNotFoundError: ``resume=True`` but ``out_dir`` holds no checkpoint.
        ValueError: a setting does not fit the data (or ``batch_size`` does not split
            over the ranks), the model's ``n_levels`` is not the discrete data's (its
            bits/dim would be wrong), or the model is conditional and the data have no
            context (labels) for it.
        TypeError: ``data`` is not a :class:`~flows.data.Dataset`.
        RuntimeError: ``torchrun`` started this process but no process group is initialised.
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
    distributed.check_launch("train")
    run = _Run(model, data, config)
    run.start()
    if config.compile:
        compile_regions(model, unit=UNITS[0] if config.compile is True else config.compile)
    run.loop()
    return run.finish()


def _check_resume(state: dict[str, Any], settings: dict[str, Any], data: Dataset) -> None:
    if state["data"]["name"] != data.name or tuple(state["data"]["shape"]) != tuple(data.shape):
        raise ValueError(
            f"train: the checkpoint was trained on {state['data']['name']!r} "
            f"{tuple(state['data']['shape'])}, not on {data.name!r} {tuple(data.shape)}"
        )
    sizes = state["data"].get("sizes")  # absent from checkpoints written before it was recorded
    if sizes is not None and list(sizes) != [len(data.train), len(data.test)]:
        raise ValueError(
            f"train: the checkpoint was trained on {data.name!r} with {sizes[0]} training and {sizes[1]} test "
            f"examples; it now has {len(data.train)} and {len(data.test)}, which would redraw the validation "
            "split and the batch order (training on examples held out before); resume on the same data, or "
            "start a new run"
        )
    stored = {**LEGACY_SETTINGS, **state["train"]}
    if stored["validation"] != settings["validation"]:
        raise ValueError(
            f"train: validation={settings['validation']!r} differs from the checkpoint's "
            f"({stored['validation']!r}): the split decides which examples the batches come from; "
            f"resume with validation={stored['validation']!r} (--validation {stored['validation']})"
        )
    if stored["validation"] and stored.get("seed", settings["seed"]) != settings["seed"]:
        raise ValueError(
            f"train: seed={settings['seed']!r} differs from the checkpoint's ({stored['seed']!r}): the seed draws "
            f"the validation split, and another would validate on examples the run trained on; resume with "
            f"seed={stored['seed']!r} (--seed {stored['seed']})"
        )
    if not settings["weight_decay"] and not stored["weight_decay"]:
        stored["decoupled_weight_decay"] = True  # without decay, Adam's L2 and AdamW are one optimiser
    if stored["ema_decay"] is None or settings["ema_decay"] is None:
        stored["ema_warmup"] = True  # no stored average goes on: the warm-up changes none
    changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        note = " (without a validation split the seed only applies to a fresh start)" if "seed" in changed else ""
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
