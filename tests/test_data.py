"""Datasets: digits, 2D toys, local MNIST / CIFAR-10 files, dequantization."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
import types
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


@pytest.mark.parametrize(("n_test", "seed"), [(300, 0), (100, 1)])
def test_digits_labels_aligned_with_images(n_test: int, seed: int) -> None:
    from sklearn.datasets import load_digits

    d = data.digits(n_test=n_test, seed=seed)
    for labels, examples in ((d.train_labels, d.train), (d.test_labels, d.test)):
        assert labels is not None and labels.dtype == torch.int64
        assert tuple(labels.shape) == (len(examples),)
        assert int(labels.min()) == 0 and int(labels.max()) == 9
    # Independently of the loader's permutation: every example's label is the target of
    # a scikit-learn image with exactly those pixels.
    bunch = load_digits()
    targets_of: dict[bytes, set[int]] = {}
    for image, target in zip(np.rint(bunch.images).astype(np.uint8), bunch.target):
        targets_of.setdefault(image.tobytes(), set()).add(int(target))
    for labels, examples in ((d.train_labels, d.train), (d.test_labels, d.test)):
        for image, label in zip(examples[:, 0].numpy(), labels.tolist()):
            assert label in targets_of[image.tobytes()]
    # The split partitions the classes: per-class counts add up to scikit-learn's.
    train_counts = torch.bincount(d.train_labels, minlength=10)
    test_counts = torch.bincount(d.test_labels, minlength=10)
    assert int(train_counts.sum()) == len(d.train) and int(test_counts.sum()) == len(d.test)
    assert torch.equal(train_counts + test_counts, torch.bincount(torch.from_numpy(bunch.target), minlength=10))
    # Adding the labels left the images where they were: same seed, same split.
    assert torch.equal(d.train, data.digits(n_test=n_test, seed=seed).train)


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
    assert a.train_labels is None and a.test_labels is None  # toys have no classes
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


def test_dataset_checks_labels() -> None:
    train, test = torch.zeros(3, 2), torch.zeros(2, 2)
    y_train, y_test = torch.tensor([0, 1, 2]), torch.tensor([1, 0])
    ok = Dataset("ok", train, test, None, (2,), train_labels=y_train, test_labels=y_test)
    assert torch.equal(ok.train_labels, y_train) and torch.equal(ok.test_labels, y_test)
    assert Dataset("unlabelled", train, test, None, (2,)).train_labels is None
    with pytest.raises(ValueError, match="train_labels given without test_labels"):
        Dataset("bad", train, test, None, (2,), train_labels=y_train)
    with pytest.raises(ValueError, match="test_labels given without train_labels"):
        Dataset("bad", train, test, None, (2,), test_labels=y_test)
    with pytest.raises(ValueError, match=r"3 train_labels for 2 train examples"):
        Dataset("bad", test, test, None, (2,), train_labels=y_train, test_labels=y_test)
    with pytest.raises(ValueError, match=r"2 test_labels for 3 test examples"):
        Dataset("bad", train, train, None, (2,), train_labels=y_train, test_labels=y_test)
    with pytest.raises(ValueError, match=r"train_labels must be an int64 tensor of shape \(3,\), got a torch.int32"):
        Dataset("bad", train, test, None, (2,), train_labels=y_train.int(), test_labels=y_test)
    with pytest.raises(ValueError, match=r"test_labels must be an int64 tensor .* shape \(2, 1\)"):
        Dataset("bad", train, test, None, (2,), train_labels=y_train, test_labels=y_test[:, None])
    with pytest.raises(ValueError, match="got a list"):
        Dataset("bad", train, test, None, (2,), train_labels=[0, 1, 2], test_labels=y_test)  # type: ignore[arg-type]


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


def _fake_mnist(folder: Path, n_train: int = 5, n_test: int = 3, labels: bool = True) -> dict[str, np.ndarray]:
    """Random images (and labels) in the IDX files, some raw and some gzip-compressed."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    }
    if labels:
        arrays["train-labels-idx1-ubyte.gz"] = rng.integers(0, 10, n_train, dtype=np.uint8)
        arrays["t10k-labels-idx1-ubyte"] = rng.integers(0, 10, n_test, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        _write_idx(folder / name, array)
    return arrays


@pytest.mark.parametrize("layout", [".", "MNIST/raw"])
def test_mnist_reads_fake_idx(tmp_path: Path, layout: str) -> None:
    arrays = _fake_mnist(tmp_path / layout)
    d = data.load("mnist", data_dir=tmp_path, source="files")
    assert d.n_levels == 256 and d.shape == (1, 28, 28)
    assert d.train.dtype == torch.uint8
    assert np.array_equal(d.train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(d.test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte.gz"])
    assert d.train_labels is not None and d.test_labels is not None
    assert d.train_labels.dtype == torch.int64 and d.test_labels.dtype == torch.int64
    assert np.array_equal(d.train_labels.numpy(), arrays["train-labels-idx1-ubyte.gz"])
    assert np.array_equal(d.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_without_label_files_warns(tmp_path: Path) -> None:
    arrays = _fake_mnist(tmp_path, labels=False)
    with pytest.warns(UserWarning, match="train-labels-idx1-ubyte and t10k-labels-idx1-ubyte not found"):
        d = data.load("mnist", data_dir=tmp_path, source="files")
    assert d.train_labels is None and d.test_labels is None
    assert np.array_equal(d.train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    # One label file alone is not enough: labels come for both splits or neither.
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.warns(UserWarning, match=r"no class labels \(t10k-labels-idx1-ubyte not found"):
        assert data.mnist(tmp_path, source="files").train_labels is None


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))  # 3 test images
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: expected 3 labels"):
        data.mnist(tmp_path, source="files")


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
    batches, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        batches[name], labels[name] = rows, rng.integers(0, 10, 2).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": labels[name]}, f, protocol=protocol)
    d = data.load("cifar-10", data_dir=tmp_path, source="files")
    assert d.name == "cifar10" and d.n_levels == 256 and d.shape == (3, 32, 32)
    assert tuple(d.train.shape) == (10, 3, 32, 32) and tuple(d.test.shape) == (2, 3, 32, 32)
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values.
    assert np.array_equal(d.train[0].numpy().reshape(-1), batches["data_batch_1"][0])
    assert np.array_equal(d.train[9].numpy().reshape(-1), batches["data_batch_5"][1])
    assert np.array_equal(d.test.numpy().reshape(2, -1), batches["test_batch"])
    # Labels follow the images: the five training batches in order, then the test batch.
    assert d.train_labels is not None and d.train_labels.dtype == torch.int64
    assert d.train_labels.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert d.test_labels is not None and d.test_labels.tolist() == labels["test_batch"]


def test_cifar_batches_without_labels_warn(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": np.zeros((2, 3072), dtype=np.uint8)}
        if name != "test_batch":
            entry[b"labels"] = [0, 1]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with pytest.warns(UserWarning, match="no 'labels' entry in test_batch"):
        d = data.cifar10(tmp_path, source="files")
    assert d.train_labels is None and d.test_labels is None and len(d.train) == 10


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


def test_torchvision_source_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torchvision path takes ``targets`` along with ``data`` (a stand-in torchvision here)."""

    class FakeMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            assert not download
            n = 4 if train else 2
            self.data = torch.arange(n * 28 * 28, dtype=torch.uint8).view(n, 28, 28)
            self.targets = torch.arange(n) % 10

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            assert not download
            n = 3 if train else 2
            self.data = np.full((n, 32, 32, 3), 7, dtype=np.uint8)  # (N, H, W, C)
            self.targets = list(range(9, 9 - n, -1))

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST, datasets.CIFAR10 = FakeMNIST, FakeCIFAR10  # type: ignore[attr-defined]
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)

    m = data.load("mnist", data_dir=tmp_path, source="torchvision")
    assert tuple(m.train.shape) == (4, 1, 28, 28)
    assert m.train_labels.tolist() == [0, 1, 2, 3] and m.test_labels.tolist() == [0, 1]
    assert m.train_labels.dtype == torch.int64
    c = data.load("cifar10", data_dir=tmp_path, source="auto")  # no files: falls through to torchvision
    assert tuple(c.train.shape) == (3, 3, 32, 32)
    assert c.train_labels.tolist() == [9, 8, 7] and c.test_labels.tolist() == [9, 8]
    assert c.test_labels.dtype == torch.int64


def test_dataset_name_resolves_aliases_and_nothing_else() -> None:
    assert data.dataset_name("CIFAR-10") == data.dataset_name("cifar") == "cifar10"
    assert data.dataset_name("8gaussians") == "eight-gaussians" and data.dataset_name("digits") == "digits"
    assert data.dataset_name("banana") is None


def test_a_loader_refusing_an_aliased_dataset_is_a_failure_not_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"labels": [0]}))  # no 'data' entry
    argv = ["train", "--data", "cifar", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main(argv) == 1  # the files' contents, not the option
    assert "no 'data' entry in this CIFAR-10 batch" in capsys.readouterr().err
