"""torch.compile sees a whole model: ``Flow.forward`` is ``log_prob`` and the input checks
branch on values only where that is free (the CPU, outside tracing)."""

from __future__ import annotations

import pytest
import torch

from flows.models import Glow, RealNVP


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
