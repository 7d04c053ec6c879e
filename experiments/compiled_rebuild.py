"""Would compiled rebuilds speed up memory-saving backward? One Glow step's blocks, measured.

    python experiments/compiled_rebuild.py [--shape 1,8,8] [--steps 8] [--hidden 64] [--batch 64] [--repeats 30]

Memory-saving backward rebuilds each block eagerly (``reconstruct``, then one pull-back,
:func:`flows.transforms.invertible_backward._block_backward`). A compiled rebuild has to be
a function Dynamo can trace end to end: here the block's input is rebuilt without grad and
the forward's vector-Jacobian product is taken with :func:`torch.func.vjp` over
:func:`torch.func.functional_call` (parameters as inputs), all inside one
:func:`torch.compile` d function that returns the rebuilt input and every gradient. Two forms:

* ``unfused``: the block's ``inverse`` without grad, then the vjp of its ``forward`` (a
  coupling's conditioner runs twice, once in each);
* ``fused`` (couplings): the conditioner's input is the output's kept part itself in both
  the no-grad solve and the vjp, so the compiler may share the two conditioner passes (as
  the eager fused rebuild shares one pass by construction).

For the first ActNorm, 1x1 convolution and coupling of the first level, on the input the
model's forward pass gives them, it prints the median thread CPU time of the eager rebuild,
of each compiled form with the ``aot_eager`` backend (tracing, no code generation) and with
``inductor``, the ordinary forward + backward for scale, the first compiled call's wall time,
and the largest difference of the compiled gradients from the eager ones. One intra-op
thread; the variants interleaved in each repeat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp

from flows.arguments import integer
from flows.transforms import ActNorm, AffineCoupling, Bijector, InvConv1x1
from flows.transforms.invertible_backward import _block_backward, _pull_back, _runs
from flows.transforms.switches import recomputing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_ops import add_glow_arguments, build_from  # noqa: E402  (a sibling script: the same Glow)

BACKENDS = ("aot_eager", "inductor")


class _FusedForward(nn.Module):
    """A coupling's forward on its two parts, ``(kept, changed) -> (y, logdet)``."""

    def __init__(self, coupling: AffineCoupling) -> None:
        super().__init__()
        self.coupling = coupling

    def forward(self, kept: Tensor, changed: Tensor) -> tuple[Tensor, Tensor]:
        c = self.coupling
        # The coupling's own private pieces: this script probes a split of its rebuild.
        out, log_scale = c.couple(changed, c.coupling_parameters(c._theta(kept, None)))
        return c._join(kept, out), c._logdet(log_scale, kept, 1.0)


def unfused(block: Bijector) -> Callable:
    def rebuild(params: dict, y: Tensor, grad_y: Tensor, grad_logdet: Tensor) -> tuple:
        with torch.no_grad():
            x, _ = block.inverse(y)
        _, pull = vjp(lambda p, x: functional_call(block, p, (x,)), params, x)
        grad_params, grad_x = pull((grad_y, grad_logdet))
        return x, grad_x, grad_params

    return rebuild


def fused(coupling: AffineCoupling) -> Callable:
    forward = _FusedForward(coupling)

    def rebuild(params: dict, y: Tensor, grad_y: Tensor, grad_logdet: Tensor) -> tuple:
        kept, changed = coupling._split(y)
        with torch.no_grad():
            x_changed, _ = coupling.uncouple(changed, coupling.coupling_parameters(coupling._theta(kept, None)))
        prefixed = {f"coupling.{name}": p for name, p in params.items()}
        _, pull = vjp(lambda p, k, c: functional_call(forward, p, (k, c)), prefixed, kept, x_changed)
        grad_params, grad_kept, grad_changed = pull((grad_y, grad_logdet))
        grads = {name.removeprefix("coupling."): g for name, g in grad_params.items()}
        return coupling._join(kept, x_changed), coupling._join(grad_kept, grad_changed), grads

    return rebuild


