"""Shared fixtures: a trained-a-little module per registry case."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from flows.models import Flow

from registry import CASES, Case

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name: str) -> ModuleType:
    """Import ``experiments/<name>.py`` as a module (experiments/ is no package), so a smoke
    test can run its ``main`` in-process and skip a second import of torch."""
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def usage_error(run: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``run(argv)`` (an experiment's ``main`` or parser) refuses ``argv`` as a usage error:
    exit status 2, no traceback. Returns what it wrote to standard error."""
    with pytest.raises(SystemExit) as stopped:
        run(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def bijector_of(module: nn.Module) -> nn.Module:
    """The bijector of a Flow, or the module itself."""
    return module.bijector if isinstance(module, Flow) else module


def block_context(module: nn.Module, context: torch.Tensor | None) -> torch.Tensor | None:
    """The context the bijector of ``module`` sees: a Flow's embedding applied (class
    labels -> vectors), or ``context`` itself."""
    if isinstance(module, Flow) and module.embedding is not None and context is not None:
        return module.embedding(context)
    return context


def nll(f: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of ``x`` under ``f`` onto a unit Gaussian (up to a constant).

    The Gaussian's mean is a fixed ramp, not zero: a loss invariant under rotations would
    give orthogonal blocks an all-zero parameter gradient, leaving gradient checks only
    rounding noise to compare.
    """
    y, logdet = f(x) if context is None else f(x, context)
    y = y.flatten(1)
    mean = torch.linspace(-1.0, 1.0, y.shape[1], dtype=y.dtype, device=y.device)
    return (0.5 * (y - mean).pow(2).sum(1) - logdet).mean()


def loss_of(module: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of a case: :func:`nll` of its bijector, or for a conditional Flow
    its negative log-likelihood, so the base's context network trains too."""
    if isinstance(module, Flow) and module.conditional:
        return -module.log_prob(x, context).mean()
    return nll(bijector_of(module), x, block_context(module, context))


def prepared(case_id: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[nn.Module, Case]:
    """Build a case, initialise it on a batch and take a few Adam steps so it is no identity."""
    torch.manual_seed(seed)
    case = CASES[case_id]
    module = case.factory().to(dtype).train()
    f = bijector_of(module)
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        f(case.draw(32, dtype), block_context(module, case.draw_context(32, dtype)))
    if params:
        opt = torch.optim.Adam(params, lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            loss_of(module, case.draw(16, dtype), case.draw_context(16, dtype)).backward()
            opt.step()
    return module, case


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The suite's tensors are tiny: on a small shared machine intra-op threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_addoption(parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
