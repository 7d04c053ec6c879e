"""Operators and time of one Glow training step, by phase: forward, backward, Adam.

    python experiments/speed_ops.py [--shape 1,8,8] [--steps 8] [--hidden 64] [--batch 64]
                                    [--repeats 20] [--no-time]

A Glow step on a CPU at these sizes is bound by the number of small operators launched,
not by arithmetic, so the operator count (:func:`flows.diagnostics.count_ops`, exact and
independent of the machine's load) is the measure this script leads with: the aten
operators of the forward pass under grad (``-log_prob(x).mean()``), of its backward, and
of one ``torch.optim.Adam`` step, for ordinary and for memory-saving backward, and for the
shared harness's floor (``floor_step.py``: the steps' coupling networks alone, on inputs of
the shapes they see, with their own Adam), so the step's distance to the floor is measured
in one process. The parameter-tensor count is printed too (CPU Adam loops over the tensors).

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

import torch

import flows
from flows.diagnostics import count_ops
from flows.transforms import Chain
from flows.transforms.coupling import MaskedCoupling

MODES = ("ordinary", "memory-saving", "floor")


def build(shape: tuple[int, ...], steps: int, hidden: int, batch: int) -> tuple[flows.models.Flow, torch.Tensor]:
    torch.manual_seed(0)
    model = flows.models.Glow(shape, levels=2, steps=steps, hidden_channels=hidden)
    x = torch.rand(batch, *shape)
    with torch.no_grad():
        model.log_prob(x)  # ActNorm's data-dependent initialisation
    return model, x


def phases(model: flows.models.Flow, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict:
    """The three phases of one step as callables sharing the loss between them."""
    state: dict = {}

    def forward() -> None:
        optimizer.zero_grad(set_to_none=True)
        state["loss"] = -model.log_prob(x).mean()

    def backward() -> None:
        state.pop("loss").backward()

    return {"forward": forward, "backward": backward, "adam": optimizer.step}


def floor(model: flows.models.Flow, x: torch.Tensor) -> dict:
    """The shared harness's floor (``floor_step.py``) of this model: copies of its steps'
    coupling networks alone (not the split priors'), each on a random input of the shape it
    sees, the loss the sum of the mean squared outputs, its own Adam."""
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
    nets = [copy.deepcopy(net) for net in nets]  # after the hooks are gone: a copy would keep them
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1,8,8", help="C,H,W (default 1,8,8)")
    parser.add_argument("--steps", type=int, default=8, help="steps per level (default 8)")
    parser.add_argument("--hidden", type=int, default=64, help="conditioner width (default 64)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per mode (default 20)")
    parser.add_argument("--no-time", action="store_true", help="print the operator counts only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    model, x = build(shape, args.steps, args.hidden, args.batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    runs = {mode: phases(model, x, optimizer) for mode in MODES[:2]}
    runs["floor"] = floor(model, x)

    def switch(mode: str) -> None:
        model.memory_saving = mode == "memory-saving"

    counts: dict[str, dict[str, int]] = {}
    for mode, run in runs.items():
        switch(mode)
        for phase in run.values():  # a warm-up step: Adam's state exists, lazy imports done
            phase()
        counts[mode] = {name: sum(count_ops(phase).values()) for name, phase in run.items()}
    times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in runs[m]} for m in MODES}
    if not args.no_time:
        for _ in range(args.repeats + 1):
            for mode, run in runs.items():
                switch(mode)
                for name, phase in run.items():
                    start = time.thread_time()
                    phase()
                    times[mode][name].append(time.thread_time() - start)

    def ms(mode: str, name: str) -> str:
        samples = times[mode][name][1:]
        return f"{1000 * statistics.median(samples):.1f}" if samples else "-"

    print(f"Glow {shape}, 2 levels, {args.steps} steps per level, hidden {args.hidden}, batch {args.batch}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters in {len(list(model.parameters()))} tensors; "
          f"torch {torch.__version__}, 1 thread")
    print()
    print("| mode | forward ops | backward ops | Adam ops | step ops | forward ms | backward ms | Adam ms | step ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        c = counts[mode]
        step = "-" if args.no_time else f"{sum(1000 * statistics.median(v[1:]) for v in times[mode].values()):.1f}"
        print(f"| {mode} | {c['forward']} | {c['backward']} | {c['adam']} | {sum(c.values())} | "
              f"{ms(mode, 'forward')} | {ms(mode, 'backward')} | {ms(mode, 'adam')} | {step} |")
    if not args.no_time:
        ratio = sum(statistics.median(v[1:]) for v in times["memory-saving"].values()) / sum(
            statistics.median(v[1:]) for v in times["ordinary"].values()
        )
        over_floor = sum(statistics.median(v[1:]) for v in times["ordinary"].values()) / sum(
            statistics.median(v[1:]) for v in times["floor"].values()
        )
        print(f"\nmemory-saving / ordinary step (CPU time, sum of the phase medians): {ratio:.2f}x; "
              f"ordinary / floor: {over_floor:.2f}x; median of {args.repeats} steps per mode after warm-up, "
              "modes interleaved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
