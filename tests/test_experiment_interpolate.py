"""Smoke test of experiments/interpolate.py on a 20-step Glow checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flows
from flows.models import build_model

from conftest import load_experiment, usage_error


def tiny_checkpoint(out: Path) -> None:
    """A checkpoint in the format of ``flows train`` (config included), 20 steps."""
    spec = {"name": "digits", "seed": 0}
    data = flows.data.load("digits")
    kwargs = {"levels": 1, "steps": 2, "hidden_channels": 8, "n_levels": data.n_levels}
    config = {"model": "glow", "input_shape": list(data.shape), "kwargs": kwargs, "data": spec}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model("glow", data.shape, **kwargs)
        settings = flows.TrainConfig(
            steps=20, batch_size=32, eval_every=20, out_dir=out, progress=False, metadata=config
        )
        flows.train(model, data, settings)
    finally:
        torch.set_num_threads(previous)


def run_script(argv: list[str]) -> int:
    return load_experiment("interpolate").main(argv)


def test_interpolate_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "glow-digits"
    tiny_checkpoint(run)
    figure, report = tmp_path / "figures" / "interpolate_digits.png", tmp_path / "interp.json"
    argv = ["--checkpoint", str(run), "--pairs", "2", "--steps", "5", "--out", str(figure), "--json", str(report)]
    assert run_script(argv) == 0
    out = capsys.readouterr().out

    assert "round trip max |decode(encode(x)) - x|" in out
    assert sum(line.startswith(f"| {c} |") for c in range(10) for line in out.splitlines()) == 10
    for row in ("test pairs: bits/dim", "class means: bits/dim", "class means: norm / sqrt(D)"):
        assert f"| {row} |" in out
    assert figure.stat().st_size > 0

    numbers = json.loads(report.read_text())
    assert numbers["round_trip_error"] < 1e-4
    assert len(numbers["per_class"]) == 10
    assert 0.0 <= numbers["nearest_mean_accuracy"] <= 1.0
    for name in ("test pairs", "class means"):
        path = numbers["paths"][name]
        assert len(path["bpd"]) == 5 and all(v == v for v in path["bpd"])  # finite, no NaN


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (["--pairs", "0"], "argument --pairs: must be at least 1, got 0"),
        (["--steps", "1"], "argument --steps: must be at least 2, got 1"),
        (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["--out", "{blocker}/figure.png"], "argument --out: {blocker}/figure.png: cannot write there"),
        ([], "--checkpoint: no checkpoint at {missing}"),
    ],
    ids=["negative-seed", "no-pairs", "one-frame", "no-threads", "out-below-a-file", "missing-checkpoint"],
)
def test_bad_options_are_one_usage_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker, missing = tmp_path / "notes.txt", tmp_path / "no-run"
    blocker.write_text("a file, not a folder")
    err = usage_error(run_script, [a.format(blocker=blocker) for a in ["--checkpoint", str(missing), *argv]], capsys)
    assert message.format(blocker=blocker, missing=missing) in err
