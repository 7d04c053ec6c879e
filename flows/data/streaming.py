"""Datasets read from disk while training: a folder of images, or a memory-mapped array.

:func:`open_path` opens

* a folder of images (PNG, JPEG or anything else Pillow reads; subfolders included,
  hidden files skipped): 8-bit levels ``(C, H, W)``, ``C = 1`` when every image is grey and
  3 otherwise, ``n_levels = 256``. All images must share one size, or ``image_size=S``
  resizes each so that its shorter side is ``S`` and crops the centre ``S x S``;
* a ``.npy`` file, or an uncompressed ``.npz`` (``np.savez``) holding ``train`` (and
  optionally ``test``) or a single array: ``uint8`` ``(N, C, H, W)`` images
  (``n_levels = 256``) or floating ``(N, D)`` vectors (continuous). Arrays are memory-mapped:
  only the rows a batch takes are read.

With ``labels=True`` (``flows train --conditional``) the examples carry class labels, as
torchvision's ``ImageFolder`` and numpy archives give them:

* a folder's subfolders are the classes, ``root/<class>/**/*.png``: an image's label is the
  index of its class folder in sorted name order, and the names are kept
  (:attr:`StreamingDataset.classes`);
* an ``.npz`` holds the images as ``x`` (or ``images``, ``train``, ``x_train``) and one
  integer label per image as ``y`` (or ``labels``, ``train_labels``, ``y_train``); a test
  split ``x_test`` (or ``test``) takes its labels from ``y_test`` (or ``test_labels``). A
  ``.npy`` has no room for labels: save an ``.npz``.

The labels are held in memory (one ``int64`` per example) and keyed by train position, as
the examples are: a batch's labels are those of the positions its loader read.

Without a given test split, a seeded permutation holds out ``n_test`` examples (default a
tenth). The result is a :class:`StreamingDataset`: a :class:`~flows.data.Dataset` whose
``train`` / ``test`` are lazy :class:`Examples` (``len``, ``shape``, indexing by an index
tensor or a slice returns a ``uint8`` / float tensor batch), so everything that reads a
``Dataset`` reads it too. :meth:`StreamingDataset.loader` reads training batches through a
``torch.utils.data.DataLoader`` whose worker processes load and dequantize the examples.

Dequantization noise is keyed per example (:func:`prepare_examples`): the noise of an
example depends only on its key, never on which process or batch draws it, so a worker
process, the main process and any rank of a multi-process run give the same values.
"""

from __future__ import annotations

import errno
import math
import os
import struct
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flows.data.dataset import Dataset

_MASK = (1 << 64) - 1
# Pillow modes read as one grey channel; any other mode is read as RGB (alpha dropped).
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def example_seed(*key: int) -> int:
    """A 64-bit seed that mixes the integers of ``key`` (splitmix64 over each in turn).

    Nearby keys (consecutive steps or positions) give unrelated seeds, which a plain sum or
    ``seed + position`` would not.

    Example:
        >>> example_seed(0, 1, 2) == example_seed(0, 1, 2) != example_seed(0, 2, 1)
        True
    """
    h = 0x9E3779B97F4A7C15
    for k in key:
        h = (h ^ (k & _MASK)) + 0x9E3779B97F4A7C15 & _MASK
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h


def prepare_examples(data: Dataset, x: Tensor, seeds: Sequence[int]) -> Tensor:
    """:meth:`Dataset.prepare` with each example's dequantization noise drawn from its own seed.

    ``y_i = (x_i + u_i) / n_levels`` with ``u_i`` drawn from a generator seeded with
    ``seeds[i]``: an example's noise is fixed by its seed, whatever batch, process or rank
    it is prepared in. Continuous data take no noise.

    Args:
        data: the dataset the examples come from (its ``n_levels``).
        x: stored examples ``(B, *shape)``.
        seeds: one seed per example (:func:`example_seed`).

    Returns:
        A float32 tensor ``(B, *shape)``.

    Example:
        >>> import torch
        >>> d = Dataset("levels", torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.uint8), 4, (3,))
        >>> both = prepare_examples(d, d.train, [7, 8])
        >>> torch.equal(both[1:], prepare_examples(d, d.train[1:], [8]))
        True
    """
    if len(seeds) != len(x):
        raise ValueError(f"prepare_examples: {len(seeds)} seeds for {len(x)} examples")
    if not data.discrete:
        return data.prepare(x)
    generator = torch.Generator()
    parts = [data.prepare(x[i : i + 1], generator=generator.manual_seed(s)) for i, s in enumerate(seeds)]
    return torch.cat(parts) if parts else data.prepare(x)


