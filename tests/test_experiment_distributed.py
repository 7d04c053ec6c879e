"""Smoke test of experiments/distributed.py: ``--quick`` runs both modes and prints the table."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import load_experiment


def test_quick_run(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    experiment = load_experiment("distributed")
    threads = torch.get_num_threads()
    try:
        assert experiment.main(["--quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d) x (\d) \| (\d+) \| [\d, ]+ \| (\d+) \| (\d+) \| ([\d.]+) \|$", out, re.M)
    assert [(p, t) for p, t, *_ in rows] == [("2", "1"), ("1", "2"), ("1", "1")]
    for _, _, rate, peak, imported, _ in rows:
        assert int(rate) > 0 and int(peak) >= int(imported) > 0
    # Both modes train the same run: one global batch, keyed noise, all-reduced gradients.
    losses = [float(loss) for *_, loss in rows]
    assert losses[0] == pytest.approx(losses[1], abs=1e-3) and losses[1] == pytest.approx(losses[2], abs=1e-3)
    assert re.search(r"throughput 2 x 1 / 1 x 2: [\d.]+", out)


def test_the_rendezvous_port_is_held_from_the_start() -> None:
    # The store this script serves binds a port the OS assigns and keeps it: no other
    # process can take it between its choice and the ranks' start (a port found free and
    # closed again could be, failing one quick run in about eight).
    store = load_experiment("distributed")._store(5.0)
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", store.port))


def test_a_launch_past_its_timeout_leaves_no_rank_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = load_experiment("distributed")
    started: list[subprocess.Popen] = []
    start = subprocess.Popen

    def popen(*args, **kwargs) -> subprocess.Popen:
        started.append(start(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(experiment.subprocess, "Popen", popen)
    args = argparse.Namespace(steps=1, batch=2, quick=True, timeout=0.2)
    with pytest.raises(subprocess.TimeoutExpired):
        experiment._launch(2, 1, args, tmp_path / "missing.pt", tmp_path / "out")
    assert len(started) == 2 and all(process.poll() is not None for process in started)


def test_a_rank_leaves_without_finalising_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    # Finalising while a gloo thread still drops its last collective's tensors aborted a
    # rank now and then (status -6, about one quick run in ten): a rank must leave by
    # os._exit once its figures are written, after the work, not before it.
    experiment = load_experiment("distributed")
    calls: list[str] = []

    class Left(Exception):
        pass

    def leave(code: int) -> None:
        calls.append(f"exit {code}")
        raise Left

    monkeypatch.setattr(experiment, "worker", lambda args: calls.append("worker"))
    monkeypatch.setattr(experiment.os, "_exit", leave)
    with pytest.raises(Left):
        experiment.main(["--worker"])
    assert calls == ["worker", "exit 0"]
