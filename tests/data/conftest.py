"""A small text corpus: a few Python-like documents, in a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

TEXTS = {
    "a.py": "def add(a, b):\n    return a + b\n\n" * 30,
    "b.py": "class Point:\n    x: int = 0\n    y: int = 0\n" * 30,
    "sub/c.py": "for i in range(10):\n    print(i, 'café')\n" * 30,
}


def write_corpus(directory: Path, texts: dict[str, str] = TEXTS) -> Path:
    for name, text in texts.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")
