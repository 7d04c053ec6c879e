"""Image datasets: scikit-learn's bundled digits, and local MNIST / CIFAR-10 files.

Nothing here downloads. MNIST and CIFAR-10 are read from a directory the user names
(or, when the files are not there and ``torchvision`` imports, through torchvision with
``download=False``); a missing file raises :class:`FileNotFoundError` naming the files to
put where. Every loader here also returns the class labels (``int64``, aligned with the
examples); MNIST without its label files, or CIFAR-10 batches without ``labels``, load
with ``None`` labels and a warning.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import warnings
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import numpy as np
import torch

from flows.data.dataset import Dataset

_MNIST_FILES = {
    "train": "train-images-idx3-ubyte",
    "test": "t10k-images-idx3-ubyte",
}
# Optional: next to the images, they give the class labels.
_MNIST_LABEL_FILES = {
    "train": "train-labels-idx1-ubyte",
    "test": "t10k-labels-idx1-ubyte",
}
_CIFAR_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
# IDX element types (the third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def digits(n_test: int = 300, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 17 grey levels).

    The images ship with scikit-learn (no download). They are split once with a seeded
    permutation, so the same ``seed`` always gives the same train/test split.

    Args:
        n_test: the number of test images (the rest, 1497 by default, are for training).
        seed: the seed of the train/test permutation.

    Returns:
        A :class:`Dataset` of ``uint8`` levels ``0..16``, shape ``(1, 8, 8)``,
        ``n_levels=17``, with the digit ``0..9`` of each image in ``train_labels`` /
        ``test_labels``.

    Example:
        >>> data = digits()
        >>> tuple(data.train.shape), tuple(data.test.shape), data.n_levels
        ((1497, 1, 8, 8), (300, 1, 8, 8), 17)
        >>> tuple(data.train_labels.shape), data.train_labels.dtype
        ((1497,), torch.int64)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images  # (1797, 8, 8) floats holding the integers 0..16
    if not 0 < n_test < len(images):
        raise ValueError(f"digits: n_test must be in 1..{len(images) - 1}, got {n_test}")
    levels = torch.from_numpy(np.rint(images).astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    order = torch.randperm(len(levels), generator=torch.Generator().manual_seed(seed))
    test, train = levels[order[:n_test]], levels[order[n_test:]]
    test_labels, train_labels = targets[order[:n_test]], targets[order[n_test:]]
    return Dataset(
        "digits",
        train.contiguous(),
        test.contiguous(),
        17,
        (1, 8, 8),
        train_labels=train_labels,
        test_labels=test_labels,
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed.

    The header is two zero bytes, a type byte (``0x08`` = unsigned byte), the number of
    dimensions, then each dimension as a big-endian 32-bit integer; the data follow.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.

    Returns:
        The array, with the shape written in the header.

    Raises:
        ValueError: when the header or the length does not match the IDX format.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes of data), "
            f"found {len(raw) - header} bytes"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find(directory: Path, names: list[str], subdirs: tuple[str, ...]) -> Path | None:
    """The first subdirectory of ``directory`` holding every name (``.gz`` allowed)."""
    for sub in subdirs:
        folder = directory / sub
        if all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names):
            return folder
    return None


def _resolve(folder: Path, name: str) -> Path:
    plain = folder / name
    return plain if plain.is_file() else folder / f"{name}.gz"


def _data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("FLOWS_DATA_DIR", "data")).expanduser()


def _torchvision_datasets(name: str) -> ModuleType:
    try:
        import torchvision.datasets as tv_datasets
    except Exception as error:
        raise ImportError(
            f"{name}: torchvision is not available ({type(error).__name__}: {error}). "
            "Install it with `pip install flows[vision]`, or put the raw files in the data "
            "directory (see flows.data.load's documentation)."
        ) from error
    return tv_datasets


def mnist(data_dir: str | os.PathLike[str] | None = None, source: str = "auto") -> Dataset:
    """MNIST from local IDX files (28x28, 256 grey levels).

    The files ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte`` (raw, or with a
    ``.gz`` suffix) are looked up in ``data_dir``, ``data_dir/MNIST/raw`` (torchvision's
    layout) and ``data_dir/mnist``. The label files ``train-labels-idx1-ubyte`` and
    ``t10k-labels-idx1-ubyte`` are optional: read from the folder that holds the images,
    they give ``train_labels`` / ``test_labels``. Without them (density estimation needs
    no labels) both are ``None`` and a :class:`UserWarning` names the missing files.

    Args:
        data_dir: the directory holding the files; defaults to ``$FLOWS_DATA_DIR`` or
            ``./data``.
        source: ``"files"`` reads only the IDX files, ``"torchvision"`` only uses
            ``torchvision.datasets.MNIST(download=False)``, ``"auto"`` tries the files and
            then torchvision when it imports.

    Returns:
        A :class:`Dataset` of ``uint8`` levels, shape ``(1, 28, 28)``, ``n_levels=256``,
        with the digits ``0..9`` as labels (``None`` when the label files are missing).

    Raises:
        FileNotFoundError: the files are not there (the message names them and where).
        ImportError: ``source="torchvision"`` and torchvision does not import.
        ValueError: a label file does not hold one label per image.
    """
    directory = _data_dir(data_dir)
    _check_source(source)
    names = list(_MNIST_FILES.values())
    if source in ("auto", "files"):
        folder = _find(directory, names, (".", "MNIST/raw", "mnist"))
        if folder is not None:
            train = read_idx(_resolve(folder, _MNIST_FILES["train"]))
            test = read_idx(_resolve(folder, _MNIST_FILES["test"]))
            labels = _mnist_labels(folder, len(train), len(test))
            return _image_dataset("mnist", train[:, None], test[:, None], 256, labels)
    if source == "torchvision" or (source == "auto" and _imports("torchvision")):
        tv_datasets = _torchvision_datasets("mnist")
        try:
            train_set = tv_datasets.MNIST(str(directory), train=True, download=False)
            test_set = tv_datasets.MNIST(str(directory), train=False, download=False)
        except RuntimeError as error:  # torchvision's "Dataset not found"
            if source == "torchvision":
                raise FileNotFoundError(_missing_message("mnist", directory, names)) from error
        else:
            train, test = train_set.data.numpy(), test_set.data.numpy()
            labels = (np.asarray(train_set.targets), np.asarray(test_set.targets))
            return _image_dataset("mnist", train[:, None], test[:, None], 256, labels)
    raise FileNotFoundError(_missing_message("mnist", directory, names))


def cifar10(data_dir: str | os.PathLike[str] | None = None, source: str = "auto") -> Dataset:
    """CIFAR-10 from the local python pickle batches (32x32 RGB, 256 levels).

    The files ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` are looked up in
    ``data_dir/cifar-10-batches-py`` and in ``data_dir`` itself. The pickles are read with
    an unpickler that only accepts numpy arrays, dicts, lists and strings, so a tampered
    file cannot run code.

    Args:
        data_dir: the directory holding ``cifar-10-batches-py``; defaults to
            ``$FLOWS_DATA_DIR`` or ``./data``.
        source: ``"files"``, ``"torchvision"`` or ``"auto"``, as for :func:`mnist`.

    Returns:
        A :class:`Dataset` of ``uint8`` levels, shape ``(3, 32, 32)``, ``n_levels=256``,
        with the classes ``0..9`` (the batches' ``labels``) as labels (``None``, with a
        warning, when a batch has no ``labels`` entry).

    Raises:
        FileNotFoundError: the files are not there (the message names them and where).
        ImportError: ``source="torchvision"`` and torchvision does not import.
    """
    directory = _data_dir(data_dir)
    _check_source(source)
    names = _CIFAR_FILES["train"] + _CIFAR_FILES["test"]
    if source in ("auto", "files"):
        folder = None
        for sub in ("cifar-10-batches-py", "."):
            if all((directory / sub / n).is_file() for n in names):
                folder = directory / sub
                break
        if folder is not None:
            batches = [_read_cifar_batch(folder / n) for n in names]
            train = np.concatenate([images for images, _ in batches[:-1]])
            test = batches[-1][0]
            labels = None
            unlabelled = [n for n, (_, y) in zip(names, batches) if y is None]
            if unlabelled:
                warnings.warn(
                    f"cifar10: no class labels (no 'labels' entry in {', '.join(unlabelled)} in {folder}); "
                    "train_labels and test_labels are None",
                    stacklevel=2,
                )
            else:
                labels = (np.concatenate([y for _, y in batches[:-1]]), batches[-1][1])
            return _image_dataset("cifar10", train, test, 256, labels)
    if source == "torchvision" or (source == "auto" and _imports("torchvision")):
        tv_datasets = _torchvision_datasets("cifar10")
        try:
            train_set = tv_datasets.CIFAR10(str(directory), train=True, download=False)
            test_set = tv_datasets.CIFAR10(str(directory), train=False, download=False)
        except RuntimeError as error:
            if source == "torchvision":
                raise FileNotFoundError(
                    _missing_message("cifar10", directory / "cifar-10-batches-py", names)
                ) from error
        else:  # torchvision keeps (N, H, W, C)
            train, test = train_set.data, test_set.data
            labels = (np.asarray(train_set.targets), np.asarray(test_set.targets))
            return _image_dataset(
                "cifar10", train.transpose(0, 3, 1, 2), test.transpose(0, 3, 1, 2), 256, labels
            )
    raise FileNotFoundError(_missing_message("cifar10", directory / "cifar-10-batches-py", names))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (CIFAR-10 batches need nothing else)."""

    _allowed: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # Python 3 protocol-2 pickles store raw bytes as latin-1 text re-encoded on load.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIFAR-10 batch (only numpy arrays)"
            )
        if module.startswith("numpy.core"):  # written by numpy 1.x; numpy 2 moved it
            module = module.replace("numpy.core", "numpy._core", 1)
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                module = module.replace("numpy._core", "numpy.core", 1)
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """One CIFAR-10 batch: ``(N, 3, 32, 32)`` uint8 levels and ``(N,)`` labels (or ``None``)."""
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    if not isinstance(batch, dict):
        raise TypeError(f"{path}: expected a dict in a CIFAR-10 batch, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    if data is None:
        raise ValueError(f"{path}: no 'data' entry in this CIFAR-10 batch")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
    labels = batch.get(b"labels", batch.get("labels"))
    if labels is None:
        return data.reshape(-1, 3, 32, 32), None
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: expected {len(data)} labels, got an array of shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _mnist_labels(folder: Path, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The MNIST label files next to the images, or ``None`` (with a warning) when missing."""
    missing = [
        n for n in _MNIST_LABEL_FILES.values() if not (folder / n).is_file() and not (folder / f"{n}.gz").is_file()
    ]
    if missing:
        warnings.warn(
            f"mnist: no class labels ({' and '.join(missing)} not found, raw or .gz, in {folder}); "
            "train_labels and test_labels are None",
            stacklevel=3,
        )
        return None
    labels = []
    for split, count in (("train", n_train), ("test", n_test)):
        path = _resolve(folder, _MNIST_LABEL_FILES[split])
        array = read_idx(path)
        if array.shape != (count,):
            raise ValueError(f"{path}: expected {count} labels (one per {split} image), got shape {array.shape}")
        labels.append(array)
    return labels[0], labels[1]


def _image_dataset(
    name: str,
    train: np.ndarray,
    test: np.ndarray,
    n_levels: int,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> Dataset:
    train_t = torch.from_numpy(np.ascontiguousarray(train, dtype=np.uint8))
    test_t = torch.from_numpy(np.ascontiguousarray(test, dtype=np.uint8))
    train_labels = test_labels = None
    if labels is not None:
        train_labels, test_labels = (torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)) for y in labels)
    return Dataset(
        name,
        train_t,
        test_t,
        n_levels,
        tuple(train_t.shape[1:]),
        train_labels=train_labels,
        test_labels=test_labels,
    )


def _check_source(source: str) -> None:
    if source not in ("auto", "files", "torchvision"):
        raise ValueError(f"source must be 'auto', 'files' or 'torchvision', got {source!r}")


def _imports(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


def _missing_message(name: str, directory: Path, files: list[str]) -> str:
    listed = ", ".join(files)
    hint = (
        " (raw or .gz; also looked in MNIST/raw and mnist/ below it; "
        f"{' and '.join(_MNIST_LABEL_FILES.values())} next to them add class labels)"
        if name == "mnist"
        else " (the python version of CIFAR-10, cifar-10-python.tar.gz, unpacked)"
    )
    return (
        f"{name}: data files not found. Put {listed} in {directory.resolve()}{hint}, or pass "
        f"another directory with data_dir= / --data-dir (or set FLOWS_DATA_DIR). "
        "flows never downloads data."
    )
