"""Runs every ```python block of the docs, so that the documented examples cannot drift from the code.

The blocks of one Markdown file run in order in one shared namespace, the way a reader would paste them into a
session: a later block may use names an earlier one defined. Each file is one test case. Blocks fenced as ``bash`` or
``text`` are shown, not run; any other fence (a bare one, ``py``, a typo) fails the test, so that no example is
skipped by accident. Errors point at the Markdown file and line, because each block is compiled under the file's
name with its original line numbers.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC_FILES = ("method_card.md", "api.md", "metrics.md", "models.md", "deployment.md")
RUNNABLE = "python"
SHOWN_ONLY = frozenset({"bash", "text", "yaml"})
OPENING_FENCE = re.compile(r"^```(\S*)\s*$")
CLOSING_FENCE = "```"


def extract_blocks(markdown: str, source: str = "<markdown>") -> list[tuple[int, str]]:
    """Returns ``(first line number, code)`` for each ```python block of ``markdown``, in order.

    Raises:
        ValueError: on a fence whose language is neither runnable nor known to be shown only, or an unclosed fence.
    """
    blocks: list[tuple[int, str]] = []
    language: str | None = None
    start = 0
    body: list[str] = []
    for number, line in enumerate(markdown.splitlines(), start=1):
        if language is None:
            match = OPENING_FENCE.match(line)
            if match is None:
                continue
            language = match.group(1)
            if language != RUNNABLE and language not in SHOWN_ONLY:
                allowed = ", ".join(sorted({RUNNABLE, *SHOWN_ONLY}))
                raise ValueError(f"{source}:{number}: fence language {language!r} is not one of {allowed}")
            start, body = number + 1, []
        elif line.rstrip() == CLOSING_FENCE:
            if language == RUNNABLE:
                blocks.append((start, "\n".join(body)))
            language = None
        else:
            body.append(line)
    if language is not None:
        raise ValueError(f"{source}:{start - 1}: ```{language} block is never closed")
    return blocks


def test_extract_blocks_keeps_python_skips_shown_and_rejects_unknown():
    markdown = "intro\n```python\nx = 1\n```\n```bash\nrm -rf /\n```\n\n```python\ny = x + 1\n```\n"
    assert extract_blocks(markdown) == [(3, "x = 1"), (10, "y = x + 1")]
    with pytest.raises(ValueError, match="'py'"):
        extract_blocks("```py\nx = 1\n```\n")
    with pytest.raises(ValueError, match="''"):
        extract_blocks("```\nx = 1\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        extract_blocks("```python\nx = 1\n")


@pytest.mark.parametrize("name", DOC_FILES)
def test_doc_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = DOCS / name
    blocks = extract_blocks(path.read_text(encoding="utf-8"), str(path))
    assert blocks, f"{path} has no ```python block to run"
    # Whatever the examples write (checkpoints, temporary folders) lands in this test's own folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # The examples' tensors are tiny; on a busy machine, OpenMP threads cost far more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    try:
        for start, code in blocks:
            # Leading newlines keep the Markdown line numbers, so a failure names the documented line.
            exec(compile("\n" * (start - 1) + code, str(path), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_recipes_page_documents_every_schema_key_and_recipe():
    from blurpool_algo.recipe import DataConfig, ModelConfig, OptimizerConfig, Recipe, SchedulerConfig

    page = (DOCS / "recipes.md").read_text()
    nested = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "scheduler": SchedulerConfig}
    keys = [f.name for f in dataclasses.fields(Recipe) if f.name not in nested]
    keys += [f"{section}.{f.name}" for section, cls in nested.items() for f in dataclasses.fields(cls)]
    missing = [key for key in keys if f"`{key}`" not in page and f"`{key.split('.')[-1]}`" not in page]
    assert not missing, f"docs/recipes.md does not mention {missing}"
    recipes = sorted(p.name for p in (DOCS.parent / "yamls").glob("*.yaml"))
    assert recipes and all(name in page for name in recipes)
