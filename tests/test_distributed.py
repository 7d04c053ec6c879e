"""Two processes (gloo on loopback) against one: DistributedDataParallel and the trainer.

``Flow.forward`` is ``log_prob``, so ``DistributedDataParallel(flow)(x)`` all-reduces the
gradients; ActNorm initialises from the statistics of the global batch. After a few steps
on halves of a global batch, both ranks hold the parameters a single process reaches on
the whole batch, in ordinary and in memory-saving mode; the same holds for
``flows.train`` in a process group (and for a streaming dataset read by loader workers),
and a checkpoint resumes at the other world size exactly where it stopped. ``torchrun``
runs ``flows train`` unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from flows import data as datasets
from flows import distributed
from flows.data.streaming import open_path
from flows.models import Glow
from flows.training import TrainConfig, load_checkpoint, train

STEPS, BATCH = 3, 16
ROOT = Path(__file__).resolve().parents[1]
# Float64 parameters after a few Adam steps: the ranks' averaged gradients differ from one
# process's by rounding only (summation order), which Adam's normalisation can amplify
# where a gradient is near zero.
RTOL, ATOL = 1e-7, 1e-9


def _model(memory_saving: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Glow((1, 4, 4), levels=2, steps=2, hidden_channels=8, split_prior=True).double()
    model.memory_saving = memory_saving
    return model


def _batches() -> torch.Tensor:
    return torch.rand(STEPS, BATCH, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _train(model: torch.nn.Module, batches: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in batches:
        opt.zero_grad()
        (-model(x).mean()).backward()
        opt.step()


def _join_group(rank: int, port: int) -> None:
    """Join the group as a client of the test's store (torchrun's agent-store protocol)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)


def _spawn(worker: Callable[..., None], *args: Any, timeout: float = 240) -> None:
    """Run ``worker(rank, port, *args)`` in 2 processes; fail (killing them) past ``timeout`` s.

    This process serves the rendezvous store on a port the OS assigns as it binds (a port
    found free and closed could be taken before rank 0 bound it); the ranks are its clients.
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = mp.start_processes(worker, args=(store.port, *args), nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"2 processes did not finish within {timeout} s")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_training(ranks: list[dict], single: dict) -> None:
    """Both ranks hold bitwise the same state, and it is the single process's."""
    for name, expected in single.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0][name], expected, rtol=RTOL, atol=ATOL, msg=name)


# -- DDP around a Flow -----------------------------------------------------------------------


def _ddp_worker(rank: int, port: int, memory_saving: bool, out: str) -> None:
    _join_group(rank, port)
    try:
        model = _model(memory_saving)
        half = _batches()[:, rank * BATCH // 2 : (rank + 1) * BATCH // 2]
        _train(DistributedDataParallel(model), half)
        torch.save(_state(model), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("memory_saving", [False, True], ids=["ordinary", "memory-saving"])
def test_two_processes_train_as_one_on_the_global_batch(memory_saving: bool, tmp_path: Path) -> None:
    out = str(tmp_path / "state")
    _spawn(_ddp_worker, memory_saving, out)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    single = _model(memory_saving)
    _train(single, _batches())
    for name, expected in single.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0][name], expected, rtol=1e-9, atol=1e-11, msg=name)


# -- flows.train in a process group ------------------------------------------------------------


def _glow(memory_saving: bool = False, n_levels: int = 17) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Glow((1, 8, 8), levels=1, steps=2, hidden_channels=8, n_levels=n_levels).double()
    model.memory_saving = memory_saving
    return model


def _config(steps: int, out: Path, resume: bool = False) -> TrainConfig:
    # checkpoint_every=1: a checkpoint per step, so the resumed runs start where these stop.
    return TrainConfig(
        steps=steps,
        batch_size=BATCH,
        lr=3e-3,
        warmup=2,
        init_batch_size=40,
        eval_every=STEPS,
        checkpoint_every=1,
        validation=32,
        progress=False,
        out_dir=out,
        resume=resume,
    )


def _digits_npy(folder: Path) -> Path:
    """The digits' training images as a .npy file (8-bit levels 0..16)."""
    file = folder / "digits.npy"
    np.save(file, datasets.load("digits").train.numpy())
    return file


