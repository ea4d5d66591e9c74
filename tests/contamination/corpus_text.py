"""Realistic offline text for contamination measurements: docstrings of the installed Python's standard library.

Test items and unrelated documents come from disjoint sets of modules (technical English with
shared phrasing, the hard case for false positives); light edits are what a copy of a test item
in a scraped corpus typically shows: words swapped or dropped, case and punctuation changed.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from collections.abc import Iterable
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}


def stdlib_files() -> list[Path]:
    """Return the standard library's Python files, sorted, without test suites and demos."""
    return sorted(p for p in STDLIB.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(STDLIB).parts[:-1]))


def paragraphs(files: Iterable[Path], min_words: int = 8) -> list[str]:
    """Return the distinct docstring paragraphs (whitespace collapsed) of ``files`` with at least ``min_words``."""
    seen: dict[str, None] = {}
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                for para in re.split(r"\n\s*\n", doc or ""):
                    words = para.split()
                    if len(words) >= min_words:
                        seen.setdefault(" ".join(words), None)
    return list(seen)


def split_modules(files: list[Path], test_share: float = 0.2) -> tuple[list[Path], list[Path]]:
    """Split files by top-level module (every file of a package on one side): (test side, corpus side)."""
    tops = sorted({f.relative_to(STDLIB).parts[0].removesuffix(".py") for f in files})
    rng = random.Random(1234)
    test_tops = set(rng.sample(tops, max(1, round(test_share * len(tops)))))
    test = [f for f in files if f.relative_to(STDLIB).parts[0].removesuffix(".py") in test_tops]
    return test, [f for f in files if f not in set(test)]


def documents(paras: list[str], words_per_doc: int) -> list[str]:
    """Cut the concatenated paragraphs into documents of ``words_per_doc`` words."""
    words = " ".join(paras).split()
    return [" ".join(words[i : i + words_per_doc]) for i in range(0, len(words) - words_per_doc + 1, words_per_doc)]


def light_edit(text: str, rng: random.Random, rate: float = 0.1, ops: tuple[str, ...] | None = None) -> str:
    """Apply ``rate`` × words (at least one) random edits: swap or drop words, change case or punctuation."""
    words = text.split()
    kinds = ops or ("swap", "delete", "case", "punct")
    for _ in range(max(1, round(rate * len(words)))):
        if len(words) < 3:
            break
        i = rng.randrange(len(words) - 1)
        kind = rng.choice(kinds)
        if kind == "swap":
            words[i], words[i + 1] = words[i + 1], words[i]
        elif kind == "delete":
            del words[i]
        elif kind == "case":
            words[i] = words[i].upper() if rng.random() < 0.5 else words[i].capitalize()
        else:
            stripped = words[i].strip(".,;:!?\"'()")
            words[i] = stripped + rng.choice([",", ".", ";", " -", "!"]) if stripped == words[i] else stripped
    return " ".join(words)


def insert(item: str, host: str, rng: random.Random) -> str:
    """Return ``host`` with ``item`` inserted at a random word boundary."""
    words = host.split()
    at = rng.randrange(len(words) + 1)
    return " ".join([*words[:at], item, *words[at:]])
