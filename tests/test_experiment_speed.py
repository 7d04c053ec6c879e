"""Smoke tests: the speed experiments print their tables with tiny settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import load_experiment

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"


def test_speed_ops_counts_every_mode(capsys) -> None:
    argv = ["--steps", "1", "--hidden", "8", "--batch", "4", "--repeats", "1"]
    assert load_experiment("speed_ops").main(argv) == 0
    out = capsys.readouterr().out
    for mode in ("| ordinary |", "| memory-saving |", "| floor |"):
        assert mode in out
    assert "memory-saving / ordinary step" in out


def test_speed_ops_times_both_layouts_of_every_coupling_network_shape(capsys) -> None:
    argv = ["--steps", "1", "--hidden", "8", "--batch", "4", "--repeats", "1", "--layouts"]
    assert load_experiment("speed_ops").main(argv) == 0
    out = capsys.readouterr().out
    # One step per level at (1, 8, 8): the networks see (4, 2, 4, 4) and (4, 4, 2, 2).
    assert "| (4, 2, 4, 4) | 1 |" in out and "| (4, 4, 2, 2) | 1 |" in out
    assert "| all, ms per step | 2 |" in out


@pytest.mark.slow
def test_speed_compile_prints_each_region_unit(capsys) -> None:
    argv = ["--steps", "1", "--hidden", "8", "--batch", "4", "--repeats", "1"]
    assert load_experiment("speed_compile").main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in ("eager", "step", "block", "model", "floor (eager)"))


@pytest.mark.skipif(
    not (PEERS / "vector_nll.py").exists() or importlib.util.find_spec("zuko") is None,
    reason="needs the shared peers harness and zuko installed",
)
def test_vector_step_time_against_a_peer(capsys) -> None:
    argv = ["--peers", str(PEERS), "--libs", "flows,zuko", "--rounds", "2", "--warmup", "1"]
    assert load_experiment("vector_step_time").main(argv) == 0
    assert "flows / fastest peer" in capsys.readouterr().out