def _in_memory(stream: datasets.Dataset) -> datasets.Dataset:
    """The examples of a streaming dataset, held in memory under the same split."""
    read = [split[torch.arange(len(split))] for split in (stream.train, stream.test)]
    return datasets.Dataset("in-memory", *read, stream.n_levels, stream.shape)


def _trainer_worker(rank: int, port: int, root: str) -> None:
    _join_group(rank, port)
    out = Path(root)
    digits = datasets.load("digits")
    try:
        for name, memory_saving in (("ordinary", False), ("memory-saving", True)):
            model = _glow(memory_saving)
            history = train(model, digits, _config(STEPS, out / name))
            torch.save({"state": _state(model), "history": history}, out / f"{name}.{rank}")
        # A run of one process, resumed here in two.
        model = _glow()
        history = train(model, digits, _config(2 * STEPS, out / "from-one", resume=True))
        torch.save({"state": _state(model), "history": history}, out / f"from-one.{rank}")
        # Streaming data: each rank's loader workers read its shards from a memory map.
        stream = open_path(out / "digits.npy", workers=1)
        model = _glow(n_levels=stream.n_levels)  # a uint8 file's levels count as 8-bit
        train(model, stream, _config(STEPS, out / "stream"))
        torch.save({"state": _state(model)}, out / f"stream.{rank}")
    finally:
        dist.destroy_process_group()


def _failing_write_worker(rank: int, port: int, root: str) -> None:
    import errno

    import flows.training

    _join_group(rank, port)
    real, calls = flows.training.save_checkpoint, []

    def full_disk(*args: Any, **kwargs: Any) -> None:  # the second checkpoint (of step 1) finds the disk full
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)

    if rank == 0:
        flows.training.save_checkpoint = full_disk
    began = time.monotonic()
    try:
        train(_glow(), datasets.load("digits"), _config(STEPS, Path(root) / "run"))
        outcome = "no error"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test reads
        outcome = f"{type(error).__name__}: {error}"
    Path(root, f"outcome.{rank}").write_text(f"{time.monotonic() - began:.1f}\n{outcome}")
    dist.destroy_process_group()


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_at_once(tmp_path: Path) -> None:
    """Rank 0 alone writes; its failure (a full disk) is shared, so every rank raises the same
    one line at once (the others waited in their next collective until its timeout: 30 min)."""
    _spawn(_failing_write_worker, str(tmp_path), timeout=180)
    outcomes = [Path(tmp_path, f"outcome.{rank}").read_text().split("\n", 1) for rank in range(2)]
    for seconds, outcome in outcomes:
        assert outcome.startswith("CheckpointError: ") and "could not be written at step 1" in outcome, outcome
        assert "No space left on device" in outcome and float(seconds) < 120
    assert outcomes[0][1] == outcomes[1][1]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer's runs in 2 processes (one spawn for all, to pay the start-up once)."""
    root = tmp_path_factory.mktemp("ddp")
    train(_glow(), datasets.load("digits"), _config(STEPS, root / "from-one"))
    _digits_npy(root)
    _spawn(_trainer_worker, str(root))
    return root


