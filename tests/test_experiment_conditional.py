"""Smoke test of experiments/conditional.py with --quick (tiny models, a few steps, in-process)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_experiment, usage_error

ROOT = Path(__file__).resolve().parents[1]


def test_conditional_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    experiment = load_experiment("conditional")
    shipped = ROOT / "docs" / "figures" / experiment.FIGURE
    before = shipped.stat().st_mtime_ns if shipped.exists() else None
    assert experiment.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out

    report = json.loads((tmp_path / "conditional.json").read_text())
    for key in ("command", "date", "torch", "lscpu", "digits", "gaussian_linear"):
        assert report[key]
    digits = report["digits"]
    unconditional, conditional = digits["models"]["unconditional"], digits["models"]["conditional"]
    for r in (unconditional, conditional):
        assert r["steps"] == 20 and [s for s, _ in r["test_curve"]] == list(range(0, 21, 2))  # every 20 // 8 steps
    # Same architecture; the conditional model adds only the label's pathways.
    assert conditional["params"] > unconditional["params"]
    for r in (unconditional, conditional):
        # Bits/dim of a barely trained model, below the uniform baseline log2(17) = 4.09 plus slack.
        assert all(0 < v < 6 for _, v in r["test_curve"])
    assert math.isclose(digits["difference_bpd"], conditional["test_bpd"] - unconditional["test_bpd"])
    assert 0 < digits["marginal_test_bpd"] < 6 and 0 <= digits["bayes_classifier_accuracy"] <= 1
    # The judge is a good classifier of real digits even on this tiny run.
    assert digits["classifier_test_accuracy"]["SVC"] > 0.9
    assert [r["temperature"] for r in digits["sample_accuracy"]] == [0.5, 0.7, 1.0]
    for r in digits["sample_accuracy"]:
        assert r["samples"] == 100 and 0 <= r["SVC"] <= 1 and 0 <= r["logistic"] <= 1
    assert "| Glow, log p(x) |" in printed and "| T = 0.7 |" in printed

    gaussian = report["gaussian_linear"]
    assert math.isfinite(gaussian["task"]["true_mean_log_posterior"])
    ours = {r["model"]: r for r in gaussian["rows"] if r["lib"] == "flows" and "error" not in r}
    assert {"RealNVP", "Glow"} <= set(ours)
    for r in ours.values():
        assert r["params"] > 0 and math.isfinite(r["gap"]) and len(r["gap_curve"]) == 4
        assert math.isclose(r["gap"], gaussian["task"]["true_mean_log_posterior"] - r["test_log_q"])
    for lib in ("zuko", "nflows"):
        rows = [r for r in gaussian["rows"] if r["lib"] == lib]
        assert rows and all("error" in r and "does not import" in r["error"] or math.isfinite(r["gap"]) for r in rows)
    assert "| true posterior |" in printed

    # --quick writes its figure under --out and leaves docs/figures alone.
    assert (tmp_path / experiment.FIGURE).stat().st_size > 1000
    assert (shipped.stat().st_mtime_ns if shipped.exists() else None) == before
    assert (tmp_path / "report.md").read_text().count("\n|") >= 15
    assert not list(tmp_path.glob("**/.*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("option", ["--out", "--figures"])
def test_an_output_folder_below_a_file_is_refused_before_the_work(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    err = usage_error(load_experiment("conditional").main, ["--quick", option, str(blocker / "sub")], capsys)
    assert f"argument {option}: {blocker / 'sub'}: {blocker} is a file, not a directory" in err
    assert sorted(tmp_path.iterdir()) == [blocker]


OUT_OF_RANGE = [
    ("--seed", "-1", "must be at least 0, got -1"),
    ("--seed", "4294967296", "must be at most 4294967295, got 4294967296"),
    ("--threads", "0", "must be at least 1, got 0"),
    ("--levels", "4", "must be at most 3, got 4"),
    ("--hidden", "0", "must be at least 1, got 0"),
    ("--batch-size", "0", "must be at least 1, got 0"),
    ("--lr", "-1", "must be > 0, got -1"),
    ("--warmup", "0", "must be at least 1, got 0"),
    ("--validation", "0", "must be at least 1, got 0"),
    ("--per-class", "0", "must be at least 1, got 0"),
    ("--gl-hidden", "0", "must be at least 1, got 0"),
    ("--gl-batch", "-2", "must be at least 1, got -2"),
]


@pytest.mark.parametrize("option, value, message", OUT_OF_RANGE, ids=[f"{o}={v}" for o, v, _ in OUT_OF_RANGE])
def test_a_value_out_of_range_is_one_usage_line(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(
        load_experiment("conditional").parse_args, ["--quick", "--out", str(tmp_path), option, value], capsys
    )
    assert f"argument {option}: {message}" in err
