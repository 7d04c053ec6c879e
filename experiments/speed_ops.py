"""Operators and time of one Glow training step, by phase: forward, backward, Adam.

    python experiments/speed_ops.py [--shape 1,8,8] [--steps 8] [--hidden 64] [--batch 64]
                                    [--repeats 20] [--no-time] [--by-block] [--layouts]

A Glow step on a CPU at these sizes is bound by the number of small operators launched,
not by arithmetic, so the operator count (:func:`flows.diagnostics.count_ops`, exact and
independent of the machine's load) is the measure this script leads with: the aten
operators of the forward pass under grad (``-log_prob(x).mean()``), of its backward, and
of one ``torch.optim.Adam`` step, for ordinary backward, memory-saving backward,
activation checkpointing (:func:`flows.benchmark.checkpointed`: each block of the outer
chain under ``torch.utils.checkpoint``), and the shared harness's floor (``floor_step.py``:
the steps' coupling networks alone, on inputs of the shapes they see, with their own
Adam), so the step's distance to the floor is measured in one process. The
parameter-tensor count is printed too (CPU Adam loops over the tensors).

The recompute bound: any scheme that rebuilds and recomputes blocks in backward (memory-
saving backward, checkpointing) runs every block's forward twice, once without grad in
the forward pass and once with grad in backward, so no such scheme costs less than an
ordinary step plus one no-grad forward pass of the same model. The script times that
no-grad forward pass (``torch.no_grad()``, ``log_prob``) as a mode of its own and prints
the bound (its time plus the ordinary step's) beside memory-saving backward, with the
ratios of memory-saving backward to ordinary and to the bound.

``--layouts`` adds the coupling networks' forward and backward in the NCHW layout (as the
model runs them) against the same network on its input laid out channels-last (output back
in NCHW), per input shape: the time, and the largest gradient error of each against float64
(the layout was tried and not kept: its oneDNN backward loses precision at some shapes,
docs/speed.md).

``--by-block`` adds the memory-saving backward broken down per block type: for each block
the engine rebuilds, its rebuild as the engine runs it (``reconstruct`` and the pull-back
of the output gradients through it,
:func:`flows.transforms.invertible_backward._block_backward`) against the block's ordinary
forward with grad and backward on the same input (pulled back by the same one engine
call, so the difference is what the rebuild does beyond an ordinary forward and
backward), and its no-grad forward; with, measured in the same loop, the whole step's
ordinary forward + backward and its memory-saving backward, so the engine's own cost
outside the blocks shows as the difference between the latter and the sum of the
rebuilds.

Times (unless ``--no-time``): the median thread CPU time of each phase over ``--repeats``
steps after two warm-up steps, the modes interleaved step by step, one intra-op thread;
``--no-time`` prints only the counts. Defaults: the shared harness's Glow on ``(1, 8, 8)``
(2 levels, 8 steps per level, hidden 64, batch 64, Glow's defaults otherwise).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

import flows
from flows.arguments import integer
from flows.benchmark import checkpointed
from flows.diagnostics import count_ops
from flows.transforms import Bijector, Chain, Tail
from flows.transforms.coupling import MaskedCoupling
from flows.transforms.invertible_backward import _block_backward, _pull_back, _runs
from flows.transforms.switches import recomputing

MODES = ("ordinary", "memory-saving", "checkpointed", "no-grad forward", "floor")
BOUND = "recompute bound (no-grad forward + ordinary)"


LEVELS = 2  # of the Glow :func:`build` builds: each squeezes, halving H and W


def image_shape(text: str) -> tuple[int, int, int]:
    """An ``argparse`` type: ``C,H,W`` of the Glow :func:`build` builds, positive integers
    with H and W divisible by ``2**LEVELS``, else one usage line.

    Example:
        >>> image_shape("1,8,8")
        (1, 8, 8)
    """
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W as three positive integers (e.g. 1,8,8), got {text!r}")
    c, h, w = sizes
    step = 2**LEVELS
    if h % step or w % step:
        raise argparse.ArgumentTypeError(
            f"H and W must be divisible by {step} (the Glow's {LEVELS} levels each halve them), got {h}x{w}: "
            f"e.g. {c},{-(-h // step) * step},{-(-w // step) * step}"
        )
    return c, h, w


def build(shape: tuple[int, ...], steps: int, hidden: int, batch: int) -> tuple[flows.models.Flow, torch.Tensor]:
    torch.manual_seed(0)
    model = flows.models.Glow(shape, levels=LEVELS, steps=steps, hidden_channels=hidden)
    x = torch.rand(batch, *shape)
    with torch.no_grad():
        model.log_prob(x)  # ActNorm's data-dependent initialisation
    return model, x


def add_glow_arguments(parser: argparse.ArgumentParser, steps: int, hidden: int) -> None:
    """The options of the Glow :func:`build_from` builds (its shape, depth, width and batch),
    with these defaults for ``--steps`` and ``--hidden``."""
    parser.add_argument(
        "--shape", type=image_shape, default=(1, 8, 8), help=f"C,H,W, H and W divisible by {2**LEVELS} (default 1,8,8)"
    )
    parser.add_argument("--steps", type=integer(1), default=steps, help=f"steps per level (default {steps})")
    parser.add_argument("--hidden", type=integer(1), default=hidden, help=f"conditioner width (default {hidden})")
    parser.add_argument("--batch", type=integer(1), default=64)


def build_from(args: argparse.Namespace) -> tuple[tuple[int, ...], flows.models.Flow, torch.Tensor]:
    """The shape, the Glow and the batch that :func:`add_glow_arguments`' options describe."""
    return (args.shape, *build(args.shape, args.steps, args.hidden, args.batch))


