"""torch.compile sees a whole model: ``Flow.forward`` is ``log_prob`` and the input checks
branch on values only where that is free (the CPU, outside tracing); regional compilation
(flows.compiling) in both backward modes; the engine reads RNG states only around blocks
that declare randomness."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flows
from flows.compiling import compile_regions, regions
from flows.models import Glow, RealNVP
from flows.training import TrainConfig
from flows.transforms import ActNorm, AffineCoupling, Chain, InvConv1x1, Inverse, ResidualBlock, channel_mask


@pytest.mark.parametrize(
    ("build", "context"),
    [
        (lambda: Glow((1, 4, 4), levels=2, steps=1, hidden_channels=8, logit_alpha=0.05), None),
        (lambda: RealNVP((1, 4, 4), levels=2, steps=1, hidden_channels=8, res_blocks=1), None),
        (lambda: Glow((1, 4, 4), levels=2, steps=1, hidden_channels=8, num_classes=3), torch.tensor([0, 1, 2, 0])),
    ],
    ids=["glow-logit", "realnvp", "glow-classes"],
)
def test_the_log_density_traces_as_one_graph(build, context) -> None:
    torch.manual_seed(0)
    model = build()
    x = torch.rand(4, 1, 4, 4)
    args = (x,) if context is None else (x, context)
    model(*args)  # ActNorm initialisation, outside the traced call
    explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


def test_value_checks_still_guard_eager_cpu_calls() -> None:
    model = RealNVP((1, 4, 4), levels=1, steps=1, hidden_channels=8, res_blocks=1)
    with pytest.raises(ValueError, match="non-finite"):
        model.log_prob(torch.full((2, 1, 4, 4), float("nan")))
    model.validate_args = False
    with pytest.raises(ValueError, match="Logit: inputs must be finite dequantized pixels"):
        model.log_prob(torch.full((2, 1, 4, 4), 2.0))


def dropout_coupling(p: float) -> AffineCoupling:
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Dropout(p), nn.Conv2d(8, 4, 3, padding=1))
    return AffineCoupling(channel_mask(4, 0), conditioner=net)


def test_draws_random_is_declared_or_derived_from_submodules() -> None:
    assert not ActNorm(4).draws_random and not InvConv1x1(4).draws_random
    assert dropout_coupling(0.5).draws_random and not dropout_coupling(0.0).draws_random
    assert not dropout_coupling(0.5).eval().draws_random  # dropout draws only in training
    stochastic = ResidualBlock.mlp(3, 8, logdet="series")
    assert stochastic.draws_random and not ResidualBlock.mlp(3, 8, logdet="exact").draws_random
    # A bijector inside answers for itself, through chains, tails and inverses.
    assert Chain(ActNorm(3), stochastic).draws_random and Inverse(Chain(stochastic)).draws_random
    assert not Chain(ActNorm(3), ResidualBlock.mlp(3, 8, logdet="exact")).draws_random


def test_only_blocks_that_may_draw_are_rng_snapshotted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine reads the RNG state (which torch.compile cannot trace) only around the
    block that declares randomness; its dropout still recomputes identically."""
    from flows.parity import gradient_parity
    from flows.transforms import invertible_backward

    calls: list[int] = []
    real = invertible_backward.get_rng_state

    def counting(x: torch.Tensor):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(x)

    monkeypatch.setattr(invertible_backward, "get_rng_state", counting)
    torch.manual_seed(0)
    chain = Chain(ActNorm(4), InvConv1x1(4), dropout_coupling(0.5), AffineCoupling(channel_mask(4, 1)))
    x = torch.randn(4, 4, 6, 6)
    chain(x)  # ActNorm's initialisation
    chain.memory_saving = True
    y, logdet = chain(x)
    (y.square().sum() + logdet.sum()).backward()
    assert len(calls) == 1  # the dropout coupling only, of four blocks
    chain.memory_saving = False
    assert gradient_parity(chain, x).error < 1e-5
    calls.clear()
    chain.eval()
    with torch.enable_grad(), flows.memory_saving(chain):
        chain(x)[0].sum().backward()
    assert calls == []


def small_glow() -> nn.Module:
    torch.manual_seed(0)
    model = Glow((1, 4, 4), levels=2, steps=2, hidden_channels=8)
    model(torch.rand(8, 1, 4, 4))  # ActNorm initialisation
    return model