class Examples(ABC):
    """The examples of one split, read on demand (the base of the array and image sources).

    ``rows`` maps the split's positions to the source's rows. Indexing with an int gives
    one example ``(*shape)``; with a slice, a list or an int64 tensor, a batch
    ``(B, *shape)``. ``shape`` is ``(len, *example_shape)``, as a tensor's would be.
    """

    def __init__(self, rows: np.ndarray, example_shape: tuple[int, ...]) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.example_shape = tuple(example_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.example_shape)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> Examples:
        """The examples at ``positions`` of this split, as a new split of the same source."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__getstate__())
        clone.rows = self.rows[positions]
        return clone

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> Tensor:
        if isinstance(index, Tensor):
            index = index.numpy()
        rows = self.rows[index]
        if np.ndim(rows) == 0:
            return self._read(np.asarray([rows]))[0]
        return self._read(rows)

    @abstractmethod
    def _read(self, rows: np.ndarray) -> Tensor:
        """The source's examples at ``rows`` (1-D int64), stacked ``(len(rows), *shape)``."""

    def __getstate__(self) -> dict[str, Any]:
        # A memory map or an open file does not travel to a worker process; it is reopened there.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}


class ArrayExamples(Examples):
    """Rows of an array in a ``.npy`` file (or an uncompressed ``.npz`` member), memory-mapped."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> None:
        super().__init__(np.arange(shape[0]), shape[1:])
        self.path, self.offset, self.dtype, self.full_shape, self.fortran = path, offset, dtype, shape, fortran

    def _array(self) -> np.memmap:
        if "_open_array" not in self.__dict__:
            self._open_array = np.memmap(
                self.path, self.dtype, "r", self.offset, self.full_shape, "F" if self.fortran else "C"
            )
        return self._open_array

    def _read(self, rows: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._array()[rows]))


class UnreadableImage(OSError):
    """An image file of a folder that Pillow opened but cannot decode (truncated, corrupt),
    named by ``filename``: found only when a batch reads it. An ``OSError`` with an errno, as
    a failing read of the environment is: the command line says it in one line, naming the file."""


class ImageExamples(Examples):
    """Image files decoded on demand to ``uint8`` ``(C, H, W)``, resized and centre-cropped
    to ``size x size`` when ``size`` is given; a file that cannot be decoded raises
    :class:`UnreadableImage`."""

    def __init__(self, files: Sequence[Path], channels: int, hw: tuple[int, int], size: int | None) -> None:
        super().__init__(np.arange(len(files)), (channels, *(hw if size is None else (size, size))))
        self.files, self.channels, self.size = [str(f) for f in files], channels, size

    def _read(self, rows: np.ndarray) -> Tensor:
        if not len(rows):  # torch.stack refuses an empty list
            return torch.empty((0, *self.example_shape), dtype=torch.uint8)
        return torch.stack([self._decode(self.files[r]) for r in rows.tolist()])

    def _decode(self, file: str) -> Tensor:
        image_module = _pillow()
        try:
            with image_module.open(file) as image:
                image.load()  # the whole decode: a truncated or corrupt file fails here, not at open_path
        except (OSError, SyntaxError, ValueError) as error:
            reason = f"cannot decode the image ({error}); remove or replace the file"
            raise UnreadableImage(errno.EIO, reason, file) from None
        image = image.convert("L" if self.channels == 1 else "RGB")
        if self.size is not None:
            image = _fit(image, self.size, image_module)
        pixels = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, self.channels)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


@dataclass(repr=False)
class StreamingDataset(Dataset):
    """A :class:`~flows.data.Dataset` whose splits are read from disk on demand.

    ``train`` and ``test`` are :class:`Examples`. Training batches come through
    :meth:`loader`, whose ``workers`` processes read and dequantize them.

    Attributes:
        workers: worker processes of the training ``DataLoader`` (0: read in the main process).
        classes: the name of each class, ``classes[k]`` that of label ``k`` (an image folder's
            class subfolders), or ``None`` when the labels have no names or there are none.
    """

    workers: int = 2
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"{self.name}: workers must be an integer >= 0, got {self.workers!r}")
        if self.classes is not None and (self.num_classes is None or len(self.classes) < self.num_classes):
            labels = "no labels" if self.num_classes is None else f"labels of {self.num_classes} classes"
            raise ValueError(f"{self.name}: {len(self.classes)} class names for {labels}")

    def loader(
        self, batches: Iterable[Sequence[tuple[int, int]]], pin_memory: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Training batches ``(x, idx)``, one per item of ``batches``, read by a ``DataLoader``.

        Args:
            batches: per step, the ``(train position, noise seed)`` pairs of this rank's
                examples (a batch sampler: the caller decides the order and the shard).
            pin_memory: page-lock the batches (for a CUDA device).

        Returns:
            An iterator over the batches of a ``torch.utils.data.DataLoader``: the prepared
            examples ``(B, *shape)`` (float32, dequantized in the workers with
            :func:`prepare_examples`) and their train positions ``(B,)``.

        Raises:
            UnreadableImage: an image file of the batch cannot be decoded (raised here, in
                this process, whichever worker read it).
        """
        from torch.utils.data import DataLoader

        # A generator of its own: an iterator draws its workers' base seed from it, and from the
        # global one without it, which would shift the global random stream (a model's dropout,
        # i-ResNet's probes) once per session and break exact resumes. The noise is keyed per
        # example, so the workers' seeds decide nothing.
        loader = DataLoader(
            _Keyed(self), batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
            pin_memory=pin_memory, generator=torch.Generator(),
        )
        return _raising(loader)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, workers={self.workers})"


