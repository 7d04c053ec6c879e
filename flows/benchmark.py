"""The cost and the saving of memory-saving backward, measured on one training step.

:func:`step_benchmark` times a training step of a model (zero the gradients, the loss
``-log_prob(x).mean()``, backward, an Adam step) with ordinary autograd and with
memory-saving backward (``model.memory_saving = True``), and reports per mode the median
step time, the bytes autograd keeps for backward (:func:`flows.saved_bytes`) and, on CUDA,
the step's peak of allocated memory; and, once, how far the two modes' parameter gradients
are apart. ``flows bench`` runs it on a model built from the command line.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flows.diagnostics import saved_bytes
from flows.memory import module_device
from flows.parity import gradient_parity
from flows.training import initialize

ORDINARY = "ordinary"
SAVING = "memory-saving"
MODES = (ORDINARY, SAVING)
"""The backward modes, in the order they are measured and reported."""

MIB = 2**20
# Small, so the copy stays near the user's parameters over the benchmark's few steps; the
# cost of an Adam step does not depend on it.
_LR = 1e-4


@dataclass
class StepRow:
    """What one backward mode costs.

    Attributes:
        mode: ``"ordinary"`` or ``"memory-saving"``.
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
    """

    mode: str
    wall_ms: float
    cpu_ms: float | None
    kept_bytes: int
    peak_cuda_bytes: int | None


@dataclass
class StepBenchmark:
    """What :func:`step_benchmark` measured.

    Attributes:
        rows: one :class:`StepRow` per mode, ordinary first.
        gradient_error: :func:`flows.parity.gradient_parity`'s error on ``x`` for the loss
            ``-log_prob(x).mean()``: ``max |g_saving - g_ordinary| / max |g_ordinary|`` over
            all parameter gradient entries, with the same parameters, frozen power
            iterations and the same random numbers in both modes (the number ``flows.check``,
            the tests and the experiments report too).
        device: the device the model ran on.
        repeats: timed steps per mode.
        warmup: untimed steps per mode before them.
    """

    rows: list[StepRow]
    gradient_error: float
    device: torch.device
    repeats: int
    warmup: int

    def row(self, mode: str) -> StepRow:
        """The row of ``mode`` (``"ordinary"`` or ``"memory-saving"``)."""
        for r in self.rows:
            if r.mode == mode:
                return r
        raise KeyError(f"StepBenchmark: no row for mode {mode!r}; modes are {', '.join(MODES)}")

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

    def table(self) -> str:
        """A markdown table, one line per mode; the CPU column only on CPU, the CUDA one only on CUDA."""
        cpu = all(r.cpu_ms is not None for r in self.rows)
        cuda = all(r.peak_cuda_bytes is not None for r in self.rows)
        header = ["mode", "step ms (wall)"]
        header += ["CPU ms"] if cpu else []
        header += ["kept for backward (MiB)"]
        header += ["peak CUDA MiB"] if cuda else []
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for r in self.rows:
            cells = [r.mode, f"{r.wall_ms:.1f}"]
            cells += [f"{r.cpu_ms:.1f}"] if r.cpu_ms is not None else []
            cells += [f"{r.kept_bytes / MIB:.2f}"]
            cells += [f"{r.peak_cuda_bytes / MIB:.1f}"] if r.peak_cuda_bytes is not None else []
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        """The ratios and the gradient parity, one line each."""
        time_part = f"time {self.time_ratio:.2f}x"
        if self.cpu_ratio is not None:
            time_part += f" (CPU {self.cpu_ratio:.2f}x)"
        memory_part = f"kept for backward {self.memory_ratio:.3f}x"
        if self.peak_ratio is not None:
            memory_part += f", peak CUDA {self.peak_ratio:.3f}x"
        return (
            f"memory-saving / ordinary: {time_part}, {memory_part}\n"
            f"gradient parity: {self.gradient_error:.1e} "
            "(max |memory-saving - ordinary| over parameter gradients / largest gradient)"
        )

    def __str__(self) -> str:
        return f"{self.table()}\n\n{self.summary()}"


def step_benchmark(model: nn.Module, x: Tensor, repeats: int = 5, warmup: int = 1) -> StepBenchmark:
    """Time a training step with ordinary and with memory-saving backward.

    A step is: zero the gradients, ``loss = -model.log_prob(x).mean()``, ``loss.backward()``,
    an Adam step. After ``warmup`` untimed steps per mode, the modes alternate step by step
    (ordinary, memory-saving, ordinary, ...) for ``repeats`` timed steps each, so a noisy
    machine slows both alike; each mode reports its medians. The bytes kept for backward
    are counted once per mode with :func:`flows.saved_bytes`, and the gradient parity
    (:func:`flows.parity.gradient_parity`) once, on ``x`` before any optimiser step.

    The benchmark runs on a deep copy of ``model`` (a second set of parameters, with
    gradients and Adam's state, for the duration): the copy is put in training mode, gets
    the data-dependent initialisation (:func:`flows.training.initialize` on ``x``; nothing
    happens if ``model`` had it already) and is trained by the timed steps. ``model`` itself, its ``memory_saving``
    switch and the global random state are left as they were.

    Args:
        model: a :class:`~flows.models.Flow` (anything with ``log_prob`` and a settable
            ``memory_saving``) containing at least one :class:`~flows.transforms.Chain`.
        x: a batch of model inputs ``(B, *input_shape)`` (dequantized for image data),
            moved to the model's device.
        repeats: timed steps per mode, at least 1.
        warmup: untimed steps per mode before the timed ones, at least 0 (the first step
            of a process pays one-time costs: lazy imports, allocator growth).

    Returns:
        The :class:`StepBenchmark`: a row per mode, the gradient parity and the settings.

    Raises:
        ValueError: ``repeats < 1``, ``warmup < 0``, or the model has no chain to switch.

    Example:
        >>> import torch
        >>> from flows.models import Glow
        >>> model = Glow((1, 4, 4), levels=1, steps=2, hidden_channels=4)
        >>> report = step_benchmark(model, torch.rand(8, 1, 4, 4), repeats=1, warmup=0)
        >>> [row.mode for row in report.rows]
        ['ordinary', 'memory-saving']
        >>> report.row("memory-saving").kept_bytes < report.row("ordinary").kept_bytes
        True
        >>> report.gradient_error < 1e-4
        True
    """
    if repeats < 1:
        raise ValueError(f"step_benchmark: repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"step_benchmark: warmup must be at least 0, got {warmup}")
    device = module_device(model)
    cuda = device.type == "cuda"
    bench = copy.deepcopy(model)
    x = x.to(device)
    with torch.random.fork_rng(devices=[device] if cuda else []):
        initialize(bench, x)
        gradient_error = gradient_parity(bench, x).error
        kept: dict[str, int] = {}
        for mode in MODES:
            bench.memory_saving = mode == SAVING
            kept[mode] = saved_bytes(lambda: -bench.log_prob(x).mean(), exclude=bench)
        optimizer = torch.optim.Adam(bench.parameters(), lr=_LR)
        wall: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        peak: dict[str, list[int]] = {mode: [] for mode in MODES}
        for rep in range(warmup + repeats):
            for mode in MODES:
                bench.memory_saving = mode == SAVING
                seconds, cpu_seconds, peak_bytes = _timed_step(bench, x, optimizer, device)
                if rep >= warmup:
                    wall[mode].append(seconds)
                    cpu[mode].append(cpu_seconds)
                    if peak_bytes is not None:
                        peak[mode].append(peak_bytes)
    rows = [
        StepRow(
            mode=mode,
            wall_ms=1000.0 * statistics.median(wall[mode]),
            cpu_ms=None if cuda else 1000.0 * statistics.median(cpu[mode]),
            kept_bytes=kept[mode],
            peak_cuda_bytes=max(peak[mode]) if cuda else None,
        )
        for mode in MODES
    ]
    return StepBenchmark(rows, gradient_error, device, repeats, warmup)


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
