"""Fault injection: killed runs, corrupted checkpoints, divergence, Ctrl-C, full disks, bad options.

Every case runs a tiny Glow on digits for a few steps; the kill -9 cases run the command in
a child process (the only way to be killed), the rest call ``flows.cli.main`` in-process.
docs/faults.md tabulates the same cases with the output they give.
"""

from __future__ import annotations

import errno
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import flows.io
import flows.training
from flows.cli import DATA_NAMES, main
from flows.io import CheckpointError, load_verified, save_verified
from flows.models import load_model
from flows.training import BEST, CHECKPOINT, PREVIOUS, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "glow", "--data", "digits", "--levels", "1", "-K", "1", "--hidden", "8"]
QUIET = ["--no-progress", "--threads", "1", "--eval-every", "4", "--batch", "16"]
STEPS = 12


def train_argv(out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["train", *SMALL, *QUIET, "--steps", str(steps), "--out", str(out), *extra]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of STEPS steps, checkpointing every step."""
    out = tmp_path_factory.mktemp("reference")
    assert main(train_argv(out, "--checkpoint-every", "1")) == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict:
    return load_checkpoint(reference_dir)


@pytest.fixture()
def run(tmp_path: Path, reference_dir: Path) -> Path:
    """A copy of the reference run: checkpoint of step STEPS, previous of STEPS - 1."""
    out = tmp_path / "run"
    out.mkdir()
    for name in (CHECKPOINT, PREVIOUS, "history.json"):
        (out / name).write_bytes((reference_dir / name).read_bytes())
    return out


def exit_status(argv: list[str]) -> int:
    """``main(argv)``'s status, also when argparse exits."""
    try:
        return main(argv)
    except SystemExit as error:
        return int(error.code or 0)


def same_parameters(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["history"]["train"] == b["history"]["train"]  # exact floats
    for (name, x), y in zip(a["model"].items(), b["model"].values(), strict=True):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------------------------- kill -9

CHILD = textwrap.dedent(
    """
    import io, os, signal, sys, time
    import torch
    import flows.io
    from flows.cli import main

    where, at = sys.argv[1], int(sys.argv[2])
    calls = {"save": 0, "replace": 0}
    save, keep = torch.save, flows.io._keep_copy

    def half_save(obj, f):  # dies with half of a checkpoint written to its temporary file
        calls["save"] += 1
        if where == "random":
            time.sleep(0.05)  # a run slow enough for the random kill to land inside it
        if where == "save" and calls["save"] == at:
            buffer = io.BytesIO()
            save(obj, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        save(obj, f)

    def keep_then_die(path, previous):  # dies with the new checkpoint complete but not yet moved
        calls["replace"] += 1
        keep(path, previous)
        if where == "replace" and calls["replace"] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save, flows.io._keep_copy = half_save, keep_then_die
    sys.exit(main(sys.argv[3:]))
    """
)


def child(where: str, at: int, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, where, str(at), *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_runs_resume_to_the_uninterrupted_parameters(tmp_path: Path, reference: dict) -> None:
    out = tmp_path / "killed"
    argv = train_argv(out, "--checkpoint-every", "1")
    resume = [*argv, "--resume"]
    rng = random.Random(0)
    # Inside a checkpoint write (half written), between writing and moving it, and at a random moment.
    kills = [("save", 3, argv), ("replace", 2, resume), ("random", 0, resume)]
    for where, at, command in kills:
        process = child(where, at, command)
        if where == "random":
            # Once the child has resumed (it rewrote history.json), kill it at a random moment.
            stamp = (out / "history.json").stat().st_mtime_ns
            deadline = time.monotonic() + 60
            while process.poll() is None and (out / "history.json").stat().st_mtime_ns == stamp:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.15))
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=120)
        assert process.returncode == -signal.SIGKILL, process.stderr.read() if process.stderr else ""
        process.stderr.close()
        step = load_checkpoint(out)["step"]
        assert step < STEPS, f"the run finished before the {where} kill"
        if where == "save":
            # The half-written temporary file is left behind (the next run removes it).
            assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert main(resume) == 0
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    same_parameters(load_checkpoint(out), reference)
    assert load_checkpoint(out / PREVIOUS)["step"] == STEPS - 1


