"""Smoke test of experiments/lab_invertible_classifiers.py: tiny settings, digits and fake MNIST."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from conftest import load_experiment, usage_error

MODELS = ("linear", "cnn", "resnet", "i-revnet", "i-resnet")


def load_script() -> ModuleType:
    return load_experiment("lab_invertible_classifiers")


@pytest.fixture(autouse=True)
def keep_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (the MNIST format), gzip-compressed for ``.gz`` names."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def fake_mnist(directory: Path, n_train: int = 96, n_test: int = 40) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    write_idx(directory / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(directory / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train))
    write_idx(directory / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(directory / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test))


def test_lab_quick_digits_and_mnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_mnist(tmp_path / "mnist" / "MNIST" / "raw")
    figures, report = tmp_path / "figures", tmp_path / "lab.json"
    argv = [
        "--quick", "--steps", "4", "--n-test", "60", "--mnist-train", "64",
        "--mnist", str(tmp_path / "mnist"), "--figures", str(figures), "--json", str(report),
    ]
    assert load_script().main(argv) == 0
    out = capsys.readouterr().out

    for data, layout in (("digits", "(4, 4, 4)"), ("mnist", "(16, 7, 7)")):
        assert f"### {data}: {layout} layout" in out
    for model in MODELS:
        assert sum(line.startswith(f"| {model} |") for line in out.splitlines()) == 2, out

    rows = json.loads(report.read_text())["results"]
    assert [(r["data"], r["model"]) for r in rows] == [(d, m) for d in ("digits", "mnist") for m in MODELS]
    for r in rows:
        assert r["params"] > 0 and 0.0 <= r["test_acc"] <= 1.0 and r["kept_ordinary"] > 0
        assert len(r["train_loss"]) == 4 and all(0.0 < loss < 10.0 for loss in r["train_loss"])
        if r["model"] not in ("i-revnet", "i-resnet"):
            assert r["kept_memory_saving"] is None and "grad_diff" not in r
            continue
        assert r["inv_error_f32"] < 1e-4 and r["inv_error_f64"] < 1e-10
        assert r["interpolation"]["end_error"] < 1e-4
        assert r["grad_diff"] < 1e-4
        # Memory-saving keeps the trunk's output, not its activations.
        assert r["kept_memory_saving"] < r["kept_ordinary"] / 2
        assert Path(r["figure"]).stat().st_size > 0

    by_model = {r["model"]: r for r in rows if r["data"] == "digits"}
    # The ResNet is the cnn with the notebook's skip connection: the same convolutions.
    assert by_model["resnet"]["params"] == by_model["cnn"]["params"]
    assert out.count("training loss curves: wrote") == 2

    names = sorted(p.name for p in figures.glob("*.png"))
    assert names == [
        "lab_iresnet_interpolation.png",
        "lab_iresnet_mnist_interpolation.png",
        "lab_irevnet_interpolation.png",
        "lab_irevnet_mnist_interpolation.png",
        "lab_training_loss.png",
        "lab_training_loss_mnist.png",
    ]


def test_resnet_block_is_x_minus_relu_of_its_branch() -> None:
    """The lab notebook's ResNet block, ``x - ReLU(b(x))``: the identity where the branch is
    non-positive (zeroed convolutions), and ``x - b(x)`` where it is positive."""
    lab = load_script()
    torch.manual_seed(0)
    trunk = lab.build("resnet", (4, 4, 4), layers=3, hidden=8).trunk
    x = torch.randn(2, 4, 4, 4)
    block = trunk[0]
    torch.testing.assert_close(block(x), x - torch.relu(block.branch(x)))
    for p in trunk.parameters():
        torch.nn.init.zeros_(p)
    assert torch.equal(trunk(x), x)
    last_bias = block.branch[-1].bias
    with torch.no_grad():
        last_bias.fill_(0.5)
    torch.testing.assert_close(block(x), x - 0.5)


def test_lab_missing_mnist_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_script().load_mnist(tmp_path, n_train=10, n_test=10)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (["--layers", "0"], "argument --layers: must be at least 1, got 0"),
        (["--n-train", "0"], "argument --n-train: must be at least 1, got 0"),
        (["--n-test", "0"], "argument --n-test: must be at least 1, got 0"),
        (["--lr", "-1"], "argument --lr: must be > 0, got -1"),
        (["--n-train", "5000"], "digits: --n-train 5000 is out of range"),
        (["--mnist", "{tmp}/no-mnist"], "--mnist {tmp}/no-mnist: expected the IDX files"),
        (
            ["--figures", "{tmp}/notes.txt/figures"],
            "argument --figures: {tmp}/notes.txt/figures: {tmp}/notes.txt is a file",
        ),
    ],
    ids=["negative-seed", "no-layers", "no-train", "no-test", "negative-lr", "train-too-large", "no-mnist",
         "figures-below-a-file"],
)
def test_bad_options_are_one_usage_line_before_the_training(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    argv = [a.format(tmp=tmp_path) for a in argv]
    err = usage_error(
        load_script().main, ["--quick", "--steps", "1", "--figures", str(tmp_path / "figures"), *argv], capsys
    )
    assert message.format(tmp=tmp_path) in err
    assert sorted(tmp_path.iterdir()) == [tmp_path / "notes.txt"]  # no figure written