class _Keyed(torch.utils.data.Dataset):
    """Training examples by ``(position, seed)``, prepared with their own noise (in a worker)."""

    def __init__(self, data: StreamingDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.train)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int] | UnreadableImage:
        position, seed = item
        try:
            return prepare_examples(self.data, self.data.train[position][None], [seed])[0], position
        except UnreadableImage as error:
            # A worker's exception reaches the main process as its type and a formatted traceback,
            # which loses the one line; the error itself travels as the batch (see _raising).
            return error


def _collate(items: list[tuple[Tensor, int] | UnreadableImage]) -> Any:
    """The batch of ``items``, or the first unreadable image among them."""
    from torch.utils.data import default_collate

    for item in items:
        if isinstance(item, UnreadableImage):
            return item
    return default_collate(items)


def _raising(loader: Iterable[Any]) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches of ``loader``, raising in this process an unreadable image a worker read."""
    for batch in loader:
        if isinstance(batch, UnreadableImage):
            raise batch
        yield batch


def is_path(name: str) -> bool:
    """Whether a ``--data`` value names a file or folder rather than a built-in dataset."""
    return os.sep in name or name.endswith((".npy", ".npz")) or Path(name).exists()


def open_path(
    path: str | os.PathLike[str],
    image_size: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    workers: int = 2,
    labels: bool = False,
) -> StreamingDataset:
    """Open a folder of images, a ``.npy`` or an ``.npz`` file as a :class:`StreamingDataset`.

    Args:
        path: the folder or file.
        image_size: resize each image (shorter side) to this and crop the centre square;
            ``None`` keeps the images' own common size. Arrays ignore it.
        n_test: held-out examples when the data bring no test split (default: a tenth, at
            least 1).
        seed: the seed of that split.
        workers: worker processes of the training loader.
        labels: read class labels (``train_labels`` / ``test_labels``): a folder's class
            subfolders, or an ``.npz``'s label arrays (see the module docstring).

    Returns:
        The dataset, named by ``path``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: an empty folder, a file that is no image, images of several sizes
            without ``image_size``, an array of the wrong rank or dtype, a compressed
            ``.npz``, or a split that leaves no training example; with ``labels``: a folder
            without class subfolders or with an empty one, files beside the class folders,
            fewer than 2 classes, a ``.npy``, or label arrays missing, of the wrong length or
            not of integers (one line naming the fix).
        ImportError: Pillow is missing (for a folder of images).

    Example:
        >>> import numpy as np, tempfile, os
        >>> file = os.path.join(tempfile.mkdtemp(), "x.npz")
        >>> np.savez(file, x=np.zeros((10, 1, 4, 4), dtype=np.uint8), y=np.arange(10) % 2)
        >>> data = open_path(file, labels=True)
        >>> len(data.train), len(data.test), data.shape, data.n_levels, data.num_classes
        (9, 1, (1, 4, 4), 256, 2)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; give an image folder, a .npy or an .npz file")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"{path}: image_size must be an integer >= 1, got {image_size!r}")
    classes = None
    if path.is_dir():
        files, source_labels, classes = _class_folders(path) if labels else (_files(path), None, None)
        train, test, n_levels = _image_folder(path, files, image_size), None, 256
        train_labels, test_labels = source_labels, None
    elif path.suffix in (".npy", ".npz"):
        train, test, train_labels, test_labels = _arrays(path, labels)
        n_levels = 256 if train.dtype == np.uint8 else None
    else:
        raise ValueError(f"{path}: not a folder, .npy or .npz file; give one of those")
    if test is None:
        train, test = _split(path, train, n_test, seed)
        if train_labels is not None:
            # The labels of the source's rows, split as the examples are.
            train_labels, test_labels = train_labels[train.rows], train_labels[test.rows]
    labelled = {}
    if train_labels is not None:
        labelled = {"train_labels": torch.from_numpy(train_labels), "test_labels": torch.from_numpy(test_labels)}
    return StreamingDataset(
        str(path), train, test, n_levels, train.example_shape, **labelled, workers=workers, classes=classes
    )


