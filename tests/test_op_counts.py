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
from flows.transforms import AffineCoupling

# The harness's Glow: (1, 8, 8), 2 levels of 8 steps, hidden 64, batch 64, Glow's defaults.
LEVELS, STEPS = 2, 8
# (forward, backward) aten operators of -log_prob(x).mean(); before these cuts (the same
# model, 2026-12-02) 1068 / 1311 ordinary and 961 / 2559 memory-saving.
BOUNDS = {"ordinary": (818, 1175), "memory-saving": (827, 2417)}


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
