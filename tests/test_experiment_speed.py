"""Smoke tests: the speed experiments print their tables with tiny settings."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import load_experiment, usage_error

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"


def test_speed_ops_counts_every_mode(capsys) -> None:
    argv = ["--steps", "1", "--hidden", "8", "--batch", "4", "--repeats", "1"]
    assert load_experiment("speed_ops").main(argv) == 0
    out = capsys.readouterr().out
    for mode in ("| ordinary |", "| memory-saving |", "| floor |"):
        assert mode in out
    assert "memory-saving / ordinary step" in out


def test_speed_ops_times_both_layouts_of_every_coupling_network_shape(capsys) -> None:
    argv = ["--steps", "1", "--hidden", "8", "--batch", "4", "--repeats", "1", "--layouts"]
    assert load_experiment("speed_ops").main(argv) == 0
    out = capsys.readouterr().out
    # One step per level at (1, 8, 8): the networks see (4, 2, 4, 4) and (4, 4, 2, 2).
    assert "| (4, 2, 4, 4) | 1 |" in out and "| (4, 4, 2, 2) | 1 |" in out
    assert "| all, ms per step | 2 |" in out
    assert "gradient error channels-last" in out


@pytest.mark.slow
def test_speed_compile_prints_each_region_unit(capsys) -> None:
    argv = ["--steps", "1", "--hidden", "8", "--batch", "4", "--repeats", "1"]
    assert load_experiment("speed_compile").main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in ("eager", "step", "block", "model", "floor (eager)"))


@pytest.mark.skipif(
    not (PEERS / "vector_nll.py").exists() or importlib.util.find_spec("zuko") is None,
    reason="needs the shared peers harness and zuko installed",
)
def test_vector_step_time_against_a_peer(capsys) -> None:
    argv = ["--peers", str(PEERS), "--libs", "flows,zuko", "--rounds", "2", "--warmup", "1"]
    assert load_experiment("vector_step_time").main(argv) == 0
    assert "flows / fastest peer" in capsys.readouterr().out


@pytest.mark.parametrize(
    "shape, message",
    [
        ("1,8", "expected C,H,W as three positive integers"),
        ("a,b,c", "expected C,H,W as three positive integers"),
        ("0,8,8", "expected C,H,W as three positive integers"),
        ("1,7,8", "H and W must be divisible by 4"),
        ("1,6,6", "H and W must be divisible by 4"),
    ],
    ids=["two-sizes", "not-integers", "no-channels", "odd-height", "one-level-only"],
)
@pytest.mark.parametrize("script", ["speed_ops", "speed_compile", "compiled_rebuild"])
def test_a_bad_shape_is_a_usage_error(script: str, shape: str, message: str, capsys) -> None:
    assert f"argument --shape: {message}" in usage_error(load_experiment(script).main, ["--shape", shape], capsys)


def test_speed_ops_builds_the_glow_a_shape_describes() -> None:
    speed_ops = load_experiment("speed_ops")
    assert speed_ops.image_shape("3,4,8") == (3, 4, 8)
    shape, model, x = speed_ops.build_from(argparse.Namespace(shape=(3, 4, 8), steps=1, hidden=4, batch=2))
    assert shape == (3, 4, 8) and x.shape == (2, 3, 4, 8) and model.log_prob(x).shape == (2,)


@pytest.fixture
def fake_peers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A peers folder whose harness builds flows and one peer, importable afresh."""
    (tmp_path / "vector_nll.py").write_text('BUILDERS = {"flows": None, "zuko": None, "uninstalled_peer": None}\n')
    monkeypatch.delitem(sys.modules, "vector_nll", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


@pytest.mark.parametrize(
    "libs, message",
    [
        ("flows,foo", "--libs: unknown 'foo'; choose from flows, zuko, uninstalled_peer"),
        ("flows", "give flows and at least one peer"),
        ("flows,flows", "flows given more than once"),
        ("flows,uninstalled_peer", "--libs: uninstalled_peer cannot be imported here"),
    ],
    ids=["unknown", "no-peer", "twice", "not-installed"],
)
def test_vector_step_time_refuses_bad_libs_before_any_work(fake_peers: Path, libs: str, message: str, capsys) -> None:
    err = usage_error(load_experiment("vector_step_time").main, ["--peers", str(fake_peers), "--libs", libs], capsys)
    assert message in err


def test_vector_step_time_refuses_a_folder_without_the_harness(tmp_path: Path, capsys) -> None:
    err = usage_error(load_experiment("vector_step_time").main, ["--peers", str(tmp_path)], capsys)
    assert f"--peers {tmp_path}: no vector_nll.py there" in err


@pytest.mark.parametrize("script", ["speed_ops", "speed_compile", "compiled_rebuild"])
def test_no_repeats_is_a_usage_error(script: str, capsys) -> None:
    err = usage_error(
        load_experiment(script).main, ["--steps", "1", "--hidden", "4", "--batch", "2", "--repeats", "0"], capsys
    )
    assert "argument --repeats: must be at least 1, got 0" in err
