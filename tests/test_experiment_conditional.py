"""Smoke test of experiments/conditional.py with --quick (tiny models, a few steps, in-process)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_experiment

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
    with pytest.raises(SystemExit) as exit_info:
        load_experiment("conditional").main(["--quick", option, str(blocker / "sub")])
    assert exit_info.value.code == 2
    assert f"argument {option}: {blocker / 'sub'}: {blocker} is a file, not a directory" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [blocker]
