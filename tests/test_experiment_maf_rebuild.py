"""Smoke test: experiments/maf_rebuild.py --quick prints its table."""

from __future__ import annotations

from conftest import load_experiment


def test_quick_run(capsys) -> None:
    assert load_experiment("maf_rebuild").main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| 4 |" in out and "opted in" in out
