"""Smoke test of experiments/vi.py with --quick (tiny flows, a few steps, flows only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flows.targets import RingMixture

from conftest import load_experiment, usage_error


def test_quick_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "vi.json"
    argv = ["--quick", "--no-peers", "--parts", "fits,memory,estimators", "--json", str(report)]
    assert load_experiment("vi").main(argv) == 0
    out = capsys.readouterr().out
    for target in ("ring", "two-moons", "double-well", "gaussian"):
        assert f"| {target} |" in out
    result = json.loads(report.read_text())
    arms = [(r["target"], r["mixing"]) for r in result["fits"]]
    expected = [(t, "swap") for t in ("ring", "two-moons", "double-well", "gaussian")] + [("gaussian", "lu")]
    assert arms == expected + [("ring", "swap+anneal"), ("two-moons", "swap+anneal")]
    for r in result["fits"]:
        assert r["library"] == "flows" and 0 < r["ess"] <= 1 and math.isfinite(r["log_z_error"])
        assert 0 <= r["modes_covered"] <= r["modes"]
    assert [(r["objective"], r["gradient"]) for r in result["estimators"]] == [("iw", "reparam"), ("iw", "dreg")]
    assert all(0 < r["ess"] <= 1 for r in result["estimators"])
    memory = result["memory"]
    assert [r["depth"] for r in memory] == [2, 8]
    # Memory-saving sampling keeps the same bytes at depth 8 as at 2; ordinary keeps more.
    assert memory[1]["kept_memory_saving"] == memory[0]["kept_memory_saving"]
    assert memory[1]["kept_ordinary"] > 3 * memory[0]["kept_ordinary"]
    assert all(r["gradient_parity"] < 1e-5 for r in memory)
    assert not list(tmp_path.glob(".*.tmp"))  # the JSON was written atomically


def test_a_diverged_run_is_a_row_of_its_arm(capsys: pytest.CaptureFixture[str]) -> None:
    """A fit that diverges (``DivergedError``) is counted as covering no mode, and the arm's
    medians are those of the runs that finished, instead of stopping the comparison."""
    vi = load_experiment("vi")

    class Overflowing(RingMixture):
        def log_prob(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x[:, 0], math.inf)  # the loss is -inf at step 1

    recipe = vi.Recipe(layers=2, hidden=8, batch=16, steps=3, lr=1e-3, eval_samples=64)
    ring = RingMixture()
    rows = []
    for target in (Overflowing(), ring):
        result, per_step = vi._ours(target, recipe, "swap", 0)
        rows.append(vi._row(ring, "ring", "given", "swap", "flows", 0, result, per_step))
    diverged, finished = rows
    assert math.isnan(diverged["ess"]) and diverged["modes_covered"] == 0
    assert math.isfinite(finished["ess"])
    vi._fits_table(rows)
    out = capsys.readouterr().out
    assert "(1 diverged)" in out and f"| {finished['ess']:.3f} |" in out


def test_layout_sensitive_targets_also_run_with_their_coordinates_reversed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vi = load_experiment("vi")
    moons = vi.make_target("two-moons")
    reversed_moons = vi.Reversed(moons)
    x = torch.randn(7, 2, dtype=torch.float64)
    torch.testing.assert_close(reversed_moons.log_prob(x), moons.log_prob(x.flip(-1)))
    assert reversed_moons.log_normalizer == moons.log_normalizer and reversed_moons.modes == 2
    report = tmp_path / "vi.json"
    argv = ["--quick", "--no-peers", "--parts", "fits", "--targets", "ring,two-moons", "--anneal-steps", "0"]
    assert vi.main([*argv, "--layouts", "given,reversed", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["fits"]
    layouts = [(r["target"], r["layout"]) for r in rows]
    assert layouts == [("ring", "given"), ("two-moons", "given"), ("two-moons", "reversed")]
    out = capsys.readouterr().out
    assert "Pooled over the layouts" in out and "| two-moons | given, reversed | swap | flows | " in out
    with pytest.raises(SystemExit):
        vi.main([*argv, "--layouts", "mirrored"])
    assert "--layouts: unknown mirrored" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--first-seed", "-1"], "argument --first-seed: must be at least 0, got -1"),
        (["--first-seed", "4294967296"], "argument --first-seed: must be at most 4294967295, got 4294967296"),
        (
            ["--first-seed", "4294967295", "--seeds", "2"],
            "--first-seed 4294967295: with 2 seed(s) the last is 4294967296, past the largest seed 4294967295",
        ),
        (["--seeds", "0"], "argument --seeds: must be at least 1, got 0"),
    ],
    ids=["negative", "too-large", "range-past-the-largest", "no-seeds"],
)
def test_seeds_out_of_range_are_one_usage_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    quick = ["--quick", "--no-peers", "--parts", "fits", "--targets", "ring", "--anneal-steps", "0", "--steps", "1"]
    assert message in usage_error(load_experiment("vi").main, [*quick, *argv], capsys)
