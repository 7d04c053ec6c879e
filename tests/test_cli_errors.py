"""The command line's answers to a new user's mistakes: one line naming the problem and the fix,
exit status 2 for a usage error and 1 for a run-time failure, never a traceback or NaN figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main

MODEL = ["--levels", "1", "-K", "1", "--hidden", "8", "--batch", "16", "--threads", "1"]
TINY = [*MODEL, "--no-progress"]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def status(argv: list[str]) -> int:
    """``main``'s exit status, argparse's own exits (``SystemExit``) included."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


@pytest.mark.parametrize("command", ["train", "sample", "interpolate", "bench"])
@pytest.mark.parametrize(
    "value, why", [("-1", "must be at least 0, got -1"), (str(2**32), "must be at most 4294967295")]
)
def test_seed_out_of_range_is_a_usage_line(command: str, value: str, why: str, tmp_path: Path, capsys) -> None:
    """Seeds numpy or torch refuse (negative, past 2**32 - 1) failed with a traceback after the data
    were loaded (``np.random.seed``: "Seed must be between 0 and 2**32 - 1")."""
    argv = [command, *([str(tmp_path)] if command in ("sample", "interpolate") else []), "--seed", value]
    if command == "train":
        argv += ["--steps", "1", *TINY, "--out", str(tmp_path / "run")]
    assert status(argv) == 2
    assert f"argument --seed: {why}" in one_line(capsys.readouterr().err)
    if command == "train":
        assert status(["train", "--data-seed", value, "--out", str(tmp_path / "run")]) == 2
        assert f"argument --data-seed: {why}" in one_line(capsys.readouterr().err)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--hiden", "8"], "flows train: error: unrecognized arguments: --hiden 8; did you mean --hidden? "
         "(see flows train --help)"),
        (["bench", "--out", "x"], "flows bench: error: unrecognized arguments: --out x (see flows bench --help)"),
        (["train", "--num-classes", "3"], "--num-classes 3; --conditional conditions the model on the data's"),
        (["sample", "RUN", "extra"], "flows sample: error: unrecognized arguments: extra (see flows sample --help)"),
    ],
)
def test_unknown_option_is_refused_by_its_command(argv: list[str], expected: str, capsys) -> None:
    """argparse refused them as ``flows: error: ... (see flows --help)``: the top-level help, which
    lists no command's options."""
    assert status(argv) == 2
    assert expected in one_line(capsys.readouterr().err)


def test_damaged_array_files_are_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    """A garbage or truncated ``.npz`` raised ``zipfile.BadZipFile`` with a traceback; a truncated
    ``.npy`` of vectors said only "mmap length is greater than file size", one of images failed at
    the first batch that reached its end."""
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((64, 1, 8, 8), dtype=np.uint8))
    (tmp_path / "half.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive" * 4)
    vectors, images = tmp_path / "vectors.npy", tmp_path / "images.npy"
    np.save(vectors, np.zeros((500, 3), dtype=np.float32))
    (tmp_path / "half.npy").write_bytes(vectors.read_bytes()[:1000])
    np.save(images, np.zeros((64, 1, 8, 8), dtype=np.uint8))  # mapped lazily: it failed at the first batch
    (tmp_path / "half_images.npy").write_bytes(images.read_bytes()[:-100])
    for name, expected in (
        ("half.npz", "not a readable .npz archive"),
        ("junk.npz", "not a readable .npz archive"),
        ("half.npy", "truncated: its header says (500, 3) float32 (6000 bytes) but the file holds 872"),
        ("half_images.npy", "truncated: its header says (64, 1, 8, 8) uint8 (4096 bytes) but the file holds 3996"),
    ):
        path = tmp_path / name
        for command in ("train", "bench"):
            argv = [command, "--data", str(path), *MODEL]
            assert status(argv + (["--out", str(tmp_path / "run")] if command == "train" else [])) == 1
            line = one_line(capsys.readouterr().err)
            assert f"flows {command}: error: {path}: {expected}" in line, line