@pytest.mark.parametrize("unit", ["step", "block"])
def test_compiled_memory_saving_gradients_equal_eager(unit: str) -> None:
    """Regional compilation, per step of flow or per block: both backward modes run with
    the compiled regions, and the compiled steps' gradients equal the eager ones.
    ``aot_eager`` compiles the graphs Dynamo and AOTAutograd capture (forward and backward)
    and runs them with eager kernels: the capture is ours to get right, inductor's code
    generation is torch's (and takes minutes on two cores)."""
    from torch._dynamo.utils import counters

    eager = small_glow()
    compiled = compile_regions(copy.deepcopy(eager), unit=unit, backend="aot_eager")
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    def gradients(model: nn.Module, saving: bool) -> list[torch.Tensor]:
        with flows.memory_saving(model, saving):
            loss = -model.log_prob(x).mean()
            return list(torch.autograd.grad(loss, list(model.parameters())))

    def error(grads: list[torch.Tensor]) -> float:
        """flows.parity's rule: the largest entry difference over the largest gradient entry
        (AOTAutograd's decompositions round differently from eager kernels)."""
        diff = max((g - r).abs().max().item() for g, r in zip(grads, reference))
        return diff / max(r.abs().max().item() for r in reference)

    counters.clear()
    reference = gradients(eager, False)
    assert error(gradients(compiled, False)) < 1e-5
    assert error(gradients(compiled, True)) < 1e-5
    assert counters["stats"]["unique_graphs"] > 0  # compiled, not silently eager
    assert counters["graph_break"] == {}
    assert error(gradients(eager, True)) < 1e-5  # eager memory-saving agrees too


def test_compile_regions_compiles_each_block_once_and_refuses_no_chain() -> None:
    model = small_glow()
    blocks = regions(model, unit="block")
    assert len(blocks) == len({id(b) for b in blocks})
    couplings = [m for m in model.modules() if isinstance(m, AffineCoupling)]
    assert len(couplings) >= 4  # 2 levels x 2 steps, and a split's coupling
    assert {id(b) for b in blocks if isinstance(b, AffineCoupling)} == {id(c) for c in couplings}
    with pytest.raises(ValueError, match="holds no Chain"):
        compile_regions(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unit must be one of"):
        compile_regions(model, unit="layer")


def test_step_regions_are_the_steps_of_flow() -> None:
    """``unit="step"``: each Glow step (ActNorm, 1x1 convolution, coupling) is one region,
    a split prior is one of its own, nothing inside a step is compiled separately, and the
    parameter-free squeezes and reshape stay eager."""
    model = small_glow()
    blocks = regions(model)
    steps = [b for b in blocks if isinstance(b, Chain)]
    assert len(steps) == 2 * 2  # levels x steps
    assert all([type(s).__name__ for s in step] == ["ActNorm", "InvConv1x1", "AffineCoupling"] for step in steps)
    inside = {id(m) for step in steps for m in step.modules() if m is not step}
    assert not inside & {id(b) for b in blocks}
    assert sum(isinstance(b, AffineCoupling) for b in blocks) == 1  # the split prior
    assert len(blocks) == len(steps) + 1


def test_the_command_line_offers_every_unit() -> None:
    from flows import cli, compiling

    assert cli.COMPILE_UNITS == compiling.UNITS
    with pytest.raises(ValueError, match="compile must be True, False or one of"):
        TrainConfig(steps=1, compile="graph")


def test_model_unit_compiles_the_whole_flow_as_one_graph() -> None:
    """``unit="model"``: the flow's bijector is the one region; ordinary training runs one
    graph without a break, with the eager gradients; memory-saving training still computes
    them (its engine runs eagerly behind the graph break Dynamo makes there)."""
    from torch._dynamo.utils import counters

    eager = small_glow()
    assert regions(eager, unit="model") == [eager.bijector]
    compiled = compile_regions(copy.deepcopy(eager), unit="model", backend="aot_eager")
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    def gradients(model: nn.Module, saving: bool) -> list[torch.Tensor]:
        with flows.memory_saving(model, saving):
            return list(torch.autograd.grad(-model.log_prob(x).mean(), list(model.parameters())))

    reference = gradients(eager, False)
    counters.clear()
    for saving in (False, True):
        for g, r in zip(gradients(compiled, saving), reference):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * max(r.abs().max().item(), 1e-3))
        if not saving:
            assert counters["stats"]["unique_graphs"] == 1 and counters["graph_break"] == {}
