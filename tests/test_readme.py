"""The README's code examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_example():
    assert _python_blocks(), "README.md lost its python example"


def test_readme_python_examples_run():
    for block in _python_blocks():
        scope: dict = {}
        exec(compile(block, str(README), "exec"), scope)
        # the example's loop leaves a balanced gradient on the encoder and weights per task
        assert scope["weights"].shape == (3,)
        assert all(
            p.grad is not None and torch.isfinite(p.grad).all()
            for p in scope["encoder"].parameters()
        )