@pytest.mark.parametrize(
    "extra, flags",
    [
        (["--data", "moons"], "--data moons: does not apply"),
        (["--validation", "0.2", "--ema", "0.9"], "--validation 0.2, --ema 0.9: do not apply"),
        (["--precision", "bf16", "--schedule", "cosine"], "--schedule cosine, --precision bf16: do not apply"),
        (["--init-batch", "64", "--data-seed", "3"], "--data-seed 3, --init-batch 64: do not apply"),
    ],
)
def test_variational_fit_refuses_likelihood_only_options(extra: list[str], flags: str, tmp_path: Path, capsys) -> None:
    """A variational fit draws no data and keeps no validation split: these options were ignored
    without a word, so ``--data moons`` looked as if it had been used."""
    argv = ["train", "--objective", "reverse-kl", "--target", "ring", "--steps", "1", *extra]
    assert status([*argv, "--out", str(tmp_path / "vi")]) == 2
    line = one_line(capsys.readouterr().err)
    assert flags in line and "--objective reverse-kl, which fits --target ring" in line, line
    assert not (tmp_path / "vi").exists()


def test_refused_run_does_not_announce_overwriting(tmp_path: Path, capsys) -> None:
    """``OUT holds a previous run; it will be overwritten`` came before the refusal of the run."""
    (tmp_path / "checkpoint.pt").write_bytes(b"an earlier run's")
    for refused, refusal in ((["--batch", "100000"], "--batch 100000 exceeds"), (["--levels", "5"], "squeezed 4")):
        assert status(["train", "--steps", "1", *TINY, *refused, "--out", str(tmp_path)]) == 2
        captured = capsys.readouterr()
        assert refusal in one_line(captured.err)
        assert "overwritten" not in captured.out
        assert (tmp_path / "checkpoint.pt").read_bytes() == b"an earlier run's"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of one step with a validation split (so a ``best.pt``), seed 0."""
    out = tmp_path_factory.mktemp("run")
    assert status(["train", "--steps", "1", "--eval-every", "1", "--init-batch", "32", *TINY, "--out", str(out)]) == 0
    return out


def test_resume_with_another_seed_is_refused(run: Path, capsys) -> None:
    """``--resume --seed N`` warned "the seed only applies to a fresh start", but the resumed run
    drew its validation split again from the new seed (``flows.training._split``): validation on
    examples already trained on, and a ``best.pt`` chosen by them."""
    capsys.readouterr()
    before = (run / "checkpoint.pt").read_bytes()
    assert status(["train", "--steps", "2", *TINY, "--out", str(run), "--resume", "--seed", "5"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--seed 5: the run was trained with --seed 0" in line and "leave --seed out to resume" in line, line
    assert (run / "checkpoint.pt").read_bytes() == before


def test_best_weights_that_scored_nan_are_refused(run: Path, capsys) -> None:
    """A run whose first evaluation scored NaN (a diverging ``--lr``) kept those weights as
    ``best.pt``; ``sample`` and ``interpolate`` drew NaN images from them, exit 0."""
    from flows.io import load_verified, save_verified

    capsys.readouterr()
    state = load_verified(run / "best.pt")
    state["best"]["validation"] = math.nan
    save_verified(state, run / "best.pt")  # the last test of this module's run
    for command in ("sample", "interpolate"):
        assert status([command, str(run)]) == 1
        line = one_line(capsys.readouterr().err)
        assert "best.pt holds the weights of step 1, whose validation bits/dim is nan" in line, line
        assert "use --weights last" in line
    assert status(["sample", str(run), "--weights", "last", "--n", "2"]) == 0


def test_figure_out_names_the_file_and_its_folder(tmp_path: Path, capsys) -> None:
    """``--out FILE.png`` below a file was refused as ``--out FOLDER: is a file``, naming neither
    the path given nor where the problem is."""
    blocker = tmp_path / "plain"
    blocker.write_text("")
    assert status(["sample", str(tmp_path), "--out", str(blocker / "x.png")]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"--out {blocker / 'x.png'}: {blocker} is a file, not a directory" in line, line


def test_channels_last_images_get_the_transpose_hint(tmp_path: Path, capsys) -> None:
    """``(N, H, W, C)`` images are read as ``(N, C, H, W)``: the builder's "pad the images" is no fix."""
    path = tmp_path / "rgb.npz"
    np.savez(path, x=np.zeros((64, 8, 8, 3), dtype=np.uint8))
    assert status(["train", "--data", str(path), "--steps", "1", *TINY, "--out", str(tmp_path / "run")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "the images look channels-last" in line and "x.transpose(0, 3, 1, 2)" in line, line
