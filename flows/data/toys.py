"""Two-dimensional toy densities, generated from a seed.

Each generator draws ``n`` points with a numpy ``Generator``; :func:`toy` splits them into
train and test and standardises both with the training split's mean and scale (one scalar
scale, so shapes keep their aspect ratio) to roughly unit scale.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from flows.data.dataset import Dataset


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved half circles."""
    upper = rng.random(n) < 0.5
    t = rng.uniform(0.0, np.pi, n)
    x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return np.stack([x, y], 1) + rng.normal(0.0, 0.06, (n, 2))


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two concentric rings of radii 1 and 0.5."""
    radius = np.where(rng.random(n) < 0.5, 1.0, 0.5)
    t = rng.uniform(0.0, 2 * np.pi, n)
    points = radius[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    return points + rng.normal(0.0, 0.04, (n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform on the 8 dark squares of a 4x4 board covering ``[-2, 2]^2``."""
    dark = np.array([(r, c) for r in range(4) for c in range(4) if (r + c) % 2 == 0])
    square = dark[rng.integers(0, len(dark), n)]
    return square[:, ::-1] - 2.0 + rng.random((n, 2))


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """Eight isotropic Gaussians evenly spaced on a circle of radius 2."""
    angle = rng.integers(0, 8, n) * (np.pi / 4)
    centres = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
    return centres + rng.normal(0.0, 0.15, (n, 2))


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    """Five curved arms: Gaussian blobs sheared by a rotation growing with radius."""
    arms = 5
    arm = rng.integers(0, arms, n)
    radial = rng.normal(1.0, 0.3, n)
    tangential = rng.normal(0.0, 0.08, n)
    # The rotation grows with distance from the centre, which bends each blob into an arm.
    angle = 2 * np.pi * arm / arms + 0.25 * np.exp(radial)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * radial - s * tangential, s * radial + c * tangential], 1)


def _spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved Archimedean spirals."""
    # sqrt spreads points evenly along the arc length rather than the angle.
    t = np.sqrt(rng.random(n)) * 3 * np.pi
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    points = sign[:, None] * t[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    return points / (3 * np.pi) + rng.normal(0.0, 0.03, (n, 2))


TOYS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "moons": _moons,
    "circles": _circles,
    "checkerboard": _checkerboard,
    "eight-gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "spirals": _spirals,
}


def toy(name: str, n_train: int = 20000, n_test: int = 5000, seed: int = 0) -> Dataset:
    """A 2D toy density as a :class:`Dataset` of ``(N, 2)`` float32 points.

    Args:
        name: one of ``moons``, ``circles``, ``checkerboard``, ``eight-gaussians``,
            ``pinwheel``, ``spirals``.
        n_train: the number of training points.
        n_test: the number of test points.
        seed: the generator's seed; the same seed gives the same points.

    Returns:
        A continuous :class:`Dataset` (``n_levels=None``) of shape ``(2,)``, standardised
        with the training split's mean and a single scale.

    Example:
        >>> data = toy("moons", n_train=100, n_test=10)
        >>> tuple(data.train.shape), data.n_levels
        ((100, 2), None)
    """
    if name not in TOYS:
        raise ValueError(f"unknown 2D toy {name!r}; choose one of {', '.join(TOYS)}")
    if n_train < 2 or n_test < 1:
        raise ValueError(f"{name}: need n_train >= 2 and n_test >= 1, got {n_train}, {n_test}")
    points = TOYS[name](n_train + n_test, np.random.default_rng(seed))
    train, test = points[:n_train], points[n_train:]
    mean = train.mean(0)
    scale = np.sqrt(((train - mean) ** 2).mean())
    train, test = (train - mean) / scale, (test - mean) / scale
    return Dataset(name, _as_tensor(train), _as_tensor(test), None, (2,))


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _make(name: str) -> Callable[..., Dataset]:
    def generator(n_train: int = 20000, n_test: int = 5000, seed: int = 0) -> Dataset:
        return toy(name, n_train=n_train, n_test=n_test, seed=seed)

    generator.__name__ = name.replace("-", "_")
    generator.__doc__ = f"The {name} 2D toy density; see :func:`toy` for the arguments."
    return generator


moons = _make("moons")
circles = _make("circles")
checkerboard = _make("checkerboard")
eight_gaussians = _make("eight-gaussians")
pinwheel = _make("pinwheel")
spirals = _make("spirals")
