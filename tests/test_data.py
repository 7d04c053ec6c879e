"""Datasets: digits, 2D toys, local MNIST / CIFAR-10 files, dequantization."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flows import data
from flows.data import Dataset, dequantize


def test_digits_shapes_and_levels() -> None:
    d = data.load("digits")
    assert d.name == "digits"
    assert d.n_levels == 17 and d.discrete
    assert d.shape == (1, 8, 8) and d.dim == 64
    assert tuple(d.train.shape) == (1497, 1, 8, 8)
    assert tuple(d.test.shape) == (300, 1, 8, 8)
    assert d.train.dtype == torch.uint8
    both = torch.cat([d.train, d.test])
    assert int(both.min()) == 0 and int(both.max()) == 16


def test_digits_split_is_deterministic() -> None:
    a, b, c = data.digits(seed=0), data.digits(seed=0), data.digits(seed=1)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.test, c.test)
    assert len(data.digits(n_test=100).test) == 100
    with pytest.raises(ValueError, match="n_test"):
        data.digits(n_test=0)


def test_dequantize_range_and_levels() -> None:
    d = data.load("digits")
    g = torch.Generator().manual_seed(0)
    y = d.prepare(d.train[:200], generator=g)
    assert y.dtype == torch.float32 and tuple(y.shape) == (200, 1, 8, 8)
    assert float(y.min()) >= 0.0 and float(y.max()) < 1.0
    # Each value stays inside its own level's bin [x / K, (x + 1) / K).
    assert torch.equal(torch.floor(y * 17).to(torch.uint8), d.train[:200])
    again = d.prepare(d.train[:200], generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, again)
    with pytest.raises(ValueError, match="n_levels"):
        dequantize(torch.zeros(2), 1)


@pytest.mark.parametrize("name", sorted(data.TOYS))
def test_toys_finite_seeded_unit_scale(name: str) -> None:
    a = data.load(name, n_train=1000, n_test=200, seed=3)
    b = data.load(name, n_train=1000, n_test=200, seed=3)
    c = data.load(name, n_train=1000, n_test=200, seed=4)
    assert a.n_levels is None and not a.discrete and a.shape == (2,)
    assert tuple(a.train.shape) == (1000, 2) and tuple(a.test.shape) == (200, 2)
    assert a.train.dtype == torch.float32
    assert torch.isfinite(a.train).all() and torch.isfinite(a.test).all()
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train, c.train)
    assert a.train.mean(0).abs().max() < 1e-4
    assert 0.5 < float(a.train.std()) < 1.5
    # Continuous data pass through prepare unchanged.
    assert torch.equal(a.prepare(a.test), a.test)


def test_toy_function_aliases() -> None:
    assert torch.equal(
        data.eight_gaussians(100, 10).train,
        data.load("eight-gaussians", n_train=100, n_test=10).train,
    )
    assert data.load("8gaussians", n_train=10, n_test=5).name == "eight-gaussians"


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits"):
        data.load("nope")


def test_dataset_checks_shapes() -> None:
    with pytest.raises(ValueError, match="expected"):
        Dataset("bad", torch.zeros(3, 2), torch.zeros(3, 3), None, (2,))


# ----------------------------------------------------------------------------- MNIST (IDX)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_mnist_missing_files_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        data.load("mnist", data_dir=tmp_path / "nowhere", source="files")
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "t10k-images-idx3-ubyte" in message
    assert "nowhere" in message


@pytest.mark.parametrize("layout", [".", "MNIST/raw"])
def test_mnist_reads_fake_idx(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    folder = tmp_path / layout
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder / "train-images-idx3-ubyte", train)  # raw
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", test)  # gzip
    d = data.load("mnist", data_dir=tmp_path, source="files")
    assert d.n_levels == 256 and d.shape == (1, 28, 28)
    assert d.train.dtype == torch.uint8
    assert np.array_equal(d.train[:, 0].numpy(), train)
    assert np.array_equal(d.test[:, 0].numpy(), test)


def test_idx_corrupt_file_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3i", 2, 4, 4) + bytes(10))
    with pytest.raises(ValueError, match="promises shape"):
        data.read_idx(bad)
    (tmp_path / "junk").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "junk")


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar_missing_files_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        data.load("cifar10", data_dir=tmp_path, source="files")
    message = str(info.value)
    assert "data_batch_1" in message and "test_batch" in message
    assert "cifar-10-batches-py" in message


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_reads_fake_pickles(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        batches[name] = rows
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": [0, 1]}, f, protocol=protocol)
    d = data.load("cifar-10", data_dir=tmp_path, source="files")
    assert d.name == "cifar10" and d.n_levels == 256 and d.shape == (3, 32, 32)
    assert tuple(d.train.shape) == (10, 3, 32, 32) and tuple(d.test.shape) == (2, 3, 32, 32)
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values.
    assert np.array_equal(d.train[0].numpy().reshape(-1), batches["data_batch_1"][0])
    assert np.array_equal(d.train[9].numpy().reshape(-1), batches["data_batch_5"][1])
    assert np.array_equal(d.test.numpy().reshape(2, -1), batches["test_batch"])


class _Sneaky:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_cifar_refuses_code_in_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": _Sneaky()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.cifar10(tmp_path, source="files")


def test_torchvision_source_without_torchvision(tmp_path: Path) -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means it is unusable here
        pass
    else:
        pytest.skip("torchvision is installed")
    with pytest.raises(ImportError, match="torchvision is not available"):
        data.load("mnist", data_dir=tmp_path, source="torchvision")
    # "auto" falls back to the clear missing-files error.
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load("mnist", data_dir=tmp_path)
