"""Smoke test of experiments/density.py with --quick (tiny models, a few steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_experiment, usage_error


def run_script(argv: list[str]) -> int:
    return load_experiment("density").main(argv)


def test_density_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, figure = tmp_path / "density.json", tmp_path / "figures" / "density_toys.png"
    argv = ["--quick", "--steps", "10", "--data", "digits,moons", "--downsampling", "squeeze,learned"]
    assert run_script([*argv, "--json", str(report), "--figure", str(figure)]) == 0
    out = capsys.readouterr().out

    expected = [(m, "digits", d) for m in ("RealNVP", "Glow", "i-ResNet") for d in ("squeeze", "learned")]
    expected += [(m, "moons", "-") for m in ("RealNVP", "Glow", "i-ResNet")]
    table = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [tuple(cells[:3]) for cells in table[1:]] == [(f"| {m}", d, s) for m, d, s in expected]
    for cells in table[1:]:
        assert cells[6].split()[0] != "-" and math.isfinite(float(cells[6].split()[0]))
    assert figure.stat().st_size > 0

    rows = json.loads(report.read_text())["rows"]
    assert [(r["model"], r["data"], r["downsampling"] or "-") for r in rows] == expected
    for r in rows:
        assert r["error"] is None and r["steps"] == 10 and r["params"] > 0
        assert math.isfinite(r["test"]) and math.isfinite(r["wall_time"])
        # Bits/dim against the uniform baseline log2(17) = 4.09; NLL in nats on the toys.
        assert 0 < r["test"] < (6 if r["data"] == "digits" else 10)
        if r["model"] == "i-ResNet":
            # The exact log-det and the 5-term series agree closely on a barely trained model.
            assert abs(r["test"] - r["test_estimator"]) < 0.05
        else:
            assert r["test_estimator"] is None
    assert not list(tmp_path.glob("**/.*.tmp"))  # atomic writes leave no temporary files


def test_vector_flows_on_a_toy_and_their_image_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_script(["--quick", "--steps", "5", "--models", "nsf,maf", "--data", "moons"]) == 0
    out = capsys.readouterr().out
    assert "| NSF | moons |" in out and "| MAF | moons |" in out
    err = usage_error(run_script, ["--quick", "--models", "nsf", "--data", "digits"], capsys)
    assert "nsf model vectors only" in err


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--seed", "-3", "must be at least 0, got -3"),
        ("--seed", "4294967296", "must be at most 4294967295, got 4294967296"),
        ("--lr", "0", "must be > 0, got 0"),
    ],
    ids=["negative-seed", "seed-too-large", "zero-lr"],
)
def test_a_value_out_of_range_is_one_usage_line(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(load_experiment("density").parse, ["--quick", option, value], capsys)
    assert f"argument {option}: {message}" in err


def test_a_figure_below_a_file_is_refused_before_the_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    err = usage_error(load_experiment("density").parse, ["--quick", "--figure", str(blocker / "toys.png")], capsys)
    assert f"argument --figure: {blocker / 'toys.png'}: cannot write there" in err
