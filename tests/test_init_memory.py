"""Initialisation in micro-batches: the statistics of the whole init batch, the memory of a step.

The initialisation protocol (``Bijector.initialize_chunks``) is checked on every registry
case: chunk by chunk it gives the outputs and parameters of the one-batch pass. The memory
test runs ``experiments/init_memory.py``'s phases in fresh processes and compares peak RSS.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flows.models import Glow
from flows.training import initialize
from flows.transforms import ActNorm

from conftest import bijector_of, block_context, load_experiment
from registry import CASES

IDS = sorted(CASES)


def _actnorms(module: torch.nn.Module) -> list[ActNorm]:
    return [m for m in module.modules() if isinstance(m, ActNorm)]


@pytest.mark.parametrize("case_id", IDS)
def test_chunked_initialisation_equals_one_batch(case_id: str) -> None:
    case = CASES[case_id]
    torch.manual_seed(0)
    whole = case.factory().to(torch.float64).train()
    chunked = copy.deepcopy(whole)
    x = case.draw(23, torch.float64)
    raw = case.draw_context(23, torch.float64)
    with torch.no_grad():
        c = block_context(whole, raw)
        [expected] = bijector_of(whole).initialize_chunks([x], [c])
        sizes = [5, 5, 5, 5, 3]
        contexts = [None] * len(sizes) if c is None else list(c.split(sizes))
        outputs = bijector_of(chunked).initialize_chunks(list(x.split(sizes)), contexts)
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(whole.state_dict().items(), chunked.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)
    assert all(bool(norm.initialized) for norm in _actnorms(chunked))


@pytest.mark.parametrize("normalize", [False, True], ids=["plain-conditioners", "hidden-actnorms"])
def test_initialize_in_micro_batches_gives_the_one_batch_actnorm(normalize: bool) -> None:
    torch.manual_seed(0)
    whole = Glow((3, 8, 8), levels=2, steps=2, hidden_channels=8, num_classes=4, normalize=normalize)
    chunked = copy.deepcopy(whole)
    x, labels = 2 + 3 * torch.rand(100, 3, 8, 8), torch.randint(0, 4, (100,))
    initialize(whole, x, labels)
    initialize(chunked, x, labels, micro_batch_size=7)
    norms = list(zip(_actnorms(whole), _actnorms(chunked), strict=True))
    # The steps' 4 ActNorms, and with normalize those inside the conditioners, each from
    # the statistics of all 100 examples (they would see only the first 7 otherwise).
    assert len(norms) == (14 if normalize else 4) and all(bool(b.initialized) for _, b in norms)
    for a, b in norms:
        torch.testing.assert_close(b.bias, a.bias, rtol=1e-5, atol=1e-5)  # float32 means of O(1) values
        torch.testing.assert_close(b.log_scale, a.log_scale, rtol=1e-5, atol=1e-5)
        assert not torch.equal(b.bias, torch.zeros_like(b.bias))  # initialised from the data
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        initialize(chunked, x, labels, micro_batch_size=0)


def test_initialisation_and_evaluation_peak_below_a_training_step() -> None:
    # Glow (3, 64, 64), 3 levels x 4 steps, hidden 128, batch 8; init batch 512 in micro-batches
    # of 8 (in one pass it peaked at 2.9 times the training step), evaluation of 64 images in
    # batches of 8 (its memory does not grow with the number of images). Whole-process peaks
    # (VmHWM) of fresh processes, so torch and the model count in each alike.
    experiment = load_experiment("init_memory")
    peaks = experiment.measure(64, 8, 512, 64, phases=("init", "eval", "train"), parallel=3)
    train = peaks["train"]["peak_mib"]
    assert peaks["init"]["peak_mib"] <= train, peaks
    assert peaks["eval"]["peak_mib"] <= train, peaks


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "0"], "argument --size: must be at least 8, got 0"),
        (["--size", "12"], "argument --size: must be a multiple of 8"),
        (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
        (["--init-batch", "-1"], "argument --init-batch: must be at least 1, got -1"),
        (["--test", "0"], "argument --test: must be at least 1, got 0"),
    ],
    ids=["size-0", "size-12", "batch-0", "init-batch-negative", "test-0"],
)
def test_init_memory_refuses_bad_sizes_before_starting_a_phase(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_experiment("init_memory").main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
