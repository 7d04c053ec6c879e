"""The dataset record shared by every loader, and uniform dequantization."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def dequantize(x: Tensor, n_levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of integer levels to floats in ``[0, 1)``.

    ``y = (x + u) / n_levels`` with ``u ~ U[0, 1)`` drawn independently per element. A
    continuous density ``p`` on ``[0, 1)^D`` then bounds the discrete log-likelihood from
    below: ``log P(x) >= E_u[log p(y)] - D log(n_levels)`` (Theis et al., 2016).

    Args:
        x: integer levels in ``{0, ..., n_levels - 1}``, any shape (e.g. ``(B, C, H, W)``).
        n_levels: the number of discrete levels (17 for digits, 256 for 8-bit images).
        generator: optional random generator for the noise (reproducible batches).

    Returns:
        A float32 tensor of ``x``'s shape with values in ``[0, 1)``.

    Example:
        >>> import torch
        >>> y = dequantize(torch.tensor([0, 16]), 17)
        >>> bool(((y >= 0) & (y < 1)).all())
        True
    """
    if n_levels < 2:
        raise ValueError(f"dequantize: n_levels must be at least 2, got {n_levels}")
    x = x.to(torch.float32)
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + noise) / n_levels


@dataclass
class Dataset:
    """A train/test pair of tensors and what they hold.

    Attributes:
        name: the dataset's name, as accepted by :func:`flows.data.load`.
        train: training examples, ``(N, *shape)``; ``uint8`` levels for discrete data,
            ``float32`` values for continuous data.
        test: held-out examples, ``(M, *shape)``, same dtype as ``train``.
        n_levels: the number of discrete levels per element (17 for digits, 256 for 8-bit
            images), or ``None`` for continuous data such as the 2D toys.
        shape: the shape of one example, ``(C, H, W)`` for images or ``(D,)`` for vectors.
        train_labels: the class of each training example, an ``int64`` tensor ``(N,)``
            aligned with ``train`` (``train_labels[i]`` is the class of ``train[i]``), or
            ``None`` when the data have no classes (the 2D toys) or the loader found none.
        test_labels: the class of each test example, ``int64`` ``(M,)`` aligned with
            ``test``; given exactly when ``train_labels`` is.
        train_context: what each training example is conditioned on, a floating-point
            tensor ``(N, C)`` aligned with ``train`` (``train_context[i]`` goes with
            ``train[i]``), for conditional density estimation ``p(x | c)``; ``None`` for
            unconditional data. The conditional datasets of :mod:`flows.data.conditional`
            carry one.
        test_context: the context of each test example, ``(M, C)``; given exactly when
            ``train_context`` is, with the same ``C`` and dtype.

    Raises:
        ValueError: an example shape differs from ``shape``, or the labels are not ``int64``
            tensors of shape ``(N,)`` / ``(M,)``, or the contexts are not floating-point
            tensors of shape ``(N, C)`` / ``(M, C)``, or only one split has labels (a context).

    Example:
        >>> import torch
        >>> d = Dataset("tiny", torch.zeros(3, 2), torch.zeros(1, 2), None, (2,),
        ...             train_labels=torch.tensor([0, 1, 1]), test_labels=torch.tensor([0]))
        >>> d.train_labels.tolist(), d.test_labels.tolist()
        ([0, 1, 1], [0])
    """

    name: str
    train: Tensor
    test: Tensor
    n_levels: int | None
    shape: tuple[int, ...]
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    train_context: Tensor | None = None
    test_context: Tensor | None = None

    def __post_init__(self) -> None:
        for split, tensor in (("train", self.train), ("test", self.test)):
            if tuple(tensor.shape[1:]) != tuple(self.shape):
                raise ValueError(
                    f"Dataset {self.name!r}: {split} examples have shape "
                    f"{tuple(tensor.shape[1:])}, expected {tuple(self.shape)}"
                )
        self._check_aligned(
            "labels",
            lambda t: t.dtype == torch.int64 and t.dim() == 1,
            lambda n: f"an int64 tensor of shape ({n},)",
            "",
        )
        self._check_aligned(
            "context",
            lambda t: t.is_floating_point() and t.dim() == 2,
            lambda n: f"a floating-point tensor of shape ({n}, C)",
            " rows",
        )
        if self.train_context is not None and self.test_context is not None:
            a, b = self.train_context, self.test_context
            if a.shape[1] != b.shape[1] or a.dtype != b.dtype:
                raise ValueError(
                    f"Dataset {self.name!r}: train_context is {a.dtype} (N, {a.shape[1]}) but test_context is "
                    f"{b.dtype} (M, {b.shape[1]}); both splits need the same context features and dtype"
                )

    def _check_aligned(
        self, kind: str, valid: Callable[[Tensor], bool], expected: Callable[[int], str], rows: str
    ) -> None:
        """``train_<kind>`` and ``test_<kind>``: both or neither, each ``valid`` and one entry
        per example of its split."""
        train, test = getattr(self, f"train_{kind}"), getattr(self, f"test_{kind}")
        if (train is None) != (test is None):
            given, missing = (f"train_{kind}", f"test_{kind}") if test is None else (f"test_{kind}", f"train_{kind}")
            raise ValueError(f"Dataset {self.name!r}: {given} given without {missing}; pass both or neither")
        for split, examples, values in (("train", self.train, train), ("test", self.test, test)):
            if values is None:
                continue
            if not isinstance(values, Tensor) or not valid(values):
                described = (
                    f"a {values.dtype} tensor of shape {tuple(values.shape)}"
                    if isinstance(values, Tensor)
                    else f"a {type(values).__name__}"
                )
                raise ValueError(
                    f"Dataset {self.name!r}: {split}_{kind} must be {expected(len(examples))}, got {described}"
                )
            if len(values) != len(examples):
                raise ValueError(
                    f"Dataset {self.name!r}: {len(values)} {split}_{kind}{rows} for "
                    f"{len(examples)} {split} examples"
                )

    @property
    def context_features(self) -> int | None:
        """The size ``C`` of one example's context vector, or ``None`` without a context."""
        return None if self.train_context is None else int(self.train_context.shape[1])

    @property
    def num_classes(self) -> int | None:
        """The number of classes (the largest label + 1 over both splits), or ``None`` without labels."""
        if self.train_labels is None or self.test_labels is None:
            return None
        labels = torch.cat([self.train_labels, self.test_labels])
        return int(labels.max()) + 1 if labels.numel() else None

    @property
    def discrete(self) -> bool:
        """Whether the data are integer levels that need dequantization."""
        return self.n_levels is not None

    @property
    def dim(self) -> int:
        """The number of elements of one example (``C * H * W`` or ``D``)."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def prepare(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Turn stored examples into model inputs.

        Discrete data are dequantized to ``[0, 1)`` with :func:`dequantize`; continuous
        data are returned as float32.

        Args:
            x: examples ``(B, *shape)`` taken from ``train`` or ``test``.
            generator: optional random generator for the dequantization noise.

        Returns:
            A float32 tensor ``(B, *shape)``.
        """
        if self.n_levels is None:
            return x.to(torch.float32)
        return dequantize(x, self.n_levels, generator=generator)

    def __repr__(self) -> str:
        levels = "continuous" if self.n_levels is None else f"n_levels={self.n_levels}"
        context = "" if self.context_features is None else f", context_features={self.context_features}"
        return (
            f"Dataset({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"shape={tuple(self.shape)}, {levels}{context})"
        )
