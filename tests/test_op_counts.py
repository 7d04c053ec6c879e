"""Operator counts of a Glow training step, bounded so that regressions show.

A Glow step at the shared harness's size is bound by the number of small operators it
launches, not by arithmetic (docs/speed.md). A count (:func:`flows.diagnostics.count_ops`)
is exact on any machine and under any load, unlike a time, so the bounds below are the
values reached (torch 2.13; `python experiments/speed_ops.py --no-time` prints them). A
change that adds operators to the hot path fails here; one that removes some should lower
the bound.
"""

from __future__ import annotations

import pytest
import torch

from flows.diagnostics import count_ops
from flows.models import Glow
from flows.transforms import ActNorm, AffineCoupling, Bijector, InvConv1x1
from flows.transforms.invertible_backward import _block_backward, _pull_back
from flows.transforms.switches import recomputing

# The harness's Glow: (1, 8, 8), 2 levels of 8 steps, hidden 64, batch 64, Glow's defaults.
LEVELS, STEPS = 2, 8
# (forward, backward) aten operators of -log_prob(x).mean(); before these cuts (the same
# model, 2026-12-02) 1068 / 1311 ordinary and 961 / 2559 memory-saving, then 818 / 1175
# and 827 / 2417 before the engine's pull-back without a seeded root and its forward
# pass without a detach per block, then 723 / 2264 before the affine coupling's rebuild
# shared its log-scale and exp between the inverse and the recompute. Since then the 1x1
# convolution reads log|s| off its packed LU parameter's diagonal (a view, and its
# backward: 16 more per pass) where Adam updates 32 tensors fewer (288 operators fewer).
BOUNDS = {"ordinary": (834, 1191), "memory-saving": (739, 2228)}
# Operators a block's rebuild in memory-saving backward (``reconstruct`` and the pull-back
# of the output gradients, as the engine runs them) launches beyond an ordinary forward
# and backward of the block on the same input, pulled back by the same one engine call:
# its inverse only. ActNorm: a division and a subtraction (the exp is shared with the
# recompute); the 1x1 convolution: W^-1 (one linalg_inv_ex) and one batched matmul with
# its expand and two views; the coupling: the elementwise inverse of the changed half (a
# subtraction and a division: the log-scale and its exp are shared with the recompute,
# ``AffineCoupling.coupling_parameters``) and the join of the rebuilt input (its detach and cat).
REBUILD_EXTRA = {ActNorm: 2, InvConv1x1: 5, AffineCoupling: 4}


def harness_glow() -> tuple[Glow, torch.Tensor]:
    torch.manual_seed(0)
    model = Glow((1, 8, 8), levels=LEVELS, steps=STEPS, hidden_channels=64)
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        model.log_prob(x)  # ActNorm's initialisation, not part of a step
    return model, x


def step_counts(model: Glow, x: torch.Tensor) -> tuple[dict[str, int], dict[str, int]]:
    losses: list[torch.Tensor] = []
    forward = count_ops(lambda: losses.append(-model.log_prob(x).mean()))
    backward = count_ops(lambda: losses.pop().backward())
    return forward, backward


@pytest.mark.parametrize("mode", list(BOUNDS), ids=list(BOUNDS))
def test_glow_step_launches_at_most_the_operators_reached(mode: str) -> None:
    model, x = harness_glow()
    model.memory_saving = mode == "memory-saving"
    forward, backward = step_counts(model, x)
    assert sum(forward.values()) <= BOUNDS[mode][0] and sum(backward.values()) <= BOUNDS[mode][1]


def test_a_level_splits_and_joins_its_flat_latent_once() -> None:
    """Consecutive steps of a level run on one split of the flat latent and one join (not
    one copy of the latent per step); each coupling joins its halves once; the 1x1
    convolutions build their weight without an identity matrix."""
    model, x = harness_glow()
    forward, _ = step_counts(model, x)
    couplings = sum(isinstance(m, AffineCoupling) for m in model.modules())
    squeezes = LEVELS  # a squeeze changes the tail's shape: its own split and join
    assert forward["cat"] == couplings + squeezes + LEVELS
    assert forward["eye"] == 0 and forward["select"] == 0


@pytest.mark.parametrize("kind", list(REBUILD_EXTRA), ids=lambda kind: kind.__name__)
def test_a_rebuild_launches_a_forward_and_a_backward_and_the_inverse(kind: type[Bijector]) -> None:
    """Memory-saving backward's rebuild of a Glow block costs no more operators than that
    block's ordinary forward and backward plus its inverse (``REBUILD_EXTRA``)."""
    model, x = harness_glow()
    block = next(m for m in model.modules() if type(m) is kind)
    inputs: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    with torch.no_grad():
        model.log_prob(x)
    handle.remove()
    params = [p for p in block.parameters() if p.requires_grad]
    with torch.no_grad():
        y, logdet = block(inputs[0])
    grad_y, grad_logdet = torch.randn_like(y), torch.randn_like(logdet)

    def ordinary() -> None:
        leaf = inputs[0].detach().requires_grad_(True)
        out, out_logdet = block(leaf)
        _pull_back([out, out_logdet], [grad_y, grad_logdet], [leaf, *params])

    def rebuild() -> None:
        with recomputing():
            _block_backward(block, params, y, None, grad_y, grad_logdet, {})

    extra = sum(count_ops(rebuild).values()) - sum(count_ops(ordinary).values())
    assert extra <= REBUILD_EXTRA[kind]