# ------------------------------------------------------------------------- corrupted files


def flip(data: bytes, position: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 0xFF
    return bytes(changed)


def tensor_position(data: bytes, reference: dict) -> int:
    """The middle of the largest weight's bytes inside the checkpoint file."""
    weight = max(reference["model"].values(), key=lambda t: t.numel())
    start = data.find(weight.contiguous().numpy().tobytes())
    assert start > 0
    return start + weight.numel() * weight.element_size() // 2


def edited_config(path: Path, recompute_digest: bool) -> None:
    """Widen the recorded model, as someone editing the file by hand would."""
    stored = torch.load(path, weights_only=True)
    payload = stored["payload"]
    payload["config"]["kwargs"]["hidden_channels"] = 16
    if recompute_digest:
        save_verified(payload, path)
    else:
        torch.save(stored, path)


CORRUPTIONS = {
    "empty": (lambda data, ref: b"", "empty"),
    "truncated": (lambda data, ref: data[: len(data) // 2], "truncated or corrupted"),
    "flipped-pickle-byte": (lambda data, ref: flip(data, 100), "truncated or corrupted"),
    "flipped-tensor-byte": (lambda data, ref: flip(data, tensor_position(data, ref)), "SHA-256 digest"),
    "png": (lambda data, ref: b"\x89PNG\r\n\x1a\n" + bytes(64), "not a torch checkpoint"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupted_checkpoint_is_one_line_naming_the_file(
    case: str, run: Path, reference: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt, expected = CORRUPTIONS[case]
    file = run / CHECKPOINT
    file.write_bytes(corrupt(file.read_bytes(), reference))
    for argv in (["sample", str(run)], train_argv(run, "--resume", steps=STEPS + 2)):
        assert main(argv) == 1
        line = one_line(capsys.readouterr().err)
        assert str(file) in line and expected in line, line
        # The previous checkpoint is intact, and the message says how to use it.
        assert f"{run / PREVIOUS} (step {STEPS - 1}) is intact" in line


def test_corrupted_best_points_to_the_training_checkpoint(
    run: Path, reference_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = run / BEST
    data = (reference_dir / BEST).read_bytes()
    best.write_bytes(data[: len(data) // 2])
    assert main(["sample", str(run)]) == 1
    line = one_line(capsys.readouterr().err)
    # best.pt is no training checkpoint: moving checkpoint.prev.pt onto it would be wrong.
    assert str(best) in line and f"--weights last reads {run / CHECKPOINT} instead" in line, line
    assert "move it onto" not in line
    assert main(["sample", str(run), "--weights", "last", "--out", str(run / "last.png")]) == 0


@pytest.mark.parametrize("recompute", [False, True], ids=["stale-digest", "recomputed-digest"])
def test_config_edited_to_another_size(recompute: bool, run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edited_config(run / CHECKPOINT, recompute)
    assert main(["sample", str(run)]) == 1
    line = one_line(capsys.readouterr().err)
    assert str(run / CHECKPOINT) in line
    assert ("do not fit the model" if recompute else "SHA-256 digest") in line, line


def test_a_foreign_torch_file_is_named(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="not written by flows"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- divergence


def test_diverging_lr_leaves_a_checkpoint_that_resumes_with_a_lower_lr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hlr"
    argv = train_argv(out, "--checkpoint-every", "1", steps=8)
    assert main([*argv, "--lr", "1e3", "--warmup", "0"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "non-finite" in line and "checkpoint.diverged.pt" in line and "is intact; resume from it" in line
    kept = load_checkpoint(out)
    # Its weights gave a finite loss at the next step, and it holds no diverged update.
    diverged = load_checkpoint(out / "checkpoint.diverged.pt")
    assert kept["step"] < diverged["step"]
    assert f"(step {kept['step']})" in line
    assert main([*argv, "--resume", "--lr", "1e-3"]) == 0
    final = load_checkpoint(out)
    assert final["step"] == 8 and all(math.isfinite(v) for v in final["history"]["train"])
    assert all(torch.isfinite(t).all() for t in final["model"].values() if t.is_floating_point())


def test_lr_on_resume_applies_and_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lr"
    assert main(train_argv(out, "--warmup", "0", steps=4)) == 0
    assert main(train_argv(out, "--warmup", "0", "--resume", "--lr", "0.01", steps=6)) == 0
    assert "changed settings (lr: 0.001 -> 0.01)" in capsys.readouterr().err
    state = load_checkpoint(out)
    assert state["history"]["lr"] == [1e-3] * 4 + [1e-2] * 2
    assert state["train"]["lr"] == 0.01 and state["scheduler"]["base_lrs"] == [0.01]
    assert [s["lr"] for s in state["history"]["sessions"]] == [1e-3, 1e-2]
    # Not given again: the checkpoint's rate, not the default, continues.
    assert main(train_argv(out, "--warmup", "0", "--resume", steps=7)) == 0
    assert load_checkpoint(out)["history"]["lr"][-1] == 1e-2


# ------------------------------------------------------------------- interrupts, disks, out


def test_ctrl_c_writes_a_checkpoint(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ctrl-c"
    step = flows.training._Run.train_step

    def interrupted_at_3(self):
        loss = step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in a terminal
        return loss

    monkeypatch.setattr(flows.training._Run, "train_step", interrupted_at_3)
    assert main(train_argv(out, "--checkpoint-every", "100")) == 130
    line = one_line(capsys.readouterr().err)
    assert "interrupted after step 3" in line and str(out / CHECKPOINT) in line and "--resume" in line
    assert load_checkpoint(out)["step"] == 3


def test_full_disk_is_one_line_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "full"
    save, calls = torch.save, []

    def full_disk(obj, f):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(obj, f)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(train_argv(out)) == 1
    line = one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "step 4" in line and "step 0 there is intact" in line
    assert load_checkpoint(out)["step"] == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_out_checked_before_anything_is_built(tmp_path: Path, monkeypatch, capsys) -> None:
    built = []
    monkeypatch.setattr("flows.cli._load_data", lambda *a, **k: built.append(1))
    (tmp_path / "file").write_text("")
    assert exit_status(train_argv(tmp_path / "file")) == 2
    assert "is a file" in one_line(capsys.readouterr().err)
    assert exit_status(train_argv(tmp_path / "file" / "below")) == 2
    assert "cannot write there" in one_line(capsys.readouterr().err)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(train_argv(locked / "run")) == 2
        assert "cannot write there" in one_line(capsys.readouterr().err)
    assert not built


def test_stale_temporaries_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".{CHECKPOINT}.{dead.pid}.tmp"
    live = tmp_path / f".{CHECKPOINT}.{os.getppid()}.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"someone else's")
    assert flows.io.remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and not stale.exists()


def test_save_verified_keeps_the_previous_file(tmp_path: Path) -> None:
    path, previous = tmp_path / "a.pt", tmp_path / "a.prev.pt"
    save_verified({"x": torch.ones(2)}, path, previous=previous)
    assert not previous.exists()
    save_verified({"x": torch.zeros(2)}, path, previous=previous)
    assert torch.equal(load_verified(previous)["x"], torch.ones(2))
    assert torch.equal(load_verified(path)["x"], torch.zeros(2))


# ------------------------------------------------------------------------------ bad options

USAGE = {
    "threads-0": (["train", "--threads", "0"], "--threads: must be at least 1, got 0"),
    "device-tpu9": (["train", "--device", "tpu9"], "--device tpu9: not a device name"),
    "checkpoint-every-negative": (["train", "--checkpoint-every", "-1"], "must be at least 1, got -1"),
    "lr-nan": (["train", "--lr", "nan"], "--lr: must be finite"),
    "hidden-0": (["train", "--hidden", "0"], "--hidden: must be at least 1, got 0"),
    "lipschitz-1": (["train", "--model", "iresnet", "--lipschitz", "1"], "must be > 0 and < 1"),
    "levels-too-many": (["train", "--levels", "4"], "the model options do not fit digits"),
    "sample-n-0": (["sample", "RUN", "--n", "0"], "--n: must be at least 1, got 0"),
    "sample-nan-temperature": (["sample", "RUN", "--temperatures", "nan"], "must be finite"),
    "interpolate-pairs-0": (["interpolate", "RUN", "--pairs", "0"], "--pairs: must be at least 1, got 0"),
    "interpolate-pairs-1000": (["interpolate", "RUN", "--pairs", "1000"], "--pairs 1000: the test split"),
    "resume-steps-below": (["train", "--out", "RUN", "--resume", "--steps", "3"], f"--steps 3 is below step {STEPS}"),
    "unknown-model": (["train", "--model", "flowpp"], "invalid choice: 'flowpp'"),
    "unknown-data": (["train", "--data", "digitz"], "unknown dataset 'digitz'; choose one of digits"),
    "validation-too-large": (["train", "--validation", "2000"], "leaves none of the 1497 training examples"),
    "conditional-moons": (["train", "--model", "realnvp", "--data", "moons", "--conditional"], "moons has no class"),
    "nsf-on-images": (["train", "--model", "nsf", "--data", "digits"], "NSF: input_shape must be (D,)"),
    "maf-on-images": (["train", "--model", "maf", "--data", "digits"], "MAF: input_shape must be (D,)"),
    "bench-nsf-on-images": (["bench", "--model", "nsf", "--data", "digits"], "NSF: input_shape must be (D,)"),
    "n-train-on-digits": (["train", "--n-train", "10"], "--n-train 10: digits has a fixed training set"),
    "n-test-on-mnist": (["train", "--data", "mnist", "--n-test", "10"], "--n-test 10: mnist has a fixed test split"),
    "workers-on-digits": (["train", "--workers", "2"], "--workers applies to --data PATH"),
    "lipschitz-on-glow": (["train", "--lipschitz", "0.5"], "--lipschitz applies to iresnet, not glow"),
    "direction-on-glow": (["train", "--direction", "sampling"], "--direction applies to realnvp, not glow"),
    "permutation-on-realnvp": (["train", "--model", "realnvp", "--permutation", "shuffle"], "applies to glow, not"),
    "coupling-on-maf": (["train", "--model", "maf", "--coupling", "affine"], "--coupling applies to glow, realnvp"),
    "levels-on-nsf": (["train", "--model", "nsf", "--data", "moons", "--levels", "2"], "--levels applies to"),
    "logit-alpha-on-nsf": (["train", "--model", "nsf", "--logit-alpha", "0.1"], "--logit-alpha applies to glow, "),
    "split-prior-both": (["train", "--split-prior", "--no-split-prior"], "not allowed with argument --split-prior"),
    "resume-other-model-and-data": (
        ["train", "--out", "RUN", "--resume", "--steps", "16", "--model", "realnvp", "-K", "2", "--data", "moons"],
        "--model realnvp, --data moons, -K 2: the run in",
    ),
    "resume-other-option": (
        ["train", "--out", "RUN", "--resume", "--steps", "16", "--no-lu", "--lipschitz", "0.5", "--conditional"],
        "--no-lu, --lipschitz 0.5, --conditional: the run in",
    ),
    "anneal-past-the-end": (
        ["train", "--objective", "reverse-kl", "--target", "two-moons", "--steps", "50", "--anneal-steps", "200"],
        "--anneal-steps 200: the annealing would not end before the last step",
    ),
    "sample-n-too-many": (["sample", "RUN", "--n", "100000"], "--n: must be at most 1024, got 100000"),
    "sample-out-jpg": (["sample", "RUN", "--out", "RUN/x.jpg"], "figures are written as PNG"),
    "vi-weights-best": (["sample", "VI", "--weights", "best"], "a variational run's, with one set of weights"),
}
if not torch.cuda.is_available():
    USAGE["device-cuda"] = (["train", "--device", "cuda"], "this machine has no cuda device")


@pytest.fixture(scope="module")
def variational_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A variational fit of a vector RealNVP to two-moons, for a few steps."""
    out = tmp_path_factory.mktemp("vi")
    argv = ["train", "--model", "realnvp", "--objective", "reverse-kl", "--target", "two-moons"]
    assert main([*argv, "--steps", "3", "--hidden", "8", "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("case", list(USAGE), ids=list(USAGE))
def test_usage_errors_are_one_line_exit_2(
    case: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    argv, expected = USAGE[case]
    argv = [a.replace("RUN", str(run)) for a in argv]
    if "VI" in argv:
        argv[argv.index("VI")] = str(request.getfixturevalue("variational_run"))
    out = tmp_path / "out"
    if argv[0] == "train" and "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    assert exit_status([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2
    line = one_line(capsys.readouterr().err)
    assert expected in line, line
    assert not out.exists()  # a refused run leaves no empty --out behind


def test_interpolate_draws_the_pairs_a_small_test_split_holds(tmp_path: Path, capsys) -> None:
    out = tmp_path / "five"
    assert main(train_argv(out, "--n-test", "5", steps=2)) == 0
    assert main(["interpolate", str(out)]) == 0  # 2 pairs, not the default 4
    assert exit_status(["interpolate", str(out), "--pairs", "3"]) == 2
    assert "--pairs 3: the test split of digits has 5 images, 2 pairs" in one_line(capsys.readouterr().err)


def test_samples_wrap_and_take_the_format_of_their_suffix(reference_dir: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    from flows import figures

    model, _ = load_model(reference_dir)
    sizes = {}
    for n in (32, 96):
        path = figures.save_samples(model, tmp_path / f"{n}.png", temperatures=(1.0,), n=n)
        sizes[n] = imread(path).shape[:2]
    assert sizes[96][1] == sizes[32][1] and sizes[96][0] > 2 * sizes[32][0]  # 32 to a row, then wrapped
    jpeg = figures.save_samples(model, tmp_path / "s.jpg", n=2)
    assert jpeg.read_bytes()[:2] == b"\xff\xd8"  # JPEG, not PNG bytes under a .jpg name


def test_a_variational_run_samples_and_loads(variational_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for given in (variational_run, variational_run / "model.pt"):
        model, state = load_model(given)
        assert state["config"]["target"] == "two-moons" and model.input_shape == (2,)
    assert main(["sample", str(variational_run)]) == 0
    assert f"wrote {variational_run / 'target.png'}" in capsys.readouterr().out


def test_batch_size_is_an_alias_of_batch(tmp_path: Path) -> None:
    assert main(["train", *SMALL, "--batch-size", "8", "--steps", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    assert load_checkpoint(tmp_path)["train"]["batch_size"] == 8


def test_a_bug_of_ours_still_shows_its_traceback(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ValueError("a bug inside the training loop")

    monkeypatch.setattr(flows.training, "_objective", broken)
    with pytest.raises(ValueError, match="a bug inside"):
        main(train_argv(tmp_path / "bug"))


def test_help_and_version_do_not_import_torch() -> None:
    code = "import sys; from flows.cli import main\ntry: main(['--version'])\nexcept SystemExit: pass\n"
    code += "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert result.stdout.split() == ["flows", "0.1.0", "False"]


def test_data_names_in_help_match_the_loader() -> None:
    from flows import data

    assert set(DATA_NAMES) == set(data.NAMES)


def test_an_experiment_refuses_an_unwritable_report_before_it_runs(tmp_path: Path, capsys) -> None:
    """``--json`` of the experiments is :func:`flows.io.writable_file`: a file below a file, or
    a directory, is one usage line at once, not a traceback after the work."""
    from conftest import load_experiment

    (tmp_path / "file").write_text("")
    vi = load_experiment("vi")
    cases = [(tmp_path / "file" / "x.json", "cannot write there"), (tmp_path, "cannot write there (is a directory")]
    for path, reason in cases:
        with pytest.raises(SystemExit) as stopped:
            vi.main(["--quick", "--no-peers", "--parts", "memory", "--json", str(path)])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --json: {path}: {reason}" in err and "Traceback" not in err
    assert vi.main(["--quick", "--no-peers", "--parts", "memory", "--json", str(tmp_path / "new" / "vi.json")]) == 0
    assert (tmp_path / "new" / "vi.json").is_file()


def test_an_output_folder_below_a_folder_one_cannot_search_is_one_usage_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """:func:`flows.io.writable_directory` where looking below an ancestor is refused
    (``Path.exists`` raises ``PermissionError`` there; root's tests cannot lock a folder):
    the usage line of an unwritable place, not a traceback."""
    import argparse

    locked = tmp_path / "locked"
    exists = Path.exists

    def refusing(path: Path, *args, **kwargs) -> bool:
        if locked in path.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", refusing)
    with pytest.raises(argparse.ArgumentTypeError, match=r"cannot write there \(Permission denied\); give another"):
        flows.io.writable_directory(str(locked / "sub" / "run"))


def test_resume_without_checkpoint_never_overwrites_what_is_left_of_a_run(tmp_path: Path, capsys) -> None:
    """``checkpoint.pt`` gone, ``checkpoint.prev.pt`` left: a new run would overwrite it (and
    ``best.pt``) within two saves. ``--resume`` refuses and says how to resume from it."""
    out = tmp_path / "run"
    assert main(train_argv(out)) == 0
    (out / "checkpoint.pt").rename(out / "checkpoint.prev.pt")
    before = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    capsys.readouterr()
    assert exit_status([*train_argv(out), "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "has no checkpoint.pt but holds checkpoint.prev.pt, best.pt of an earlier run" in line
    assert "move checkpoint.prev.pt onto checkpoint.pt to resume from it" in line
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before
    (out / "checkpoint.prev.pt").rename(out / "checkpoint.pt")  # the fix it names
    assert main([*train_argv(out), "--resume"]) == 0


@pytest.mark.parametrize("size, keep", [(100, 0.5), (4000, 0.5), (40000, 0.9)])
def test_a_truncated_checkpoint_is_named_in_one_short_line(size: int, keep: float, tmp_path: Path) -> None:
    """Cut anywhere, the reader's error is one sentence: torch 2.13's zip reader follows its
    own with a paragraph of advice, which the line leaves out."""
    from flows.io import CheckpointError, load_verified, save_verified

    path = tmp_path / "checkpoint.pt"
    save_verified({"step": 3, "weights": torch.randn(size)}, path)  # cut, some give Errno 22, some miniz
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as caught:
        load_verified(path)
    text = str(caught.value)
    assert "cannot be read as a torch checkpoint" in text and "\n" not in text and "miniz" not in text
    assert len(text) < 300, text


def test_a_figure_that_cannot_go_to_its_default_place_names_out(tmp_path: Path, capsys) -> None:
    """No --out given: the line names the file it would write and the option to give, not --out."""
    out = tmp_path / "run"
    assert main(train_argv(out)) == 0
    (out / "samples.png").unlink()
    (out / "samples.png").mkdir()  # stands in for a place that cannot be written (root writes anywhere)
    capsys.readouterr()
    assert exit_status(["sample", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"flows sample: error: cannot write {out / 'samples.png'} (is a directory")
    assert line.endswith("give --out FILE.png somewhere writable")


def test_resume_warns_of_an_unreadable_best_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(train_argv(out)) == 0
    best = out / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    capsys.readouterr()
    assert main(train_argv(out, "--resume", steps=STEPS + 1)) == 0
    err = capsys.readouterr().err
    assert err.startswith("flows train: warning: ") and "best.pt: cannot be read as a torch checkpoint" in err
    assert "until then sample with --weights last" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "script, argv",
    [
        ("memory", ["--quick", "--repeats", "0"]),
        ("images", ["--quick", "--batch", "0"]),
        ("distributed", ["--quick", "--rounds", "0"]),
        ("vi", ["--quick", "--no-peers", "--seeds", "0"]),
        ("iunet", ["--quick", "--skip-memory", "--steps", "-1"]),
        ("conditional", ["--quick", "--digits-steps", "-1"]),
        ("maf_rebuild", ["--repeats", "0"]),
    ],
)
def test_an_experiment_refuses_a_count_out_of_range_at_once(script: str, argv: list[str], capsys) -> None:
    """A zero or negative count (``flows.arguments.integer``) is one usage line: before, some
    were read as the default (``args.x or default``), overridden by --quick, or crashed after the work."""
    from conftest import load_experiment

    with pytest.raises(SystemExit) as stopped:
        load_experiment(script).main(argv)
    assert stopped.value.code == 2 and "must be at least" in capsys.readouterr().err
