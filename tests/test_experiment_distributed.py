"""Smoke test of experiments/distributed.py: ``--quick`` runs both modes and prints the table."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import load_experiment


def test_quick_run(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    experiment = load_experiment("distributed")
    threads = torch.get_num_threads()
    try:
        assert experiment.main(["--quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d) x (\d) \| (\d+) \| [\d, ]+ \| (\d+) \| (\d+) \| ([\d.]+) \|$", out, re.M)
    assert [(p, t) for p, t, *_ in rows] == [("2", "1"), ("1", "2"), ("1", "1")]
    for _, _, rate, peak, imported, _ in rows:
        assert int(rate) > 0 and int(peak) >= int(imported) > 0
    # Both modes train the same run: one global batch, keyed noise, all-reduced gradients.
    losses = [float(loss) for *_, loss in rows]
    assert losses[0] == pytest.approx(losses[1], abs=1e-3) and losses[1] == pytest.approx(losses[2], abs=1e-3)
    assert re.search(r"throughput 2 x 1 / 1 x 2: [\d.]+", out)
