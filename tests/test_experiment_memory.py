"""Smoke test of ``experiments/memory.py``: tiny sizes, real subprocess RSS, sane numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from conftest import load_experiment, usage_error


def load_script() -> ModuleType:
    return load_experiment("memory")


def test_quick_reversible_table_and_json(tmp_path: Path, capsys) -> None:
    memory = load_script()
    path = tmp_path / "memory.json"
    assert memory.main(["--quick", "--families", "reversible", "--json", str(path)]) == 0
    printed = capsys.readouterr().out

    family = memory.FAMILIES["reversible"]
    depths = family.quick.depths
    assert "### Reversible RevCoupling conv stack, x (4, 16, 8, 8)" in printed
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| depth | blocks | params | saved ordinary (MiB)")
    assert [line.split("|")[1].strip() for line in table[1:]] == [str(d) for d in depths]
    assert "(target <= 1.5x)" in printed and "- reversible, memory-saving: " in printed
    assert "against checkpointed: memory-saving time" in printed

    result = json.loads(path.read_text())
    assert result["quick"] is True
    rows = result["rows"]
    assert [r["depth"] for r in rows] == list(depths)
    output_mib = 4 * 16 * 8 * 8 * 4 / 2**20  # the stack's float32 output, all it keeps
    for r in rows:
        assert math.isclose(r["saved_mib[memory-saving]"], output_mib)
        assert r["params"] > 0
        for mode in memory.MODES:
            assert r[f"time_ms[{mode}]"] > 0 and r[f"wall_ms[{mode}]"] > 0
            # a fresh process holding torch is well above 50 MiB; one step adds a little
            assert 50 < r[f"rss_baseline_mib[{mode}]"] <= r[f"rss_peak_mib[{mode}]"] < 4096
            assert 0 <= r[f"rss_increase_mib[{mode}]"] < 1024
        for mode in memory.BASELINES:
            assert 0.2 < r[f"overhead[{mode}]"] < 20 and 0.1 < r[f"wall_overhead[{mode}]"] < 50
        # checkpointing keeps each RevCoupling's input: more than memory-saving, less than ordinary
        assert r["saved_mib[memory-saving]"] < r["saved_mib[checkpointed]"] < r["saved_mib[ordinary]"]
        assert r["gradient_parity"] < 1e-5  # float32, a few exact couplings
    deepest = rows[-1]
    assert deepest["saved_mib[memory-saving]"] < deepest["saved_mib[ordinary]"] / 4
    assert rows[0]["saved_mib[ordinary]"] < deepest["saved_mib[ordinary]"]


def test_glow_memory_saving_keeps_only_the_latent() -> None:
    """Memory-saving Glow keeps only the flat latent; the table has one row per depth."""
    memory = load_script()
    family = memory.FAMILIES["glow-32"]
    row = memory.measure_in_process(family, depth=1, repeats=1, quick=True)
    latent_mib = 2 * 3 * 32 * 32 * 4 / 2**20  # batch 2, float32
    assert row["saved_mib[ordinary]"] > 4 * latent_mib
    assert math.isclose(row["saved_mib[memory-saving]"], latent_mib, rel_tol=0.05)
    assert row["overhead[memory-saving]"] > 0 and row["wall_overhead[memory-saving]"] > 0
    assert not any("outer" in key for key in row)
    assert row["gradient_parity"] < 1e-4  # float32 Glow, flows.parity's rule
    assert row["saved_mib[memory-saving]"] < row["saved_mib[checkpointed]"] < row["saved_mib[ordinary]"]
    for mode in memory.MODES:
        row[f"rss_increase_mib[{mode}]"] = 1.0
    row["rss_mib[baseline]"] = 200.0
    lines = memory.table(family, [row], repeats=1, quick=True).splitlines()
    header, rule, data = lines[2], lines[3], lines[4]
    assert header.endswith(
        "| step ordinary (CPU ms) | step memory-saving (CPU ms) | step checkpointed (CPU ms) "
        "| memory-saving time overhead | checkpointed time overhead | grad parity |"
    )
    assert "outer chain only" not in header
    assert data.startswith("| 1 | 3 |") and header.count(" |") == rule.count("|") - 1 == data.count(" |")


def test_cuda_rows_table_and_summary() -> None:
    """On CUDA the table shows the device peak and wall times; the summary uses wall time."""
    memory = load_script()
    family = memory.FAMILIES["glow-paper"]
    row = {"depth": 8, "blocks": 24, "params": 1000, "saved_mib[ordinary]": 10.0, "saved_mib[memory-saving]": 0.75}
    row["saved_mib[checkpointed]"] = 2.5
    measured = (("ordinary", 100.0, 900.0), ("memory-saving", 140.0, 120.0), ("checkpointed", 130.0, 300.0))
    for mode, wall, peak in measured:
        row[f"wall_ms[{mode}]"], row[f"time_ms[{mode}]"], row[f"cuda_peak_mib[{mode}]"] = wall, 5.0, peak
    row["wall_overhead[memory-saving]"], row["overhead[memory-saving]"] = 1.4, 1.0
    row["wall_overhead[checkpointed]"], row["overhead[checkpointed]"] = 1.3, 1.0
    row["gradient_parity"] = 3.2e-7
    lines = memory.table(family, [row], repeats=3, quick=False).splitlines()
    header, rule, data = lines[2], lines[3], lines[4]
    peaks = "| CUDA step peak ordinary (MiB) | CUDA step peak memory-saving (MiB) | CUDA step peak checkpointed"
    assert peaks in header
    assert "RSS" not in header and "CPU ms" not in header
    assert data == (
        "| 8 | 24 | 1,000 | 10.00 | 0.750 | 2.500 | 900.0 | 120.0 | 300.0 | 100.0 | 140.0 | 130.0 | 1.40x | 1.30x "
        "| 3.2e-07 |"
    )
    assert header.count(" |") == rule.count("|") - 1 == data.count(" |")
    text = memory.summary([family], {"glow-paper": [row]}, cuda=True)
    assert "wall time" in text and "1.40x to 1.40x" in text and "met at 1 of 1" in text
    assert "memory-saving time 1.08x to 1.08x of checkpointing's; checkpointing keeps 3.3x to 3.3x" in text


def test_cuda_device_without_cuda_is_a_clear_error(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    memory = load_script()
    with pytest.raises(SystemExit):
        memory.main(["--quick", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "meta"])
def test_a_device_that_is_not_cpu_or_cuda_is_one_usage_line(device: str, capsys) -> None:
    err = usage_error(load_script().main, ["--quick", "--device", device], capsys)
    assert f"--device {device}: expected cpu, cuda or cuda:N" in err


def test_a_cuda_index_past_the_devices_is_one_usage_line(capsys) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = f"cuda:{torch.cuda.device_count()}"
    err = usage_error(load_script().main, ["--quick", "--device", device], capsys)
    assert f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)" in err
