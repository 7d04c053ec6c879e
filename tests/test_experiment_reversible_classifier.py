"""Smoke test of ``experiments/reversible_classifier.py``: tiny run, table and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from conftest import load_experiment, usage_error


def load_script() -> ModuleType:
    return load_experiment("reversible_classifier")


def test_quick_run_table_and_json(tmp_path: Path, capsys) -> None:
    script = load_script()
    path = tmp_path / "classifier.json"
    assert script.main(["--quick", "--steps", "3", "--json", str(path)]) == 0
    printed = capsys.readouterr().out

    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | blocks | params | test acc | bytes kept, ordinary")
    cells = [[c.strip() for c in line.split("|")[1:3]] for line in table[1:]]
    assert cells == [
        ["i-RevNet-style conv", "2"],
        ["i-RevNet-style conv", "8"],
        ["reversible ViT", "2"],
        ["reversible ViT", "8"],
    ]

    result = json.loads(path.read_text())
    assert result["steps"] == 3 and result["quick"] is True
    rows = result["rows"]
    for shallow, deep in (rows[0:2], rows[2:4]):
        assert 0.0 <= shallow["test_accuracy"] <= 1.0 and deep["test_accuracy"] is None
        assert shallow["cpu_ms_per_step[memory-saving]"] > 0
        # memory-saving keeps the same bytes at 4x depth; ordinary keeps ~4x more
        assert deep["kept_bytes[memory-saving]"] == shallow["kept_bytes[memory-saving]"]
        assert deep["kept_bytes[memory-saving]"] < deep["kept_bytes[ordinary]"] / 4
        assert deep["kept_bytes[ordinary]"] > 2 * shallow["kept_bytes[ordinary]"]
        for r in (shallow, deep):
            assert r["gradient_difference"] < 1e-4  # float32 reconstruction, a few blocks


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--depth", "1"], "argument --depth: must be at least 2, got 1"),
        (["--steps", "-1"], "argument --steps: must be at least 0, got -1"),
        (["--depth", "two"], "argument --depth: expected an integer, got 'two'"),
    ],
    ids=["depth-1", "negative-steps", "not-an-integer"],
)
def test_a_bad_size_is_one_usage_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert message in usage_error(load_script().main, ["--quick", *argv], capsys)