def _ranks(root: Path, name: str) -> list[dict]:
    return [torch.load(root / f"{name}.{r}", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("memory_saving", [False, True], ids=["ordinary", "memory-saving"])
def test_train_in_two_processes_equals_one(two_process_runs: Path, memory_saving: bool, tmp_path: Path) -> None:
    name = "memory-saving" if memory_saving else "ordinary"
    ranks = _ranks(two_process_runs, name)
    single = _glow(memory_saving)
    history = train(single, datasets.load("digits"), _config(STEPS, tmp_path))
    # ActNorm's data-dependent init (all-reduced moments) and every weight agree bitwise on
    # the two ranks, and with one process on the same global batches.
    assert any(".initialized" in k for k in ranks[0]["state"])
    _assert_same_training([r["state"] for r in ranks], _state(single))
    for r in ranks:
        np.testing.assert_allclose(r["history"]["train"], history["train"], rtol=1e-12)
        np.testing.assert_allclose(r["history"]["validation"], history["validation"], rtol=1e-12)
        assert r["history"]["final_test"] == pytest.approx(history["final_test"], rel=1e-12)
    # Rank 0 alone wrote the run's files.
    assert load_checkpoint(two_process_runs / name)["step"] == STEPS


def test_checkpoint_of_two_processes_resumes_in_one(two_process_runs: Path, tmp_path: Path) -> None:
    digits = datasets.load("digits")
    resumed = _glow()
    train(resumed, digits, _config(2 * STEPS, two_process_runs / "ordinary", resume=True))
    whole = _glow()
    uninterrupted = train(whole, digits, _config(2 * STEPS, tmp_path))
    history = load_checkpoint(two_process_runs / "ordinary")["history"]
    np.testing.assert_allclose(history["train"], uninterrupted["train"], rtol=1e-12)
    for name, expected in _state(whole).items():
        torch.testing.assert_close(resumed.state_dict()[name], expected, rtol=RTOL, atol=ATOL, msg=name)


def test_checkpoint_of_one_process_resumes_in_two(two_process_runs: Path, tmp_path: Path) -> None:
    ranks = _ranks(two_process_runs, "from-one")
    whole = _glow()
    uninterrupted = train(whole, datasets.load("digits"), _config(2 * STEPS, tmp_path))
    _assert_same_training([r["state"] for r in ranks], _state(whole))
    np.testing.assert_allclose(ranks[0]["history"]["train"], uninterrupted["train"], rtol=1e-12)
    assert [s["start_step"] for s in ranks[0]["history"]["sessions"]] == [0, STEPS]


def test_streaming_data_in_two_processes_equals_one_in_memory(two_process_runs: Path, tmp_path: Path) -> None:
    ranks = _ranks(two_process_runs, "stream")
    stream = open_path(two_process_runs / "digits.npy")
    single = _glow(n_levels=stream.n_levels)
    train(single, _in_memory(stream), _config(STEPS, tmp_path))
    _assert_same_training([r["state"] for r in ranks], _state(single))


# -- what a single process sees ------------------------------------------------------------


def test_single_process_defaults() -> None:
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.shard(7) == slice(0, 7)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()


@pytest.mark.parametrize("n, world", [(16, 2), (10, 3), (5, 4), (3, 1)])
def test_shards_tile_the_batch_in_order(n: int, world: int) -> None:
    covered = [i for r in range(world) for i in range(n)[distributed.shard(n, r, world)]]
    assert covered == list(range(n))


def test_a_launched_rank_without_a_process_group_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    moons = datasets.load("moons", n_train=64, n_test=16)
    with pytest.raises(RuntimeError, match="rank 1 of 2 started by torchrun.*init_process_group"):
        train(Glow((2,), levels=1, steps=1, hidden_channels=4), moons, TrainConfig(steps=1, progress=False))
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


# -- the command line under torchrun -------------------------------------------------------------


def test_torchrun_runs_flows_train(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "flows", "train", "--levels", "1", "-K", "1", "--hidden", "8", "--batch", "16"]
    command += ["--steps", "2", "--eval-every", "2", "--threads", "1", "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone prints and writes; the run is that of one process at the same global batch.
    assert done.stdout.count("test bits/dim") == 1 and done.stdout.count("wrote ") == 3
    assert load_checkpoint(out)["step"] == 2 and (out / "samples.png").is_file()


def test_cli_refuses_a_batch_that_does_not_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from flows.cli import main

    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # as in a group of 2 processes
    argv = ["train", "--levels", "1", "-K", "1", "--hidden", "8", "--batch", "15", "--steps", "1"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flows train: error: --batch 15: batch_size 15 does not split over 2 processes; give a multiple of 2"
    argv = ["train", "--levels", "1", "-K", "1", "--hidden", "8", "--batch", "16", "--init-micro-batch", "15"]
    assert main([*argv, "--steps", "1", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flows train: error: --init-micro-batch 15 does not split over 2 processes; give a multiple of 2"


def test_under_a_launcher_rank_0_alone_prints_a_usage_error_and_failures_name_their_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Every rank parses the same command line: a usage error is printed once, by rank 0; a
    run-time failure may be one rank's own, so each rank prints it, saying which."""
    from flows.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--data", "nope", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--data", "nope", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("flows train: error: unknown dataset 'nope'")
    monkeypatch.setenv("RANK", "1")
    assert main(["sample", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("flows sample [rank 1]: error: ")
