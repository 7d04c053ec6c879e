"""``argparse`` types of the command line and the experiment scripts: a number out of its
range is one usage line (``argument --repeats: must be at least 1, got 0``), never a silent
default or a traceback after the work."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def integer(least: int, most: int | None = None) -> Callable[[str], int]:
    """An ``argparse`` type: an integer in ``[least, most]``.

    Example:
        >>> integer(1)("3"), integer(1).__name__
        (3, 'integer >= 1')
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {value}")
        return value

    parse.__name__ = f"integer >= {least}"
    return parse


SEED_MAX = 2**32 - 1
"""The largest seed every generator a run seeds takes (numpy's legacy ``np.random.seed`` stops at
``2**32 - 1``; torch's take more)."""


def seed() -> Callable[[str], int]:
    """An ``argparse`` type: a random seed in ``[0, 2**32 - 1]``, which torch's and numpy's
    generators all accept (a negative or larger one failed deep inside ``np.random.seed`` or
    ``torch.manual_seed`` with a traceback).

    Example:
        >>> seed()("7"), seed().__name__
        (7, 'seed')
    """
    parse = integer(0, SEED_MAX)
    parse.__name__ = "seed"
    return parse


def number(least: float, strict: bool = False, below: float | None = None) -> Callable[[str], float]:
    """An ``argparse`` type: a finite number ``>= least`` (``> least`` if ``strict``), and ``< below``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if value < least or (strict and value == least) or (below is not None and value >= below):
            low = f"> {least:g}" if strict else f">= {least:g}"
            raise argparse.ArgumentTypeError(
                f"must be {low}{f' and < {below:g}' if below is not None else ''}, got {value:g}"
            )
        return value

    return parse


def checked_default(parser: argparse.ArgumentParser, option: str, check: Callable[[str], T], value: object) -> T:
    """``check(str(value))`` for an option's default computed after parsing (it depends on other
    options), refused as a given value would be: one usage line ``OPTION (default): why``.

    Example:
        >>> checked_default(argparse.ArgumentParser(), "--repeats", integer(1), 3)
        3
    """
    try:
        return check(str(value))
    except argparse.ArgumentTypeError as error:
        parser.error(f"{option} (default): {error}")