def _split(path: Path, examples: Examples, n_test: int | None, seed: int) -> tuple[Examples, Examples]:
    n = len(examples)
    n_test = max(1, n // 10) if n_test is None else n_test
    if not 0 < n_test < n:
        raise ValueError(f"{path}: {n} examples cannot give {n_test} test examples and keep one to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    # Each split in file order: neighbouring rows of a memory map are read together.
    return examples.take(np.sort(perm[n_test:])), examples.take(np.sort(perm[:n_test]))


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading a folder of images needs Pillow: pip install pillow") from None
    return Image


def _visible(entry: Path, folder: Path) -> bool:
    """Whether ``entry`` (below ``folder``) is neither hidden nor inside a hidden folder."""
    # Only the parts below `folder`: a folder that itself lies under ~/.cache still counts.
    return not any(part.startswith(".") for part in entry.relative_to(folder).parts)


def _files(folder: Path) -> list[Path]:
    """The visible files of ``folder`` and its subfolders, sorted."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and _visible(f, folder))


def _class_folders(folder: Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """The image files of ``folder/<class>/``, the label of each (its class folder's index in
    sorted name order) and the class names."""
    entries = sorted((e for e in folder.iterdir() if _visible(e, folder)), key=lambda e: e.name)
    subfolders = [e for e in entries if e.is_dir()]
    loose = [e for e in entries if not e.is_dir()]
    if not subfolders:
        raise ValueError(
            f"{folder}: --conditional (labels=True) takes the classes from subfolders, {folder.name}/<class>/*.png, "
            "but it has none; put each class's images in a subfolder named after the class"
        )
    if loose:
        raise ValueError(
            f"{folder}: {len(loose)} file(s) ({loose[0].name}, ...) lie beside the class subfolders; move each "
            "into its class's subfolder or remove it"
        )
    if len(subfolders) < 2:
        raise ValueError(
            f"{folder}: one class subfolder ({subfolders[0].name}); a class-conditional model needs at least 2 "
            "classes, one subfolder each"
        )
    files, labels = [], []
    for label, subfolder in enumerate(subfolders):
        found = _files(subfolder)
        if not found:
            raise ValueError(
                f"{folder}: class folder {subfolder.name} holds no image files; add its images or remove the folder"
            )
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64), tuple(s.name for s in subfolders)


def _image_folder(folder: Path, files: list[Path], size: int | None) -> ImageExamples:
    image_module = _pillow()
    if not files:
        raise ValueError(f"{folder}: no image files in it; put PNG or JPEG images there (subfolders count too)")
    sizes, grey = {}, True
    for file in files:
        try:
            with image_module.open(file) as image:
                sizes.setdefault(image.size, file)
                grey = grey and image.mode in _GREY_MODES
        except (OSError, SyntaxError, ValueError):
            # Pillow raises UnidentifiedImageError (an OSError) for non-images, SyntaxError for some corrupt ones.
            raise ValueError(
                f"{folder}: {file.relative_to(folder)} is not an image Pillow can read; "
                "remove it or keep only images in the folder"
            ) from None
    if len(sizes) > 1 and size is None:
        (a, fa), (b, fb) = list(sizes.items())[:2]
        raise ValueError(
            f"{folder}: images of different sizes ({a[0]}x{a[1]} {fa.name}, {b[0]}x{b[1]} {fb.name}); give "
            "--image-size N (image_size=N) to resize and centre-crop them all to N x N"
        )
    width, height = next(iter(sizes))
    return ImageExamples(files, 1 if grey else 3, (height, width), size)


def _fit(image: Any, size: int, image_module: Any) -> Any:
    """Resize so that the shorter side is ``size``, then crop the centre ``size x size``."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), image_module.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


# The names an .npz member may take for each of its roles (numpy's and Keras's spellings).
_ROLES = {
    "train": ("train", "x", "images", "x_train"),
    "test": ("test", "x_test"),
    "train_labels": ("y", "labels", "train_labels", "y_train"),
    "test_labels": ("y_test", "test_labels"),
}
# How to turn any class values (strings, floats, sparse integers) into the labels 0..K-1.
_RENUMBER = "number the classes 0..K-1, e.g. np.unique(y, return_inverse=True)[1]"


def _arrays(
    path: Path, labels: bool
) -> tuple[ArrayExamples, ArrayExamples | None, np.ndarray | None, np.ndarray | None]:
    """The train array, the test array (``None`` when the file holds no test split) and, with
    ``labels``, the label arrays of both (the test one ``None`` with the test split)."""
    if path.suffix == ".npy":
        if labels:
            raise ValueError(
                f"{path}: a .npy file holds no labels for --conditional (labels=True); save images and labels "
                "together: np.savez(file.npz, x=images, y=labels)"
            )
        return _array(path, path, 0), None, None, None
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy"): archive.getinfo(name) for name in archive.namelist()}
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path}: not a readable .npz archive ({error}); write it again (np.savez)") from None
    roles = _roles(path, members)
    if "train" not in roles:
        if len(members) != 1:
            raise ValueError(
                f"{path}: holds arrays {', '.join(sorted(members))}; name them x and y (labels), or train and "
                "test (np.savez(path, x=..., y=...)), or keep a single array"
            )
        roles = {"train": next(iter(members))}
    arrays = [
        _array(path, f"{path} [{roles[split]}]", _member_offset(path, members[roles[split]]))
        for split in ("train", "test")
        if split in roles
    ]
    if len(arrays) == 2 and arrays[0].example_shape != arrays[1].example_shape:
        raise ValueError(
            f"{path}: train examples have shape {arrays[0].example_shape} but test examples "
            f"{arrays[1].example_shape}; give both splits one shape"
        )
    train, test = arrays[0], arrays[1] if len(arrays) == 2 else None
    if not labels:
        return train, test, None, None
    if "train_labels" not in roles:
        raise ValueError(
            f"{path}: holds no label array for --conditional (labels=True); save the labels beside the images: "
            "np.savez(file, x=images, y=labels)"
        )
    if ("test" in roles) != ("test_labels" in roles):
        given, missing = ("test", "y_test") if "test" in roles else ("test_labels", "x_test")
        raise ValueError(
            f"{path}: holds {roles[given]} but no {missing}; give the test split both its examples and its labels "
            "(x_test, y_test), or neither"
        )
    train_labels = _labels(path, roles["train_labels"], roles["train"], len(train))
    test_labels = None if test is None else _labels(path, roles["test_labels"], roles["test"], len(test))
    every = train_labels if test_labels is None else np.concatenate([train_labels, test_labels])
    values = np.unique(every)
    if len(values) < 2:
        raise ValueError(f"{path}: every label is {values[0]}; a class-conditional model needs at least 2 classes")
    if values[-1] >= len(every):
        raise ValueError(f"{path}: labels up to {values[-1]} for {len(every)} examples; {_RENUMBER}")
    return train, test, train_labels, test_labels


def _roles(path: Path, members: Iterable[str]) -> dict[str, str]:
    """The member of an ``.npz`` that plays each role of :data:`_ROLES` (absent roles left out)."""
    roles = {}
    for role, names in _ROLES.items():
        found = [name for name in names if name in members]
        if len(found) > 1:
            raise ValueError(f"{path}: holds both {found[0]} and {found[1]} (the same role); keep one of them")
        if found:
            roles[role] = found[0]
    return roles


def _labels(path: Path, member: str, examples: str, n: int) -> np.ndarray:
    """The label array ``member`` of an ``.npz``, checked: ``n`` integers ``>= 0``."""
    what = f"{path} [{member}]"
    with np.load(path, allow_pickle=False) as archive:
        try:
            y = archive[member]
        except ValueError:  # an object array, which allow_pickle=False refuses
            raise ValueError(f"{what}: holds Python objects; save the labels as integers ({_RENUMBER})") from None
    if y.ndim != 1:
        one_hot = " (one-hot labels: y.argmax(1))" if y.ndim == 2 else ""
        raise ValueError(f"{what}: labels must have shape (N,), one class per example, got {y.shape}{one_hot}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{what}: labels must be integers, got {y.dtype}; {_RENUMBER}")
    if len(y) != n:
        raise ValueError(f"{what}: {len(y)} labels for the {n} examples of {examples}; give one label per example")
    if n and y.min() < 0:
        raise ValueError(f"{what}: labels must be >= 0, got {y.min()}; {_RENUMBER}")
    return y.astype(np.int64)


def _member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where an ``.npz`` member's ``.npy`` bytes start in the file (members are stored whole)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(
            f"{path}: {info.filename} is compressed and cannot be memory-mapped; save it with np.savez "
            "(not np.savez_compressed) or as a .npy file"
        )
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the zip local file header; its last 4 bytes give two lengths
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _array(path: Path, what: Path | str, start: int) -> ArrayExamples:
    """The ``.npy`` array whose bytes start at ``start`` of ``path``, checked and mapped."""
    with open(path, "rb") as f:
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as error:
            raise ValueError(f"{what}: not a readable .npy array ({error})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{what}: holds Python objects, which cannot be memory-mapped; save a numeric array")
    if len(shape) not in (2, 4):
        raise ValueError(
            f"{what}: an array of shape {tuple(shape)} (rank {len(shape)}); give (N, C, H, W) images or (N, D) "
            "vectors (grey (N, H, W) images take a channel axis: x[:, None])"
        )
    if len(shape) == 4 and dtype != np.uint8:
        raise ValueError(f"{what}: images must be uint8 levels 0..255, got {dtype}; convert with x.astype(np.uint8)")
    if len(shape) == 2 and dtype.kind != "f":
        raise ValueError(f"{what}: vectors must be floating point, got {dtype}; convert with x.astype(np.float32)")
    if shape[0] == 0:
        raise ValueError(f"{what}: holds no examples (shape {tuple(shape)})")
    size, needed = os.path.getsize(path), math.prod(shape) * dtype.itemsize
    if offset + needed > size:
        # Truncated (an interrupted copy or save): mapping it fails at the first batch reaching the end.
        raise ValueError(
            f"{what}: truncated: its header says {tuple(shape)} {dtype} ({needed} bytes) "
            f"but the file holds {size - offset} after the header; write it again (np.save / np.savez)"
        )
    examples = ArrayExamples(path, offset, dtype, tuple(shape), fortran)
    if dtype.kind == "f":
        _check_finite(examples._array(), what)
    return examples


_SCAN_ROWS = 1 << 16


def _check_finite(array: np.ndarray, what: Path | str) -> None:
    """Refuse vectors holding NaN or inf, named by row, when the file is opened (training would
    stop on a non-finite loss at the first batch drawing one, far from the cause); the memory
    map is read in chunks, never whole."""
    bad = np.concatenate([
        start + np.flatnonzero(~np.isfinite(array[start : start + _SCAN_ROWS]).all(axis=1))
        for start in range(0, len(array), _SCAN_ROWS)
    ])
    if len(bad):
        first = ", ".join(map(str, bad[:5].tolist())) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"{what}: {len(bad)} of {len(array)} rows hold NaN or inf (rows {first}); drop them "
            "(x = x[np.isfinite(x).all(axis=1)]) or fill them before training"
        )


__all__ = [
    "ArrayExamples",
    "Examples",
    "ImageExamples",
    "StreamingDataset",
    "UnreadableImage",
    "example_seed",
    "is_path",
    "open_path",
    "prepare_examples",
]
