"""The cost and the saving of memory-saving backward, measured on one training step.

:func:`step_benchmark` times a training step of a model (zero the gradients, the loss
``-log_prob(x).mean()``, backward, the trainer's Adam update, :func:`flows.optimizer.adamw`)
with ordinary autograd, with memory-saving backward (``model.memory_saving = True``) and with activation checkpointing
(:func:`checkpointed`: ``torch.utils.checkpoint`` around each block of the model's
chain, the baseline memory-saving backward is usually compared with), and reports per
row the median step time, the first step's time, the bytes autograd keeps for backward
(:func:`flows.saved_bytes`) and, on CUDA, the step's peak of allocated memory; and, once,
how far the memory-saving gradients are from the ordinary ones. Optional rows: the two
backward modes with regional compilation (:func:`flows.compiling.compile_regions`; the
first step then includes compiling) and in mixed precision (:mod:`flows.precision`, with
the gradients' agreement with float32). ``flows bench`` runs it on a model built from the
command line.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flows.compiling import UNITS, compile_regions
from flows.diagnostics import saved_bytes
from flows.memory import memory_saving, module_device
from flows.optimizer import adamw
from flows.parity import gradient_parity
from flows.precision import Agreement, autocast_dtype, gradient_agreement, mixed_precision
from flows.training import initialize
from flows.transforms.base import Bijector
from flows.transforms.chain import Chain
from flows.transforms.switches import frozen_updates

ORDINARY = "ordinary"
SAVING = "memory-saving"
CHECKPOINTED = "checkpointed"
MODES = (ORDINARY, SAVING, CHECKPOINTED)
"""The backward modes, in the order they are measured and reported."""

MIB = 2**20
# Small, so the copy stays near the user's parameters over the benchmark's few steps; the
# cost of an Adam step does not depend on it.
_LR = 1e-4


class Checkpointed(Bijector):
    """``block`` under activation checkpointing: ``y, logdet = block(x)`` (same math).

    Under grad the forward runs inside :func:`torch.utils.checkpoint.checkpoint`
    (``use_reentrant=False``): autograd keeps only the block's input, and backward reruns
    the block's forward (with the random state of the forward pass, and per-step state
    frozen, :func:`~flows.transforms.switches.frozen_updates`) before differentiating it.
    Memory then grows with the number of checkpointed blocks (one input each), where
    memory-saving backward keeps only the chain's output.

    Args:
        block: the bijector to checkpoint.
    """

    def __init__(self, block: Bijector) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not torch.is_grad_enabled():
            return self.block(x, context)
        return checkpoint(
            self.block, x, context, use_reentrant=False, context_fn=lambda: (nullcontext(), _Frozen())
        )

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.block.inverse(y, context)


class _Frozen:
    """:func:`~flows.transforms.switches.frozen_updates` as a context that can be entered
    again: a checkpoint may recompute more than once (a block whose forward differentiates
    itself, as i-ResNet's log-det does)."""

    def __init__(self) -> None:
        self._entered: list[AbstractContextManager[None]] = []

    def __enter__(self) -> None:
        self._entered.append(frozen_updates())
        self._entered[-1].__enter__()

    def __exit__(self, *exc: object) -> None:
        self._entered.pop().__exit__(*exc)


def checkpointed(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with each block of its outermost chain :class:`Checkpointed`
    (each step of flow of a Glow, with its squeezes and splits), ordinary backward.

    Raises:
        ValueError: ``model`` holds no chain.

    Example:
        >>> import torch
        >>> from flows.models import Glow
        >>> model = Glow((1, 4, 4), levels=1, steps=2, hidden_channels=4)
        >>> x = torch.rand(2, 1, 4, 4)
        >>> torch.allclose(checkpointed(model).log_prob(x), model.log_prob(x))
        True
    """
    copy_ = copy.deepcopy(model)
    outer = next((m for m in copy_.modules() if isinstance(m, Chain)), None)
    if outer is None:
        raise ValueError(f"checkpointed: {type(model).__name__} holds no Chain whose blocks to checkpoint")
    for chain in (m for m in copy_.modules() if isinstance(m, Chain)):
        chain.memory_saving = False  # ordinary autograd inside each checkpoint
    for i, block in enumerate(outer.blocks):
        outer.blocks[i] = Checkpointed(block)
    return copy_


@dataclass(frozen=True)
class Variant:
    """One way to run the training step: a backward mode, compiled or not, a precision."""

    mode: str
    compiled: bool = False
    precision: str = "fp32"

    @property
    def label(self) -> str:
        """E.g. ``"memory-saving, compiled"`` or ``"ordinary, bf16"``."""
        return ", ".join([self.mode] + ["compiled"] * self.compiled + [self.precision] * (self.precision != "fp32"))


@dataclass
class StepRow:
    """What one variant of the step costs.

    Attributes:
        mode: ``"ordinary"``, ``"memory-saving"`` or ``"checkpointed"``.
        wall_ms: median wall time of one step in milliseconds (on CUDA the device is
            synchronised before each reading of the clock).
        cpu_ms: median CPU time of the process (``time.process_time``, all threads) during
            one step, in milliseconds; ``None`` on CUDA.
        kept_bytes: bytes autograd keeps for backward once the loss is built
            (:func:`flows.saved_bytes`, parameters excluded); device-independent.
        peak_cuda_bytes: the largest increase of allocated CUDA memory during a step over
            what was allocated when it began, the maximum over the timed steps; ``None`` off
            CUDA. Parameters, Adam's state, the batch (and the caller's model) are in that
            baseline, as are the previous step's gradients, which the step frees before
            backward rebuilds them: the increase is what the step's activations and
            temporaries need.
        first_step_s: wall seconds of the row's first step (compiling included for a
            compiled row).
        compiled: the regions ran compiled (:func:`flows.compiling.compile_regions`: steps of flow).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:mod:`flows.precision`).
    """

    mode: str
    wall_ms: float
    cpu_ms: float | None
    kept_bytes: int
    peak_cuda_bytes: int | None
    first_step_s: float = 0.0
    compiled: bool = False
    precision: str = "fp32"

    @property
    def label(self) -> str:
        return Variant(self.mode, self.compiled, self.precision).label


@dataclass
class StepBenchmark:
    """What :func:`step_benchmark` measured.

    Attributes:
        rows: one :class:`StepRow` per variant: ordinary, memory-saving, checkpointed;
            then the compiled and the mixed-precision ones asked for.
        gradient_error: :func:`flows.parity.gradient_parity`'s error on ``x`` for the loss
            ``-log_prob(x).mean()``: ``max |g_saving - g_ordinary| / max |g_ordinary|`` over
            all parameter gradient entries, with the same parameters, frozen power
            iterations and the same random numbers in both modes (the number ``flows.check``,
            the tests and the experiments report too).
        device: the device the model ran on.
        repeats: timed steps per mode.
        warmup: untimed steps per mode before them.
        agreement: for a mixed-precision run, its gradients against float32 ones
            (:func:`flows.precision.gradient_agreement`); ``None`` otherwise.
        compile_unit: the :func:`~flows.compiling.compile_regions` unit of the compiled
            rows; ``None`` without them.
    """

    rows: list[StepRow]
    gradient_error: float
    device: torch.device
    repeats: int
    warmup: int
    agreement: Agreement | None = None
    compile_unit: str | None = None

    def row(self, mode: str, compiled: bool = False, precision: str = "fp32") -> StepRow:
        """The row of ``mode`` (``"ordinary"``, ``"memory-saving"`` or ``"checkpointed"``),
        compiled or not, in ``precision``."""
        for r in self.rows:
            if (r.mode, r.compiled, r.precision) == (mode, compiled, precision):
                return r
        labels = ", ".join(repr(r.label) for r in self.rows)
        raise KeyError(f"StepBenchmark: no row {Variant(mode, compiled, precision).label!r}; rows are {labels}")

    def has(self, mode: str, compiled: bool = False, precision: str = "fp32") -> bool:
        """Whether a row of that variant was measured."""
        return any((r.mode, r.compiled, r.precision) == (mode, compiled, precision) for r in self.rows)

    @property
    def time_ratio(self) -> float:
        """Median wall time of a memory-saving step over that of an ordinary one."""
        return self.row(SAVING).wall_ms / self.row(ORDINARY).wall_ms

    @property
    def cpu_ratio(self) -> float | None:
        """The same ratio of median CPU times; ``None`` on CUDA."""
        saving, ordinary = self.row(SAVING).cpu_ms, self.row(ORDINARY).cpu_ms
        if saving is None or ordinary is None:
            return None
        return saving / max(ordinary, 1e-9)

    @property
    def memory_ratio(self) -> float:
        """Bytes kept for backward, memory-saving over ordinary."""
        return self.row(SAVING).kept_bytes / max(self.row(ORDINARY).kept_bytes, 1)

    @property
    def peak_ratio(self) -> float | None:
        """Peak CUDA memory of a step, memory-saving over ordinary; ``None`` off CUDA."""
        saving, ordinary = self.row(SAVING).peak_cuda_bytes, self.row(ORDINARY).peak_cuda_bytes
        if saving is None or ordinary is None:
            return None
        return saving / max(ordinary, 1)

    def ratio(self, mode: str, over: str = ORDINARY, compiled: bool = False, precision: str = "fp32") -> float:
        """Median wall time of ``mode`` over that of ``over``, both in the same variant."""
        return self.row(mode, compiled, precision).wall_ms / self.row(over, compiled, precision).wall_ms

    def table(self) -> str:
        """A markdown table, one line per row; the CPU column only on CPU, the CUDA one only on CUDA."""
        cpu = all(r.cpu_ms is not None for r in self.rows)
        cuda = all(r.peak_cuda_bytes is not None for r in self.rows)
        header = ["mode", "step ms (wall)"]
        header += ["CPU ms"] if cpu else []
        header += ["kept for backward (MiB)"]
        header += ["peak CUDA MiB"] if cuda else []
        header += ["first step (s)"]
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for r in self.rows:
            cells = [r.label, f"{r.wall_ms:.1f}"]
            cells += [f"{r.cpu_ms:.1f}"] if r.cpu_ms is not None else []
            cells += [f"{r.kept_bytes / MIB:.2f}"]
            cells += [f"{r.peak_cuda_bytes / MIB:.1f}"] if r.peak_cuda_bytes is not None else []
            cells += [f"{r.first_step_s:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        """The ratios, the gradient parity and agreement, one line each."""
        time_part = f"time {self.time_ratio:.2f}x"
        if self.cpu_ratio is not None:
            time_part += f" (CPU {self.cpu_ratio:.2f}x)"
        memory_part = f"kept for backward {self.memory_ratio:.3f}x"
        if self.peak_ratio is not None:
            memory_part += f", peak CUDA {self.peak_ratio:.3f}x"
        lines = [f"memory-saving / ordinary: {time_part}, {memory_part}"]
        if self.has(CHECKPOINTED):
            kept = self.row(CHECKPOINTED).kept_bytes / max(self.row(ORDINARY).kept_bytes, 1)
            lines.append(
                f"checkpointed / ordinary: time {self.ratio(CHECKPOINTED):.2f}x, kept for backward {kept:.3f}x; "
                f"memory-saving / checkpointed: time {self.ratio(SAVING, CHECKPOINTED):.2f}x"
            )
        if self.has(SAVING, compiled=True):
            lines.append(
                f"compiled (unit {self.compile_unit}): "
                f"memory-saving / ordinary {self.ratio(SAVING, compiled=True):.2f}x; "
                f"compiled / eager: ordinary {self.row(ORDINARY, True).wall_ms / self.row(ORDINARY).wall_ms:.2f}x, "
                f"memory-saving {self.row(SAVING, True).wall_ms / self.row(SAVING).wall_ms:.2f}x"
            )
        lines.append(
            f"gradient parity: {self.gradient_error:.1e} "
            "(max |memory-saving - ordinary| over parameter gradients / largest gradient)"
        )
        if self.agreement is not None:
            precision = next(r.precision for r in self.rows if r.precision != "fp32")
            lines.append(
                f"{precision} gradients against float32: relative error {self.agreement.relative_error:.2e}, "
                f"cosine {self.agreement.cosine:.6f} (worst: {self.agreement.worst})"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table()}\n\n{self.summary()}"


def step_benchmark(
    model: nn.Module,
    x: Tensor,
    repeats: int = 5,
    warmup: int = 1,
    compiled: bool = False,
    precision: str = "fp32",
    compile_options: dict[str, Any] | None = None,
) -> StepBenchmark:
    """Time a training step with ordinary, memory-saving and checkpointed backward.

    A step is: zero the gradients, ``loss = -model.log_prob(x).mean()``, ``loss.backward()``,
    an Adam step as :func:`flows.train` takes it (:func:`flows.optimizer.adamw`). After
    ``warmup`` untimed steps per row, the rows alternate step by step (ordinary,
    memory-saving, checkpointed, ...) for ``repeats`` timed steps each, so a noisy machine
    slows all alike; each row reports its medians. The bytes kept for backward are counted
    once per row with :func:`flows.saved_bytes` after the steps, and the gradient parity
    (:func:`flows.parity.gradient_parity`) once, on ``x`` before any optimiser step.

    The benchmark runs on deep copies of ``model`` (one per kind of row: eager, compiled,
    checkpointed, each with gradients and Adam's state, for the duration): the copies are
    put in training mode, get the data-dependent initialisation
    (:func:`flows.training.initialize` on ``x``; nothing happens if ``model`` had it
    already) and are trained by the timed steps. ``model`` itself, its ``memory_saving``
    switch and the global random state are left as they were.

    Args:
        model: a :class:`~flows.models.Flow` (anything with ``log_prob`` and a settable
            ``memory_saving``) containing at least one :class:`~flows.transforms.Chain`.
        x: a batch of model inputs ``(B, *input_shape)`` (dequantized for image data),
            moved to the model's device.
        repeats: timed steps per row, at least 1.
        warmup: untimed steps per row before the timed ones, at least 0 (the first step
            of a process pays one-time costs: lazy imports, allocator growth, compiling).
        compiled: add ordinary and memory-saving rows with regional compilation
            (:func:`flows.compiling.compile_regions`).
        precision: ``"bf16"`` or ``"fp16"`` adds ordinary and memory-saving rows in that
            precision (:func:`flows.precision.mixed_precision`) and their gradients'
            agreement with float32.
        compile_options: passed to :func:`~flows.compiling.compile_regions`: its ``unit``
            (``{"unit": "model"}``) and :func:`torch.compile`'s options (e.g.
            ``{"backend": "aot_eager"}``).

    Returns:
        The :class:`StepBenchmark`: a row per variant, the gradient parity and the settings.

    Raises:
        ValueError: ``repeats < 1``, ``warmup < 0``, an unknown precision (or fp16 off
            CUDA), or the model has no chain to switch.

    Example:
        >>> import torch
        >>> from flows.models import Glow
        >>> model = Glow((1, 4, 4), levels=1, steps=2, hidden_channels=4)
        >>> report = step_benchmark(model, torch.rand(8, 1, 4, 4), repeats=1, warmup=0)
        >>> [row.mode for row in report.rows]
        ['ordinary', 'memory-saving', 'checkpointed']
        >>> report.row("memory-saving").kept_bytes < report.row("checkpointed").kept_bytes
        True
        >>> report.gradient_error < 1e-4
        True
    """
    if repeats < 1:
        raise ValueError(f"step_benchmark: repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"step_benchmark: warmup must be at least 0, got {warmup}")
    device = module_device(model)
    autocast_dtype(precision, device)
    cuda = device.type == "cuda"
    bench = copy.deepcopy(model)
    x = x.to(device)
    with torch.random.fork_rng(devices=[device] if cuda else []):
        initialize(bench, x)
        gradient_error = gradient_parity(bench, x).error
        agreement = gradient_agreement(bench, x, precision) if precision != "fp32" else None
        variants: dict[Variant, nn.Module] = {Variant(ORDINARY): bench, Variant(SAVING): bench}
        variants[Variant(CHECKPOINTED)] = checkpointed(bench)
        if compiled:
            regional = compile_regions(copy.deepcopy(bench), **(compile_options or {}))
            variants[Variant(ORDINARY, True)] = variants[Variant(SAVING, True)] = regional
        if precision != "fp32":
            variants[Variant(ORDINARY, False, precision)] = variants[Variant(SAVING, False, precision)] = bench
        optimizers = {id(m): adamw(m.parameters(), _LR, 0.0) for m in variants.values()}
        wall: dict[Variant, list[float]] = {v: [] for v in variants}
        cpu: dict[Variant, list[float]] = {v: [] for v in variants}
        peak: dict[Variant, list[int]] = {v: [] for v in variants}
        first: dict[Variant, float] = {}
        for rep in range(warmup + repeats):
            for variant, module in variants.items():
                with _running(module, variant, device):
                    seconds, cpu_seconds, peak_bytes = _timed_step(module, x, optimizers[id(module)], device)
                first.setdefault(variant, seconds)
                if rep >= warmup:
                    wall[variant].append(seconds)
                    cpu[variant].append(cpu_seconds)
                    if peak_bytes is not None:
                        peak[variant].append(peak_bytes)
        kept: dict[Variant, int] = {}
        for variant, module in variants.items():
            with _running(module, variant, device):
                kept[variant] = saved_bytes(lambda m=module: -m.log_prob(x).mean(), exclude=module)
    rows = [
        StepRow(
            mode=v.mode,
            wall_ms=1000.0 * statistics.median(wall[v]),
            cpu_ms=None if cuda else 1000.0 * statistics.median(cpu[v]),
            kept_bytes=kept[v],
            peak_cuda_bytes=max(peak[v]) if cuda else None,
            first_step_s=first[v],
            compiled=v.compiled,
            precision=v.precision,
        )
        for v in variants
    ]
    unit = (compile_options or {}).get("unit", UNITS[0]) if compiled else None
    return StepBenchmark(rows, gradient_error, device, repeats, warmup, agreement, unit)


@contextmanager
def _running(module: nn.Module, variant: Variant, device: torch.device) -> Iterator[None]:
    """``module`` switched to the variant's backward mode and precision for the body."""
    with memory_saving(module, variant.mode == SAVING), mixed_precision(module, variant.precision, device):
        yield


def _timed_step(
    model: nn.Module, x: Tensor, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[float, float, int | None]:
    """One training step: wall seconds, process CPU seconds, CUDA peak increase (or None)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    began_cpu, began_wall = time.process_time(), time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = -model.log_prob(x).mean()
    loss.backward()
    optimizer.step()
    if cuda:
        # Kernels run asynchronously: without this the clock would stop at their launch.
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - began_wall, time.process_time() - began_cpu
    peak = torch.cuda.max_memory_allocated(device) - baseline if cuda else None
    return seconds, cpu_seconds, peak