def median_us(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        samples.append(time.thread_time() - start)
    return 1e6 * statistics.median(samples)


def block_rows(block: Bijector, h: Tensor, repeats: int) -> list[str]:
    """The table's rows of one block whose forward input is ``h``."""
    with torch.no_grad():
        y, logdet = block(h)
    grad_y, grad_logdet = torch.randn_like(y), torch.randn_like(logdet)
    params = {name: p for name, p in block.named_parameters() if p.requires_grad}
    grads: dict[int, Tensor] = {}
    with recomputing():
        eager_x, eager_grad_x = _block_backward(block, list(params.values()), y, None, grad_y, grad_logdet, grads)

    def eager() -> None:
        _block_backward(block, list(params.values()), y, None, grad_y, grad_logdet, {})

    def ordinary() -> None:
        leaf = h.detach().requires_grad_(True)
        out, out_logdet = block(leaf)
        _pull_back([out, out_logdet], [grad_y, grad_logdet], [leaf, *params.values()])

    timed: dict[tuple[str, str], Callable[[], object]] = {("eager", "-"): eager, ("ordinary", "-"): ordinary}
    compiled_rows = []
    forms = {"unfused": unfused(block)} | ({"fused": fused(block)} if isinstance(block, AffineCoupling) else {})
    for form, fn in forms.items():
        for backend in BACKENDS:
            torch._dynamo.reset()
            compiled = torch.compile(fn, backend=backend)
            start = time.perf_counter()
            with recomputing():
                rebuilt, grad_x, grad_params = compiled(params, y, grad_y, grad_logdet)
            first = time.perf_counter() - start
            diffs = [(grad_x - eager_grad_x).abs().max(), (rebuilt - eager_x).abs().max()]
            diffs += [(grad_params[n] - grads[id(p)]).abs().max() for n, p in params.items()]
            timed[form, backend] = partial(compiled, params, y, grad_y, grad_logdet)
            compiled_rows.append((form, backend, first, max(d.item() for d in diffs)))
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in timed}
    with recomputing():
        for _ in range(repeats):
            for key, fn in timed.items():
                samples[key].append(median_us(fn, 5))
    med = {key: statistics.median(v) for key, v in samples.items()}
    base, name = med["eager", "-"], type(block).__name__
    rows = [f"| {name} | eager rebuild (the engine's) | - | {base:.0f} | 1.00x | - | - |",
            f"| {name} | ordinary forward + backward | - | {med['ordinary', '-']:.0f} | "
            f"{med['ordinary', '-'] / base:.2f}x | - | - |"]
    for form, backend, first, diff in compiled_rows:
        rows.append(f"| {name} | compiled, {form} | {backend} | {med[form, backend]:.0f} | "
                    f"{med[form, backend] / base:.2f}x | {first:.1f} | {diff:.1e} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_glow_arguments(parser, steps=8, hidden=64)
    parser.add_argument("--repeats", type=integer(1), default=30, help="timed repeats per block and form (default 30)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _, model, x = build_from(args)
    blocks = [b for run in _runs(model.bijector.leaves()) for b in run.blocks]
    chosen = {kind: next(b for b in blocks if isinstance(b, kind)) for kind in (ActNorm, InvConv1x1, AffineCoupling)}
    inputs: dict[int, Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda m, a: inputs.setdefault(id(m), a[0].detach().clone()))
               for b in chosen.values()]
    with torch.no_grad():
        model.log_prob(x)
    for handle in handles:
        handle.remove()
    print("| block | form | backend | rebuild (us) | / eager rebuild | first call (s) | max grad diff |")
    print("|---|---|---|---:|---:|---:|---:|")
    for block in chosen.values():
        for row in block_rows(block, inputs[id(block)], args.repeats):
            print(row)
    print(f"\nGlow {','.join(map(str, args.shape))} steps {args.steps} hidden {args.hidden} batch {args.batch}, torch "
          f"{torch.__version__}, 1 thread; median over {args.repeats} repeats of the median of 5 calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
