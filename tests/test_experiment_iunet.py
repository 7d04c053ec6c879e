"""Smoke test of experiments/iunet.py: the --quick run writes its tables, JSON and figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_experiment, usage_error


@pytest.fixture(scope="module")
def experiment():
    return load_experiment("iunet")


def test_quick_run(experiment, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert experiment.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out

    rows = json.loads((tmp_path / "memory.json").read_text())
    depths = sorted({(r["levels"], r["blocks"]) for r in rows})
    assert depths == [(2, 1), (3, 2)]
    for depth in depths:
        kinds = {r["kind"]: r for r in rows if (r["levels"], r["blocks"]) == depth}
        assert set(kinds) == set(experiment.KINDS)
        for name in experiment.KIND_NAMES.values():
            assert f"| {depth[0]} x {depth[1]} | {name} |" in printed
    deepest = {r["kind"]: r for r in rows if (r["levels"], r["blocks"]) == depths[-1]}
    saving, ordinary = deepest["saving"], deepest["ordinary"]
    assert saving["saved_bytes"] + saving["ctx_bytes"] < ordinary["saved_bytes"] + ordinary["ctx_bytes"]
    # Memory-saving keeps about the output (and the loss's saved input), not the activations.
    assert saving["saved_bytes"] < 0.1 * ordinary["saved_bytes"]
    assert saving["params"] == ordinary["params"]
    iunets = deepest["iunets-saving"]
    if "missing" in iunets:
        assert "does not import" in printed
    else:
        assert iunets["saved_bytes"] < deepest["iunets-ordinary"]["saved_bytes"]

    summary = json.loads((tmp_path / "denoising.json").read_text())
    assert set(summary) == {"i-UNet", "U-Net", "noisy_psnr"}
    for name in ("i-UNet", "U-Net"):
        assert summary[name]["psnr"] > 0 and summary[name]["params"] > 0
        assert f"| {name}" in printed
    assert "| noisy input |" in printed

    for figure in ("iunet_denoising.png", "iunet_memory.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    assert (tmp_path / "report.md").read_text().count("\n|") >= 14


@pytest.mark.parametrize("option", ["--out", "--figures"])
def test_an_output_folder_below_a_file_is_refused_before_the_work(
    experiment, option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    err = usage_error(experiment.main, ["--quick", option, str(blocker / "sub")], capsys)
    assert f"argument {option}: {blocker / 'sub'}: {blocker} is a file, not a directory" in err
    with pytest.raises(SystemExit):
        experiment.main(["--quick", option, str(blocker)])
    assert f"argument {option}: {blocker}: is a file, not a directory" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--channels", "3", "--channels 3: the i-UNet splits half of them off as a skip; give an even number"),
        ("--channels", "0", "argument --channels: must be at least 2, got 0"),
        ("--size", "0", "argument --size: must be at least 1, got 0"),
        ("--size", "6", "--size 6: 3 levels halve it 2 time(s); give a multiple of 4 or fewer --levels"),
        ("--levels", "0", "argument --levels: must be at least 1, got 0"),
        ("--blocks", "-1", "argument --blocks: must be at least 1, got -1"),
        ("--sigma", "-1", "argument --sigma: must be >= 0, got -1"),
        ("--lr", "0", "argument --lr: must be > 0, got 0"),
    ],
    ids=[
        "odd-channels", "no-channels", "no-size", "size-not-halvable", "no-levels", "negative-blocks",
        "negative-sigma", "zero-lr",
    ],
)
def test_a_value_out_of_range_is_one_usage_line(
    experiment, option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error(experiment.parse_args, ["--quick", "--out", str(tmp_path), option, value], capsys)
