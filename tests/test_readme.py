"""The README's Python examples run, in order, in one namespace (as a reader pastes them).

Training lengths are shortened (``steps=1500`` / ``steps=500`` become 3 steps) so the
examples run in seconds; everything else is as printed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples() -> None:
    assert len(_examples()) >= 8


def test_the_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # anything an example writes lands here
    namespace: dict = {}
    for block in _examples():
        code = re.sub(r"\bsteps=(1500|500)\b", "steps=3", block)
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
