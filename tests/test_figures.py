"""Figures of 2D models: the density figure reads any dataset's test split (an in-memory
tensor or a streaming file read on demand) and draws a class-conditional model per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows import figures
from flows.cli import main
from flows.data.streaming import open_path
from flows.models import RealNVP


def _moons_file(path: Path, dtype: type = np.float32, labels: bool = False) -> Path:
    """Two noisy half circles, ``(N, 2)`` of ``dtype``; with ``labels``, an ``.npz`` with ``y``
    the half each point lies on."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    angle = rng.uniform(0, np.pi, 200)
    x = np.stack([np.cos(angle) + y, np.sin(angle) * (1 - 2 * y) + 0.5 * y], 1) + rng.normal(0, 0.05, (200, 2))
    if labels:
        np.savez(path, x=x.astype(dtype), y=y)
    else:
        np.save(path, x.astype(dtype))
    return path


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=["float16", "float32", "float64"])
def test_density_of_a_streaming_vector_file(tmp_path: Path, dtype: type) -> None:
    data = open_path(_moons_file(tmp_path / "vec.npy", dtype), workers=0)
    model = RealNVP((2,), levels=1, steps=2, hidden_channels=8)
    path = figures.save_density(model, data, tmp_path / "density.png", n_samples=100, resolution=10)
    assert path.stat().st_size > 0


def test_class_conditional_density_is_drawn_per_class(tmp_path: Path) -> None:
    data = open_path(_moons_file(tmp_path / "lab.npz", labels=True), workers=0, labels=True)
    model = RealNVP((2,), levels=1, steps=2, hidden_channels=8, num_classes=2)
    path = figures.save_density(model, data, tmp_path / "density.png", n_samples=100, resolution=10)
    assert path.stat().st_size > 0
    # One class (a label tensor, not a float context) at a time is drawn too.
    figures.save_density(model, data, tmp_path / "one.png", n_samples=10, resolution=10, contexts=torch.tensor([1]))


def test_class_conditional_density_without_test_labels_names_the_fix(tmp_path: Path) -> None:
    data = open_path(_moons_file(tmp_path / "vec.npy"), workers=0)
    model = RealNVP((2,), levels=1, steps=2, hidden_channels=8, num_classes=2)
    with pytest.raises(ValueError, match=r"class-conditional but .* has no test labels; open the data with its labels"):
        figures.save_density(model, data, tmp_path / "density.png", n_samples=10, resolution=10)


@pytest.mark.parametrize("labels", [False, True], ids=["vectors", "labelled-conditional"])
def test_cli_trains_and_draws_a_vector_file(tmp_path: Path, capsys: pytest.CaptureFixture, labels: bool) -> None:
    file = _moons_file(tmp_path / ("lab.npz" if labels else "vec.npy"), labels=labels)
    run = tmp_path / "run"
    argv = ["train", "--model", "realnvp", "--data", str(file), "--workers", "0", "--levels", "1", "-K", "1"]
    argv += ["--hidden", "8", "--steps", "2", "--batch", "16", "--no-progress", "--out", str(run)]
    assert main(argv + (["--conditional"] if labels else [])) == 0
    assert (run / "density.png").is_file()
    (run / "density.png").unlink()
    assert main(["sample", str(run)]) == 0
    assert (run / "density.png").is_file()


def test_sample_class_draws_that_class_alone_for_a_2d_model(tmp_path: Path) -> None:
    from PIL import Image

    file = _moons_file(tmp_path / "lab.npz", labels=True)
    run = tmp_path / "run"
    argv = ["train", "--model", "realnvp", "--data", str(file), "--workers", "0", "--levels", "1", "-K", "1"]
    argv += ["--hidden", "8", "--steps", "2", "--batch", "16", "--no-progress", "--conditional", "--out", str(run)]
    assert main(argv) == 0
    assert main(["sample", str(run), "--class", "1", "--out", str(tmp_path / "one.png")]) == 0
    every, one = Image.open(run / "density.png"), Image.open(tmp_path / "one.png")
    assert one.width < every.width and one.height == every.height  # one column, not one per class