def phases(model: flows.models.Flow, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict:
    """The three phases of one step as callables sharing the loss between them."""
    state: dict = {}

    def forward() -> None:
        optimizer.zero_grad(set_to_none=True)
        state["loss"] = -model.log_prob(x).mean()

    def backward() -> None:
        state.pop("loss").backward()

    return {"forward": forward, "backward": backward, "adam": optimizer.step}


def no_grad_forward(model: flows.models.Flow, x: torch.Tensor) -> dict:
    """The forward pass any rebuild-and-recompute scheme runs without grad: one phase."""

    def forward() -> None:
        with torch.no_grad():
            model.log_prob(x)

    return {"forward": forward}


def coupling_networks(model: flows.models.Flow, x: torch.Tensor) -> tuple[list[torch.nn.Module], list[torch.Tensor]]:
    """Copies of the model's steps' coupling networks (not the split priors'), each with a
    random input of the shape it sees."""
    nets, inputs = [], []
    steps = [c for m in model.modules() if isinstance(m, Chain) for c in m.blocks if isinstance(c, MaskedCoupling)]

    def capture(net: torch.nn.Module, args: tuple) -> None:
        nets.append(net)
        inputs.append(torch.randn_like(args[0]))

    handles = [c.conditioner.register_forward_pre_hook(capture) for c in steps]
    with torch.no_grad():
        model.log_prob(x)
    for handle in handles:
        handle.remove()
    # After the hooks are gone: a copy would keep them.
    return [copy.deepcopy(net) for net in nets], inputs


def floor(model: flows.models.Flow, x: torch.Tensor) -> dict:
    """The shared harness's floor (``floor_step.py``) of this model: its steps' coupling
    networks alone (:func:`coupling_networks`), the loss the sum of the mean squared
    outputs, its own Adam."""
    nets, inputs = coupling_networks(model, x)
    for net in nets:  # as the harness does: a last layer away from zero
        torch.nn.init.normal_(net[-1].weight, std=0.01)
    optimizer = torch.optim.Adam([p for net in nets for p in net.parameters()], lr=1e-5)
    state: dict = {}

    def forward() -> None:
        optimizer.zero_grad(set_to_none=True)
        state["loss"] = sum(net(h).square().mean() for net, h in zip(nets, inputs))

    def backward() -> None:
        state.pop("loss").backward()

    return {"forward": forward, "backward": backward, "adam": optimizer.step}


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def step_table(model: flows.models.Flow, x: torch.Tensor, repeats: int, timed: bool) -> None:
    """The table of operators and times by phase and mode, and the ratios."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    checkpointed_model = checkpointed(model)
    runs = {
        "ordinary": phases(model, x, optimizer),
        "memory-saving": phases(model, x, optimizer),
        "checkpointed": phases(checkpointed_model, x, torch.optim.Adam(checkpointed_model.parameters(), lr=1e-5)),
        "no-grad forward": no_grad_forward(model, x),
        "floor": floor(model, x),
    }

    def switch(mode: str) -> None:
        model.memory_saving = mode == "memory-saving"

    counts: dict[str, dict[str, int]] = {}
    for mode, run in runs.items():
        switch(mode)
        for phase in run.values():  # a warm-up step: Adam's state exists, lazy imports done
            phase()
        counts[mode] = {name: sum(count_ops(phase).values()) for name, phase in run.items()}
    times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in runs[m]} for m in MODES}
    if timed:
        for _ in range(repeats + 1):
            for mode, run in runs.items():
                switch(mode)
                for name, phase in run.items():
                    start = time.thread_time()
                    phase()
                    times[mode][name].append(time.thread_time() - start)
    # Medians after the first timed step (a second warm-up), per phase.
    medians = {m: {p: median_ms(v[1:]) for p, v in times[m].items()} for m in MODES} if timed else {}
    if timed:
        medians[BOUND] = {p: medians["ordinary"][p] + medians["no-grad forward"].get(p, 0.0) for p in runs["ordinary"]}
    counts[BOUND] = {p: counts["ordinary"][p] + counts["no-grad forward"].get(p, 0) for p in runs["ordinary"]}

    print("| mode | forward ops | backward ops | Adam ops | step ops | forward ms | backward ms | Adam ms | step ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in (*MODES[:2], BOUND, *MODES[2:]):
        c, t = counts[mode], medians.get(mode, {})

        def cell(phase: str, values: dict, fmt: str = "{}") -> str:
            return fmt.format(values[phase]) if phase in values else "-"

        step_ms = f"{sum(t.values()):.1f}" if t else "-"
        ops = " | ".join(cell(phase, c) for phase in ("forward", "backward", "adam"))
        ms = " | ".join(cell(phase, t, "{:.1f}") for phase in ("forward", "backward", "adam"))
        print(f"| {mode} | {ops} | {sum(c.values())} | {ms} | {step_ms} |")
    if not timed:
        return
    step = {mode: sum(medians[mode].values()) for mode in medians}
    print(f"\nmemory-saving / ordinary step: {step['memory-saving'] / step['ordinary']:.2f}x; "
          f"recompute bound / ordinary: {step[BOUND] / step['ordinary']:.2f}x; "
          f"memory-saving / recompute bound: {step['memory-saving'] / step[BOUND]:.2f}x; "
          f"checkpointed / ordinary: {step['checkpointed'] / step['ordinary']:.2f}x; "
          f"ordinary / floor: {step['ordinary'] / step['floor']:.2f}x")
    print(f"(CPU time, sums of the phase medians; median of {repeats} steps per mode after warm-up, modes interleaved)")


def block_kind(block: Bijector, split_priors: set[int]) -> str:
    if id(block) in split_priors:
        return f"{type(block).__name__} (split prior)"
    if isinstance(block, Tail):
        return f"Tail({type(block.bijector).__name__})"
    return type(block).__name__


def by_block(model: flows.models.Flow, x: torch.Tensor, repeats: int) -> None:
    """Memory-saving backward's rebuilds per block type against ordinary forward + backward."""
    model.memory_saving = False
    runs = _runs(model.bijector.leaves())  # the blocks the engine rebuilds, as it groups them
    blocks = [(block, params) for run in runs for block, params in zip(run.blocks, run.params)]
    split_priors = {
        id(b.bijector) for b in model.bijector.blocks if isinstance(b, Tail) and isinstance(b.bijector, MaskedCoupling)
    }
    inputs: dict[int, torch.Tensor] = {}

    def capture(block: torch.nn.Module, args: tuple) -> None:
        inputs[id(block)] = args[0].detach().clone()

    handles = [block.register_forward_pre_hook(capture) for block, _ in blocks]
    with torch.no_grad():
        model.log_prob(x)
    for handle in handles:
        handle.remove()

    def cases(block: Bijector, params: list) -> dict[str, Callable[[], object]]:
        h = inputs[id(block)]
        with torch.no_grad():
            y, logdet = block(h)
        grad_y, grad_logdet = torch.randn_like(y), torch.randn_like(logdet)

        def no_grad() -> None:
            with torch.no_grad():
                block(h)

        def ordinary() -> None:
            leaf = h.detach().requires_grad_(True)
            out, out_logdet = block(leaf)
            # As the engine: the log-det only where it depends on something (not a squeeze's).
            pairs = [(out, grad_y)] + [(out_logdet, grad_logdet)] * out_logdet.requires_grad
            _pull_back([o for o, _ in pairs], [g for _, g in pairs], [leaf, *params])

        def rebuild() -> None:  # inside recomputing(), entered once per step as by the engine
            _block_backward(block, params, y, None, grad_y, grad_logdet, {})

        return {"no-grad forward": no_grad, "forward + backward": ordinary, "rebuild": rebuild}

    kinds = [block_kind(block, split_priors) for block, _ in blocks]
    calls = [cases(block, params) for block, params in blocks]
    names = list(calls[0])
    ops = {}
    with recomputing():
        for kind, call in zip(kinds, calls):
            for name, fn in call.items():
                fn()  # warm-up
                ops.setdefault((kind, name), sum(count_ops(fn).values()))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    whole = phases(model, x, optimizer)
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in range(repeats + 1):
        sums: dict[tuple[str, str], float] = defaultdict(float)
        with recomputing():  # the blocks' ordinary calls do not read it once ActNorm is initialised
            for kind, call in zip(kinds, calls):
                # The three calls in turn in each position: none always runs on another's warm cache.
                for name in names[r % 3:] + names[:r % 3]:
                    start = time.thread_time()
                    call[name]()
                    sums[kind, name] += time.thread_time() - start
        for mode in ("ordinary", "memory-saving"):
            model.memory_saving = mode == "memory-saving"
            for phase in ("forward", "backward"):
                start = time.thread_time()
                whole[phase]()
                sums[mode, phase] += time.thread_time() - start
        model.zero_grad(set_to_none=True)
        for key, value in sums.items():
            times[key].append(value)
    model.memory_saving = False
    med = {key: median_ms(v[1:]) for key, v in times.items()}
    order = list(dict.fromkeys(kinds))
    n = {kind: kinds.count(kind) for kind in order}
    print(f"\nMemory-saving backward by block type: thread CPU us per block (median of {repeats} "
          "repeats of all the step's blocks, interleaved; in brackets the aten operators per block)\n")
    print("| block | blocks per step | no-grad forward | forward + backward | rebuild "
          "| rebuild - (forward + backward) | rebuild / (forward + backward) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in order:
        us = {name: 1000 * med[kind, name] / n[kind] for name in names}
        cells = " | ".join(f"{us[name]:.0f} ({ops[kind, name]})" for name in names)
        extra = us["rebuild"] - us["forward + backward"]
        print(f"| {kind} | {n[kind]} | {cells} | {extra:+.0f} | {us['rebuild'] / us['forward + backward']:.2f}x |")
    total = {name: sum(med[kind, name] for kind in order) for name in names}
    extra, ratio = total["rebuild"] - total["forward + backward"], total["rebuild"] / total["forward + backward"]
    cells = " | ".join(f"{total[name]:.1f}" for name in names)
    print(f"| all blocks, ms per step | {len(kinds)} | {cells} | {extra:+.1f} | {ratio:.2f}x |")
    ordinary = med["ordinary", "forward"] + med["ordinary", "backward"]
    print(f"\nwhole step, same loop: ordinary forward + backward {ordinary:.1f} ms, memory-saving forward "
          f"{med['memory-saving', 'forward']:.1f} ms, memory-saving backward {med['memory-saving', 'backward']:.1f} ms "
          f"(the blocks' rebuilds {total['rebuild']:.1f} ms; the rest, "
          f"{med['memory-saving', 'backward'] - total['rebuild']:.1f} ms, is the loss's and the base density's "
          "backward, the walk's splits and joins and the parameter gradients' accumulation); the blocks' forward + "
          f"backward, each pulled back on its own, {total['forward + backward']:.1f} ms against {ordinary:.1f} ms "
          "in one graph")
    cost = pull_back_cost(repeats)
    print(f"one pull-back through a one-operator graph on a (64, 4, 4, 4) tensor, the graph's own cost subtracted: "
          f"torch.autograd.grad {cost['torch.autograd.grad']:.0f} us, the engine entry it wraps (the engine's "
          f"_pull_back) {cost['engine entry']:.0f} us per call (median of {repeats} runs of 200 calls)")


def pull_back_cost(repeats: int) -> dict[str, float]:
    """Microseconds per call of a pull-back itself: ``torch.autograd.grad`` and the engine
    entry the memory-saving engine calls, each through a graph of one multiplication, less
    twice the time of building that graph (its forward and its backward are one
    multiplication each)."""
    leaf = torch.randn(64, 4, 4, 4, requires_grad=True)
    grad = torch.randn_like(leaf)
    calls = {
        "graph": lambda: leaf * 2.0,
        "torch.autograd.grad": lambda: torch.autograd.grad(leaf * 2.0, leaf, grad),
        "engine entry": lambda: _pull_back([leaf * 2.0], [grad], [leaf]),
    }
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats + 1):
        for name, call in calls.items():
            start = time.thread_time()
            for _ in range(200):
                call()
            times[name].append((time.thread_time() - start) / 200)
    us = {name: 1e6 * statistics.median(v[1:]) for name, v in times.items()}
    return {name: us[name] - 2 * us["graph"] for name in calls if name != "graph"}


def layouts(model: flows.models.Flow, x: torch.Tensor, repeats: int) -> None:
    """The coupling networks' forward + backward in NCHW (as the model runs them) against
    the same network on its input laid out channels-last, per input shape, the input
    needing grad as inside a flow; interleaved. Beside the times, the largest relative error
    of the gradients (input and parameters) against the network in float64."""
    nets, inputs = coupling_networks(model, x)
    cases: dict[tuple[int, ...], tuple[torch.nn.Module, torch.Tensor]] = {}
    for net, h in zip(nets, inputs):
        cases.setdefault(tuple(h.shape), (net, h))
    counts = {shape: sum(tuple(h.shape) == shape for h in inputs) for shape in cases}
    formats = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}

    def gradients(net: torch.nn.Module, h: torch.Tensor, layout: torch.memory_format) -> list[torch.Tensor]:
        leaf = h.detach().contiguous(memory_format=layout).requires_grad_(True)
        net.zero_grad(set_to_none=True)
        net(leaf).contiguous().square().sum().backward()
        return [leaf.grad, *(p.grad for p in net.parameters())]

    times: dict[tuple[tuple[int, ...], str], list[float]] = defaultdict(list)
    errors: dict[tuple[tuple[int, ...], str], float] = {}
    for shape, (net, h) in cases.items():
        torch.nn.init.normal_(net[-1].weight, std=0.05)
        exact = gradients(copy.deepcopy(net).double(), h.double(), torch.contiguous_format)
        for name, layout in formats.items():
            errors[shape, name] = max(
                ((g.double() - e).abs().max() / e.abs().max()).item() for g, e in zip(gradients(net, h, layout), exact)
            )
        for r in range(repeats + 2):
            for name, layout in formats.items():
                start = time.thread_time()
                gradients(net, h, layout)
                if r >= 2:
                    times[shape, name].append(time.thread_time() - start)
    print("\nCoupling networks, forward + backward (input needing grad), thread CPU us, "
          f"median of {repeats} interleaved calls; gradient error: largest relative to float64:\n")
    print("| input shape | per step | NCHW | channels-last | NCHW / channels-last | gradient error NCHW "
          "| gradient error channels-last |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total = dict.fromkeys(formats, 0.0)
    for shape in cases:
        us = {name: 1e6 * statistics.median(times[shape, name]) for name in formats}
        for name in formats:
            total[name] += counts[shape] * us[name] / 1000
        error = {name: f"{errors[shape, name]:.1e}" for name in formats}
        print(f"| {tuple(shape)} | {counts[shape]} | {us['NCHW']:.0f} | {us['channels-last']:.0f} | "
              f"{us['NCHW'] / us['channels-last']:.2f}x | {error['NCHW']} | {error['channels-last']} |")
    print(f"| all, ms per step | {len(inputs)} | {total['NCHW']:.1f} | {total['channels-last']:.1f} | "
          f"{total['NCHW'] / total['channels-last']:.2f}x | | |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_glow_arguments(parser, steps=8, hidden=64)
    parser.add_argument("--repeats", type=integer(1), default=20, help="timed steps per mode (default 20)")
    parser.add_argument("--no-time", action="store_true", help="print the operator counts only")
    parser.add_argument("--by-block", action="store_true", help="also break memory-saving backward down by block type")
    parser.add_argument("--layouts", action="store_true", help="also time the coupling networks NCHW and channels-last")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape, model, x = build_from(args)
    print(f"Glow {shape}, 2 levels, {args.steps} steps per level, hidden {args.hidden}, batch {args.batch}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters in {len(list(model.parameters()))} tensors; "
          f"torch {torch.__version__}, 1 thread")
    print()
    step_table(model, x, args.repeats, not args.no_time)
    if args.by_block and not args.no_time:
        by_block(model, x, args.repeats)
    if args.layouts and not args.no_time:
        layouts(model, x, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
