"""Smoke test of experiments/meft.py: ``--quick`` runs end to end and its numbers make sense."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import load_experiment, usage_error


@pytest.fixture
def meft():
    return load_experiment("meft")


def test_quick_run(meft, tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    try:
        code = meft.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    # First table: one row per configuration, in order.
    table = out.split("| config | test acc |")[1].split("\n\n")[0]
    rows = {m.group(1): m for m in re.finditer(r"^\| ([\w-]+) \| ([\d.]+) \| ([\d,]+) \| ([\d,]+) \|", table, re.M)}
    assert list(rows) == meft.CONFIGS
    kept = {name: int(m.group(4).replace(",", "")) for name, m in rows.items()}
    trainable = {name: int(m.group(3).replace(",", "")) for name, m in rows.items()}
    assert kept["meft-memory-saving"] < kept["meft"] < kept["full"]
    assert trainable["meft"] == trainable["meft-memory-saving"] < trainable["full"]
    # Depth table: the memory-saving row keeps the same bytes at every depth.
    depth_table = out.split("| config | blocks |")[1]
    saving = re.findall(r"^\| meft-memory-saving \| (\d+) \| ([\d,]+) \|", depth_table, re.M)
    assert [int(b) for b, _ in saving] == [2, 4, 8]
    assert len({k for _, k in saving}) == 1
    assert (tmp_path / "meft.png").stat().st_size > 0
    # Gradient parity by flows.parity's rule, at conversion and after fine-tuning (float32).
    parity = re.search(r"gradient parity \(flows\.parity.*?\): (\S+) at conversion, (\S+) after", out)
    assert parity is not None
    assert all(float(v) < 1e-4 for v in parity.groups())


@pytest.mark.parametrize("option, name", [("--out", "sub"), ("--figure", "meft.png")])
def test_an_output_below_a_file_is_refused_before_the_work(meft, option, name, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    err = usage_error(meft.main, ["--quick", "--out", str(tmp_path / "run"), option, str(blocker / name)], capsys)
    assert f"argument {option}: {blocker / name}: " in err
    assert sorted(tmp_path.iterdir()) == [blocker]  # nothing made, not even --out


@pytest.mark.parametrize("option", ["--steps", "--depth"])
def test_a_worker_size_below_one_is_a_usage_error(meft, option, capsys):
    err = usage_error(meft.main, ["--worker", "full", option, "0"], capsys)
    assert f"argument {option}: must be at least 1, got 0" in err
