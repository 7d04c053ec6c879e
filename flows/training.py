"""Maximum-likelihood training of flows, with exact resume and atomic checkpoints.

:func:`train` runs Adam with a linear learning-rate warm-up and gradient-norm clipping,
shows a progress bar with the live loss, evaluates on the test split every
``eval_every`` steps, and writes ``checkpoint.pt`` (and ``history.json``) atomically into
``out_dir``. A checkpoint holds everything the next step depends on: model, optimiser and
scheduler state, the step, the batch sampler's position, and the torch / numpy / python
random states. Resuming from it therefore produces bit-for-bit the loss sequence an
uninterrupted run would have (on the same machine, thread count and torch version).

For discrete data (images) the loss is the bits/dim of a uniformly dequantized batch
(``model.bits_per_dim``); for continuous data (2D toys) it is the negative
log-likelihood in nats.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flows.data.dataset import Dataset

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
_FORMAT = "flows-checkpoint-1"


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss (or gradient norm) and stopped.

    The step that produced it was not applied, and the last checkpoint (if any) is
    untouched.

    Attributes:
        step: the step (1-based) whose loss or gradient was not finite.
        checkpoint: the last good checkpoint file, or ``None`` when none was written.
        checkpoint_step: the step stored in that checkpoint, or ``None``.
    """

    def __init__(
        self,
        what: str,
        step: int,
        value: float,
        checkpoint: Path | None,
        checkpoint_step: int | None,
    ) -> None:
        self.step = step
        self.checkpoint = checkpoint
        self.checkpoint_step = checkpoint_step
        if checkpoint is not None:
            kept = f"The last good checkpoint {checkpoint} (step {checkpoint_step}) is intact"
        else:
            kept = "No checkpoint was written before it"
        super().__init__(
            f"non-finite {what} ({value}) at step {step}; training stopped without applying "
            f"that step. {kept}. Try a lower learning rate, a longer warm-up or a smaller "
            "gradient-clipping norm."
        )


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    Readers of ``path`` see either the old file or the complete new one, never a partial
    write (``os.replace`` is atomic on one file system). On an exception the temporary
    file is removed and ``path`` is left as it was.

    Args:
        path: the destination file.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a checkpoint dict atomically (temporary file, fsync, ``os.replace``).

    Args:
        state: the checkpoint contents (tensors, dicts, lists and Python scalars).
        path: the destination file.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train`.

    Loading uses ``weights_only=True``: checkpoints hold only tensors and plain Python
    containers, so no code runs on load.

    Args:
        path: the checkpoint file, or a run directory holding ``checkpoint.pt``.
        map_location: where to put the tensors.

    Returns:
        The checkpoint dict (keys ``model``, ``optimizer``, ``scheduler``, ``step``,
        ``config``, ``data``, ``train``, ``rng``, ``sampler``, ``history``).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the file is not a flows checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a flows training checkpoint")
    return state


def initialize(model: nn.Module, batch: Tensor) -> None:
    """Run the data-dependent initialisation (ActNorm) on one batch, without gradients.

    Calls ``model.log_prob(batch)`` in training mode under ``torch.no_grad()``, so every
    ``ActNorm`` sets its bias and scale from a large batch (e.g. 512 examples) before the
    first optimisation step, instead of from the first small training batch.

    Args:
        model: a :class:`~flows.models.Flow`.
        batch: model inputs ``(B, *input_shape)`` (dequantized for image data).
    """
    model.train()
    with torch.no_grad():
        model.log_prob(batch)


def _objective(model: nn.Module, data: Dataset, x: Tensor) -> Tensor:
    """Per-example loss: bits/dim for discrete data, NLL in nats for continuous data."""
    if data.discrete:
        return model.bits_per_dim(x)
    return -model.log_prob(x)


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
    random state is restored afterwards, so evaluating never changes a training run.

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
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with _fork_rng(device), torch.no_grad():
            for start in range(0, len(examples), batch_size):
                x = data.prepare(examples[start : start + batch_size], generator=generator)
                total += _objective(model, data, x.to(device)).double().sum().item()
    finally:
        model.train(was_training)
    return total / len(examples)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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
    np.random.set_state(
        ("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
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


def train(
    model: nn.Module,
    data: Dataset,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    clip: float | None = 50.0,
    eval_every: int = 500,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    checkpoint_every: int | None = None,
    init_batch_size: int = 512,
    eval_batch_size: int = 500,
    weight_decay: float = 0.0,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit a flow by maximum likelihood.

    Each step draws a batch (shuffled epochs, without replacement), dequantizes it for
    discrete data, minimises the mean bits/dim (discrete) or NLL in nats (continuous) with
    Adam, a linear learning-rate warm-up over ``warmup`` steps and gradient-norm clipping
    at ``clip``. Before the first step, :func:`initialize` runs the data-dependent
    initialisation on ``init_batch_size`` training examples. The test split is evaluated
    every ``eval_every`` steps and at the end.

    Args:
        model: a :class:`~flows.models.Flow` on the device to train on.
        data: the dataset (see :func:`flows.data.load`).
        steps: the total number of optimisation steps (a resumed run continues up to it).
        batch_size: examples per step.
        lr: Adam's learning rate after warm-up.
        warmup: the number of warm-up steps (0 for none).
        clip: the maximum gradient norm, or ``None`` for no clipping.
        eval_every: steps between test evaluations.
        out_dir: directory for ``checkpoint.pt`` and ``history.json``; ``None`` writes
            nothing.
        resume: continue from ``out_dir/checkpoint.pt`` (model, optimiser, scheduler,
            sampler and random states), reproducing the uninterrupted run exactly.
        seed: seeds the batch order, the dequantization noise and, at a fresh start, the
            global torch / numpy / python generators.
        progress: show a tqdm progress bar with the live loss.
        checkpoint_every: steps between checkpoints (default ``eval_every``); a
            checkpoint is always written after the last step.
        init_batch_size: examples for the data-dependent initialisation.
        eval_batch_size: examples per forward pass during evaluation.
        weight_decay: Adam's L2 penalty.
        config: JSON-like description stored in the checkpoint (e.g. the model name and
            builder arguments, so the command line can rebuild the model).

    Returns:
        The history: ``metric`` (``"bits/dim"`` or ``"nll"``), per-step lists ``step``,
        ``train`` (the loss), ``lr`` and ``grad_norm``; ``test_step`` and ``test`` for the
        evaluations; ``wall_time`` in seconds (summed over resumed sessions) and
        ``final_test``.

    Raises:
        NonFiniteLossError: a loss or gradient norm was NaN or infinite; that step was not
            applied and the last checkpoint is intact.
        FileNotFoundError: ``resume=True`` but ``out_dir`` holds no checkpoint.
    """
    if steps < 0 or batch_size < 1 or eval_every < 1:
        raise ValueError(
            f"train: need steps >= 0, batch_size >= 1, eval_every >= 1; got {steps}, "
            f"{batch_size}, {eval_every}"
        )
    if batch_size > len(data.train):
        raise ValueError(
            f"train: batch_size {batch_size} exceeds the {len(data.train)} training examples"
        )
    if resume and out_dir is None:
        raise ValueError("train: resume=True needs out_dir")
    checkpoint_every = checkpoint_every or eval_every
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT if out is not None else None
    device = _device(model)
    hyper = {
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "clip": clip,
        "seed": seed,
        "weight_decay": weight_decay,
    }

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LinearWarmup(warmup))
    history: dict[str, Any] = {
        "metric": "bits/dim" if data.discrete else "nll",
        "step": [],
        "train": [],
        "lr": [],
        "grad_norm": [],
        "test_step": [],
        "test": [],
        "wall_time": 0.0,
        "final_test": None,
    }

    if resume:
        assert ckpt_path is not None
        state = load_checkpoint(ckpt_path, map_location=device)
        _check_resume(state, hyper, data)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        sampler = _Sampler(len(data.train), batch_size, generator)
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"], generator)
        start = int(state["step"])
        last_saved: int | None = start
    else:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        sampler = _Sampler(len(data.train), batch_size, generator)
        n_init = min(init_batch_size, len(data.train))
        init_idx = torch.randperm(len(data.train), generator=generator)[:n_init]
        initialize(model, data.prepare(data.train[init_idx], generator=generator).to(device))
        start, last_saved = 0, None

    def checkpoint(step: int) -> None:
        nonlocal last_saved
        if out is None or ckpt_path is None:
            return
        state = {
            "format": _FORMAT,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": config or {},
            "data": {"name": data.name, "shape": list(data.shape), "n_levels": data.n_levels},
            "train": hyper,
            "rng": _rng_state(generator),
            "sampler": sampler.state_dict(),
            "history": history,
        }
        save_checkpoint(state, ckpt_path)
        with atomic_path(out / HISTORY) as tmp:
            tmp.write_text(json.dumps(history, indent=1))
        last_saved = step

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=min(start, steps), disable=not progress, dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = math.inf if clip is None else clip
    began = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            model.train()
            x = data.prepare(data.train[sampler.next()], generator=generator).to(device)
            loss = _objective(model, data, x).mean()
            if not torch.isfinite(loss):
                raise NonFiniteLossError("loss", step, loss.item(), ckpt_path, last_saved)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    "gradient norm", step, grad_norm.item(), ckpt_path, last_saved
                )
            history["lr"].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            history["step"].append(step)
            history["train"].append(loss.item())
            history["grad_norm"].append(grad_norm.item())
            postfix = {history["metric"]: f"{loss.item():.4f}"}
            if history["test"]:
                postfix["test"] = f"{history['test'][-1]:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                history["test_step"].append(step)
                history["test"].append(evaluate(model, data, batch_size=eval_batch_size))
            if step % checkpoint_every == 0 or step == steps:
                history["wall_time"] += time.perf_counter() - began
                began = time.perf_counter()
                checkpoint(step)
    finally:
        bar.close()
    history["wall_time"] += time.perf_counter() - began
    if history["test"] and history["test_step"][-1] == steps:
        history["final_test"] = history["test"][-1]
    else:
        history["final_test"] = evaluate(model, data, batch_size=eval_batch_size)
    return history


def _check_resume(state: dict[str, Any], hyper: dict[str, Any], data: Dataset) -> None:
    if state["data"]["name"] != data.name or tuple(state["data"]["shape"]) != tuple(data.shape):
        raise ValueError(
            f"train: the checkpoint was trained on {state['data']['name']!r} "
            f"{tuple(state['data']['shape'])}, not on {data.name!r} {tuple(data.shape)}"
        )
    changed = {
        k: (state["train"].get(k), v) for k, v in hyper.items() if state["train"].get(k) != v
    }
    if changed:
        detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        warnings.warn(
            f"train: resuming with changed settings ({detail}); the run will not match an "
            "uninterrupted one",
            RuntimeWarning,
            stacklevel=3,
        )
